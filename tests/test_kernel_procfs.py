"""kernel_stub/procfs.py: the files of /proc, the device tree as Linux shows it (checked
against dtc), and the sysctls with proc_dointvec's parsing, ranges and the write log."""
import os
import re
import subprocess

import pytest

from hclsim.boot.host_dt import build_host_config, write_host_dt
from hclsim.defs import kabi
from hclsim.kernel_stub import procfs
from hclsim.kernel_stub.devfs import Random
from hclsim.kernel_stub.procfs import ModuleInfo, Sysctl, basic_meminfo, device_tree, make_procfs, parse_dointvec
from hclsim.kernel_stub.vfs import Dir, GeneratedFile, KernelError, Mount, MountTable, Symlink

from .kfs import CALLER, FakeClock, FakeCpus, errno_of, node, read, write
from .tools import require

MiB, GiB = 1 << 20, 1 << 30
HOST_DT = write_host_dt(build_host_config(4, 2, 1 * GiB, 128 * MiB, 64 * MiB, bootargs="OPENHCL_X=1 quiet"))

EDGE_DTS = b"""/dts-v1/;
/memreserve/ 0x1000 0x1000;
/ {
    #address-cells = <2>;
    #size-cells = <1>;
    model = "hclsim edge";
    empty-flag;
    named { name = "explicit"; value = <1 2 3>; };
    keys@10 { security-key = [de ad be ef]; strings = "a", "bc", ""; reg = <0 0x10 4>; };
    outer { inner@1,2 { bytes = [00 01 02]; deeper { x = <0xffffffff>; }; }; };
    memory@20000000 { device_type = "memory"; reg = <0 0x20000000 0x1000000>; };
};
"""


def dtc(args, data: bytes) -> str:
    return subprocess.run([require("dtc"), "-q", "-f", *args], input=data, capture_output=True, check=True).stdout


def materialize(d: Dir, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    for name, child in d.children().items():
        if isinstance(child, Dir):
            materialize(child, os.path.join(path, name))
        else:
            with open(os.path.join(path, name), "wb") as f:
                f.write(child.open(kabi.O_RDONLY, CALLER).read(1 << 20))


@pytest.mark.parametrize("which", ["host", "edge"])
def test_device_tree_matches_dtc(tmp_path, which):
    blob = HOST_DT if which == "host" else dtc(["-I", "dts", "-O", "dtb"], EDGE_DTS)
    materialize(device_tree(blob), str(tmp_path / "base"))
    # dtc reads a /proc/device-tree style directory (-I fs) and drops the `name` files Linux adds.
    from_fs = dtc(["-I", "fs", "-O", "dts", "-s", str(tmp_path / "base")], b"")
    from_blob = dtc(["-I", "dtb", "-O", "dts", "-s"], blob)
    from_blob = b"".join(line for line in from_blob.splitlines(True) if not line.startswith(b"/memreserve/"))
    assert from_fs.replace(b'\tname = "explicit";\n', b"") == from_blob.replace(b'\tname = "explicit";\n', b"")


def test_device_tree_linux_details():
    tree = device_tree(dtc(["-I", "dts", "-O", "dtb"], EDGE_DTS))
    assert read(tree, "name") == b"\0"                              # the root's name is empty
    assert read(tree, "keys@10/name") == b"keys\0"                 # up to the '@'
    assert read(tree, "outer/inner@1,2/name") == b"inner\0"
    assert read(tree, "named/name") == b"explicit\0"               # an existing name property is kept
    assert read(tree, "empty-flag") == b"" and node(tree, "empty-flag").size() == 0
    assert read(tree, "keys@10/strings") == b"a\0bc\0\0"
    assert node(tree, "keys@10/security-key").mode == 0o400 and node(tree, "model").mode == 0o444
    assert node(tree, "outer/inner@1,2/deeper/x").size() == 4
    assert errno_of(node(tree, "model").open, kabi.O_WRONLY, CALLER) == kabi.EACCES


def proc(**kw):
    mounts = MountTable()
    mounts.add(Mount("proc", "/proc", "proc", kabi.MS_NOSUID | kabi.MS_NODEV | kabi.MS_NOEXEC | kabi.MS_RELATIME,
                     Dir()))
    args = dict(cmdline=b"console=ttyS0 OPENHCL_X=1", clock=FakeClock(12.345678), sysctl=Sysctl(possible_cpus=4),
                cpus=FakeCpus([0, 1, 2, 3], [0, 2]), mounts=mounts,
                meminfo=lambda: basic_meminfo(8048288, 7000000), random=Random(), dtb=HOST_DT)
    args.update(kw)
    return make_procfs(**args), args


def test_simple_files():
    root, args = proc()
    assert read(root, "cmdline") == b"console=ttyS0 OPENHCL_X=1\n"
    assert read(root, "uptime") == b"12.34 24.69\n"               # two online CPUs idle all along
    root2, _ = proc(idle=lambda: 5.678)
    assert read(root2, "uptime") == b"12.34 5.67\n"
    assert read(root, "mounts") == b"rootfs / rootfs rw 0 0\nproc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
    assert isinstance(node(root, "device-tree"), Symlink)
    assert node(root, "device-tree").target == "/sys/firmware/devicetree/base"
    assert errno_of(node(root, "cmdline").open, kabi.O_WRONLY, CALLER) == kabi.EACCES


def test_meminfo():
    root, _ = proc()
    text = read(root, "meminfo").decode()
    lines = text.splitlines()
    assert lines[:3] == ["MemTotal:        8048288 kB", "MemFree:         7000000 kB", "MemAvailable:    7000000 kB"]
    assert "HugePages_Total:       0" in lines and "Hugepagesize:       2048 kB" in lines
    assert all(re.fullmatch(r"[A-Za-z_()]+:\s+\d+( kB)?", line) for line in lines)
    assert int(lines[1].split()[1]) // 1024 >= 10          # the diag worker needs 10 MB free


def test_modules_newest_first_and_kptr_restrict():
    mods = [ModuleInfo("pci_hyperv_intf", 12288, 1, ("pci_hyperv",), "Live", 0xFFFFFFFFC0000000),
            ModuleInfo("pci_hyperv", 36864, 0, (), "Loading", 0xFFFFFFFFC0010000)]
    sysctl = Sysctl()
    root, _ = proc(sysctl=sysctl, modules=lambda: mods)
    assert read(root, "modules") == (b"pci_hyperv 36864 0 - Loading 0xffffffffc0010000\n"
                                     b"pci_hyperv_intf 12288 1 pci_hyperv, Live 0xffffffffc0000000\n")
    write(root, "sys/kernel/kptr_restrict", "2")
    assert read(root, "modules").split(b"\n")[0].endswith(b" 0x0000000000000000")


def test_interrupts_iomem_ioports_timer_list():
    root, _ = proc()
    inter = read(root, "interrupts").decode().splitlines()
    assert inter[0].split() == ["CPU0", "CPU2"]                     # online CPUs only
    loc = next(line for line in inter if line.startswith("LOC:"))
    assert loc.split()[1:3] == ["1234", "1234"] and loc.endswith("Local timer interrupts")
    iomem = read(root, "iomem").decode()
    for m in build_host_config(4, 2, 1 * GiB, 128 * MiB, 64 * MiB).memory:
        assert f"{m.base:08x}-{m.base + m.size - 1:08x} : System RAM\n" in iomem
    assert "fee00000-fee00fff : Local APIC\n" in iomem
    ioports = read(root, "ioports").decode()
    assert "03e8-03ef : serial\n" in ioports and ioports.startswith("0000-001f : dma1\n")
    timers = read(root, "timer_list").decode()
    assert timers.startswith("Timer List Version: v0.9\n") and "now at 12345678000 nsecs" in timers
    assert "\ncpu: 0\n" in timers and "\ncpu: 2\n" in timers and "\ncpu: 1\n" not in timers


def test_random_sysctls():
    pool = Random()
    root, args = proc(random=pool)
    assert read(root, "sys/kernel/random/entropy_avail") == b"0\n"
    pool.add(b"x" * 16, 128, 1, "ioctl")
    assert read(root, "sys/kernel/random/entropy_avail") == b"128\n"
    assert read(root, "sys/kernel/random/poolsize") == b"256\n"
    assert errno_of(node(root, "sys/kernel/random/entropy_avail").open, kabi.O_WRONLY, CALLER) == kabi.EACCES
    uuid = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\n")
    boot_id = read(root, "sys/kernel/random/boot_id")
    assert uuid.fullmatch(boot_id) and read(root, "sys/kernel/random/boot_id") == boot_id
    assert uuid.fullmatch(read(root, "sys/kernel/random/uuid"))
    assert read(root, "sys/kernel/random/uuid") != read(root, "sys/kernel/random/uuid")


def test_sysctl_defaults():
    s = Sysctl(mem_total_kb=8 * 1024 * 1024, possible_cpus=64)
    root, _ = proc(sysctl=s)
    assert read(root, "sys/kernel/threads-max") == b"65536\n"       # totalram / (8 * THREAD_SIZE)
    assert read(root, "sys/kernel/pid_max") == b"65536\n"           # 1024 per possible CPU
    assert read(root, "sys/kernel/core_pattern") == b"core\n"
    assert read(root, "sys/vm/max_map_count") == b"65530\n"
    assert read(root, "sys/vm/min_free_kbytes") == b"11585\n"       # sqrt(lowmem_kb * 16)
    assert read(root, "sys/vm/watermark_scale_factor") == b"10\n"
    assert Sysctl(mem_total_kb=1024).values["kernel/threads-max"] == 20


def test_underhill_init_sysctl_writes_are_logged_in_order():
    s = Sysctl()
    root, _ = proc(sysctl=s)
    writes = [("kernel/threads-max", "32768"), ("kernel/kptr_restrict", "1"),
              ("kernel/core_pattern", "|/bin/underhill-crash %p %i %s %e"), ("kernel/core_pipe_limit", "1"),
              ("vm/panic_on_oom", "1"), ("vm/min_free_kbytes", "1024"), ("vm/watermark_scale_factor", "1"),
              ("vm/watermark_boost_factor", "0")]
    for name, value in writes:
        assert write(root, f"sys/{name}", value) == len(value)
    assert s.writes == [(f"/proc/sys/{n}", v if n.endswith("core_pattern") else int(v)) for n, v in writes]
    assert s.core_pattern == "|/bin/underhill-crash %p %i %s %e"
    assert read(root, "sys/kernel/core_pattern") == b"|/bin/underhill-crash %p %i %s %e\n"
    assert read(root, "sys/vm/watermark_boost_factor") == b"0\n"


@pytest.mark.parametrize("data,expected", [
    (b"32768", (32768, 5)), (b"32768\n", (32768, 6)), (b"  \t 7 \n\n", (7, 8)), (b"0x10", (16, 4)),
    (b"0X1f\n", (31, 5)), (b"010", (8, 3)), (b"0", (0, 1)), (b"-5", (-5, 2)), (b"-0", (0, 2)),
    (b"2147483647", (2147483647, 10)), (b"-2147483648", (-2147483648, 11)),
    (b"1 2", (1, 2)), (b"5\nx", (5, 2)),            # one value: the rest is left (a short write)
])
def test_parse_dointvec(data, expected):
    assert parse_dointvec(data) == expected


@pytest.mark.parametrize("data", [b"   ", b"\n", b"abc", b"12a", b"1.5", b"+3", b"-", b"- 1", b"0x", b"08",
                                  b"2147483648", b"-2147483649", b"99999999999999999999999", b"1\0", b"0x1g"])
def test_parse_dointvec_refuses(data):
    assert errno_of(parse_dointvec, data) == kabi.EINVAL


@pytest.mark.parametrize("name,good,bad", [
    ("kernel/threads-max", ["1", "0x3fffffff"], ["0", "-1", "0x40000000"]),
    ("kernel/kptr_restrict", ["0", "2"], ["3", "-1"]),
    ("kernel/pid_max", ["301", "4194304"], ["300", "4194305"]),
    ("kernel/core_pipe_limit", ["0", "2147483647"], ["-1"]),
    ("vm/panic_on_oom", ["0", "2"], ["3", "-1"]),
    ("vm/min_free_kbytes", ["0", "65536"], ["-1"]),
    ("vm/watermark_scale_factor", ["1", "3000"], ["0", "3001"]),
    ("vm/watermark_boost_factor", ["0", "100000"], ["-1"]),
    ("vm/max_map_count", ["0", "262144"], ["-1"]),
])
def test_sysctl_ranges(name, good, bad):
    s = Sysctl()
    root, _ = proc(sysctl=s)
    for value in good:
        write(root, f"sys/{name}", value + "\n")
        assert s.values[name] == int(value, 0)
    before = s.values[name]
    for value in bad:
        assert errno_of(write, root, f"sys/{name}", value) == kabi.EINVAL
    assert s.values[name] == before and len(s.writes) == len(good)


def test_sysctl_write_positions():
    s = Sysctl()
    root, _ = proc(sysctl=s)
    f = node(root, "sys/kernel/threads-max").open(kabi.O_WRONLY, CALLER)
    assert f.write(b"100 200") == 4                  # short: the value and its whitespace
    assert f.write(b"200") == 3                      # at a non-zero position: ignored (writes_strict)
    assert s.values["kernel/threads-max"] == 100 and s.writes == [("/proc/sys/kernel/threads-max", 100)]
    assert write(root, "sys/kernel/threads-max", b"") == 0 and len(s.writes) == 1
    f = node(root, "sys/vm/panic_on_oom").open(kabi.O_RDWR, CALLER)
    assert f.read(2) == b"0\n" and f.read(10) == b""
    assert f.write(b"1") == 1 and s.values["vm/panic_on_oom"] == 0   # the read moved the position
    g = node(root, "sys/vm/panic_on_oom").open(kabi.O_RDONLY, CALLER)
    assert g.read(1) == b"0" and g.read(10) == b""   # a sysctl integer is rendered at position 0 only
    assert errno_of(g.write, b"1") == kabi.EBADF


def test_core_pattern_is_proc_dostring():
    s = Sysctl()
    root, _ = proc(sysctl=s)
    path = "sys/kernel/core_pattern"
    assert write(root, path, "") == 0 and s.core_pattern == "core" and s.writes == []   # no change
    assert write(root, path, "x" * 200) == 200 and s.core_pattern == "x" * 127      # cut, not refused
    write(root, path, "first line\nsecond")
    assert s.core_pattern == "first line"
    write(root, path, b"cut\0here")
    assert s.core_pattern == "cut"
    f = node(root, path).open(kabi.O_WRONLY, CALLER)
    f.write(b"|/bin/a")
    f.write(b" %p")                                  # strict mode continues at the position
    assert s.core_pattern == "|/bin/a %p"
    assert s.writes[-2:] == [("/proc/sys/kernel/core_pattern", "|/bin/a"),
                             ("/proc/sys/kernel/core_pattern", "|/bin/a %p")]
    h = node(root, path).open(kabi.O_RDONLY, CALLER)
    assert h.read(3) == b"|/b" and h.read(100) == b"in/a %p\n"


def test_sysctl_nodes_are_files():
    root, _ = proc()
    n = node(root, "sys/kernel/threads-max")
    assert n.kind == kabi.KIND_FILE and n.mode == 0o644
    assert isinstance(node(root, "cmdline"), GeneratedFile)
    with pytest.raises(KernelError):
        node(root, "sys/kernel/nonexistent")
    assert procfs.CORENAME_MAX_SIZE == 128
