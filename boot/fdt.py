"""Reading flattened device trees through libfdt: a fully checked open, node walking and typed
properties. Errors name the node path and property so callers can pass them on as one line."""
import libfdt

from hclsim import HclsimError

FDT_HEADER_SIZE = 40
_MISSING = object()


class FdtError(HclsimError):
    pass


def _strerror(err: int) -> str:
    return libfdt.fdt_strerror(err)


def open_fdt(blob, available: int | None = None) -> libfdt.Fdt:
    """A libfdt tree over blob, after libfdt's full structure check.

    available is how many bytes the container holds (the blob may be longer, e.g. a whole region);
    the tree's totalsize must fit in it.
    """
    data = bytearray(blob)
    available = len(data) if available is None else min(available, len(data))
    if available < FDT_HEADER_SIZE:
        raise FdtError(f"{available} bytes is too small for an FDT header")
    err = libfdt.fdt_check_header(data)
    if err:
        raise FdtError(f"bad FDT header: {_strerror(err)}")
    total = libfdt.fdt_totalsize(data)
    if total > available:
        raise FdtError(f"FDT totalsize {total} exceeds the {available} bytes available")
    data = data[:total]
    err = libfdt.fdt_check_full(data, total)
    if err:
        raise FdtError(f"FDT structure check failed: {_strerror(err)}")
    return libfdt.Fdt(data)


def node(fdt: libfdt.Fdt, path: str) -> int | None:
    """Offset of the node at path, or None if there is none."""
    off = fdt.path_offset(path, quiet=(libfdt.NOTFOUND,))
    return None if off < 0 else off


def subnodes(fdt: libfdt.Fdt, parent: int):
    """(offset, name) of each direct child, in tree order."""
    off = fdt.first_subnode(parent, quiet=(libfdt.NOTFOUND,))
    while off >= 0:
        yield off, fdt.get_name(off)
        off = fdt.next_subnode(off, quiet=(libfdt.NOTFOUND,))


def path_of(fdt: libfdt.Fdt, off: int) -> str:
    return fdt.get_path(off)


def prop_names(fdt: libfdt.Fdt, off: int) -> list[str]:
    names = []
    poff = fdt.first_property_offset(off, quiet=(libfdt.NOTFOUND,))
    while poff >= 0:
        names.append(fdt.get_property_by_offset(poff).name)
        poff = fdt.next_property_offset(poff, quiet=(libfdt.NOTFOUND,))
    return names


def prop(fdt: libfdt.Fdt, off: int, name: str, required: bool = True) -> bytes | None:
    """Raw value of a property; None if it is missing and not required."""
    value = fdt.getprop(off, name, quiet=(libfdt.NOTFOUND,))
    if isinstance(value, int):
        if required:
            raise FdtError(f"{path_of(fdt, off)}: missing property {name}")
        return None
    return bytes(value)


def _int(fdt, off, name, size, default):
    raw = prop(fdt, off, name, required=default is _MISSING)
    if raw is None:
        return default
    if len(raw) != size:
        raise FdtError(f"{path_of(fdt, off)} {name}: {len(raw)} bytes, expected {size}")
    return int.from_bytes(raw, "big")


def prop_u32(fdt: libfdt.Fdt, off: int, name: str, default=_MISSING) -> int:
    return _int(fdt, off, name, 4, default)


def prop_u64(fdt: libfdt.Fdt, off: int, name: str, default=_MISSING) -> int:
    return _int(fdt, off, name, 8, default)


def prop_strings(fdt: libfdt.Fdt, off: int, name: str, default=_MISSING) -> list[str]:
    """A string-list property (e.g. compatible)."""
    raw = prop(fdt, off, name, required=default is _MISSING)
    if raw is None:
        return default
    if not raw.endswith(b"\0"):
        raise FdtError(f"{path_of(fdt, off)} {name}: not NUL-terminated")
    try:
        return raw[:-1].decode("ascii").split("\0")
    except UnicodeDecodeError:
        raise FdtError(f"{path_of(fdt, off)} {name}: not ASCII") from None


def prop_str(fdt: libfdt.Fdt, off: int, name: str, default=_MISSING) -> str:
    """A single NUL-terminated string property."""
    strings = prop_strings(fdt, off, name, default)
    if strings is default:
        return default
    if len(strings) != 1:
        raise FdtError(f"{path_of(fdt, off)} {name}: {len(strings)} strings, expected one")
    return strings[0]


def prop_reg(fdt: libfdt.Fdt, off: int, address_cells: int, size_cells: int, name: str = "reg") -> list[tuple]:
    """reg decoded as (address, size) pairs with the given cell counts (size omitted when 0 cells)."""
    value = prop(fdt, off, name)
    entry = 4 * (address_cells + size_cells)
    if entry == 0 or not value or len(value) % entry:
        raise FdtError(f"{path_of(fdt, off)} {name}: {len(value)} bytes is not a whole number of "
                       f"<{address_cells} {size_cells}> cell entries")
    out = []
    for o in range(0, len(value), entry):
        addr = int.from_bytes(value[o:o + 4 * address_cells], "big")
        size = int.from_bytes(value[o + 4 * address_cells:o + entry], "big")
        out.append((addr, size) if size_cells else (addr,))
    return out


def mem_reserves(fdt: libfdt.Fdt) -> list[tuple[int, int]]:
    """The /memreserve/ map as (address, size)."""
    return [tuple(fdt.get_mem_rsv(i)) for i in range(fdt.num_mem_rsv())]
