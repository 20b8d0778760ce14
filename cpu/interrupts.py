"""Interrupt delivery through the guest's IDT (Unicorn has no local APIC and delivers nothing).

Done the way a 64-bit CPU does for an external interrupt with no privilege change: align RSP to
16, push SS, RSP, RFLAGS, CS, RIP, clear IF (interrupt gate) and continue at the gate's handler.
The guest returns with IRETQ, which Unicorn executes itself. The gate and frame pieces serve
cpu/delivery.py too (exceptions, and privilege changes, for a guest with its own IDT).
"""
import struct

from unicorn import x86_const as x86

RFLAGS_IF = 1 << 9
RFLAGS_TF = 1 << 8
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF


class DeliveryError(Exception):
    """The guest's IDT cannot take this vector (no gate, not present, outside the limit)."""


def interrupts_enabled(engine) -> bool:
    return bool(engine.reg("rflags") & RFLAGS_IF)


def read_exactly(engine, va: int, length: int) -> bytes:
    """length bytes at va through the loaded VP's page tables; DeliveryError if any is unmapped."""
    data = engine.read_virtual(va, length)
    if len(data) != length:
        raise DeliveryError(f"IDT/stack address {va:#x} is not mapped")
    return data


def _write(engine, va: int, data: bytes) -> None:
    for i in range(0, len(data), 8):  # 8-byte pieces: each lies within one page (RSP is aligned)
        pa = engine.translate(va + i)
        if pa < 0 or not engine.mem.contains(pa, 8):
            raise DeliveryError(f"stack address {va + i:#x} is not mapped")
        engine.mem.write(pa, data[i:i + 8])


def push_frame(engine, rsp: int, values) -> int:
    """values (quadwords, lowest address first) pushed below rsp; the new RSP."""
    data = struct.pack(f"<{len(values)}Q", *values)
    _write(engine, rsp - len(data), data)
    return rsp - len(data)


def idt_gate(engine, vector: int) -> tuple[int, int, int, int, int]:
    """(handler, selector, IST, gate type, DPL) of vector's gate in the loaded VP's IDT."""
    _sel, idt_base, idt_limit, _flags = engine.uc.reg_read(x86.UC_X86_REG_IDTR)
    if 16 * vector + 15 > idt_limit:
        raise DeliveryError(f"vector {vector:#x} is beyond the IDT limit {idt_limit:#x}")
    lo, hi = struct.unpack("<QQ", read_exactly(engine, idt_base + 16 * vector, 16))
    gate_type = (lo >> 40) & 0xF
    if not (lo >> 47) & 1 or gate_type not in (GATE_INTERRUPT, GATE_TRAP):
        raise DeliveryError(f"IDT gate {vector:#x} is not a present interrupt/trap gate")
    handler = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | ((hi & 0xFFFFFFFF) << 32)
    return handler, (lo >> 16) & 0xFFFF, (lo >> 32) & 7, gate_type, (lo >> 45) & 3


def cleared_flags(gate_type: int) -> int:
    """The RFLAGS bits a delivery through a gate of gate_type clears."""
    return RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | (RFLAGS_IF if gate_type == GATE_INTERRUPT else 0)


def deliver(engine, vector: int) -> int:
    """Enter the handler for vector on the loaded VP; returns the handler address."""
    handler, selector, _ist, gate_type, _dpl = idt_gate(engine, vector)
    rsp, rflags = engine.reg("rsp"), engine.reg("rflags")
    top = push_frame(engine, rsp & ~0xF, (engine.reg("rip"), engine.reg("cs"), rflags, rsp, engine.reg("ss")))
    engine.set_reg("rsp", top)
    engine.set_reg("rflags", rflags & ~cleared_flags(gate_type))
    if selector != engine.reg("cs"):
        engine.set_reg("cs", selector)
    engine.set_reg("rip", handler)
    return handler
