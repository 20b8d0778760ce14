"""Guest RAM as a memfd that other OS processes map: a real second process (python, the fd passed
with pass_fds or opened from /proc/<pid>/fd) sees and makes the same stores."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hclsim.boot.layout import BootParams
from hclsim.config import BootConfig
from hclsim.cpu import ram_pages
from hclsim.cpu.memory import ENV_KIND, MEMFD_NAME, SCRUB_LIMIT, GuestMemory, GuestMemoryError
from hclsim.machine import Machine

MiB = 1 << 20
PATTERN = bytes(range(256)) * 16          # one page


def _child(script: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


CHILD = """
import sys
from hclsim.cpu.memory import GuestMemory
fd, size = int(sys.argv[1]), int(sys.argv[2])
mem = GuestMemory.attach(fd, size)
assert mem.read(0x1234, 11) == b"from parent", mem.read(0x1234, 11)
mem.write(0x200000, bytes(range(256)) * 16)      # a page the parent never touched
mem.write(size - 4, b"last")
print("written", flush=True)
assert sys.stdin.readline() == "go\\n"
assert mem.read(0x300000, 5) == b"reply", mem.read(0x300000, 5)   # stored after we mapped it
assert mem.read(0x200000, 4096) == bytes(4096) and mem.read(size - 4, 4) == bytes(4)  # parent's reset()
mem.close()
print("checked", flush=True)
"""


def test_a_second_process_maps_the_same_ram():
    mem = GuestMemory(64 * MiB)
    assert os.readlink(f"/proc/self/fd/{mem.fd}").startswith(f"/memfd:{MEMFD_NAME}")
    mem.write(0x1234, b"from parent")
    child = _child(CHILD, mem.fd, mem.size, pass_fds=[mem.fd])
    try:
        assert child.stdout.readline() == "written\n", child.stderr.read()
        # mincore sees the memfd's page cache: the child's pages, though this process never
        # touched them, and data_runs reads them through our mapping
        assert ram_pages.data_runs(mem) == [(0x1000, 0x1000), (0x200000, 0x1000), (mem.size - 4096, 4096)]
        assert mem.read(0x200000, 4096) == PATTERN and mem.read(mem.size - 4, 4) == b"last"
        mem.reset()                              # the child's pages go too
        mem.write(0x300000, b"reply")
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "checked\n", child.stderr.read()
        assert child.wait(30) == 0
    finally:
        child.kill()
        child.wait()
        mem.close()


def test_a_process_opens_the_ram_by_its_proc_path():
    mem = GuestMemory(4 * MiB)
    mem.write(0x10, b"by path")
    child = _child("""
        import os, sys
        from hclsim.cpu.memory import GuestMemory
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
        mem = GuestMemory.attach(fd, int(sys.argv[2]))
        os.close(fd)                     # attach keeps its own dup
        print(mem.read(0x10, 7).decode())
        mem.write(0x20, b"seen")
    """, f"/proc/{os.getpid()}/fd/{mem.fd}", mem.size)      # no fd inherited
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out == "by path\n" and mem.read(0x20, 4) == b"seen"
    mem.close()


def test_a_process_receives_the_fd_over_a_unix_socket():
    mem = GuestMemory(4 * MiB)
    mem.write(0x30, b"by socket")
    ours, theirs = socket.socketpair()
    child = _child("""
        import socket, sys
        from hclsim.cpu.memory import GuestMemory
        sock = socket.socket(fileno=int(sys.argv[1]))
        _, (fd,), _, _ = socket.recv_fds(sock, 16, 1)
        print(GuestMemory.attach(fd, int(sys.argv[2])).read(0x30, 9).decode())
    """, theirs.fileno(), mem.size, pass_fds=[theirs.fileno()])
    theirs.close()
    socket.send_fds(ours, [b"ram"], [mem.fd])
    out, err = child.communicate(timeout=30)
    ours.close()
    assert child.returncode == 0, err
    assert out == "by socket\n"
    mem.close()


def test_reset_zeroes_a_few_pages_in_place_and_keeps_them():
    """Up to SCRUB_LIMIT of allocated pages: zeroed, still allocated (the next boot of a pooled
    machine touches them again without a shmem fault each)."""
    mem = GuestMemory(64 * MiB)
    other = GuestMemory.attach(mem.fd, mem.size)           # a second mapping of the same pages
    mem.array(0, 16 * MiB)[:] = 0xA5
    assert other.read(16 * MiB - 1, 1) == b"\xa5"
    mem.reset()
    assert os.fstat(mem.fd).st_blocks * 512 >= 16 * MiB    # kept
    assert ram_pages.data_runs(mem) == []
    assert not mem.array(0, 16 * MiB).any() and not other.array(0, 16 * MiB).any()
    other.close()
    mem.close()


def test_reset_frees_the_memfd_beyond_the_scrub_limit():
    mem = GuestMemory(SCRUB_LIMIT + 32 * MiB)
    other = GuestMemory.attach(mem.fd, mem.size)
    before = _status_kib("RssShmem")
    mem.array(0, SCRUB_LIMIT + 16 * MiB)[:] = 0xA5
    assert os.fstat(mem.fd).st_blocks * 512 >= SCRUB_LIMIT + 16 * MiB
    assert _status_kib("RssShmem") - before >= (SCRUB_LIMIT >> 10)
    dirty = _status_kib("RssShmem")
    mem.reset()
    # MADV_DONTNEED would only have dropped our PTEs: the page cache, and `other`, would keep 0xA5
    assert os.fstat(mem.fd).st_blocks == 0
    assert dirty - _status_kib("RssShmem") >= (SCRUB_LIMIT >> 10)
    assert ram_pages.data_runs(mem) == []
    assert not mem.array(0, 16 * MiB).any() and not other.array(0, 16 * MiB).any()
    other.close()
    mem.close()


def test_private_ram_still_resets_and_has_no_fd(monkeypatch):
    mem = GuestMemory(4 * MiB, shared=False)
    mem.write(0x1000, b"x")
    mem.reset()
    assert mem.read(0x1000, 1) == b"\0" and not mem.shared
    with pytest.raises(GuestMemoryError, match="private guest RAM has no fd"):
        mem.fd
    monkeypatch.setenv(ENV_KIND, "private")
    assert not GuestMemory(4096).shared
    monkeypatch.setenv(ENV_KIND, "sharde")
    with pytest.raises(GuestMemoryError, match="must be 'shared' or 'private'"):
        GuestMemory(4096)


def test_attach_refuses_what_is_not_this_ram(tmp_path):
    mem = GuestMemory(4 * MiB)
    plain = tmp_path / "ram"
    plain.write_bytes(bytes(4 * MiB))
    read_fd, write_fd = os.pipe()
    file_fd = os.open(plain, os.O_RDWR)
    ro_fd = os.open(f"/proc/self/fd/{mem.fd}", os.O_RDONLY)
    closed_fd = os.dup(mem.fd)
    os.close(closed_fd)
    try:
        cases = [((mem.fd, 8 * MiB), r"holds 0x400000 bytes, not 0x800000"),
                 ((mem.fd, 100), r"positive multiple of 4 KiB"),
                 ((read_fd, 4 * MiB), r"fd \d+ is pipe:\[\d+\], not a memfd"),
                 ((file_fd, 4 * MiB), r"not a memfd"),
                 ((ro_fd, 4 * MiB), r"is not open read-write"),
                 ((closed_fd, 4 * MiB), r"Bad file descriptor")]
        for args, message in cases:
            with pytest.raises(GuestMemoryError, match=message) as info:
                GuestMemory.attach(*args)
            assert str(info.value).count("\n") == 0
    finally:
        for fd in (read_fd, write_fd, file_fd, ro_fd):
            os.close(fd)
        mem.close()


def test_large_ram_commits_nothing_and_too_large_is_one_clear_error():
    before = _status_kib("VmRSS")
    big = GuestMemory(64 << 30)               # more than most hosts have: nothing is committed
    big.write(63 << 30, b"x")
    assert os.fstat(big.fd).st_blocks * 512 <= 2 * MiB
    assert _status_kib("VmRSS") - before < 16 * 1024
    big.close()
    with pytest.raises(GuestMemoryError, match=r"cannot be mapped on this host: Cannot allocate memory") as info:
        GuestMemory(1 << 60)                  # beyond the 47-bit (or 56-bit) user address space
    assert "\n" not in str(info.value)


def test_a_booted_machines_ram_is_visible_from_another_process():
    m = Machine(BootConfig(cpus=4))
    try:
        r = m.run_to_handoff()
        bp = BootParams.from_buffer_copy(r.handoff.boot_params)
        cmdline = bp.hdr.cmd_line_ptr | bp.ext_cmd_line_ptr << 32
        log = m.layout.region("log")
        child = _child("""
            import json, sys
            from hclsim.cpu.memory import GuestMemory
            fd, size, cmdline, log, log_size = map(int, sys.argv[1:])
            mem = GuestMemory.attach(fd, size)
            print(json.dumps({"cmdline": mem.read_cstr(cmdline, 4096).decode(),
                              "log": mem.read(log, log_size).hex()}))
        """, m.mem.fd, m.mem.size, cmdline, log.start, log.size, pass_fds=[m.mem.fd])
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        seen = json.loads(out)
        assert seen["cmdline"] == r.handoff.cmdline and "rdinit=/underhill-init" in seen["cmdline"]
        log_bytes = bytes.fromhex(seen["log"])
        assert log_bytes == m.mem.read(log.start, log.size)
        assert r.shim_log.splitlines()[0] in log_bytes
        assert np.array_equal(m.mem.array(cmdline, 16), np.frombuffer(seen["cmdline"][:16].encode(), np.uint8))
    finally:
        m.close()
