"""The register layout the stub offers gdb and its target description (target.xml).

It follows gdb's own amd64 features in gdb's order (64bit-core.xml, 64bit-sse.xml,
64bit-segments.xml), because gdb's amd64 support validates those features by name and requires
the x87 registers in the core feature. The simulator does not model x87/SSE state (the firmware
is built -mno-sse), so those read as 0 and writes to them are ignored. Control registers come in
a feature of our own, which gdb shows as extra registers (`info registers cr3`).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    source: str | None          # DebugTarget.registers() key; None: not modelled, reads as 0
    group: str | None = None


_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(f"r{i}" for i in range(8, 16))
_PTR = {"rbp": "data_ptr", "rsp": "data_ptr"}

CORE = ([Reg(n, 64, _PTR.get(n, "int64"), n) for n in _GPRS]
        + [Reg("rip", 64, "code_ptr", "rip"), Reg("eflags", 32, "i386_eflags", "rflags")]
        + [Reg(n, 32, "int32", n) for n in ("cs", "ss", "ds", "es", "fs", "gs")]
        + [Reg(f"st{i}", 80, "i387_ext", None) for i in range(8)]
        + [Reg(n, 32, "int", None, "float") for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg",
                                                       "fooff", "fop")])
SSE = [Reg(f"xmm{i}", 128, "vec128", None) for i in range(16)] + [Reg("mxcsr", 32, "i386_mxcsr", None, "vector")]
SEGMENTS = [Reg("fs_base", 64, "int", "fs_base"), Reg("gs_base", 64, "int", "gs_base")]
CONTROL = [Reg(n, 64, "int64", n, "system") for n in ("cr0", "cr2", "cr3", "cr4", "efer")]

FEATURES = (("org.gnu.gdb.i386.core", CORE), ("org.gnu.gdb.i386.sse", SSE),
            ("org.gnu.gdb.i386.segments", SEGMENTS), ("org.hclsim.x86.control", CONTROL))
REGISTERS = [r for _, regs in FEATURES for r in regs]   # the remote protocol's register numbers
BY_NAME = {r.name: n for n, r in enumerate(REGISTERS)}
G_SIZE = sum(r.bits // 8 for r in REGISTERS)            # bytes in a `g` reply

_EFLAGS = ((0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
           (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"),
           (20, "VIP"), (21, "ID"))
_MXCSR = ((0, "IE"), (1, "DE"), (2, "ZE"), (3, "OE"), (4, "UE"), (5, "PE"), (6, "DAZ"), (7, "IM"),
          (8, "DM"), (9, "ZM"), (10, "OM"), (11, "UM"), (12, "PM"), (15, "FZ"))
_VECTORS = (("v4f", "ieee_single", 4), ("v2d", "ieee_double", 2), ("v16i8", "int8", 16),
            ("v8i16", "int16", 8), ("v4i32", "int32", 4), ("v2i64", "int64", 2))


def _flags(ident: str, fields) -> str:
    body = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in fields)
    return f'<flags id="{ident}" size="4">{body}</flags>'


def _regs(regs) -> str:
    out = []
    for r in regs:
        group = f' group="{r.group}"' if r.group else ""
        out.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{BY_NAME[r.name]}"{group}/>')
    return "\n  ".join(out)


def _types(feature: str) -> str:
    if feature.endswith(".core"):
        return _flags("i386_eflags", _EFLAGS)
    if feature.endswith(".sse"):
        vectors = "".join(f'<vector id="{i}" type="{t}" count="{c}"/>' for i, t, c in _VECTORS)
        fields = "".join(f'<field name="{n}" type="{i}"/>' for n, i in (
            ("v4_float", "v4f"), ("v2_double", "v2d"), ("v16_int8", "v16i8"), ("v8_int16", "v8i16"),
            ("v4_int32", "v4i32"), ("v2_int64", "v2i64"), ("uint128", "uint128")))
        return vectors + f'<union id="vec128">{fields}</union>' + _flags("i386_mxcsr", _MXCSR)
    return ""


def target_xml() -> bytes:
    features = "\n".join(f'<feature name="{name}">\n  {_types(name)}\n  {_regs(regs)}\n</feature>'
                         for name, regs in FEATURES)
    return ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target version="1.0">\n'
            f'<architecture>i386:x86-64</architecture>\n<osabi>none</osabi>\n{features}\n</target>\n').encode()


def encode(reg: Reg, value: int) -> str:
    """Target byte order (little endian) hex of one register."""
    size = reg.bits // 8
    return (value & ((1 << reg.bits) - 1)).to_bytes(size, "little").hex()


def encode_all(values: dict) -> str:
    """The `g` reply from DebugTarget.registers(): unmodelled registers as zeros."""
    return "".join(encode(r, values.get(r.source, 0) if r.source else 0) for r in REGISTERS)


def decode(reg: Reg, text: bytes) -> int:
    return int.from_bytes(bytes.fromhex(text.decode("ascii")), "little")


def decode_all(text: bytes) -> dict:
    """{source name: value} of the modelled registers in a `G` packet; ValueError if malformed.
    A short packet sets only the registers it covers, as gdbserver allows."""
    if len(text) % 2 or len(text) > 2 * G_SIZE:
        raise ValueError("bad register block size")
    out, pos = {}, 0
    for r in REGISTERS:
        width = r.bits // 4
        if pos + width > len(text):
            break
        chunk = text[pos:pos + width]
        pos += width
        if r.source is not None and b"x" not in chunk:
            out[r.source] = decode(r, chunk)
    return out
