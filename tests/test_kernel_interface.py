"""The kernel interface of a running VM, asked by a client written from defs/kabi.py: every bad
request is answered with an errno (or EINVAL for a malformed message), the kernel keeps serving,
and the VM still powers off."""
import os
import socket
import struct
import tempfile

import pytest

from hclsim.config import BootConfig
from hclsim.defs import kabi
from hclsim.kernel_stub.userspace import Userspace
from hclsim.machine import Machine


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(60)          # a request the kernel never answers fails the test, not hangs it
        self.sock.connect(path)
        self.seq = 0
        self.fds = []                     # host descriptors the last reply carried (call(..., keep_fds=True))

    def raw(self, data: bytes, keep_fds: bool = False):
        self.sock.send(data)
        msg, anc, _f, _a = self.sock.recvmsg(kabi.MAX_MESSAGE, socket.CMSG_SPACE(16))
        self.fds = []
        for level, kind, payload in anc:
            if kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]):
                    if keep_fds:
                        self.fds.append(fd)
                    else:
                        os.close(fd)
        return kabi.decode_reply(msg)

    def call(self, op, *values, keep_fds: bool = False):
        self.seq += 1
        seq, err, out = self.raw(kabi.encode_request(self.seq, op, values), keep_fds)
        assert seq == self.seq
        return err, out


def _boot(config: BootConfig, ready):
    """A machine to the handoff and its userspace started, until ready(us); (Machine, Userspace)."""
    import time
    machine = Machine(config)
    result = machine.run_to_handoff()
    run_dir = tempfile.mkdtemp(prefix="hclsim-test-vm-")
    us = Userspace(result.linux, result.handoff, machine.initrd.data, run_dir)
    us.start()
    deadline = time.monotonic() + 30
    while not ready(us) and time.monotonic() < deadline and not us.finished.is_set():
        time.sleep(0.02)
    assert ready(us), us.kmsg.text()
    return machine, us


@pytest.fixture(scope="module")
def vm():
    # Runs while we ask; the sidecar CPUs stay offline (RUN_VP on one must fail).
    machine, us = _boot(BootConfig(cpus=4, vtl0_iterations=2_000_000, host_bootargs="OPENHCL_NO_SIDECAR_HOTPLUG=1"),
                        lambda us: any(e.name == "vtl0" for e in us.events))
    yield us
    us.shutdown()
    machine.close()


def client(us) -> Client:
    return Client(us.server.path)


def test_an_empty_packet_ends_the_connection_only(vm):
    c = client(vm)
    c.sock.send(b"")                  # on SOCK_SEQPACKET this reads as the end of the connection
    assert c.sock.recv(100) == b""
    assert client(vm).call(kabi.Op.STAT, "/proc")[0] == 0


@pytest.mark.parametrize("raw", [b"\x00", kabi.REQUEST.pack(1, kabi.Op.OPEN, 3) + b"s\xff\xff\xff\xff",
                                 kabi.REQUEST.pack(1, kabi.Op.OPEN, 1) + b"?", b"x" * 9000])
def test_malformed_messages_get_einval(vm, raw):
    c = client(vm)
    _seq, err, _ = c.raw(raw)
    assert err == kabi.EINVAL


def test_unknown_operation_and_wrong_arguments(vm):
    c = client(vm)
    assert c.call(999)[0] == kabi.ENOSYS
    assert c.call(kabi.Op.OPEN, 1, 2, 3)[0] == kabi.EINVAL            # a path must be a string
    assert c.call(kabi.Op.OPEN, "/proc/cmdline")[0] == kabi.EINVAL     # too few values
    assert c.call(kabi.Op.READ, 12345, 10)[0] == kabi.EBADF
    assert c.call(kabi.Op.CLOSE, 12345)[0] == kabi.EBADF
    assert c.call(kabi.Op.READ, 0, -1)[0] in (kabi.EINVAL, kabi.EBADF)


def test_paths(vm):
    c = client(vm)
    assert c.call(kabi.Op.OPEN, "relative", kabi.O_RDONLY, 0)[0] == kabi.ENOENT
    assert c.call(kabi.Op.OPEN, "/proc/no-such", kabi.O_RDONLY, 0)[0] == kabi.ENOENT
    assert c.call(kabi.Op.OPEN, "/proc/cmdline", kabi.O_WRONLY, 0)[0] == kabi.EACCES   # read-only file
    assert c.call(kabi.Op.OPEN, "/proc/cmdline/x", kabi.O_RDONLY, 0)[0] == kabi.ENOTDIR
    assert c.call(kabi.Op.OPEN, "/proc\0", kabi.O_RDONLY, 0)[0] == kabi.EINVAL
    assert c.call(kabi.Op.OPEN, "/" + "a" * 5000, kabi.O_RDONLY, 0)[0] == kabi.ENAMETOOLONG
    assert c.call(kabi.Op.MOUNT, "x", "/tmp", "nosuchfs", 0, "")[0] == kabi.ENODEV
    assert c.call(kabi.Op.MOUNT, "proc", "/proc", "proc", 0, "")[0] == kabi.EBUSY
    assert c.call(kabi.Op.FINIT_MODULE, "/etc/underhill-build-info.json", "")[0] == kabi.ENOEXEC
    err, (fd, host) = c.call(kabi.Op.OPEN, "/proc/cmdline", kabi.O_RDONLY, 0)
    assert err == 0 and host == 0
    err, (data,) = c.call(kabi.Op.READ, fd, 4096)
    assert data.rstrip(b"\n") == vm.handoff.cmdline_bytes
    err, (names,) = c.call(kabi.Op.LISTDIR, "/sys/devices/system/cpu")
    assert {"cpu0", "cpu3", "online", "present"} <= set(names)


def test_cpus_and_mshv(vm):
    c = client(vm)
    assert c.call(kabi.Op.OPEN, "/sys/devices/system/cpu/cpu99/online", kabi.O_WRONLY, 0)[0] == kabi.ENOENT
    err, (mshv, _h) = c.call(kabi.Op.OPEN, "/dev/mshv", kabi.O_RDWR, 0)
    assert err == 0
    err, (vtl, _out) = c.call(kabi.Op.IOCTL, mshv, kabi.MSHV_CREATE_VTL, b"")
    assert err == 0
    assert c.call(kabi.Op.IOCTL, vtl, 0x1234, b"")[0] == kabi.ENOTTY
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_RETURN_TO_LOWER_VTL, struct.pack("<I", 99))[0] == kabi.EINVAL
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_RETURN_TO_LOWER_VTL, b"")[0] == kabi.EFAULT
    assert 3 not in vm.linux.cpus.online          # RUN_VP on a CPU the sidecar holds
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_RETURN_TO_LOWER_VTL, struct.pack("<I", 3))[0] == kabi.EINVAL
    assert "RUN_VP on CPU 3, which is offline" in vm.kmsg.text()
    bad = struct.pack("<I", 0) + kabi.REGISTER_ASSOC.pack(0xDEAD, 0, 0)
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_GET_VP_REGISTERS, bad)[0] == kabi.EINVAL
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_GET_VP_REGISTERS, b"\0\0\0\0xyz")[0] == kabi.EINVAL
    assert c.call(kabi.Op.MMAP, vtl, 123, 4096)[0] == kabi.EINVAL
    assert c.call(kabi.Op.MMAP, vtl, (kabi.MMAP_RUN_PAGE | 99) * 4096, 4096)[0] == kabi.EINVAL


def test_the_vm_keeps_running(vm):
    assert vm.init_proc.returncode is None
    assert vm.panic is None
    assert "BUG" not in vm.kmsg.text()


# ---- the sidecar device, as a VMM would drive it (the VM worker uses only RUN and STOP) ------
@pytest.fixture(scope="module")
def idle_vm():
    """Two NUMA nodes, so two sidecar nodes: CPUs 0-1 (0 is Linux's) and 2-3 (2 is Linux's).
    The control process waits for a diag Start: no VM worker, the sidecar CPUs 1 and 3 stay
    IDLE for this client."""
    machine, us = _boot(BootConfig(cpus=4, numa_nodes=2, host_bootargs="OPENHCL_WAIT_FOR_START=1"),
                        lambda us: "waiting for a diag Start request" in us.kmsg.text())
    yield us
    us.shutdown()
    machine.close()


def _sidecar(c: Client, node: int, flags: int = kabi.O_RDWR) -> int:
    err, (fd, host) = c.call(kabi.Op.OPEN, f"/dev/mshv_vtl_sidecar{node}", flags, 0)
    assert err == 0 and host == 0
    return fd


def _cpu(n: int) -> bytes:
    return struct.pack("<I", n)


def _map_node(c: Client, dev: int):
    """INFO, then the node's command pages mapped: (base CPU, per-CPU bytes, mmap)."""
    import mmap as mmap_mod
    err, (_r, info) = c.call(kabi.Op.IOCTL, dev, kabi.MSHV_SIDECAR_INFO, b"")
    assert err == 0
    base, count, per_cpu = kabi.SIDECAR_INFO.unpack(info)
    assert count == 2 and per_cpu == kabi.SIDECAR_SHMEM_PAGES_PER_VP * kabi.PAGE_SIZE
    err, (offset,) = c.call(kabi.Op.MMAP, dev, 0, count * per_cpu, keep_fds=True)
    assert err == 0 and len(c.fds) == 1
    fd = c.fds[0]
    try:
        return base, per_cpu, mmap_mod.mmap(fd, count * per_cpu, mmap_mod.MAP_SHARED, offset=offset)
    finally:
        os.close(fd)


def _write_run_vp(c: Client, shmem, page: int, cpu: int) -> None:
    """The VP's VTL0 registers (GET_VP_REGISTERS through mshv_vtl) into its command page's
    context, and the RUN_VP command, as the VM worker writes them."""
    from hclsim.defs.hvdef import HvRegister
    err, (mshv, _h) = c.call(kabi.Op.OPEN, "/dev/mshv", kabi.O_RDWR, 0)
    err, (vtl, _out) = c.call(kabi.Op.IOCTL, mshv, kabi.MSHV_CREATE_VTL, b"")
    assert err == 0
    canonical = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
                 "r14", "r15")
    arg = _cpu(cpu) + b"".join(kabi.REGISTER_ASSOC.pack(HvRegister.Rax + i, 0, 0) for i in range(16))
    err, (_r, out) = c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_GET_VP_REGISTERS, arg)
    assert err == 0
    regs = {name: kabi.REGISTER_ASSOC.unpack_from(out, i * kabi.REGISTER_ASSOC.size)[1]
            for i, name in enumerate(canonical)}
    for i, name in enumerate(kabi.RUN_CONTEXT_GPRS):
        struct.pack_into("<Q", shmem, page + kabi.SIDECAR_CMD_CPU_CONTEXT + 8 * i, regs.get(name, 0))
    struct.pack_into("<I", shmem, page + kabi.SIDECAR_CMD_COMMAND, kabi.SIDECAR_COMMAND_RUN_VP)


def test_sidecar_start_then_read_of_the_finished_cpus(idle_vm):
    """INFO, the command pages mapped, a RUN_VP command written and STARTed (asynchronous:
    a second START of the busy CPU is EBUSY), then read() gives the CPU that finished and the
    page holds its intercept; with O_NONBLOCK, EAGAIN while none has finished."""
    from hclsim.defs.hvdef import HvMessageType
    c = client(idle_vm)
    dev = _sidecar(c, 0)
    nonblocking = _sidecar(c, 0, kabi.O_RDWR | kabi.O_NONBLOCK)
    base, per_cpu, shmem = _map_node(c, dev)
    assert base == 0
    assert c.call(kabi.Op.READ, nonblocking, 4096)[0] == kabi.EAGAIN         # nothing started yet
    page = (1 - base) * per_cpu
    _write_run_vp(c, shmem, page, 1)
    assert c.call(kabi.Op.IOCTL, dev, kabi.MSHV_SIDECAR_START, _cpu(1)) == (0, [0, b""])
    assert c.call(kabi.Op.IOCTL, dev, kabi.MSHV_SIDECAR_START, _cpu(1))[0] == kabi.EBUSY   # it is running
    err, (data,) = c.call(kabi.Op.READ, dev, 4096)        # runs the node's CPUs until one finishes
    assert err == 0 and data == _cpu(1)
    assert shmem[page + kabi.SIDECAR_CMD_HAS_ERROR] == 0
    assert shmem[page + kabi.SIDECAR_CMD_REQUEST_DATA] != 0                    # it stopped at an intercept
    kind = struct.unpack_from("<I", shmem, page + kabi.SIDECAR_CMD_INTERCEPT_MESSAGE)[0]
    assert kind == HvMessageType.X64IoPortIntercept                           # the guest's first COM1 write
    assert c.call(kabi.Op.READ, nonblocking, 4096)[0] == kabi.EAGAIN         # read once
    shmem.close()
    assert idle_vm.panic is None and "BUG" not in idle_vm.kmsg.text()


def test_a_blocked_sidecar_read_waits_for_a_start(idle_vm):
    """read() with no command on the node sleeps (runs nothing) until a START from another
    thread: then it runs the node's CPUs and returns that CPU."""
    import threading
    c, other = client(idle_vm), client(idle_vm)
    dev = _sidecar(c, 1)
    base, per_cpu, shmem = _map_node(c, dev)
    assert base == 2
    got = []
    reader = threading.Thread(target=lambda: got.append(c.call(kabi.Op.READ, dev, 4096)), daemon=True)
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not got                                     # nothing to finish yet
    _write_run_vp(other, shmem, (3 - base) * per_cpu, 3)
    assert other.call(kabi.Op.IOCTL, _sidecar(other, 1), kabi.MSHV_SIDECAR_START, _cpu(3))[0] == 0
    reader.join(60)
    assert got == [(0, [_cpu(3)])]
    shmem.close()


def test_sidecar_bad_requests_get_an_errno(idle_vm):
    c = client(idle_vm)
    dev = _sidecar(c, 0)
    size = 2 * kabi.SIDECAR_SHMEM_PAGES_PER_VP * kabi.PAGE_SIZE
    for request in (kabi.MSHV_SIDECAR_START, kabi.MSHV_SIDECAR_RUN, kabi.MSHV_SIDECAR_STOP):
        assert c.call(kabi.Op.IOCTL, dev, request, _cpu(3))[0] == kabi.EINVAL     # node 1's CPU
        assert c.call(kabi.Op.IOCTL, dev, request, _cpu(99))[0] == kabi.EINVAL    # no such CPU
        assert c.call(kabi.Op.IOCTL, dev, request, b"\1")[0] == kabi.EFAULT       # shorter than a CPU number
    assert c.call(kabi.Op.IOCTL, dev, kabi.MSHV_SIDECAR_START, _cpu(0))[0] == kabi.EBUSY   # Linux's CPU, not IDLE
    assert c.call(kabi.Op.IOCTL, _sidecar(c, 1), kabi.MSHV_SIDECAR_STOP, _cpu(3)) == (0, [0, b""])  # not running
    assert c.call(kabi.Op.IOCTL, dev, 0x1234, b"")[0] == kabi.ENOTTY
    assert c.call(kabi.Op.READ, dev, 3)[0] == kabi.EINVAL                     # less than one u32
    assert c.call(kabi.Op.WRITE, dev, b"x")[0] == kabi.EINVAL
    assert c.call(kabi.Op.MMAP, dev, 0, size + kabi.PAGE_SIZE)[0] == kabi.EINVAL     # beyond the command pages
    assert c.call(kabi.Op.MMAP, dev, size, kabi.PAGE_SIZE)[0] == kabi.EINVAL
    assert c.call(kabi.Op.MMAP, dev, 100, kabi.PAGE_SIZE)[0] == kabi.EINVAL          # not page aligned
    assert c.call(kabi.Op.MMAP, dev, 0, 0)[0] == kabi.EINVAL
    assert c.call(kabi.Op.OPEN, "/dev/mshv_vtl_sidecar2", kabi.O_RDWR, 0)[0] == kabi.ENOENT   # two nodes only
    assert client(idle_vm).call(kabi.Op.STAT, "/proc")[0] == 0                 # still serving
    assert idle_vm.panic is None and "BUG" not in idle_vm.kmsg.text()
