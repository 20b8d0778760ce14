"""VTL switches on one VP (hyperv-essentials.md section 3, HvCallVtlReturn / VTL entry).

Shared between the VTLs: the GPRs (RSP excepted) and CR2. Private: RIP, RSP, RFLAGS, control
registers, EFER, segments and descriptor tables. VTL0's state lives in VpState.vtl0_registers
(keyed by HV register name, which is what Get/SetVpRegisters on VTL0 reach) while VTL2 runs; the
VP's saved engine context always holds VTL2's private state.
"""
import struct

from unicorn import x86_const as x86

from hclsim.defs.hvdef import (CONTROL_NAMES, GPR_NAMES, HV_VP_ASSIST_ENTRY_REASON_OFFSET as ASSIST_ENTRY_REASON,
                               HV_VP_ASSIST_INTERCEPT_MSG_OFFSET as ASSIST_INTERCEPT_MESSAGE, HV_MESSAGE_SIZE,
                               HV_VP_ASSIST_VTL0_RAX_OFFSET as ASSIST_VTL0_RAX, SEGMENT_NAMES,
                               SHARED_REGISTERS as SHARED, HvRegister as R)
from hclsim.cpu.engine import MSR_EFER

TABLES = {R.Idtr: x86.UC_X86_REG_IDTR, R.Gdtr: x86.UC_X86_REG_GDTR}


def register_file(ctx, gprs: dict | None = None) -> dict:
    """VTL0's register file (by HvRegister, as VpState.vtl0_registers keeps it) for a starting
    context (an HvInitialVpContext, hv.vp.long_mode_context) and general registers by HvRegister."""
    state = {R.Rip: ctx.rip, R.Rsp: ctx.rsp, R.Rflags: ctx.rflags, R.Cr0: ctx.cr0, R.Cr3: ctx.cr3, R.Cr4: ctx.cr4,
             R.Efer: ctx.efer, R.Gdtr: (0, ctx.gdtr.base, ctx.gdtr.limit, 0),
             R.Idtr: (0, ctx.idtr.base, ctx.idtr.limit, 0)}
    for reg, seg in SEGMENT_NAMES.items():
        state[reg] = getattr(ctx, seg).selector
    state.update(gprs or {})
    return state


def apply_vtl0(engine, state: dict) -> None:
    """Load a VTL0 register dict into the engine (private and shared registers)."""
    uc = engine.uc
    for name, reg in TABLES.items():
        if name in state:
            uc.reg_write(reg, state[name])
    for name in (R.Cr3, R.Cr4):
        if name in state:
            engine.set_reg(CONTROL_NAMES[name], state[name])
    engine.set_msr(MSR_EFER, state.get(R.Efer, 0))
    engine.set_reg("cr0", state.get(R.Cr0, 0x60000010))
    for name, seg in SEGMENT_NAMES.items():
        if name in state:
            engine.set_reg(seg, state[name])
    for name, reg in GPR_NAMES.items():
        engine.set_reg(reg, state.get(name, 0))
    engine.set_reg("cr2", state.get(R.Cr2, 0))


def capture_vtl0(engine, state: dict) -> None:
    """Store the engine's (VTL0) registers into the dict."""
    for name, reg in GPR_NAMES.items():
        state[name] = engine.reg(reg)
    for name, reg in CONTROL_NAMES.items():
        state[name] = engine.reg(reg)
    state[R.Efer] = engine.msr(MSR_EFER)
    for name, seg in SEGMENT_NAMES.items():
        state[name] = engine.reg(seg)
    for name, reg in TABLES.items():
        state[name] = engine.uc.reg_read(reg)


def shared_registers(engine) -> dict:
    return {r: engine.reg(r) for r in SHARED}


def set_shared_registers(engine, values: dict) -> None:
    for r, v in values.items():
        engine.set_reg(r, v)


def write_entry(mem, assist_gpa: int, reason: int, message: bytes = b"") -> None:
    """VTL2's assist page on VTL entry: entry_reason, and the intercept message."""
    mem.write_u32(assist_gpa + ASSIST_ENTRY_REASON, reason)
    if message:
        mem.write(assist_gpa + ASSIST_INTERCEPT_MESSAGE, message.ljust(HV_MESSAGE_SIZE, b"\0")[:HV_MESSAGE_SIZE])


def vtl0_rax_rcx(mem, assist_gpa: int) -> tuple[int, int]:
    return struct.unpack("<QQ", mem.read(assist_gpa + ASSIST_VTL0_RAX, 16))
