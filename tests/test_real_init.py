"""The real /init (boot/firmware/init) and its test initrd (boot/initrd.py: real_init_initrd()):
reproducible to the byte, the entries GNU cpio lists, a static x86_64 ELF with no interpreter,
and, where QEMU and a Debian kernel are on the machine, what it prints as PID 1 of that kernel
(the format: docs/contracts.md, "Real /init").
"""
import glob
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from hclsim.boot import firmware
from hclsim.boot.initrd import load_initrd, real_init_initrd

# (ls -l mode, name) as GNU cpio lists them, in the config's order.
EXPECTED_ENTRIES = [
    ("drwxr-xr-x", "dev"),
    ("crw-------", "dev/console"),
    ("drwxr-xr-x", "proc"),
    ("drwxr-xr-x", "sys"),
    ("-rwxr-xr-x", "init"),
]
QEMU_APPEND = "console=ttyS0 noapic nolapic"
QEMU_TIMEOUT = 120


@pytest.fixture(scope="module")
def initrd() -> Path:
    return real_init_initrd()


def test_initrd_is_byte_identical_across_builds(initrd, tmp_path, monkeypatch):
    # A second build from nothing: another cache folder (the ELF compiled again), another cwd.
    first = initrd.read_bytes()
    elf = firmware.build(firmware.INIT).read_bytes()
    monkeypatch.setenv("HCLSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    again = real_init_initrd(force=True)
    assert again != initrd
    assert firmware.cached_path(firmware.INIT).read_bytes() == elf
    assert again.read_bytes() == first
    assert again.name == initrd.name


def test_initrd_is_cached_by_content_and_loads(initrd):
    data = initrd.read_bytes()
    assert re.fullmatch(r"real-init-[0-9a-f]{16}\.cpio\.gz", initrd.name)
    assert real_init_initrd() == initrd
    assert data[:2] == b"\x1f\x8b" and data[4:8] == b"\0\0\0\0"    # gzip, mtime 0
    loaded = load_initrd(initrd)
    assert loaded.compression == ("gzip",)
    assert loaded.files == len(EXPECTED_ENTRIES)
    cpio = gzip.decompress(data)
    assert cpio[:6] == b"070701"
    # newc headers: inodes 1.. in order, mtime 0, owner 0:0
    pos, seen = 0, []
    while True:
        fields = [int(cpio[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size = fields[:7]
        namesize = fields[11]
        name = cpio[pos + 110:pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            break
        seen.append((ino, uid, gid, mtime, name))
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + size + 3) & ~3
    assert seen == [(i, 0, 0, 0, name) for i, (_, name) in enumerate(EXPECTED_ENTRIES, start=1)]


def test_gnu_cpio_lists_the_entries(initrd):
    if not shutil.which("cpio"):
        pytest.skip("GNU cpio not installed (apt-get install cpio)")
    proc = subprocess.run(["cpio", "-itv"], input=gzip.decompress(initrd.read_bytes()),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert [(l.split()[0], l.split()[-1]) for l in lines] == EXPECTED_ENTRIES
    for l in lines:
        assert l.split()[2:4] == ["root", "root"], l
    console = next(l for l in lines if l.endswith(" dev/console"))
    assert re.search(r"\s5,\s+1\s", console), console    # character device 5:1
    init = next(l for l in lines if l.endswith(" init"))
    assert int(init.split()[4]) == firmware.build(firmware.INIT).stat().st_size


def test_init_elf_is_static_x86_64_without_interpreter():
    path = firmware.build(firmware.INIT)
    with path.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64 and elf.little_endian
        assert elf["e_machine"] == "EM_X86_64"
        assert elf["e_type"] == "ET_EXEC"
        kinds = [seg["p_type"] for seg in elf.iter_segments()]
        assert "PT_INTERP" not in kinds and "PT_DYNAMIC" not in kinds
        assert not any(s.name.startswith((".rela", ".rel.", ".dyn", ".interp", ".debug"))
                       for s in elf.iter_sections())
        loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
        assert loads and not any(seg["p_flags"] & 3 == 3 for seg in loads)   # no W+X
        entry = elf["e_entry"]
        assert any(seg["p_vaddr"] <= entry < seg["p_vaddr"] + seg["p_memsz"] and seg["p_flags"] & 1
                   for seg in loads)
        stack = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_GNU_STACK"]
        assert stack and not stack[0]["p_flags"] & 1
    data = path.read_bytes()    # -g0: no path of the checkout or the build folder in it
    assert os.fsencode(firmware.INIT.source_dir) not in data and os.fsencode(Path.cwd()) not in data


def _debian_kernel() -> Path:
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    real = Path(os.environ.get("HCLSIM_REAL_IMAGES") or "/var/cache/hclsim-real-images") / "vmlinuz"
    for candidate in [*map(Path, found), real]:
        if candidate.is_file() and os.access(candidate, os.R_OK):
            return candidate
    pytest.skip("no Debian kernel at /boot/vmlinuz-* to boot under QEMU")


def test_init_under_qemu_prints_what_linux_shows_and_powers_off(initrd, tmp_path):
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    kernel = _debian_kernel()
    serial = tmp_path / "serial.txt"
    cmd = [qemu, "-kernel", str(kernel), "-initrd", str(initrd), "-append", QEMU_APPEND,
           "-m", "512", "-accel", "tcg", "-display", "none", "-monitor", "none",
           "-serial", f"file:{serial}", "-no-reboot"]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        tail = serial.read_bytes()[-2000:].decode(errors="replace") if serial.exists() else ""
        pytest.fail(f"QEMU did not power off within {QEMU_TIMEOUT} s; serial ends:\n{tail}")
    out = serial.read_bytes().decode(errors="replace").replace("\r", "")
    out = re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", out)    # the firmware's terminal resets
    assert proc.returncode == 0, (proc.stderr, out[-2000:])
    assert "Kernel panic" not in out, out[-2000:]
    lines = [l for l in out.splitlines() if l.startswith("init: ")]
    values = {}
    for l in lines:
        key, _, value = l[len("init: "):].partition(" ")
        values.setdefault(key, []).append(value)
    assert "error" not in values, lines
    keys = [l.split()[1] for l in lines]
    assert keys[0] == "pid" and keys[-1] == "poweroff", lines
    assert values["pid"] == ["1"]
    release = kernel.name.removeprefix("vmlinuz-")
    if release != "vmlinuz":
        assert values["release"] == [release]
    assert values["version"][0].startswith("#")
    assert values["machine"] == ["x86_64"]
    assert values["cmdline"] == [QEMU_APPEND]
    (memtotal,) = values["memtotal"]
    assert re.fullmatch(r"\d+ kB", memtotal) and 256 * 1024 < int(memtotal.split()[0]) <= 512 * 1024
    memmap = [re.fullmatch(r"(\d+) (0x[0-9a-f]+) (0x[0-9a-f]+) (.+)", v) for v in values["memmap"]]
    assert memmap and all(memmap), values["memmap"]
    assert [int(m[1]) for m in memmap] == list(range(len(memmap)))
    assert values["memmap-entries"] == [str(len(memmap))]
    assert any(m[4] == "System RAM" and int(m[2], 16) <= 0x100000 <= int(m[3], 16) for m in memmap)
    assert all(int(m[2], 16) <= int(m[3], 16) for m in memmap)
    assert values["cpus-online"] == ["0"]    # one vCPU (and nolapic: only the BSP anyway)
