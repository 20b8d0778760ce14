"""Global variables of the firmware through their DWARF types (pyelftools), for `print`: where a
variable lives (DW_OP_addr, an image offset) and how to show its bytes (base types, enums,
pointers, arrays, structs and unions, typedefs and qualifiers), as gdb prints them."""
import functools
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError

from hclsim.debug.dwarf import dwarf_info

DW_OP_ADDR = 0x03
MAX_ELEMENTS = 200     # gdb's default `print elements`
MAX_DEPTH = 6
REPEATS = 10


@dataclass(frozen=True)
class Variable:
    name: str
    offset: int        # image offset (add the alias base for the runtime address)
    type: object       # a DIE


@functools.lru_cache(maxsize=16)
def variables(path: str) -> dict[str, Variable]:
    """name -> Variable of every global or static variable with a fixed address."""
    out = {}
    try:
        dwarf = dwarf_info(path)
        if dwarf is None:
            return {}
        for cu in dwarf.iter_CUs():
            for die in cu.get_top_DIE().iter_children():
                if die.tag != "DW_TAG_variable" or "DW_AT_location" not in die.attributes:
                    continue
                loc = die.attributes["DW_AT_location"].value
                decl = die.get_DIE_from_attribute("DW_AT_specification") \
                    if "DW_AT_specification" in die.attributes else die   # a definition of an extern
                name = decl.attributes.get("DW_AT_name")
                if not isinstance(loc, list) or len(loc) != 9 or loc[0] != DW_OP_ADDR or name is None:
                    continue
                typ = decl.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in decl.attributes else None
                out[name.value.decode(errors="replace")] = Variable(
                    name.value.decode(errors="replace"), int.from_bytes(bytes(loc[1:9]), "little"), typ)
    except (OSError, ELFError, KeyError, ValueError):
        return {}
    return out


def _name(die) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    return attr.value.decode(errors="replace") if attr else None


def _target(die):
    return die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None


def type_size(die) -> int:
    while die is not None and "DW_AT_byte_size" not in die.attributes:
        if die.tag == "DW_TAG_array_type":
            return _array_count(die) * type_size(_target(die))
        if die.tag in ("DW_TAG_pointer_type",):
            return 8
        die = _target(die)
    return 0 if die is None else die.attributes["DW_AT_byte_size"].value


def type_name(die) -> str:
    if die is None:
        return "void"
    if die.tag == "DW_TAG_pointer_type":
        return type_name(_target(die)) + " *"
    if die.tag in ("DW_TAG_const_type", "DW_TAG_volatile_type"):
        return f"{die.tag[7:-5]} {type_name(_target(die))}"
    if die.tag == "DW_TAG_array_type":
        return f"{type_name(_target(die))} [{_array_count(die)}]"
    if die.tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type"):
        kind = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union"}.get(die.tag, "enum")
        return f"{kind} {_name(die) or '{...}'}"
    return _name(die) or "?"


def _array_count(die) -> int:
    for child in die.iter_children():
        if child.tag == "DW_TAG_subrange_type":
            if "DW_AT_count" in child.attributes:
                return child.attributes["DW_AT_count"].value
            if "DW_AT_upper_bound" in child.attributes:
                return child.attributes["DW_AT_upper_bound"].value + 1
    return 0


def format_value(die, data: bytes, symbolize, depth: int = 0) -> str:
    """data (type_size(die) bytes) shown as gdb would show a value of type die."""
    while die is not None and die.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type"):
        die = _target(die)
    if die is None:
        return data.hex()
    if depth > MAX_DEPTH:
        return "{...}"
    if die.tag == "DW_TAG_base_type":
        size, enc = die.attributes["DW_AT_byte_size"].value, die.attributes["DW_AT_encoding"].value
        raw = data[:size]
        if enc == 0x04 and size in (4, 8):                     # DW_ATE_float
            return repr(struct.unpack("<f" if size == 4 else "<d", raw)[0])
        signed = enc in (0x05, 0x06)                           # signed, signed_char
        value = int.from_bytes(raw, "little", signed=signed)
        if enc in (0x06, 0x08) and size == 1:                  # chars
            return f"{value} '{_quoted(bytes([value & 0xFF]))[1:-1]}'"
        if enc == 0x02:                                        # boolean
            return "true" if value else "false"
        return str(value)
    if die.tag == "DW_TAG_enumeration_type":
        value = int.from_bytes(data[:type_size(die)], "little")
        for child in die.iter_children():
            if child.tag == "DW_TAG_enumerator" and child.attributes["DW_AT_const_value"].value == value:
                return _name(child)
        return str(value)
    if die.tag == "DW_TAG_pointer_type":
        value = int.from_bytes(data[:8], "little")
        sym = symbolize(value) if value else None
        return f"({type_name(die)}) {value:#x}" + (f" <{sym}>" if sym else "")
    if die.tag == "DW_TAG_array_type":
        element = _target(die)
        size, count = type_size(element), _array_count(die)
        base = element
        while base is not None and base.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type"):
            base = _target(base)
        if base is not None and base.tag == "DW_TAG_base_type" and size == 1 and \
                base.attributes["DW_AT_encoding"].value in (0x06, 0x08):     # char array: a string
            text = data[:count].split(b"\0")[0]
            return _quoted(text) + ("" if len(text) < count else "...")
        shown, i = [], 0
        while i < count and len(shown) < MAX_ELEMENTS:
            chunk = data[i * size:(i + 1) * size]
            run = 1
            while i + run < count and data[(i + run) * size:(i + run + 1) * size] == chunk:
                run += 1
            text = format_value(element, chunk, symbolize, depth + 1)
            if run >= REPEATS:                 # gdb's `set print repeats` (10)
                shown.append(f"{text} <repeats {run} times>")
                i += run
            else:
                shown.append(text)
                i += 1
        return "{" + ", ".join(shown) + ("..." if i < count else "") + "}"
    if die.tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
        parts = []
        for child in die.iter_children():
            if child.tag != "DW_TAG_member":
                continue
            off = child.attributes.get("DW_AT_data_member_location")
            off = off.value if off is not None and isinstance(off.value, int) else 0
            member = _target(child)
            parts.append(f"{_name(child) or '<anon>'} = "
                         f"{format_value(member, data[off:off + type_size(member)], symbolize, depth + 1)}")
        return "{" + ", ".join(parts) + "}"
    return data.hex()


def _quoted(raw: bytes) -> str:
    """A C string as gdb shows it: "text\\n" with escapes for quotes and control bytes."""
    out = []
    for b in raw:
        c = chr(b)
        out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r", '"': '\\"', "\\": "\\\\"}.get(c)
                   or (c if 0x20 <= b < 0x7F else f"\\{b:03o}"))
    return '"' + "".join(out) + '"'
