"""Emulating the instruction behind an MMIO intercept (an access to an unmapped GPA), as the VMM's
instruction emulator does: decode it (capstone), then give the bytes a store writes or the
register updates that complete a load. Pure: no engine, no memory; the GPA comes from the
intercept message, so the addressing form (base, index, scale, displacement, RIP-relative,
segment override, moffs) only has to be recognised, never computed.

Supported: MOV between a general register and memory (1, 2, 4, 8 bytes, including AH..DH and the
REX byte registers SPL..DIL, R8B..R15B), MOV of an immediate to memory (imm32 sign-extended for an
8-byte store), MOVABS with a 64-bit moffs, MOVZX and MOVSX from 1 or 2 bytes, MOVSXD from 4 bytes.
Anything else (ALU ops on memory, string ops, segment registers, SSE moves...) raises
MmioEmulationError naming the instruction.

Registers are passed and returned by their 64-bit names ("rax".."r15"); complete_read follows the
x86 rules: a 32-bit destination zero-extends into its 64-bit register, an 8- or 16-bit one keeps
the other bits, AH..DH are bits 8-15.
"""
from dataclasses import dataclass

import capstone
from capstone import x86_const as csx

from hclsim import HclsimError

MASK64 = (1 << 64) - 1

_FULL = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _register_table() -> dict[str, tuple[str, int, int]]:
    """Register name as written -> (64-bit register, bit shift, width in bytes)."""
    table = {}
    legacy = {"rax": ("eax", "ax", "al"), "rcx": ("ecx", "cx", "cl"), "rdx": ("edx", "dx", "dl"),
              "rbx": ("ebx", "bx", "bl"), "rsp": ("esp", "sp", "spl"), "rbp": ("ebp", "bp", "bpl"),
              "rsi": ("esi", "si", "sil"), "rdi": ("edi", "di", "dil")}
    for full, (r32, r16, r8) in legacy.items():
        table.update({full: (full, 0, 8), r32: (full, 0, 4), r16: (full, 0, 2), r8: (full, 0, 1)})
    for high, full in (("ah", "rax"), ("ch", "rcx"), ("dh", "rdx"), ("bh", "rbx")):
        table[high] = (full, 8, 1)
    for n in range(8, 16):
        r = f"r{n}"
        table.update({r: (r, 0, 8), r + "d": (r, 0, 4), r + "w": (r, 0, 2), r + "b": (r, 0, 1)})
    return table


REGISTERS = _register_table()
_READ_IDS = {csx.X86_INS_MOV: "mov", csx.X86_INS_MOVABS: "movabs", csx.X86_INS_MOVZX: "movzx",
             csx.X86_INS_MOVSX: "movsx", csx.X86_INS_MOVSXD: "movsxd"}
_WRITE_IDS = {csx.X86_INS_MOV: "mov", csx.X86_INS_MOVABS: "movabs"}

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True


class MmioEmulationError(HclsimError):
    """The intercepted instruction is not one the MMIO emulator completes."""


@dataclass(frozen=True)
class MmioAccess:
    """What one intercepted instruction does to the MMIO GPA."""
    text: str                 # the instruction as decoded, e.g. "movzx ecx, byte ptr [rsi + 0x20]"
    length: int               # its length in bytes (RIP moves past it)
    write: bool               # a store (True) or a load
    size: int                 # bytes accessed at the GPA: 1, 2, 4 or 8
    register: str | None      # the load's destination / the store's source, as written ("ah", "r9b")
    immediate: int | None = None  # a store of an immediate: the bytes stored (extended, masked to size)
    extend: str = ""          # loads: "zero" (movzx), "sign" (movsx, movsxd), "" (mov: same size)

    @property
    def register_width(self) -> int:
        """Bytes of the register operand (the destination's width for movzx/movsx)."""
        return REGISTERS[self.register][2]


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def _text(insn) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


_LEGACY_PREFIXES = frozenset(b"\xf0\xf2\xf3\x2e\x36\x3e\x26\x64\x65\x66\x67")


def _disasm(code: bytes, rip: int):
    """(instruction, extra length, text suffix). capstone 5 rejects some valid encodings with an
    address-size override (67 63 /r, movsxd with 32-bit addressing): the override only changes how
    the address is computed, which the GPA in the message already tells, so decode without it."""
    insn = next(_cs.disasm(code, rip, 1), None)
    if insn is not None:
        return insn, 0, ""
    prefixes = 0
    while prefixes < len(code) and code[prefixes] in _LEGACY_PREFIXES:
        prefixes += 1
    if b"\x67" in code[:prefixes]:
        at = code.index(b"\x67")
        insn = next(_cs.disasm(code[:at] + code[at + 1:], rip, 1), None)
        if insn is not None:
            return insn, 1, " (32-bit address)"
    return None, 0, ""


def decode(code: bytes, rip: int = 0) -> MmioAccess:
    """The access the first instruction in code (the intercept's instruction bytes) makes."""
    insn, extra, suffix = _disasm(bytes(code), rip)
    if insn is None:
        raise MmioEmulationError(f"MMIO instruction at {rip:#x} does not decode: {bytes(code).hex() or 'no bytes'}")
    text, ops, length = _text(insn) + suffix, list(insn.operands), insn.size + extra

    def fail(why: str):
        return MmioEmulationError(f"cannot emulate MMIO instruction {text!r} at {rip:#x}: {why}")

    def gpr(op) -> str:
        name = insn.reg_name(op.reg)
        if name not in REGISTERS:
            raise fail(f"{name} is not a general register")
        return name

    if insn.id not in _READ_IDS or len(ops) != 2 or [op.type for op in ops].count(csx.X86_OP_MEM) != 1:
        raise fail("only mov, movzx, movsx and movsxd between memory and a register or an immediate")
    dst, src = ops
    if dst.type == csx.X86_OP_MEM:  # a store
        size = dst.size
        if insn.id not in _WRITE_IDS or size not in (1, 2, 4, 8):
            raise fail("not a store of a register or an immediate")
        if src.type == csx.X86_OP_IMM:
            imm_size = getattr(insn, "imm_size", 0) or size
            value = src.imm & _mask(imm_size)
            if imm_size < size and value >> (8 * imm_size - 1):  # mov qword [m], imm32: sign-extended
                value |= _mask(size) & ~_mask(imm_size)
            return MmioAccess(text, length, True, size, None, value & _mask(size))
        reg = gpr(src)
        if REGISTERS[reg][2] != size:
            raise fail("operand sizes differ")
        return MmioAccess(text, length, True, size, reg)
    reg, size = gpr(dst), src.size
    width, mnemonic = REGISTERS[reg][2], _READ_IDS[insn.id]
    if size not in (1, 2, 4, 8):
        raise fail(f"a {size}-byte access")
    if mnemonic in ("mov", "movabs"):
        if width != size:
            raise fail("operand sizes differ")
        return MmioAccess(text, length, False, size, reg)
    if mnemonic == "movsxd" and width < 4:
        # 66 63 /r: Intel reads 2 bytes, other implementations 4; no single right answer.
        raise fail("movsxd with a 16-bit destination")
    if size > width:
        raise fail("source wider than destination")
    return MmioAccess(text, length, False, size, reg, None, "zero" if mnemonic == "movzx" else "sign")


def _register(regs: dict, full: str, access: MmioAccess) -> int:
    if full not in regs:
        raise MmioEmulationError(f"MMIO instruction {access.text!r} uses {full}, which is not among the "
                                 "VP registers given")
    return int(regs[full]) & MASK64


def store_value(access: MmioAccess, regs: dict) -> int:
    """The bytes a store writes, as an integer of access.size bytes (little-endian in memory)."""
    if not access.write:
        raise MmioEmulationError(f"{access.text!r} is a load, not a store")
    if access.register is None:
        return access.immediate & _mask(access.size)
    full, shift, width = REGISTERS[access.register]
    return (_register(regs, full, access) >> shift) & _mask(access.size)


def complete_read(access: MmioAccess, value: int, regs: dict) -> dict:
    """The 64-bit register update that completes a load which read value (access.size bytes)."""
    if access.write:
        raise MmioEmulationError(f"{access.text!r} is a store, not a load")
    full, shift, width = REGISTERS[access.register]
    old = _register(regs, full, access)
    v = int(value) & _mask(access.size)
    if access.extend == "sign" and v >> (8 * access.size - 1):
        v |= MASK64 & ~_mask(access.size)
    v &= _mask(width)
    if width >= 4:       # a 32-bit destination zero-extends into the whole register
        return {full: v}
    field = _mask(width) << shift
    return {full: (old & ~field & MASK64) | (v << shift)}
