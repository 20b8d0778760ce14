"""The firmware images a machine runs and where each sits: runtime addresses (the sidecar has two,
its identity alias where sidecar_entry starts and the high alias it runs at after switching page
tables), GPAs, and what the debugger derives from them: symbols both ways, DWARF source lines,
and the addresses of the instructions that exit to the hypervisor (`catch exit`)."""
import functools
from dataclasses import dataclass

import capstone
from capstone import x86_const as csx
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from hclsim.boot.vtl0_guest import IMAGE_GPA
from hclsim.hv.hypervisor import hypercall_page_bytes
from hclsim.debug.events import DebugError
from hclsim.debug.lines import line_table
from hclsim.debug.variables import variables
from hclsim.sidecar import layout as sl

# Instructions that leave the guest for the hypervisor, by `catch exit` kind.
EXIT_KINDS = {
    csx.X86_INS_IN: "io", csx.X86_INS_OUT: "io", csx.X86_INS_INSB: "io", csx.X86_INS_INSW: "io",
    csx.X86_INS_INSD: "io", csx.X86_INS_OUTSB: "io", csx.X86_INS_OUTSW: "io", csx.X86_INS_OUTSD: "io",
    csx.X86_INS_CPUID: "cpuid", csx.X86_INS_HLT: "hlt", csx.X86_INS_RDMSR: "msr", csx.X86_INS_WRMSR: "msr",
    csx.X86_INS_VMCALL: "hypercall", csx.X86_INS_VMMCALL: "hypercall", csx.X86_INS_PAUSE: "pause",
}
# Pages the hypervisor fills at run time with its hypercall code (the ELF holds filler there).
HYPERCALL_PAGE_SYMBOLS = {"shim": "hypercall_page", "sidecar": "hypercall_page_copy"}

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.skipdata = True


@dataclass(frozen=True)
class Alias:
    name: str        # "shim", "sidecar", "vtl0", "linux" (the real kernel's, from kallsyms)
    base: int        # runtime address of link address 0
    gpa: int         # guest physical address of link address 0
    image: object    # boot.elfimage.FirmwareImage

    def holds(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.image.span


@functools.lru_cache(maxsize=64)
def _sections(path: str) -> tuple:
    try:
        with open(path, "rb") as f:
            return tuple((s.name, s["sh_addr"], s["sh_size"]) for s in ELFFile(f).iter_sections()
                         if s["sh_flags"] & 2 and s["sh_size"])          # SHF_ALLOC
    except (OSError, ELFError):
        return ()


def section_name(path: str, offset: int) -> str | None:
    """The allocated ELF section holding image offset offset ('.text', '.bss', ...)."""
    return next((name for name, addr, size in _sections(path) if addr <= offset < addr + size), None)


def short_path(path: str) -> str:
    """'shim/main.c' for '/.../boot/firmware/shim/main.c', 'sidecar/init.c' for
    '/.../sidecar/firmware/init.c': enough to tell the images' sources apart."""
    parts = path.replace("\\", "/").split("/")
    if "firmware" in parts:
        i = len(parts) - 1 - parts[::-1].index("firmware")
        rest = parts[i + 1:]
        return "/".join(rest if len(rest) > 1 else parts[i - 1:i] + rest)
    return "/".join(parts[-2:])


class ImageMap:
    def __init__(self, machine):
        self.aliases = [Alias("shim", machine.image.shim_base, machine.image.shim_base, machine.shim)]
        if machine.sidecar is not None:
            gpa = machine.layout.region("sidecar").start
            self.aliases += [Alias("sidecar", sl.IMAGE_VA, gpa, machine.sidecar),   # preferred: where it runs
                             Alias("sidecar", gpa, gpa, machine.sidecar)]
        if machine.vtl0_guest is not None:
            self.aliases.append(Alias("vtl0", IMAGE_GPA, IMAGE_GPA, machine.vtl0_guest.image))
        self.names = list(dict.fromkeys(a.name for a in self.aliases))

    def add_kernel(self, symbols, gpa: int) -> None:
        """The real kernel's symbols (debug/kallsyms.py KernelSymbols), at their link addresses:
        symbolize, break and complete on them as `linux:name` or `name`."""
        self.aliases.append(Alias("linux", symbols.base, gpa, symbols))
        self.names.append("linux")

    # ---- where ----------------------------------------------------------------------------
    def at(self, addr: int) -> tuple[Alias, int] | None:
        for alias in self.aliases:
            if alias.holds(addr):
                return alias, addr - alias.base
        return None

    def preferred(self, name: str) -> Alias:
        return next(a for a in self.aliases if a.name == name)

    def aliases_of(self, addr: int) -> list[int]:
        """Every runtime address of the image byte at addr (addr itself first)."""
        hit = self.at(addr)
        if hit is None:
            return [addr]
        alias, off = hit
        return [addr] + [a.base + off for a in self.aliases if a.name == alias.name and a is not alias]

    def gpa_of(self, addr: int) -> int | None:
        hit = self.at(addr)
        return None if hit is None else hit[0].gpa + hit[1]

    def executable(self, gpa: int, length: int) -> bool:
        """Whether [gpa, gpa+length) overlaps an image's code (host writes there need retranslation)."""
        for alias in self.aliases:
            for seg in alias.image.segments:
                lo = alias.gpa + seg.vaddr
                if seg.executable and lo < gpa + length and gpa < lo + seg.memsz:
                    return True
        return False

    # ---- symbols --------------------------------------------------------------------------
    def symbolize(self, addr: int) -> str | None:
        hit = self.at(addr)
        if hit is None:
            return None
        alias, off = hit
        sym = alias.image.symbolize(off)
        return f"{alias.name}:{sym}" if sym else f"{alias.name}+{off:#x}"

    def symbol_addresses(self, name: str) -> list[int]:
        """Runtime addresses (preferred alias) of a symbol, 'sym' or 'image:sym'; [] if unknown."""
        image, _, sym = name.rpartition(":")
        found = []
        for n in self.names:
            if image and n != image:
                continue
            off = self.preferred(n).image.symbol(sym)
            if off is not None:
                found.append(self.preferred(n).base + off)
        return found

    def symbol_names(self) -> list[str]:
        """Every symbol, bare and as image:name (for completion)."""
        names = set()
        for n in self.names:
            for _addr, _size, sym in self.preferred(n).image.symbols:
                names.update((sym, f"{n}:{sym}"))
        return sorted(names)

    def function_span(self, addr: int) -> tuple[int, int] | None:
        """[start, end) of the sized symbol holding addr."""
        hit = self.at(addr)
        if hit is None:
            return None
        alias, off = hit
        for start, size, _name in alias.image.symbols:
            if start <= off < start + size:
                return alias.base + start, alias.base + start + size
        return None

    # ---- source lines ---------------------------------------------------------------------
    def source_line(self, addr: int) -> tuple[str, int] | None:
        hit = self.at(addr)
        if hit is None:
            return None
        table = line_table(hit[0].image.path)
        return None if table is None else table.line_at(hit[1])

    def line_span(self, addr: int) -> tuple[tuple[str, int], int, int] | None:
        """((file, line), start, end) of the code of the source line addr is in."""
        hit = self.at(addr)
        table = None if hit is None else line_table(hit[0].image.path)
        span = None if table is None else table.span_at(hit[1])
        if span is None:
            return None
        return (span[0], span[1]), hit[0].base + span[2], hit[0].base + span[3]

    def variable(self, name: str):
        """(runtime address, variables.Variable) of a global variable, 'var' or 'image:var'."""
        image, _, var = name.rpartition(":")
        for n in self.names:
            if image and n != image:
                continue
            alias = self.preferred(n)
            found = variables(alias.image.path).get(var)
            if found is not None:   # a PIE image's DW_OP_addr is an offset; the sidecar's an address
                return (found.offset if found.offset >= alias.base else alias.base + found.offset), found
        return None

    def line_addresses(self, file: str, line: int) -> list[int]:
        """Runtime addresses (preferred alias) of file:line; DebugError if unknown or ambiguous."""
        matches = []
        for n in self.names:
            alias = self.preferred(n)
            table = line_table(alias.image.path)
            if table is None:
                continue
            files = table.matching_files(file)
            if files:
                matches.append((alias, table, files))
        paths = sorted({short_path(t.files[i]) for _, t, fs in matches for i in fs})
        if not matches:
            raise DebugError(f"no source file {file!r} in the loaded images")
        if len(paths) > 1:
            raise DebugError(f"{file}:{line} is ambiguous: {', '.join(paths)} (give more of the path)")
        alias, table, files = matches[0]
        found, offsets = table.offsets_of(files, line)
        if not offsets:
            raise DebugError(f"no code at or after line {line} of {paths[0]}")
        return [alias.base + off for off in offsets]

    # ---- exits ----------------------------------------------------------------------------
    def exit_instructions(self) -> dict[int, str]:
        """{runtime address: catch kind} of every exiting instruction in the images' code, the
        hypercall pages included, at every alias."""
        sites = {}
        for alias in self.aliases:
            for off, kind in _exit_offsets(alias.image).items():
                sites[alias.base + off] = kind
        return sites


@functools.lru_cache(maxsize=8)
def _exit_offsets(image) -> dict[int, str]:
    found = {}
    for seg in image.segments:
        if seg.executable:
            for insn in _cs.disasm(seg.data, seg.vaddr):
                if insn.id in EXIT_KINDS:
                    found[insn.address] = EXIT_KINDS[insn.id]
    page = next((image.symbol(s) for s in HYPERCALL_PAGE_SYMBOLS.values() if image.symbol(s) is not None), None)
    if page is not None:
        for off in range(page, page + 4096):
            found.pop(off, None)
        for insn in _cs.disasm(hypercall_page_bytes(), page):
            if insn.id in EXIT_KINDS:
                found[insn.address] = EXIT_KINDS[insn.id]
    return found
