"""procfs of the stand-in kernel: what the paravisor's programs read in /proc, and the sysctls
they write in /proc/sys, with Linux's parsing and checks.

make_procfs builds one mount's tree; the per-process entries (/proc/self, /proc/<pid>) are
the system call server's to add (Dir.add). The device tree lives in sysfs, as on Linux:
/proc/device-tree is a symlink to /sys/firmware/devicetree/base, built by device_tree() here
(sysfs takes the Dir).

Sysctl integers are parsed as proc_dointvec does (optional leading whitespace, base 0 like
strtoul: 0x.. hex, 0.. octal, one value, then only whitespace), out of range is EINVAL; a
write at a non-zero file position is ignored (sysctl_writes_strict = 1); core_pattern is
proc_dostring: it ends at a newline or NUL and is cut at 127 bytes (CORENAME_MAX_SIZE 128),
never refused. Every accepted write is logged in order in Sysctl.writes.
"""
import math
import os
from dataclasses import dataclass

from hclsim.defs import kabi
from hclsim.kernel_stub.vfs import Dir, File, GeneratedFile, KernelError, Node, Symlink

PAGE_SIZE = 4096
INT_MAX = (1 << 31) - 1
FUTEX_TID_MASK = 0x3FFFFFFF             # MAX_THREADS
PID_MAX_LIMIT = 4 * 1024 * 1024          # 64-bit
CORENAME_MAX_SIZE = 128
THREAD_SIZE = 16384                      # x86_64 kernel stacks
_TMPBUFLEN = 22                          # proc_get_long's buffer
_SPACE = b" \t\n\v\f\r"
_HEX = b"0123456789abcdefABCDEF"

# (min, max) of the integer sysctls, by path below /proc/sys. threads-max's minimum is 1
# since Linux 5.x (sysctl_max_threads), not MIN_THREADS.
INT_SYSCTLS = {
    "kernel/threads-max": (1, FUTEX_TID_MASK),
    "kernel/kptr_restrict": (0, 2),
    "kernel/pid_max": (301, PID_MAX_LIMIT),          # RESERVED_PIDS + 1 .. PID_MAX_LIMIT
    "kernel/core_pipe_limit": (0, INT_MAX),
    "vm/panic_on_oom": (0, 2),
    "vm/min_free_kbytes": (0, INT_MAX),
    "vm/watermark_scale_factor": (1, 3000),
    "vm/watermark_boost_factor": (0, INT_MAX),
    "vm/max_map_count": (0, INT_MAX),
}
STRING_SYSCTLS = {"kernel/core_pattern": CORENAME_MAX_SIZE}


def parse_dointvec(data: bytes) -> tuple[int, int]:
    """(value, bytes consumed) of a write to a one-integer sysctl (__do_proc_dointvec with
    proc_get_long); KernelError(EINVAL) for anything else. Trailing text after the value and
    its whitespace is left unconsumed: a short write, as Linux returns."""
    left = data[:PAGE_SIZE - 1]
    p = len(left) - len(left.lstrip(_SPACE))
    if p == len(left):
        raise KernelError(kabi.EINVAL, "no number")
    tmp = left[p:p + _TMPBUFLEN - 1]
    neg = tmp[:1] == b"-" and len(left) - p > 1
    q = 1 if neg else 0
    if not tmp[q:q + 1].isdigit():
        raise KernelError(kabi.EINVAL, "not a number")
    if tmp[q:q + 2] in (b"0x", b"0X") and tmp[q + 2:q + 3] and tmp[q + 2] in _HEX:
        base, digits, q = 16, _HEX, q + 2
    elif tmp[q:q + 1] == b"0":
        base, digits = 8, b"01234567"
    else:
        base, digits = 10, b"0123456789"
    end = q
    while end < len(tmp) and tmp[end] in digits:
        end += 1
    value = int(tmp[q:end] or b"0", base)
    if end == _TMPBUFLEN - 1:                        # might go on: too long to be one number
        raise KernelError(kabi.EINVAL, "number too long")
    if value >= 1 << 64 or p + end < len(left) and left[p + end] not in b" \t\n":
        raise KernelError(kabi.EINVAL, "junk after the number")
    if value > INT_MAX + (1 if neg else 0):
        raise KernelError(kabi.EINVAL, "out of int range")
    rest = left[p + end:]
    rest_left = len(rest) - len(rest.lstrip(_SPACE))
    consumed = len(data) - (len(left) - (p + end + rest_left))
    return (-value if neg else value), consumed


class Sysctl:
    """The values of the sysctls, by path below /proc/sys ("kernel/core_pattern"), and the
    writes accepted, in order: writes = [(absolute path, value)], shared with sysfs."""

    def __init__(self, *, mem_total_kb: int = 1 << 20, possible_cpus: int = 1, writes: list | None = None):
        threads = max(20, min(FUTEX_TID_MASK, mem_total_kb * 1024 // (THREAD_SIZE * 8)))   # set_max_threads
        self.values = {
            "kernel/threads-max": threads,
            "kernel/kptr_restrict": 0,
            "kernel/pid_max": min(PID_MAX_LIMIT, max(32768, 1024 * possible_cpus)),      # pid_idr_init
            "kernel/core_pattern": "core",
            "kernel/core_pipe_limit": 0,
            "vm/panic_on_oom": 0,
            "vm/min_free_kbytes": max(128, min(262144, math.isqrt(mem_total_kb * 16))),       # init_per_zone_wmark_min
            "vm/watermark_scale_factor": 10,
            "vm/watermark_boost_factor": 15000,
            "vm/max_map_count": 65530,
        }
        self.writes = writes if writes is not None else []
        self.boot_id = _uuid4()

    def __getitem__(self, name: str):
        return self.values[name]

    @property
    def core_pattern(self) -> str:
        return self.values["kernel/core_pattern"]

    def _node(self, name: str) -> Node:
        return _SysctlNode(self, name)


def _uuid4() -> str:
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _SysctlNode(Node):
    mode = 0o644

    def __init__(self, sysctl: Sysctl, name: str):
        self.sysctl, self.name = sysctl, name

    def open(self, flags, caller):
        return _SysctlFile(self.sysctl, self.name, flags)


class _SysctlFile(File):
    """One open sysctl, with its one file position as Linux keeps it: an integer is rendered
    by a read at position 0 (a later read is the end), a write at a non-zero position is
    ignored (sysctl_writes_strict)."""

    def __init__(self, sysctl: Sysctl, name: str, flags: int):
        self.sysctl, self.name = sysctl, name
        acc = flags & kabi.O_ACCMODE
        self.readable, self.writable = acc != kabi.O_WRONLY, acc != kabi.O_RDONLY
        self.pos = 0

    def read(self, count, nonblock=False):
        if not self.readable:
            raise KernelError(kabi.EBADF)
        value = self.sysctl.values[self.name]
        if self.name in STRING_SYSCTLS:
            content = value.encode("utf-8", "surrogateescape") + b"\n"
            chunk = content[self.pos:self.pos + count]
        else:
            chunk = f"{value}\n".encode()[:count] if self.pos == 0 else b""
        self.pos += len(chunk)
        return chunk

    def write(self, data):
        if not self.writable:
            raise KernelError(kabi.EBADF)
        data = bytes(data)
        if not data:                                     # a zero-length write changes nothing
            return 0
        path = f"/proc/sys/{self.name}"
        if self.name in STRING_SYSCTLS:
            return self._write_string(path, data)
        if self.pos:
            self.pos += len(data)
            return len(data)
        value, consumed = parse_dointvec(data)
        low, high = INT_SYSCTLS[self.name]
        if not low <= value <= high:
            raise KernelError(kabi.EINVAL, f"{path}: {value} is outside {low}..{high}")
        self.sysctl.values[self.name] = value
        self.sysctl.writes.append((path, value))
        self.pos += consumed
        return consumed

    def _write_string(self, path: str, data: bytes) -> int:
        """_proc_do_string, strict: go on at the position (up to the current length), stop at a
        newline or NUL, keep at most maxlen - 1 bytes; the whole write counts as written."""
        maxlen = STRING_SYSCTLS[self.name]
        current = self.sysctl.values[self.name].encode("utf-8", "surrogateescape")[:maxlen - 1]
        start, self.pos = self.pos, self.pos + len(data)
        if start > len(current):
            return len(data)
        text = data.split(b"\n", 1)[0].split(b"\0", 1)[0]
        value = (current[:start] + text)[:maxlen - 1].decode("utf-8", "surrogateescape")
        self.sysctl.values[self.name] = value
        self.sysctl.writes.append((path, value))
        return len(data)


# ---- the device tree --------------------------------------------------------------------------
def device_tree(dtb: bytes) -> Dir:
    """The flattened device tree as Linux shows it (/sys/firmware/devicetree/base): a directory
    per node named as the node, a file per property with its raw value (0444; 0400 for
    security-* properties), and a `name` property where the tree has none (the node name up
    to its '@', NUL-terminated: what of_fdt's populate_properties adds)."""
    from hclsim.boot import fdt as fdtutil      # libfdt: only when a tree is built
    tree = fdtutil.open_fdt(dtb)

    def build(off: int, name: str) -> Dir:
        entries = {}
        for prop in fdtutil.prop_names(tree, off):
            mode = 0o400 if prop.startswith("security-") else 0o444
            entries[prop] = _blob(fdtutil.prop(tree, off, prop), mode)
        if "name" not in entries:
            entries["name"] = _blob(name.split("@", 1)[0].encode() + b"\0", 0o444)
        for child, child_name in fdtutil.subnodes(tree, off):
            entries[child_name] = build(child, child_name)
        return Dir(entries)

    return build(0, "")


def _blob(data: bytes, mode: int) -> GeneratedFile:
    return GeneratedFile(lambda: data, mode=mode, size=len(data))


def dt_reg_ranges(dtb: bytes, device_type: str) -> list[tuple[int, int]]:
    """(base, size) of every reg entry of the root's children of a device_type (memory)."""
    from hclsim.boot import fdt as fdtutil
    tree = fdtutil.open_fdt(dtb)
    ac, sc = fdtutil.prop_u32(tree, 0, "#address-cells", 2), fdtutil.prop_u32(tree, 0, "#size-cells", 1)
    out = []
    for off, _name in fdtutil.subnodes(tree, 0):
        if fdtutil.prop(tree, off, "device_type", required=False) == device_type.encode() + b"\0":
            out += fdtutil.prop_reg(tree, off, ac, sc)
    return sorted(out)


# ---- the files ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleInfo:
    """A loaded module as /proc/modules shows it; users are the modules that depend on it."""
    name: str
    size: int
    refcount: int = 0
    users: tuple = ()
    state: str = "Live"                 # Live, Loading, Unloading
    address: int = 0


MEMINFO_FIELDS = ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapCached", "Active",
                  "Inactive", "Unevictable", "Mlocked", "SwapTotal", "SwapFree", "Dirty", "Writeback",
                  "AnonPages", "Mapped", "Shmem", "KReclaimable", "Slab", "SReclaimable", "SUnreclaim",
                  "KernelStack", "PageTables", "CommitLimit", "Committed_AS", "VmallocTotal", "VmallocUsed",
                  "Percpu", "HugePages_Total", "HugePages_Free", "Hugepagesize")


def basic_meminfo(total_kb: int, free_kb: int) -> dict:
    """A plausible /proc/meminfo of a small VM with no swap: the fields not derived are 0."""
    used = total_kb - free_kb
    return {"MemTotal": total_kb, "MemFree": free_kb, "MemAvailable": free_kb, "Cached": used // 4,
            "AnonPages": used // 4, "Slab": used // 8, "KernelStack": 16 * 4, "CommitLimit": total_kb // 2,
            "Committed_AS": used // 2, "VmallocTotal": 34359738367, "Hugepagesize": 2048}


def render_meminfo(values: dict) -> bytes:
    lines = []
    for name in list(MEMINFO_FIELDS) + [k for k in values if k not in MEMINFO_FIELDS]:
        v = int(values.get(name, 0))
        if name.startswith("HugePages_"):
            lines.append(f"{name + ':':<16}{v:>8}\n")            # counts, not kB
        else:
            lines.append(f"{name + ':':<16}{v:>8} kB\n")         # show_val_kb
    return "".join(lines).encode()


def render_modules(modules, kptr_restrict: int) -> bytes:
    """m_show: newest first; the address hidden (zero) when kptr_restrict is 2 (root sees it at 0, 1)."""
    lines = []
    for m in reversed(list(modules)):
        users = "".join(f"{u}," for u in m.users) or "-"
        address = m.address if kptr_restrict < 2 else 0
        lines.append(f"{m.name} {m.size} {m.refcount} {users} {m.state} 0x{address:016x}\n")
    return "".join(lines).encode()


def _centis(seconds: float) -> str:
    """Seconds as /proc/uptime prints them: truncated to hundredths."""
    c = int(seconds * 100)
    return f"{c // 100}.{c % 100:02d}"


def _online(cpus) -> list[int]:
    return [c for c in cpus.present if cpus.is_online(c)]


def render_interrupts(cpus, uptime: float) -> bytes:
    online = _online(cpus)
    out = [" " * 11 + "".join(f"CPU{c:<8d}" for c in online).rstrip() + "\n"]
    rows = (("NMI", 0, "Non-maskable interrupts"), ("LOC", int(uptime * 100), "Local timer interrupts"),
            ("SPU", 0, "Spurious interrupts"), ("RES", 0, "Rescheduling interrupts"),
            ("CAL", 0, "Function call interrupts"), ("TLB", 0, "TLB shootdowns"),
            ("HYP", 0, "Hypervisor callback interrupts"), ("HRE", 0, "Hyper-V reenlightenment interrupts"),
            ("HVS", int(uptime * 100), "Hyper-V stimer0 interrupts"))
    for name, count, what in rows:
        out.append(f"{name:>3}: " + "".join(f"{count:10d} " for _ in online) + f"  {what}\n")
    out.append(f"ERR: {0:10d}\nMIS: {0:10d}\n")
    return "".join(out).encode()


def _resources(entries, width: int) -> bytes:
    return "".join(f"{'  ' * depth}{start:0{width}x}-{end:0{width}x} : {name}\n"
                   for depth, start, end, name in entries).encode()


def render_iomem(ram: list) -> bytes:
    entries = [(0, base, base + size - 1, "System RAM") for base, size in ram if size]
    entries.append((0, 0xFEE00000, 0xFEE00FFF, "Local APIC"))
    return _resources(sorted(entries, key=lambda e: e[1]), 8)


def render_ioports(serial_ports: list) -> bytes:
    entries = [(0, 0x00, 0x1F, "dma1"), (0, 0x20, 0x21, "pic1"), (0, 0x40, 0x43, "timer0"),
               (0, 0x50, 0x53, "timer1"), (0, 0x60, 0x60, "keyboard"), (0, 0x64, 0x64, "keyboard"),
               (0, 0x80, 0x8F, "dma page reg"), (0, 0xA0, 0xA1, "pic2"), (0, 0xC0, 0xDF, "dma2"),
               (0, 0xF0, 0xFF, "fpu")]
    entries += [(0, port, port + size - 1, "serial") for port, size in serial_ports]
    return _resources(sorted(entries, key=lambda e: e[1]), 4)


def render_timer_list(cpus, now_ns: int) -> bytes:
    out = ["Timer List Version: v0.9\n", "HRTIMER_MAX_CLOCK_BASES: 8\n", f"now at {now_ns} nsecs\n"]
    tick = 4_000_000
    nxt = (now_ns // tick + 1) * tick
    for c in _online(cpus):
        out += [f"\ncpu: {c}\n", " clock 0:\n", "  .base:       0000000000000000\n", "  .index:      0\n",
                "  .resolution: 1 nsecs\n", "  .get_time:   ktime_get\n", "  .offset:     0 nsecs\n",
                "active timers:\n", " #0: <0000000000000000>, tick_nohz_handler, S:01\n",
                f" # expires at {nxt}-{nxt} nsecs [in {nxt - now_ns} to {nxt - now_ns} nsecs]\n",
                f"  .expires_next   : {nxt} nsecs\n", "  .hres_active    : 1\n",
                f"  .nr_events      : {now_ns // tick}\n"]
    out += ["\nTick Device: mode:     1\n", "Per CPU device: 0\n", "Clock Event Device: Hyper-V clockevent\n"]
    return "".join(out).encode()


def _serial_ports(dtb: bytes) -> list[tuple[int, int]]:
    """The ns16550 ports of x86-pio-bus nodes of a DTB (the COM3 the host gives)."""
    from hclsim.boot import fdt as fdtutil
    tree = fdtutil.open_fdt(dtb)
    ports = []
    for off, _name in fdtutil.subnodes(tree, 0):
        if "x86-pio-bus" not in fdtutil.prop_strings(tree, off, "compatible", default=[]):
            continue
        for child, _ in fdtutil.subnodes(tree, off):
            if "ns16550" in fdtutil.prop_strings(tree, child, "compatible", default=[]):
                ports += fdtutil.prop_reg(tree, child, 1, 1)
    return ports


def make_procfs(*, cmdline: bytes, clock, sysctl: Sysctl, cpus, mounts, meminfo, random=None,
                modules=None, dtb: bytes | None = None, idle=None) -> Dir:
    """One mount of procfs.

    cmdline: the kernel command line (bytes, no newline); clock() seconds since boot; sysctl:
    the Sysctl; cpus: .present (list of CPU numbers) and .is_online(n); mounts: the MountTable
    (its proc_mounts()); meminfo() -> {field: kB} (basic_meminfo makes one); random: the
    devfs.Random pool (entropy_avail); modules() -> ModuleInfo-like objects in load order;
    dtb: the kernel's DTB (iomem's System RAM, ioports' serial ports); idle() -> the CPUs'
    summed idle seconds (default: every online CPU idle since boot)."""
    modules = modules if modules is not None else (lambda: ())
    ram = dt_reg_ranges(dtb, "memory") if dtb else []
    serial = _serial_ports(dtb) if dtb else []

    def uptime() -> bytes:
        up = max(0.0, clock())
        idle_s = idle() if idle is not None else up * len(_online(cpus))
        return f"{_centis(up)} {_centis(idle_s)}\n".encode()

    def file(fn) -> GeneratedFile:
        return GeneratedFile(fn)

    kernel = Dir({name.split("/", 1)[1]: sysctl._node(name) for name in (*INT_SYSCTLS, *STRING_SYSCTLS)
                  if name.startswith("kernel/")})
    kernel.add("random", Dir({
        "entropy_avail": file(lambda: f"{random.entropy_avail if random is not None else 256}\n".encode()),
        "poolsize": file(lambda: b"256\n"),
        "boot_id": file(lambda: f"{sysctl.boot_id}\n".encode()),
        "uuid": file(lambda: f"{_uuid4()}\n".encode()),
    }))
    vm = Dir({name.split("/", 1)[1]: sysctl._node(name) for name in INT_SYSCTLS if name.startswith("vm/")})
    return Dir({
        "cmdline": file(lambda: bytes(cmdline) + b"\n"),
        "device-tree": Symlink("/sys/firmware/devicetree/base"),
        "meminfo": file(lambda: render_meminfo(meminfo())),
        "uptime": file(uptime),
        "modules": file(lambda: render_modules(modules(), sysctl["kernel/kptr_restrict"])),
        "mounts": file(lambda: mounts.proc_mounts()),
        "interrupts": file(lambda: render_interrupts(cpus, clock())),
        "iomem": file(lambda: render_iomem(ram)),
        "ioports": file(lambda: render_ioports(serial)),
        "timer_list": file(lambda: render_timer_list(cpus, int(clock() * 1e9))),
        "sys": Dir({"kernel": kernel, "vm": vm}),
    })
