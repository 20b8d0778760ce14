"""Firmware ELF images (boot shim, later the sidecar and the VTL0 guest): loadable segments,
entry point and symbols, read with pyelftools.
"""
import bisect
import io
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from hclsim import HclsimError


class FirmwareImageError(HclsimError):
    pass


@dataclass(frozen=True)
class Segment:
    vaddr: int        # link-time address (images are linked at 0 and self-relocate)
    data: bytes
    memsz: int
    executable: bool


@dataclass(frozen=True)
class FirmwareImage:
    path: str
    entry: int                        # link-time entry address
    segments: tuple
    symbols: tuple                    # sorted (address, size, name) of functions and objects

    @property
    def span(self) -> int:
        """Bytes from link address 0 to the end of the highest segment (BSS included)."""
        return max(s.vaddr + s.memsz for s in self.segments)

    def symbol(self, name: str) -> int | None:
        for addr, _size, sym in self.symbols:
            if sym == name:
                return addr
        return None

    def symbolize(self, offset: int) -> str | None:
        """'name+0x12' for an image offset, if a symbol covers it."""
        addrs = [s[0] for s in self.symbols]
        i = bisect.bisect_right(addrs, offset) - 1
        while i >= 0:
            addr, size, name = self.symbols[i]
            if addr <= offset < addr + max(size, 1) or (size == 0 and offset - addr < 0x1000):
                return f"{name}+{offset - addr:#x}" if offset != addr else name
            if size:
                break
            i -= 1
        return None


def load_firmware_image(path, what: str = "firmware") -> FirmwareImage:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FirmwareImageError(f"{what} {path}: cannot read: {exc.strerror}") from None
    try:
        elf = ELFFile(io.BytesIO(raw))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise FirmwareImageError(f"{what} {path}: not an x86_64 ELF64 image ({elf['e_machine']})")
        if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
            raise FirmwareImageError(f"{what} {path}: ELF type {elf['e_type']} is not an executable")
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            data = seg.data()
            if len(data) != seg["p_filesz"]:
                raise FirmwareImageError(f"{what} {path}: segment at {seg['p_vaddr']:#x} is truncated")
            segments.append(Segment(seg["p_vaddr"], data, seg["p_memsz"], bool(seg["p_flags"] & P_FLAGS.PF_X)))
        if not segments:
            raise FirmwareImageError(f"{what} {path}: no loadable (PT_LOAD) segments")
        entry = elf["e_entry"]
        if not any(s.vaddr <= entry < s.vaddr + s.memsz and s.executable for s in segments):
            raise FirmwareImageError(f"{what} {path}: entry point {entry:#x} is not in an executable segment")
        symbols = []
        symtab = elf.get_section_by_name(".symtab")
        if symtab is not None:
            for sym in symtab.iter_symbols():
                if sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE") and sym.name \
                        and sym["st_shndx"] != "SHN_UNDEF" and not sym.name.startswith("."):
                    symbols.append((sym["st_value"], sym["st_size"], sym.name))
        symbols.sort()
    except ELFError as exc:
        raise FirmwareImageError(f"{what} {path}: not a valid ELF file: {exc}") from None
    except (ValueError, KeyError, IndexError) as exc:
        raise FirmwareImageError(f"{what} {path}: corrupt ELF: {exc}") from None
    if any(s.vaddr < 0 or s.vaddr > (1 << 32) for s in segments):
        raise FirmwareImageError(f"{what} {path}: segments must be linked at 0 (position independent), got {segments[0].vaddr:#x}")
    return FirmwareImage(str(path), entry, tuple(segments), tuple(symbols))
