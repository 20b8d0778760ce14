"""VTL switches on one VP (hyperv-essentials.md section 3, HvCallVtlReturn / VTL entry).

Shared between the VTLs: the GPRs (RSP excepted) and CR2. Private: RIP, RSP, RFLAGS, control
registers, EFER, segments and descriptor tables. VTL0's state lives in VpState.vtl0_registers
(keyed by HV register name, which is what Get/SetVpRegisters on VTL0 reach) while VTL2 runs; the
VP's saved engine context always holds VTL2's private state.
"""
import struct


from hclsim.defs.hvdef import (CONTROL_NAMES, GPR_NAMES, TABLE_NAMES, HV_VP_ASSIST_ENTRY_REASON_OFFSET as ASSIST_ENTRY_REASON,
                               HV_VP_ASSIST_INTERCEPT_MSG_OFFSET as ASSIST_INTERCEPT_MESSAGE, HV_MESSAGE_SIZE,
                               HV_VP_ASSIST_VTL0_RAX_OFFSET as ASSIST_VTL0_RAX, SEGMENT_NAMES,
                               SHARED_REGISTERS as SHARED, HvRegister as R)
from hclsim.cpu.engine import MSR_EFER



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


# The registers a VTL switch moves, in the order they must be written (paging and EFER before
# CR0 and the segments), as batches of one uc_reg_*_batch call each: switching VPs on a Linux CPU
# costs ~2 calls instead of ~60 (the 64-VP run switches at nearly every exit).
_CONTROL_FIRST = ((R.Cr3, "cr3"), (R.Cr4, "cr4"))
_REST = (((R.Cr0, "cr0"),) + tuple(SEGMENT_NAMES.items()) + tuple(GPR_NAMES.items()) + ((R.Cr2, "cr2"),))
_REST_NAMES = tuple(n for _, n in _REST)
_CAPTURE = tuple(GPR_NAMES.items()) + tuple(CONTROL_NAMES.items()) + tuple(SEGMENT_NAMES.items())
_CAPTURE_NAMES = tuple(n for _, n in _CAPTURE)


def apply_vtl0(engine, state: dict) -> None:
    """Load a VTL0 register dict into the engine (private and shared registers)."""
    for name, table in TABLE_NAMES.items():
        if name in state:
            _sel, base, limit, _flags = state[name]
            engine.set_table(table, base, limit)
    for name, reg in _CONTROL_FIRST:
        if name in state:
            engine.set_reg(reg, state[name])
    engine.set_msr(MSR_EFER, state.get(R.Efer, 0))
    segs = set(SEGMENT_NAMES)
    pairs = [(n, state.get(r, 0x60000010 if r == R.Cr0 else 0)) for r, n in _REST if r not in segs or r in state]
    engine.write_regs(tuple(n for n, _ in pairs), [v for _, v in pairs])


def capture_vtl0(engine, state: dict) -> None:
    """Store the engine's (VTL0) registers into the dict."""
    for (name, _reg), value in zip(_CAPTURE, engine.read_regs(_CAPTURE_NAMES)):
        state[name] = value
    state[R.Efer] = engine.msr(MSR_EFER)
    for name, table in TABLE_NAMES.items():
        base, limit = engine.table(table)
        state[name] = (0, base, limit, 0)        # as register_file keeps a table: (selector, base, limit, flags)


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
