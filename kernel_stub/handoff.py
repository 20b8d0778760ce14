"""The boot shim's jump into Linux, taken apart and checked the way the x86 boot path would see it.

The shim (boot/firmware/shim) leaves the CPU at the kernel entry with RSI = &boot_params; the
format is in docs/contracts.md ("Kernel handoff") and Documentation/arch/x86/boot.rst. Every
violation is a HandoffError whose message starts with the offending field, so a broken shim is
diagnosed from one line.
"""
from dataclasses import dataclass

import numpy as np

from hclsim import HclsimError
from hclsim.boot.layout import (BOOT_FLAG_MAGIC, E820_MAX_ENTRIES_ZEROPAGE, E820_RAM, E820_RESERVED, HDRS_MAGIC,
                                PAGE_SIZE, SETUP_DTB, SETUP_E820_EXT, BootE820Entry, BootParams, SetupData,
                                from_bytes)
from hclsim.cpu.memory import GuestMemory
from hclsim.cpu.pagetable import LEVEL_NAMES, translate
from hclsim.boot import fdt as fdtr

CR0_PE, CR0_PG = 1 << 0, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
BOOT_CS, BOOT_DS = 0x10, 0x18          # Linux's __BOOT_CS / __BOOT_DS
BOOT_PROTOCOL_VERSION = 0x020F
LOADER_UNDEFINED = 0xFF
HARDWARE_SUBARCH_OPENHCL = 1           # makes the OpenHCL kernel skip BIOS/ROM probing (VTL0's memory)
MAX_SETUP_DATA = 64                    # bounds the chain walk even without a loop
E820_ENTRY_SIZE = 20
SETUP_DATA_HEADER = 16

DT_COMPATIBLE = "microsoft,openvmm"
HYPERVISOR_COMPATIBLE = "microsoft,hyperv"


class HandoffError(HclsimError):
    pass


@dataclass(frozen=True)
class HandoffRegs:
    rip: int
    rdi: int
    rsi: int
    rsp: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: int
    ds: int
    ss: int


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class Handoff:
    boot_params_gpa: int
    boot_params: bytes
    cmdline: str                  # the command line as text (UTF-8; any other byte as \xNN)
    e820: tuple[E820Entry, ...]
    initrd_gpa: int
    initrd_size: int
    dtb: bytes
    dt: dict
    setup_data: tuple[tuple[int, int, int], ...]  # (gpa, type, len)
    cmdline_bytes: bytes = b""    # exactly what the shim wrote (what Linux parses)


def _fail(msg: str):
    raise HandoffError(f"handoff: {msg}")


@dataclass(frozen=True)
class Vtl2Range:
    start: int
    end: int

    def holds(self, addr: int, size: int = 1) -> bool:
        return size >= 0 and self.start <= addr and addr + size <= self.end

    def require(self, field: str, addr: int, size: int = 1) -> None:
        if not self.holds(addr, size):
            _fail(f"{field} {addr:#x} (size {size:#x}) outside VTL2 [{self.start:#x}, {self.end:#x})")


# ---- registers ---------------------------------------------------------------------------------

def _register_checks(entry: int):
    """(field, value getter, predicate, what was expected): Linux's 64-bit entry requirements."""
    return (
        ("rip", lambda r: r.rip, lambda v: v == entry, f"the kernel entry {entry:#x}"),
        ("efer.LMA", lambda r: r.efer, lambda v: v & EFER_LMA, "LMA set (long mode active)"),
        ("efer.LME", lambda r: r.efer, lambda v: v & EFER_LME, "LME set"),
        ("cr0.PE", lambda r: r.cr0, lambda v: v & CR0_PE, "PE set"),
        ("cr0.PG", lambda r: r.cr0, lambda v: v & CR0_PG, "PG set"),
        ("cr4.PAE", lambda r: r.cr4, lambda v: v & CR4_PAE, "PAE set"),
        ("cs", lambda r: r.cs, lambda v: v == BOOT_CS, f"__BOOT_CS {BOOT_CS:#x}"),
        ("ds", lambda r: r.ds, lambda v: v == BOOT_DS, f"__BOOT_DS {BOOT_DS:#x}"),
        ("ss", lambda r: r.ss, lambda v: v == BOOT_DS, f"__BOOT_DS {BOOT_DS:#x}"),
        ("rdi", lambda r: r.rdi, lambda v: v == 0, "0"),
    )


def _check_registers(regs: HandoffRegs, entry: int) -> None:
    for field, get, ok, expected in _register_checks(entry):
        value = get(regs)
        if not ok(value):
            _fail(f"{field}: {value:#x}, expected {expected}")


def _check_identity_mapped(mem: GuestMemory, cr3: int, what: str, addr: int, size: int) -> None:
    """The boot protocol wants the kernel, zero page and command line identity-mapped."""
    ram = mem.array()
    for page in range(addr & ~(PAGE_SIZE - 1), addr + max(size, 1), PAGE_SIZE):
        va = max(page, addr)
        pa = translate(ram, cr3, va)
        if pa != va:
            why = LEVEL_NAMES.get(pa, f"maps to {pa:#x}")
            _fail(f"cr3 {cr3:#x}: {what} at {va:#x} is not identity-mapped ({why})")


# ---- boot_params -------------------------------------------------------------------------------

# (setup header field, required value): what the shim promises (contracts.md) and Linux reads.
_HEADER_FIELDS = (
    ("boot_flag", BOOT_FLAG_MAGIC),
    ("header", HDRS_MAGIC),
    ("version", BOOT_PROTOCOL_VERSION),
    ("type_of_loader", LOADER_UNDEFINED),
    ("hardware_subarch", HARDWARE_SUBARCH_OPENHCL),
)


def _check_header(bp: BootParams) -> None:
    for name, want in _HEADER_FIELDS:
        got = getattr(bp.hdr, name)
        if got != want:
            _fail(f"boot_params.hdr.{name}: {got:#x}, expected {want:#x}")
    if bp.e820_entries > E820_MAX_ENTRIES_ZEROPAGE:
        _fail(f"boot_params.e820_entries: {bp.e820_entries} > {E820_MAX_ENTRIES_ZEROPAGE}")


# ---- the kernel command line as Linux reads it -------------------------------------------------

def linux_isspace(byte: int) -> bool:
    """lib/ctype.c's isspace(): tab, newline, \\v, \\f, CR, space, and 0xA0 (Latin-1 NBSP)."""
    return byte == 0x20 or 0x09 <= byte <= 0x0D or byte == 0xA0


@dataclass(frozen=True)
class KernelParam:
    """One parameter as lib/cmdline.c's next_arg() splits it: name, value (None without '='),
    and where its bytes (quotes included) lie in the line."""
    name: bytes
    value: bytes | None
    start: int
    end: int


def kernel_params(line: bytes) -> tuple[list[KernelParam], bytes | None]:
    """The parameters Linux's parse_args() hands to the kernel, and the rest after a "--" (for
    init) or None. Spaces are isspace() bytes; a '"' toggles quoting (a leading one quotes the
    whole parameter and is dropped, as is a closing one); the name ends at the first '=' after
    its first byte; a value's surrounding quotes are dropped."""
    params, i, n = [], 0, len(line)
    while True:
        while i < n and linux_isspace(line[i]):
            i += 1
        if i >= n:
            return params, None
        start, quoted = i, line[i] == 0x22
        args = i + quoted
        in_quote, equals, j = quoted, 0, args
        while j < n and not (linux_isspace(line[j]) and not in_quote):
            if equals == 0 and j > args and line[j] == 0x3D:
                equals = j
            if line[j] == 0x22:
                in_quote = not in_quote
            j += 1
        token = bytes(line[args:j])
        if equals:
            eq = equals - args
            vstart, vend = eq + 1, len(token)
            opened = token[vstart:vstart + 1] == b'"'
            vstart += opened
            if (opened or quoted) and token.endswith(b'"'):
                vend -= 1
            name, value = token[:eq], token[vstart:max(vstart, vend)]
        else:
            name, value = token[:-1] if quoted and token.endswith(b'"') else token, None
        if value is None and name == b"--":
            return params, line[j + 1:] if j < n else b""
        params.append(KernelParam(name, value, start, j))
        i = j + 1


def param_is(param: KernelParam, name: str) -> bool:
    """parameq(): names compare with '-' and '_' the same."""
    return param.name.replace(b"-", b"_") == name.encode().replace(b"-", b"_")


def _read_cmdline(mem: GuestMemory, bp: BootParams, vtl2: Vtl2Range) -> tuple[int, bytes]:
    ptr = bp.hdr.cmd_line_ptr | bp.ext_cmd_line_ptr << 32
    vtl2.require("boot_params.hdr.cmd_line_ptr", ptr)
    # cmdline_size excludes the NUL (boot protocol), so the NUL may sit at offset cmdline_size.
    limit = bp.hdr.cmdline_size + 1
    raw = mem.read(ptr, min(limit, vtl2.end - ptr))
    end = raw.find(b"\0")
    if end < 0:
        _fail(f"boot_params.hdr.cmdline_size: command line at {ptr:#x} has no NUL within "
              f"{bp.hdr.cmdline_size} bytes (or before the end of VTL2)")
    # Any other byte is fine: Linux copies the line as it is (boot_command_line) and splits it at
    # isspace() bytes; nothing in it is refused, UTF-8 or Latin-1 from a trusted host included.
    return ptr, raw[:end]


def _check_initrd(mem: GuestMemory, bp: BootParams, vtl2: Vtl2Range, initrd: bytes | None) -> tuple[int, int]:
    image = bp.hdr.ramdisk_image | bp.ext_ramdisk_image << 32
    size = bp.hdr.ramdisk_size | bp.ext_ramdisk_size << 32
    if initrd is None:
        if image or size:
            _fail(f"boot_params.hdr.ramdisk_image/ramdisk_size: {image:#x}/{size:#x}, expected 0/0 (no initrd)")
        return 0, 0
    if size != len(initrd):
        _fail(f"boot_params.hdr.ramdisk_size: {size:#x}, expected the initrd's {len(initrd):#x} bytes")
    vtl2.require("boot_params.hdr.ramdisk_image", image, size)
    loaded = mem.read(image, size)
    if loaded != initrd:
        first = int(np.flatnonzero(np.frombuffer(loaded, np.uint8) != np.frombuffer(initrd, np.uint8))[0])
        _fail(f"boot_params.hdr.ramdisk_image: bytes at {image:#x} differ from the initrd "
              f"(first difference at offset {first:#x})")
    return image, size


# ---- setup_data chain --------------------------------------------------------------------------

def read_setup_data(mem: GuestMemory, head: int, vtl2: Vtl2Range) -> tuple[tuple[int, int, int], ...]:
    """The setup_data chain as (gpa, type, len), each header and payload checked to lie in VTL2."""
    seen: dict[int, int] = {}
    chain = []
    field, gpa = "boot_params.hdr.setup_data", head
    while gpa:
        index = len(chain)
        if gpa in seen:
            _fail(f"{field}: {gpa:#x} loops back to setup_data[{seen[gpa]}]")
        if index >= MAX_SETUP_DATA:
            _fail(f"{field}: setup_data chain longer than {MAX_SETUP_DATA} entries")
        vtl2.require(field, gpa, SETUP_DATA_HEADER)
        hdr = mem.read_struct(SetupData, gpa)
        payload = gpa + SETUP_DATA_HEADER
        if not vtl2.holds(payload, hdr.len):
            _fail(f"setup_data[{index}].len: {hdr.len:#x} bytes at {payload:#x} run past the end of VTL2 "
                  f"{vtl2.end:#x}")
        seen[gpa] = index
        chain.append((gpa, hdr.type, hdr.len))
        field, gpa = f"setup_data[{index}].next", hdr.next
    return tuple(chain)


def _dtb_of(mem: GuestMemory, chain) -> tuple[str, bytes]:
    dtbs = [(i, gpa, length) for i, (gpa, kind, length) in enumerate(chain) if kind == SETUP_DTB]
    if len(dtbs) != 1:
        where = ", ".join(f"setup_data[{i}]" for i, _, _ in dtbs) or "none"
        _fail(f"setup_data: {len(dtbs)} SETUP_DTB entries ({where}), expected exactly one")
    index, gpa, length = dtbs[0]
    return f"setup_data[{index}] SETUP_DTB", mem.read(gpa + SETUP_DATA_HEADER, length)


# ---- e820 --------------------------------------------------------------------------------------

def read_e820(mem: GuestMemory, bp: BootParams, chain) -> tuple[tuple[str, E820Entry], ...]:
    """(field name, entry): the zero page's entries, then those of each SETUP_E820_EXT in chain order."""
    entries = [(f"boot_params.e820_table[{i}]", bp.e820_table[i]) for i in range(bp.e820_entries)]
    for index, (gpa, kind, length) in enumerate(chain):
        if kind != SETUP_E820_EXT:
            continue
        if length % E820_ENTRY_SIZE:
            _fail(f"setup_data[{index}].len: {length} is not a whole number of e820 entries (SETUP_E820_EXT)")
        raw = mem.read(gpa + SETUP_DATA_HEADER, length)
        entries += [(f"setup_data[{index}] SETUP_E820_EXT entry {k}", from_bytes(BootE820Entry, raw, off))
                    for k, off in enumerate(range(0, length, E820_ENTRY_SIZE))]
    return tuple((name, E820Entry(e.addr, e.size, e.type)) for name, e in entries)


# (predicate, problem): each e820 entry on its own.
_E820_ENTRY_CHECKS = (
    (lambda e, vtl2: e.size > 0, lambda e, vtl2: "size is 0"),
    (lambda e, vtl2: e.type in (E820_RAM, E820_RESERVED),
     lambda e, vtl2: f"type {e.type} is neither RAM (1) nor reserved (2)"),
    (lambda e, vtl2: vtl2.holds(e.addr, e.size),
     lambda e, vtl2: f"[{e.addr:#x}, {e.end:#x}) outside VTL2 [{vtl2.start:#x}, {vtl2.end:#x})"),
)


def _check_e820(named, vtl2: Vtl2Range) -> None:
    if not named:
        _fail("boot_params.e820_entries: e820 map is empty")
    prev = None
    for name, e in named:
        for ok, problem in _E820_ENTRY_CHECKS:
            if not ok(e, vtl2):
                _fail(f"{name}: {problem(e, vtl2)}")
        if prev is not None and e.addr < prev.addr:
            _fail(f"{name}: [{e.addr:#x}, {e.end:#x}) is not sorted (previous entry starts at {prev.addr:#x})")
        if prev is not None and e.addr < prev.end:
            _fail(f"{name}: [{e.addr:#x}, {e.end:#x}) overlaps the previous entry ending at {prev.end:#x}")
        prev = e


def _merge(ranges) -> list[tuple[int, int]]:
    """(start, end) ranges sorted with touching or overlapping ones joined."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def _subtract(ranges, holes) -> list[tuple[int, int]]:
    out = []
    for start, end in ranges:
        for hs, he in _merge(holes):
            if he <= start or hs >= end:
                continue
            if hs > start:
                out.append((start, hs))
            start = max(start, he)
        if start < end:
            out.append((start, end))
    return out


def _ram_ranges(e820) -> list[tuple[int, int]]:
    return _merge((e.addr, e.end) for e in e820 if e.type == E820_RAM)


def _check_ram_covers(e820, what: str, addr: int, size: int) -> None:
    if not any(s <= addr and addr + max(size, 1) <= e for s, e in _ram_ranges(e820)):
        _fail(f"e820: RAM does not cover the {what} [{addr:#x}, {addr + max(size, 1):#x})")


# ---- device tree -------------------------------------------------------------------------------

# (node path, property, expected): a string is looked for in a string list, an int compared to a u32.
_DT_PROPERTY_CHECKS = (
    ("/", "compatible", DT_COMPATIBLE),
    ("/", "#address-cells", 2),
    ("/", "#size-cells", 2),
    ("/hypervisor", "compatible", HYPERVISOR_COMPATIBLE),
    ("/cpus", "#address-cells", 1),
    ("/cpus", "#size-cells", 0),
)
_CPU_PROPERTY_CHECKS = (("device_type", "cpu"), ("reg", int), ("numa-node-id", int), ("status", "okay"))


def _check_property(tree, off: int, name: str, expected) -> None:
    path = fdtr.path_of(tree, off)
    if isinstance(expected, str):
        got = fdtr.prop_strings(tree, off, name)
        if expected not in got:
            _fail(f"dtb {path} {name}: {', '.join(map(repr, got))}, expected {expected!r}")
    else:
        got = fdtr.prop_u32(tree, off, name)
        if expected is not int and got != expected:
            _fail(f"dtb {path} {name}: {got}, expected {expected}")


def _required_node(tree, path: str) -> int:
    off = fdtr.node(tree, path)
    if off is None:
        _fail(f"dtb {path}: node missing")
    return off


def _check_dt_cpus(tree) -> None:
    cpus = _required_node(tree, "/cpus")
    apic_ids: dict[int, str] = {}
    for off, name in fdtr.subnodes(tree, cpus):
        if not name.startswith("cpu@"):
            continue
        for prop, expected in _CPU_PROPERTY_CHECKS:
            _check_property(tree, off, prop, expected)
        apic = fdtr.prop_u32(tree, off, "reg")
        if apic in apic_ids:
            _fail(f"dtb /cpus/{name} reg: APIC id {apic} already used by /cpus/{apic_ids[apic]}")
        apic_ids[apic] = name
    if not apic_ids:
        _fail("dtb /cpus: no cpu@ node")


def _memory_nodes(tree) -> list[tuple[str, int, int]]:
    """(path, base, size) of every reg entry of the root's memory@ nodes."""
    out = []
    for off, name in fdtr.subnodes(tree, 0):
        if name.startswith("memory@"):
            _check_property(tree, off, "device_type", "memory")
            out += [(f"/{name}", base, size) for base, size in fdtr.prop_reg(tree, off, 2, 2)]
    return out


def _check_dt_memory(tree, e820) -> None:
    """Linux's usable RAM from the tree (memory@ minus /memreserve/) must be the e820 RAM."""
    nodes = _memory_nodes(tree)
    if not nodes:
        _fail("dtb /: no memory@ node")
    reserved = [(addr, addr + size) for addr, size in fdtr.mem_reserves(tree)]
    usable = _subtract(_merge((b, b + s) for _, b, s in nodes), reserved)
    ram = _ram_ranges(e820)
    extra, missing = _subtract(usable, ram), _subtract(ram, usable)
    if extra and (not missing or extra[0] < missing[0]):
        start, end = extra[0]
        path = next(p for p, b, s in nodes if b <= start < b + s)
        _fail(f"dtb {path} reg: [{start:#x}, {end:#x}) is usable memory but not e820 RAM")
    if missing:
        start, end = missing[0]
        inside = [p for p, b, s in nodes if b <= start < b + s]
        where = f"reserved by /memreserve/ inside {inside[0]}" if inside else "not in any memory@ node"
        _fail(f"dtb memory@: e820 RAM [{start:#x}, {end:#x}) is {where}")


def _check_dt(tree, e820) -> None:
    for path, name, expected in _DT_PROPERTY_CHECKS:
        _check_property(tree, _required_node(tree, path), name, expected)
    _check_dt_cpus(tree)
    _check_dt_memory(tree, e820)


def _summarize(tree) -> dict:
    cpus_off = fdtr.node(tree, "/cpus")
    cpus = [] if cpus_off is None else [
        (fdtr.prop_u32(tree, off, "reg"), fdtr.prop_u32(tree, off, "numa-node-id", 0))
        for off, name in fdtr.subnodes(tree, cpus_off) if name.startswith("cpu@")]
    openhcl = fdtr.node(tree, "/openhcl")
    openhcl_memory = [] if openhcl is None else [
        (base, size, fdtr.prop_u32(tree, off, "openhcl,memory-type", 0))
        for off, name in fdtr.subnodes(tree, openhcl) if name.startswith("memory@")
        for base, size in fdtr.prop_reg(tree, off, 2, 2)]
    hypervisor = fdtr.node(tree, "/hypervisor")
    return {
        "compatible": fdtr.prop_strings(tree, 0, "compatible", []),
        "hypervisor": hypervisor is not None
        and HYPERVISOR_COMPATIBLE in fdtr.prop_strings(tree, hypervisor, "compatible", []),
        "cpus": cpus,
        "memory": [(base, size) for _, base, size in _memory_nodes(tree)],
        "openhcl_memory": openhcl_memory,
        "reftimes": {name: fdtr.prop_u64(tree, 0, name)
                     for name in fdtr.prop_names(tree, 0) if name.startswith("reftime_")},
        "isolation_type": None if openhcl is None else fdtr.prop_str(tree, openhcl, "isolation-type", None),
        "memreserve": fdtr.mem_reserves(tree),
    }


def dt_summary(blob) -> dict:
    """What the kernel's device tree says: cpus [(apic, numa)], memory [(base, size)], openhcl_memory
    [(base, size, memory type)], reftimes, isolation_type, compatible, hypervisor, memreserve."""
    try:
        return _summarize(fdtr.open_fdt(blob))
    except fdtr.FdtError as e:
        raise HandoffError(f"handoff: dtb {e}") from None


def cmdline_text(raw: bytes) -> str:
    """The command line for reports and logs: UTF-8 text, any other byte as \\xNN."""
    return raw.decode("utf-8", "backslashreplace")


# ---- the whole handoff -------------------------------------------------------------------------

def check_handoff(mem: GuestMemory, regs: HandoffRegs, *, kernel_entry: int, vtl2_base: int, vtl2_size: int,
                  initrd: bytes | None) -> Handoff:
    """Everything the shim handed to Linux, after checking it as Linux would; HandoffError otherwise."""
    vtl2 = Vtl2Range(vtl2_base, vtl2_base + vtl2_size)
    if not mem.contains(vtl2.start, vtl2_size):
        _fail(f"VTL2 range [{vtl2.start:#x}, {vtl2.end:#x}) outside guest RAM [0, {mem.size:#x})")
    _check_registers(regs, kernel_entry)
    vtl2.require("rsi (boot_params)", regs.rsi, PAGE_SIZE)
    raw = mem.read(regs.rsi, PAGE_SIZE)
    bp = BootParams.from_buffer_copy(raw)
    _check_header(bp)
    cmdline_gpa, cmdline = _read_cmdline(mem, bp, vtl2)
    for what, addr, size in (("kernel entry", kernel_entry, 1), ("boot_params", regs.rsi, PAGE_SIZE),
                             ("command line", cmdline_gpa, len(cmdline) + 1)):
        _check_identity_mapped(mem, regs.cr3, what, addr, size)

    chain = read_setup_data(mem, bp.hdr.setup_data, vtl2)
    named = read_e820(mem, bp, chain)
    _check_e820(named, vtl2)
    e820 = tuple(e for _, e in named)
    initrd_gpa, initrd_size = _check_initrd(mem, bp, vtl2, initrd)
    _check_ram_covers(e820, "kernel entry", kernel_entry, 1)
    if initrd_size:
        _check_ram_covers(e820, "initrd", initrd_gpa, initrd_size)

    dtb_field, dtb_area = _dtb_of(mem, chain)
    try:
        tree = fdtr.open_fdt(dtb_area)
    except fdtr.FdtError as e:
        _fail(f"{dtb_field}: {e}")
    try:
        _check_dt(tree, e820)
        summary = _summarize(tree)
    except fdtr.FdtError as e:
        _fail(f"dtb {e}")
    return Handoff(boot_params_gpa=regs.rsi, boot_params=raw, cmdline=cmdline_text(cmdline), e820=e820,
                   initrd_gpa=initrd_gpa, initrd_size=initrd_size, dtb=bytes(tree.as_bytearray()),
                   dt=summary, setup_data=chain, cmdline_bytes=cmdline)
