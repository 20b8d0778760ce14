"""kernel_stub.handoff on handoffs built by hand in guest memory: a valid one is accepted, and each
broken field is rejected with a message naming it."""
import dataclasses
import re
import subprocess

import libfdt
import pytest

from hclsim.boot import layout as L
from hclsim.cpu.memory import GuestMemory
from .tools import require
from hclsim.kernel_stub.handoff import E820Entry, HandoffError, HandoffRegs, check_handoff, dt_summary

MiB = 1 << 20
VTL2_BASE, VTL2_SIZE = 2 * MiB, 16 * MiB
VTL2_END = VTL2_BASE + VTL2_SIZE
MEM_SIZE = 32 * MiB
ENTRY = VTL2_BASE + 2 * MiB
INITRD_GPA = VTL2_BASE + 3 * MiB
BOOT_PARAMS = VTL2_BASE + 4 * MiB
CMDLINE_GPA = BOOT_PARAMS + 0x1000
DTB_SETUP = BOOT_PARAMS + 0x2000
E820_EXT_SETUP = BOOT_PARAMS + 0x80000
PAGE_TABLES = VTL2_BASE + 5 * MiB
RESERVED = (VTL2_BASE + 6 * MiB, 0x10000)
INITRD = bytes(range(256)) * 48
CMDLINE = "rdinit=/underhill-init console=ttyS2,115200 panic=-1"
REFTIMES = {"reftime_boot_start": 100, "reftime_boot_end": 900}
CPUS = [(0, 0), (1, 0), (2, 1), (3, 1)]


def default_e820():
    rs, rsize = RESERVED
    return [(VTL2_BASE, rs - VTL2_BASE, L.E820_RAM), (rs, rsize, L.E820_RESERVED),
            (rs + rsize, VTL2_END - rs - rsize, L.E820_RAM)]


def make_dtb(e820) -> bytes:
    """The kernel DT as the shim writes it: all of VTL2 as memory, non-RAM in /memreserve/."""
    sw = libfdt.FdtSw()
    for addr, size, kind in e820:
        if kind != L.E820_RAM:
            sw.add_reservemap_entry(addr, size)
    sw.finish_reservemap()
    with sw.add_node(""):
        sw.property_u32("#address-cells", 2)
        sw.property_u32("#size-cells", 2)
        sw.property_string("compatible", "microsoft,openvmm")
        for name, value in REFTIMES.items():
            sw.property_u64(name, value)
        with sw.add_node("hypervisor"):
            sw.property_string("compatible", "microsoft,hyperv")
        with sw.add_node("cpus"):
            sw.property_u32("#address-cells", 1)
            sw.property_u32("#size-cells", 0)
            for i, (apic, numa) in enumerate(CPUS):
                with sw.add_node(f"cpu@{i}"):
                    sw.property_string("device_type", "cpu")
                    sw.property_u32("reg", apic)
                    sw.property_u32("numa-node-id", numa)
                    sw.property_string("status", "okay")
        with sw.add_node(f"memory@{VTL2_BASE:x}"):
            sw.property_string("device_type", "memory")
            sw.property("reg", VTL2_BASE.to_bytes(8, "big") + VTL2_SIZE.to_bytes(8, "big"))
            sw.property_u32("numa-node-id", 0)
        with sw.add_node("openhcl"):
            sw.property_u32("#address-cells", 2)
            sw.property_u32("#size-cells", 2)
            sw.property_string("isolation-type", "none")
            for base, size, kind in ((0, VTL2_BASE, 0), (VTL2_BASE, VTL2_SIZE, 1)):
                with sw.add_node(f"memory@{base:x}"):
                    sw.property_string("device_type", "memory-openhcl")
                    sw.property("reg", base.to_bytes(8, "big") + size.to_bytes(8, "big"))
                    sw.property_u32("openhcl,memory-type", kind)
    tree = sw.as_fdt()
    tree.pack()
    return bytes(tree.as_bytearray())


def dtc(args, data: bytes) -> bytes:
    return subprocess.run([require("dtc"), "-q", *args], input=data, capture_output=True, check=True).stdout


@dataclasses.dataclass
class Scene:
    """A guest memory holding a complete handoff, plus the registers and check arguments."""
    mem: GuestMemory
    regs: HandoffRegs
    initrd: bytes | None = INITRD

    def check(self):
        return check_handoff(self.mem, self.regs, kernel_entry=ENTRY, vtl2_base=VTL2_BASE,
                             vtl2_size=VTL2_SIZE, initrd=self.initrd)

    def boot_params(self) -> L.BootParams:
        return self.mem.read_struct(L.BootParams, BOOT_PARAMS)

    def patch_bp(self, **fields):
        """Set boot_params fields; 'hdr__x' names a setup header field."""
        bp = self.boot_params()
        for name, value in fields.items():
            target, attr = (bp.hdr, name[5:]) if name.startswith("hdr__") else (bp, name)
            setattr(target, attr, value)
        self.mem.write_struct(BOOT_PARAMS, bp)

    def patch_e820(self, index, **fields):
        bp = self.boot_params()
        for name, value in fields.items():
            setattr(bp.e820_table[index], name, value)
        self.mem.write_struct(BOOT_PARAMS, bp)

    def set_regs(self, **fields):
        self.regs = dataclasses.replace(self.regs, **fields)

    def set_dtb(self, blob: bytes, length: int | None = None):
        hdr = self.mem.read_struct(L.SetupData, DTB_SETUP)
        hdr.len = len(blob) if length is None else length
        self.mem.write_struct(DTB_SETUP, hdr)
        self.mem.write(DTB_SETUP + 16, blob)

    def edit_dts(self, edit):
        """Decompile the DTB with dtc, apply edit(text), recompile it with dtc and put it back."""
        blob = self.mem.read(DTB_SETUP + 16, self.mem.read_struct(L.SetupData, DTB_SETUP).len)
        text = dtc(["-I", "dtb", "-O", "dts"], blob).decode()
        edited = edit(text)
        assert edited != text, "edit changed nothing"
        self.set_dtb(dtc(["-I", "dts", "-O", "dtb"], edited.encode()))


def write_page_tables(mem: GuestMemory) -> int:
    """Identity-map VTL2 with 2 MiB pages (everything here is below 1 GiB)."""
    pml4, pdpt, pd = PAGE_TABLES, PAGE_TABLES + 0x1000, PAGE_TABLES + 0x2000
    mem.write_u64(pml4, pdpt | 3)
    mem.write_u64(pdpt, pd | 3)
    for addr in range(VTL2_BASE, VTL2_END, 2 * MiB):
        mem.write_u64(pd + (addr >> 21) * 8, addr | 0x83)
    return pml4


def build(e820=None, initrd=INITRD) -> Scene:
    e820 = default_e820() if e820 is None else e820
    mem = GuestMemory(MEM_SIZE)
    cr3 = write_page_tables(mem)
    mem.write(ENTRY, b"\xf4")
    if initrd is not None:
        mem.write(INITRD_GPA, initrd)
    mem.write(CMDLINE_GPA, CMDLINE.encode() + b"\0")

    bp = L.BootParams()
    h = bp.hdr
    h.boot_flag, h.header, h.version = L.BOOT_FLAG_MAGIC, L.HDRS_MAGIC, 0x020F
    h.type_of_loader, h.hardware_subarch = 0xFF, 1
    h.cmd_line_ptr, h.cmdline_size = CMDLINE_GPA, len(CMDLINE)
    if initrd is not None:
        h.ramdisk_image, h.ramdisk_size = INITRD_GPA, len(initrd)
    h.setup_data = DTB_SETUP
    zero_page, ext = e820[:L.E820_MAX_ENTRIES_ZEROPAGE], e820[L.E820_MAX_ENTRIES_ZEROPAGE:]
    bp.e820_entries = len(zero_page)
    for i, (addr, size, kind) in enumerate(zero_page):
        bp.e820_table[i] = L.BootE820Entry(addr, size, kind)
    mem.write_struct(BOOT_PARAMS, bp)

    dtb = make_dtb(e820)
    mem.write_struct(DTB_SETUP, L.SetupData(E820_EXT_SETUP if ext else 0, L.SETUP_DTB, len(dtb)))
    mem.write(DTB_SETUP + 16, dtb)
    if ext:
        entries = b"".join(bytes(L.BootE820Entry(*e)) for e in ext)
        mem.write_struct(E820_EXT_SETUP, L.SetupData(0, L.SETUP_E820_EXT, len(entries)))
        mem.write(E820_EXT_SETUP + 16, entries)

    regs = HandoffRegs(rip=ENTRY, rdi=0, rsi=BOOT_PARAMS, rsp=0, cr0=0x80000021, cr3=cr3, cr4=0x40060,
                       efer=0xD00, cs=0x10, ds=0x18, ss=0x18)
    return Scene(mem, regs, initrd)


# ---- accepted handoffs -------------------------------------------------------------------------

def test_valid_handoff_accepted():
    h = build().check()
    assert h.boot_params_gpa == BOOT_PARAMS and len(h.boot_params) == 4096
    assert h.cmdline == CMDLINE
    assert h.e820 == tuple(E820Entry(*e) for e in default_e820())
    assert (h.initrd_gpa, h.initrd_size) == (INITRD_GPA, len(INITRD))
    assert h.setup_data == ((DTB_SETUP, L.SETUP_DTB, len(h.dtb)),)
    assert h.dt["cpus"] == CPUS
    assert h.dt["memory"] == [(VTL2_BASE, VTL2_SIZE)]
    assert h.dt["memreserve"] == [RESERVED]
    assert h.dt["reftimes"] == REFTIMES
    assert h.dt["isolation_type"] == "none"
    assert h.dt["hypervisor"] is True
    assert h.dt["compatible"] == ["microsoft,openvmm"]
    assert h.dt["openhcl_memory"] == [(0, VTL2_BASE, 0), (VTL2_BASE, VTL2_SIZE, 1)]
    assert dt_summary(h.dtb) == h.dt


def test_no_initrd_accepted():
    h = build(initrd=None).check()
    assert (h.initrd_gpa, h.initrd_size) == (0, 0)


def test_high_cmdline_size_slack_accepted():
    s = build()
    s.patch_bp(hdr__cmdline_size=4096)  # a larger buffer than the line is fine
    assert s.check().cmdline == CMDLINE


def many_e820_entries(count):
    """RAM, then count alternating 4 KiB reserved/RAM pieces, then RAM to the end of VTL2."""
    start = VTL2_BASE + 7 * MiB
    pieces = [(VTL2_BASE, start - VTL2_BASE, L.E820_RAM)]
    for i in range(count):
        pieces.append((start + i * 0x1000, 0x1000, L.E820_RESERVED if i % 2 == 0 else L.E820_RAM))
    end = start + count * 0x1000
    pieces.append((end, VTL2_END - end, L.E820_RAM))
    return pieces


def test_e820_beyond_128_entries_continues_in_setup_e820_ext():
    e820 = many_e820_entries(200)
    s = build(e820=e820)
    assert s.boot_params().e820_entries == 128
    h = s.check()
    assert h.e820 == tuple(E820Entry(*e) for e in e820)
    assert [kind for _, kind, _ in h.setup_data] == [L.SETUP_DTB, L.SETUP_E820_EXT]
    assert h.setup_data[1][2] == (len(e820) - 128) * 20


def test_dtb_built_by_dtc_accepted():
    s = build()
    s.edit_dts(lambda t: t.replace("reftime_boot_end = <0x00 0x384>", "reftime_boot_end = <0x00 0x385>"))
    assert s.check().dt["reftimes"]["reftime_boot_end"] == 0x385


# ---- rejected handoffs: one broken field each ----------------------------------------------------

def dts_edit(edit):
    """A scene mutation editing the DTB's source text (dtc round trip)."""
    return lambda s: s.edit_dts(edit)


def dts_sub(pattern: str, repl: str, count: int = 0):
    return dts_edit(lambda text: re.sub(pattern, repl, text, count=count, flags=re.S))


def in_node(node: str, old: str, new: str):
    """Replace the first `old` after the line opening `node`."""
    def edit(text):
        start = re.search(rf"^\s*{re.escape(node)} {{$", text, re.M).end()
        return text[:start] + text[start:].replace(old, new, 1)
    return dts_edit(edit)


def drop_node(node: str):
    return dts_sub(rf"\n\s*{re.escape(node)} {{.*?\n\t}};", "", count=1)


def e820_ext_bad_len(s):
    hdr = s.mem.read_struct(L.SetupData, E820_EXT_SETUP)
    hdr.len -= 1
    s.mem.write_struct(E820_EXT_SETUP, hdr)


def second_dtb(s):
    blob = s.mem.read(DTB_SETUP + 16, s.mem.read_struct(L.SetupData, DTB_SETUP).len)
    other = DTB_SETUP + 0x40000
    s.mem.write_struct(other, L.SetupData(0, L.SETUP_DTB, len(blob)))
    s.mem.write(other + 16, blob)
    s.mem.write_u64(DTB_SETUP, other)


def setup_data_loop(s):
    second = DTB_SETUP + 0x40000
    s.mem.write_struct(second, L.SetupData(DTB_SETUP, 0x1234, 0))
    s.mem.write_u64(DTB_SETUP, second)


def swap_e820(s):
    bp = s.boot_params()
    a, b = L.BootE820Entry.from_buffer_copy(bp.e820_table[0]), L.BootE820Entry.from_buffer_copy(bp.e820_table[1])
    bp.e820_table[0], bp.e820_table[1] = b, a
    s.mem.write_struct(BOOT_PARAMS, bp)


def corrupt(gpa, data):
    return lambda s: s.mem.write(gpa, data)


def corrupt_dt_struct(s):
    """An invalid tag at the start of the structure block (off_dt_struct is header word 2)."""
    dtb = DTB_SETUP + 16
    off_dt_struct = int.from_bytes(s.mem.read(dtb + 8, 4), "big")
    s.mem.write(dtb + off_dt_struct, b"\xff\xff\xff\xff")


RSV_START, RSV_SIZE = RESERVED
MEMNODE = f"memory@{VTL2_BASE:x}"

VIOLATIONS = {
    # registers
    "rip": (lambda s: s.set_regs(rip=ENTRY + 1), "rip"),
    "long mode": (lambda s: s.set_regs(efer=0x100), "efer.LMA"),
    "paging": (lambda s: s.set_regs(cr0=0x21), "cr0.PG"),
    "protected mode": (lambda s: s.set_regs(cr0=0x80000000), "cr0.PE"),
    "pae": (lambda s: s.set_regs(cr4=0x40040), "cr4.PAE"),
    "cs": (lambda s: s.set_regs(cs=0x8), "cs"),
    "ss": (lambda s: s.set_regs(ss=0x10), "ss"),
    "rdi": (lambda s: s.set_regs(rdi=1), "rdi"),
    "rsi outside vtl2": (lambda s: s.set_regs(rsi=VTL2_END - 0x800), "rsi (boot_params)"),
    "cr3 not identity": (lambda s: s.set_regs(cr3=PAGE_TABLES + 0x8000), "cr3"),
    # boot_params header
    "boot_flag": (lambda s: s.patch_bp(hdr__boot_flag=0), "boot_params.hdr.boot_flag"),
    "header": (lambda s: s.patch_bp(hdr__header=0x12345678), "boot_params.hdr.header"),
    "version": (lambda s: s.patch_bp(hdr__version=0x020C), "boot_params.hdr.version"),
    "type_of_loader": (lambda s: s.patch_bp(hdr__type_of_loader=0x21), "boot_params.hdr.type_of_loader"),
    "hardware_subarch": (lambda s: s.patch_bp(hdr__hardware_subarch=0), "boot_params.hdr.hardware_subarch"),
    "e820_entries": (lambda s: s.patch_bp(e820_entries=129), "boot_params.e820_entries"),
    # command line
    "cmd_line_ptr outside": (lambda s: s.patch_bp(hdr__cmd_line_ptr=0x1000), "boot_params.hdr.cmd_line_ptr"),
    "ext_cmd_line_ptr": (lambda s: s.patch_bp(ext_cmd_line_ptr=1), "boot_params.hdr.cmd_line_ptr"),
    "cmdline unterminated": (lambda s: s.patch_bp(hdr__cmdline_size=10), "boot_params.hdr.cmdline_size"),
    # initrd
    "ramdisk_size": (lambda s: s.patch_bp(hdr__ramdisk_size=len(INITRD) - 1), "boot_params.hdr.ramdisk_size"),
    "ext_ramdisk_size": (lambda s: s.patch_bp(ext_ramdisk_size=1), "boot_params.hdr.ramdisk_size"),
    "ramdisk_image outside": (lambda s: s.patch_bp(hdr__ramdisk_image=VTL2_END - 16),
                              "boot_params.hdr.ramdisk_image"),
    "ext_ramdisk_image": (lambda s: s.patch_bp(ext_ramdisk_image=1), "boot_params.hdr.ramdisk_image"),
    "initrd content": (corrupt(INITRD_GPA + 100, b"\xff\xff"), "boot_params.hdr.ramdisk_image"),
    "initrd not expected": (lambda s: setattr(s, "initrd", None), "boot_params.hdr.ramdisk_image"),
    # e820
    "e820 zero size": (lambda s: s.patch_e820(1, size=0), "boot_params.e820_table[1]"),
    "e820 type": (lambda s: s.patch_e820(1, type=3), "boot_params.e820_table[1]"),
    "e820 outside vtl2": (lambda s: s.patch_e820(2, size=VTL2_SIZE), "boot_params.e820_table[2]"),
    "e820 unsorted": (swap_e820, "boot_params.e820_table[1]"),
    "e820 overlap": (lambda s: s.patch_e820(1, addr=RSV_START - 0x1000), "boot_params.e820_table[1]"),
    "e820 no ram at entry": (lambda s: s.patch_e820(0, type=L.E820_RESERVED),
                             "e820: RAM does not cover the kernel"),
    "e820 no ram at initrd": (lambda s: s.patch_e820(0, size=INITRD_GPA + 0x1000 - VTL2_BASE),
                              "e820: RAM does not cover the initrd"),
    # setup_data chain
    "setup_data outside": (lambda s: s.patch_bp(hdr__setup_data=VTL2_END - 8), "boot_params.hdr.setup_data"),
    "setup_data len": (lambda s: s.mem.write_u32(DTB_SETUP + 12, VTL2_SIZE), "setup_data[0].len"),
    "setup_data loop": (setup_data_loop, "setup_data[1].next"),
    "setup_data self loop": (lambda s: s.mem.write_u64(DTB_SETUP, DTB_SETUP), "setup_data[0].next"),
    "no SETUP_DTB": (lambda s: s.mem.write_u32(DTB_SETUP + 8, 0x77), "SETUP_DTB"),
    "two SETUP_DTB": (second_dtb, "2 SETUP_DTB"),
    "dtb truncated": (lambda s: s.mem.write_u32(DTB_SETUP + 12, 200), "setup_data[0] SETUP_DTB"),
    "dtb magic": (corrupt(DTB_SETUP + 16, b"\0\0\0\0"), "setup_data[0] SETUP_DTB"),
    "dtb structure": (corrupt_dt_struct, "setup_data[0] SETUP_DTB: FDT structure check failed"),
    # device tree
    "root compatible": (dts_sub('"microsoft,openvmm"', '"acme,board"'), "dtb / compatible"),
    "root address-cells": (dts_sub("#address-cells = <0x02>", "#address-cells = <0x01>", 1),
                           "dtb / #address-cells"),
    "root size-cells": (dts_sub("#size-cells = <0x02>", "#size-cells = <0x01>", 1), "dtb / #size-cells"),
    "hypervisor compatible": (in_node("hypervisor", "microsoft,hyperv", "xen"), "dtb /hypervisor compatible"),
    "hypervisor missing": (drop_node("hypervisor"), "dtb /hypervisor"),
    "cpus missing": (drop_node("cpus"), "dtb /cpus"),
    "cpus empty": (dts_sub(r"\n\t\tcpu@\d \{.*?\n\t\t\};", ""), "dtb /cpus: no cpu@ node"),
    "cpu device_type": (in_node("cpu@1", '"cpu"', '"cpux"'), "dtb /cpus/cpu@1 device_type"),
    "cpu status": (in_node("cpu@2", '"okay"', '"disabled"'), "dtb /cpus/cpu@2 status"),
    "cpu numa missing": (in_node("cpu@3", "numa-node-id", "numa-node"),
                         "dtb /cpus/cpu@3: missing property numa-node-id"),
    "cpu reg missing": (in_node("cpu@1", "reg =", "regs ="), "dtb /cpus/cpu@1: missing property reg"),
    "cpu reg duplicate": (in_node("cpu@1", "reg = <0x01>", "reg = <0x00>"), "dtb /cpus/cpu@1 reg"),
    "memory missing": (drop_node(MEMNODE), "dtb /: no memory@ node"),
    "memory device_type": (in_node(MEMNODE, '"memory"', '"ram"'), f"dtb /{MEMNODE} device_type"),
    "memory reg too big": (in_node(MEMNODE, f"{VTL2_SIZE:#x}", f"{VTL2_SIZE + MiB:#x}"), f"dtb /{MEMNODE} reg"),
    "memory reg too small": (in_node(MEMNODE, f"{VTL2_SIZE:#x}", f"{VTL2_SIZE - MiB:#x}"),
                             "dtb memory@: e820 RAM"),
    "memreserve missing": (dts_sub(r"/memreserve/[^\n]*\n", ""), f"dtb /{MEMNODE} reg"),
    "memreserve over ram": (dts_sub(f"{RSV_SIZE:016x}", f"{RSV_SIZE * 2:016x}"), "reserved by /memreserve/"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_violation_names_the_field(name):
    mutate, field = VIOLATIONS[name]
    s = build()
    s.check()  # the untouched scene is valid
    mutate(s)
    with pytest.raises(HandoffError) as exc:
        s.check()
    message = str(exc.value)
    assert message.startswith("handoff: ")
    assert field in message, message
    assert "\n" not in message


def test_e820_ext_bad_length_named():
    s = build(e820=many_e820_entries(140))
    e820_ext_bad_len(s)
    with pytest.raises(HandoffError, match=r"setup_data\[1\]\.len"):
        s.check()


def test_e820_ext_entry_violation_named():
    s = build(e820=many_e820_entries(140))
    s.mem.write_u32(E820_EXT_SETUP + 16 + 16, 7)  # type of the first ext entry
    with pytest.raises(HandoffError, match=r"setup_data\[1\] SETUP_E820_EXT entry 0: type 7"):
        s.check()


def test_long_setup_data_chain_is_bounded():
    s = build()
    # 100 distinct links, no loop: the walk stops at its bound.
    first = DTB_SETUP + 0x40000
    for i in range(100):
        nxt = first + (i + 1) * 16 if i < 99 else 0
        s.mem.write_struct(first + i * 16, L.SetupData(nxt, 0x99, 0))
    s.mem.write_u64(DTB_SETUP, first)
    with pytest.raises(HandoffError, match="chain longer than"):
        s.check()


def test_dt_summary_rejects_garbage():
    with pytest.raises(HandoffError, match="dtb"):
        dt_summary(b"\0" * 64)
