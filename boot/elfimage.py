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


# What each firmware role's image must be (docs/contracts.md): the entry symbol it is built
# with, and how much its image (BSS included) may span. A build with a symbol table is checked
# by its entry's name, so one image given for another (`--sidecar` pointing at the boot shim)
# is refused before the boot instead of faulting in it.
@dataclass(frozen=True)
class Role:
    entry_symbol: str | None
    max_span: int


MiB = 1 << 20
ROLES = {
    "boot shim": Role("_start", 64 * MiB),
    "sidecar": Role("sidecar_entry", 2 * MiB),      # one 2 MiB page maps it (sidecar/firmware/link.ld)
    "VTL0 test guest": Role("vtl0_entry", 2 * MiB),
}
_ENTRY_OWNER = {role.entry_symbol: what for what, role in ROLES.items()}
DEFAULT_ROLE = Role(None, 64 * MiB)
# Segments a userspace program has and a firmware image (linked by its own script, notes and
# .interp discarded) does not.
_USERSPACE_SEGMENTS = {"PT_INTERP": "a dynamically linked program (PT_INTERP)",
                       "PT_TLS": "a userspace program (thread-local storage, PT_TLS)"}


def load_firmware_image(path, what: str = "firmware") -> FirmwareImage:
    """A firmware ELF: x86_64, position independent and linked at 0, statically linked, entry in
    an executable segment, and the image the role `what` (ROLES) needs. FirmwareImageError with
    one line naming the file and the problem otherwise."""
    path = Path(path)
    role = ROLES.get(what, DEFAULT_ROLE)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FirmwareImageError(f"{what} {path}: cannot read: {exc.strerror}") from None
    if raw[:4] != b"\x7fELF":
        raise FirmwareImageError(f"{what} {path}: not an ELF file")
    try:
        image = _parse(raw, path, what)
    except FirmwareImageError:
        raise
    except ELFError as exc:
        raise FirmwareImageError(f"{what} {path}: not a valid ELF file: {_one_line(exc)}") from None
    except Exception as exc:  # pyelftools on a mangled file: struct, index, key, value errors...
        raise FirmwareImageError(f"{what} {path}: corrupt ELF: {type(exc).__name__}: {_one_line(exc)}") from None
    if image.span > role.max_span:
        raise FirmwareImageError(f"{what} {path}: image spans {image.span:#x} bytes, more than a {what} may "
                                 f"({role.max_span:#x})")
    if role.entry_symbol is not None and image.symbols:
        name = next((sym for addr, _size, sym in image.symbols if addr == image.entry and sym in _ENTRY_OWNER),
                    None) or image.symbolize(image.entry) or f"{image.entry:#x}"
        if name != role.entry_symbol:
            other = _ENTRY_OWNER.get(name)
            hint = f" (a {other}'s entry)" if other else ""
            raise FirmwareImageError(f"{what} {path}: not a {what}: its entry point is {name}{hint}, a {what} "
                                     f"starts at {role.entry_symbol}")
    return image


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _parse(raw: bytes, path: Path, what: str) -> FirmwareImage:
    elf = ELFFile(io.BytesIO(raw))
    if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64" or not elf.little_endian:
        raise FirmwareImageError(f"{what} {path}: not an x86_64 ELF64 image ({elf['e_machine']}, "
                                 f"ELF{elf.elfclass})")
    if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
        raise FirmwareImageError(f"{what} {path}: ELF type {elf['e_type']} is not an executable")
    segments = []
    for seg in elf.iter_segments():
        if seg["p_type"] in _USERSPACE_SEGMENTS:
            raise FirmwareImageError(f"{what} {path}: {_USERSPACE_SEGMENTS[seg['p_type']]}, not a "
                                     f"self-relocating firmware image")
        if seg["p_type"] == "PT_NOTE" and any(n["n_type"] == "NT_GNU_ABI_TAG" for n in seg.iter_notes()):
            raise FirmwareImageError(f"{what} {path}: a GNU/Linux userspace program (NT_GNU_ABI_TAG note), "
                                     f"not a self-relocating firmware image")
        if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
            continue
        if seg["p_filesz"] > seg["p_memsz"]:
            raise FirmwareImageError(f"{what} {path}: segment at {seg['p_vaddr']:#x} has p_filesz "
                                     f"{seg['p_filesz']:#x} larger than p_memsz {seg['p_memsz']:#x}")
        if seg["p_offset"] + seg["p_filesz"] > len(raw):
            raise FirmwareImageError(f"{what} {path}: segment at {seg['p_vaddr']:#x} is truncated")
        if seg["p_vaddr"] + seg["p_memsz"] > 1 << 32:
            raise FirmwareImageError(f"{what} {path}: segments must be linked at 0 (position independent), "
                                     f"got one at {seg['p_vaddr']:#x} (+{seg['p_memsz']:#x})")
        data = raw[seg["p_offset"]:seg["p_offset"] + seg["p_filesz"]]
        segments.append(Segment(seg["p_vaddr"], data, seg["p_memsz"], bool(seg["p_flags"] & P_FLAGS.PF_X)))
    if not segments:
        raise FirmwareImageError(f"{what} {path}: no loadable (PT_LOAD) segments")
    segments.sort(key=lambda s: s.vaddr)
    if segments[0].vaddr != 0:
        raise FirmwareImageError(f"{what} {path}: segments must be linked at 0 (position independent), "
                                 f"the first is at {segments[0].vaddr:#x}")
    for a, b in zip(segments, segments[1:]):
        if a.vaddr + a.memsz > b.vaddr:
            raise FirmwareImageError(f"{what} {path}: segments overlap at {b.vaddr:#x}")
    entry = elf["e_entry"]
    if not any(s.vaddr <= entry < s.vaddr + s.memsz and s.executable for s in segments):
        raise FirmwareImageError(f"{what} {path}: entry point {entry:#x} is not in an executable segment")
    symbols = []
    symtab = elf.get_section_by_name(".symtab")
    if symtab is not None and hasattr(symtab, "iter_symbols"):
        for sym in symtab.iter_symbols():
            if sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE") and sym.name \
                    and sym["st_shndx"] != "SHN_UNDEF" and not sym.name.startswith("."):
                symbols.append((sym["st_value"], sym["st_size"], sym.name))
    symbols.sort()
    return FirmwareImage(str(path), entry, tuple(segments), tuple(symbols))
