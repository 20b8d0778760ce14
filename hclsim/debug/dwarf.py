"""The DWARF of a firmware ELF, read once per file for the line table, the call frame table and
the variables (each used to open and parse the file again). The ELF is read into memory, so the
DIEs the variables keep stay readable after the file is closed."""
import functools
import io

from elftools.elf.elffile import ELFFile


@functools.lru_cache(maxsize=16)
def dwarf_info(path: str):
    """The DWARFInfo of the ELF at path, or None if it has none; OSError/ELFError pass through."""
    with open(path, "rb") as f:
        elf = ELFFile(io.BytesIO(f.read()))
    return elf.get_dwarf_info() if elf.has_dwarf_info() else None
