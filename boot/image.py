"""The VTL2 image: lays out and writes what the IGVM loader would (docs/contracts.md) — the
persisted-state region, kernel, shim, initrd, GDT, ShimParamsRaw, ParavisorCommandLine, the
parameter region with the host device tree, log, heap and the initial identity page tables — and
gives the BSP's long-mode starting context.
"""
import ctypes
import zlib
from dataclasses import dataclass

from hclsim import HclsimError
from hclsim.boot import layout
from hclsim.boot.layout import PAGE_SIZE
from hclsim.cpu.cpuid import PHYSICAL_ADDRESS_BITS
from hclsim.defs.platform import Region
from hclsim.hv.vp import long_mode_context

MiB = 1 << 20
GiB = 1 << 30
ALIGN_2M = 2 * MiB
PERSISTED_STATE_SIZE = 2 * MiB
RESERVED_PAGES = 4
LOG_PAGES = 2
HEAP_PAGES = 16

GDT_ENTRIES = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
CODE64_SELECTOR, DATA_SELECTOR = 0x10, 0x18
CR0_INITIAL = 0x80000021        # PG | NE | PE
CR4_INITIAL = 0x00040060        # OSXSAVE | MCE | PAE
EFER_INITIAL = 0xD00            # NXE | LMA | LME
PTE_PRESENT_RW_ACCESSED = 0x23  # P | RW | A
PTE_DIRTY_PS = 0xC0             # D | PS (large leaf)
MAX_GPA = 1 << PHYSICAL_ADDRESS_BITS  # the guest physical address width CPUID reports


class ImageError(HclsimError):
    pass


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class VtlLayout:
    """Where everything goes (GPAs). Computed before anything is written."""
    vtl2_base: int
    vtl2_size: int
    regions: tuple                   # Region, low to high
    page_table_pages: int

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def used_end(self) -> int:
        return self.regions[-1].end


def _page_table_pages(base: int, size: int) -> int:
    gigs = range(base // GiB, (base + size - 1) // GiB + 1)
    pdpts = len({g // 512 for g in gigs})
    pds = sum(1 for g in gigs if not (g * GiB >= base and (g + 1) * GiB <= base + size))
    return 1 + pdpts + pds


def plan_layout(vtl2_base: int, min_size: int, kernel_span: int, kernel_align: int,
                shim_span: int, initrd_size: int, sidecar_size: int = 0, free_needed: int = 0) -> VtlLayout:
    """Place the regions low to high from vtl2_base; grow the VTL2 size (2 MiB steps) to fit,
    leaving at least free_needed bytes of VTL2 RAM for the shim to allocate (sidecar nodes)."""
    _check_layout_inputs(vtl2_base, min_size, kernel_span, kernel_align, shim_span, initrd_size, sidecar_size,
                         free_needed)
    regions = []
    cursor = vtl2_base

    def place(name, size, align=PAGE_SIZE):
        nonlocal cursor
        cursor = align_up(cursor, align)
        regions.append(Region(name, cursor, size))
        cursor += size

    place("persisted_state", PERSISTED_STATE_SIZE, ALIGN_2M)
    place("kernel", align_up(kernel_span, PAGE_SIZE), max(ALIGN_2M, kernel_align))
    place("sidecar", align_up(sidecar_size, PAGE_SIZE), ALIGN_2M)
    place("shim", align_up(shim_span, PAGE_SIZE))
    place("initrd", align_up(initrd_size, PAGE_SIZE))
    place("gdt", PAGE_SIZE)
    place("shim_params", PAGE_SIZE)
    place("cmdline", PAGE_SIZE)
    place("reserved", RESERVED_PAGES * PAGE_SIZE)
    place("parameters", layout.HOST_DT_MAX_SIZE)
    place("log", LOG_PAGES * PAGE_SIZE)
    place("heap", HEAP_PAGES * PAGE_SIZE)
    # Page tables go last; their own size depends on the final VTL2 size.
    size = max(min_size, align_up(cursor - vtl2_base + 16 * PAGE_SIZE + free_needed, ALIGN_2M))
    while True:
        pt_pages = _page_table_pages(vtl2_base, size)
        if cursor + pt_pages * PAGE_SIZE + free_needed <= vtl2_base + size:
            break
        size += ALIGN_2M
    regions.append(Region("page_tables", cursor, pt_pages * PAGE_SIZE))
    if vtl2_base + size > MAX_GPA:
        raise ImageError(f"VTL2 range [{vtl2_base:#x}, {vtl2_base + size:#x}) would end beyond the "
                         f"{PHYSICAL_ADDRESS_BITS}-bit guest physical address space ({MAX_GPA:#x}): the images "
                         f"(kernel {kernel_span:#x}, initrd {initrd_size:#x}, shim {shim_span:#x}, sidecar "
                         f"{sidecar_size:#x} bytes) or the VTL2 size are too large")
    return VtlLayout(vtl2_base, size, tuple(regions), pt_pages)


def _check_layout_inputs(vtl2_base, min_size, kernel_span, kernel_align, shim_span, initrd_size, sidecar_size,
                         free_needed) -> None:
    """What the planner can place: sizes within the guest physical address space, alignments
    powers of two (align_up with anything else puts the kernel at an odd address)."""
    if kernel_align <= 0 or kernel_align & (kernel_align - 1):
        raise ImageError(f"kernel alignment {kernel_align:#x} is not a power of two")
    if vtl2_base < 0 or vtl2_base % ALIGN_2M:
        raise ImageError(f"VTL2 base {vtl2_base:#x} is not 2 MiB aligned")
    for name, value in (("VTL2 size", min_size), ("kernel span", kernel_span), ("kernel alignment", kernel_align),
                        ("shim span", shim_span), ("initrd size", initrd_size), ("sidecar size", sidecar_size),
                        ("sidecar node memory", free_needed), ("VTL2 base", vtl2_base)):
        if not 0 <= value <= MAX_GPA:
            raise ImageError(f"{name} {value:#x} is outside the {PHYSICAL_ADDRESS_BITS}-bit guest physical "
                             f"address space")


def write_page_tables(mem, lay: VtlLayout) -> int:
    """Identity-map the VTL2 range with 1 GiB / 2 MiB leaves; returns the PML4 GPA (CR3)."""
    region = lay.region("page_tables")
    mem.fill(region.start, region.size)
    pages = iter(range(region.start, region.end, PAGE_SIZE))
    pml4 = next(pages)
    pdpts, pds = {}, {}
    base, end = lay.vtl2_base, lay.vtl2_base + lay.vtl2_size
    table = PTE_PRESENT_RW_ACCESSED
    addr = base
    while addr < end:
        g = addr // GiB
        if g // 512 not in pdpts:
            pdpts[g // 512] = next(pages)
            mem.write_u64(pml4 + (g // 512) * 8, pdpts[g // 512] | table)
        pdpt = pdpts[g // 512]
        if g * GiB >= base and (g + 1) * GiB <= end:  # whole aligned GiB inside VTL2: one 1 GiB leaf
            mem.write_u64(pdpt + (g % 512) * 8, (g * GiB) | table | PTE_DIRTY_PS)
            addr = (g + 1) * GiB
            continue
        if g not in pds:
            pds[g] = next(pages)
            mem.write_u64(pdpt + (g % 512) * 8, pds[g] | table)
        mem.write_u64(pds[g] + ((addr >> 21) & 511) * 8, addr | table | PTE_DIRTY_PS)
        addr += ALIGN_2M
    return pml4


@dataclass(frozen=True)
class LoadedImage:
    """What was written, with every address the machine and the reports need."""
    layout: VtlLayout
    shim_base: int
    shim_entry: int
    kernel_entry: int
    params_gpa: int
    cmdline_gpa: int
    host_dt_gpa: int
    log_gpa: int
    pml4: int
    gdt: int
    initrd_gpa: int
    initrd_size: int
    initrd_crc: int

    def bsp_context(self):
        """The BSP's starting context, as the IGVM file's VP context sets it."""
        return long_mode_context(rip=self.shim_entry, rsp=0, cr3=self.pml4, gdt=(self.gdt, len(GDT_ENTRIES) * 8 - 1),
                                 cr0=CR0_INITIAL, cr4=CR4_INITIAL, efer=EFER_INITIAL, cs=CODE64_SELECTOR,
                                 ds=DATA_SELECTOR)

    def bsp_registers(self) -> dict:
        """General registers the shim starts with: RSI = the ShimParamsRaw offset from its base."""
        return {"rsi": self.params_gpa - self.shim_base}


def write_image(mem, lay: VtlLayout, *, shim, kernel, initrd: bytes | None, host_dt: bytes,
                isolation: int, cmdline_policy: int, static_cmdline: str, sidecar=None) -> LoadedImage:
    """Write every region of lay into guest memory."""
    if lay.vtl2_base + lay.vtl2_size > mem.size:
        raise ImageError(f"VTL2 range [{lay.vtl2_base:#x}, {lay.vtl2_base + lay.vtl2_size:#x}) does not fit in "
                         f"{mem.size >> 20} MiB of guest memory: raise --memory")
    r = {reg.name: reg for reg in lay.regions}
    mem.fill(lay.vtl2_base, r["heap"].end - lay.vtl2_base)

    for seg in kernel.segments:
        mem.write(r["kernel"].start + seg.offset, seg.data)
    kernel_entry = r["kernel"].start + kernel.entry_offset

    shim_base = r["shim"].start
    for seg in shim.segments:
        mem.write(shim_base + seg.vaddr, seg.data)
    sidecar_entry = 0
    if sidecar is not None:
        for seg in sidecar.segments:
            mem.write(r["sidecar"].start + seg.vaddr, seg.data)
        sidecar_entry = r["sidecar"].start + sidecar.entry

    initrd = initrd or b""
    mem.write(r["initrd"].start, initrd)

    for i, entry in enumerate(GDT_ENTRIES):
        mem.write_u64(r["gdt"].start + 8 * i, entry)

    if len(host_dt) > r["parameters"].size:
        raise ImageError(f"host device tree is {len(host_dt)} bytes; the parameter region holds {r['parameters'].size}")
    mem.write(r["parameters"].start, host_dt)

    text = static_cmdline.encode("utf-8", "surrogateescape")  # a surrogate escape is the byte it stands for
    if len(text) > layout.PARAVISOR_CMDLINE_MAX:
        raise ImageError(f"static command line is {len(text)} bytes, more than the {layout.PARAVISOR_CMDLINE_MAX} "
                         f"of the ParavisorCommandLine")
    cmdline = layout.ParavisorCommandLine(policy=cmdline_policy, static_command_line_len=len(text))
    ctypes.memmove(cmdline.static_command_line, text, len(text))
    mem.write_struct(r["cmdline"].start, cmdline)

    rel = lambda gpa: gpa - shim_base  # noqa: E731 - ShimParamsRaw offsets are shim-relative
    crc = zlib.crc32(initrd) & 0xFFFFFFFF
    params = layout.ShimParamsRaw(
        kernel_entry_offset=rel(kernel_entry), cmdline_offset=rel(r["cmdline"].start),
        initrd_offset=rel(r["initrd"].start), initrd_size=len(initrd), initrd_crc=crc,
        supported_isolation_type=isolation,
        memory_start_offset=rel(lay.vtl2_base), memory_size=lay.vtl2_size,
        parameter_region_offset=rel(r["parameters"].start), parameter_region_size=r["parameters"].size,
        vtl2_reserved_region_offset=rel(r["reserved"].start), vtl2_reserved_region_size=r["reserved"].size,
        sidecar_offset=rel(r["sidecar"].start), sidecar_size=r["sidecar"].size,
        sidecar_entry_offset=rel(sidecar_entry) if sidecar is not None else 0,
        used_start=rel(lay.vtl2_base), used_end=rel(lay.used_end),
        bounce_buffer_start=0, bounce_buffer_size=0,
        log_buffer_start=rel(r["log"].start), log_buffer_size=r["log"].size,
        heap_start_offset=rel(r["heap"].start), heap_size=r["heap"].size,
        persisted_state_region_offset=rel(r["persisted_state"].start),
        persisted_state_region_size=r["persisted_state"].size,
    )
    mem.write_struct(r["shim_params"].start, params)
    pml4 = write_page_tables(mem, lay)
    return LoadedImage(lay, shim_base, shim_base + shim.entry, kernel_entry, r["shim_params"].start,
                       r["cmdline"].start, r["parameters"].start, r["log"].start, pml4, r["gdt"].start,
                       r["initrd"].start, len(initrd), crc)


def read_shim_log(mem, image: LoadedImage) -> bytes:
    """The boot shim's log ring, oldest byte first (empty if the shim never set it up)."""
    region = image.layout.region("log")
    hdr = mem.read_struct(layout.ShimLogHeader, region.start)
    if hdr.magic != layout.SHIM_LOG_MAGIC:
        return b""
    cap = min(hdr.capacity, region.size - ctypes.sizeof(hdr))
    data = mem.read(region.start + ctypes.sizeof(hdr), cap)
    if hdr.written <= cap:
        return data[:hdr.written]
    split = hdr.written % cap
    return data[split:] + data[:split]

