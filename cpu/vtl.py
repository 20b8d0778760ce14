"""VTL switches on one VP (hyperv-essentials.md section 3, HvCallVtlReturn / VTL entry).

Shared between the VTLs: the GPRs (RSP excepted) and CR2. Private: RIP, RSP, RFLAGS, control
registers, EFER, segments and descriptor tables. VTL0's state lives in VpState.vtl0_registers
(keyed by HV register name, which is what Get/SetVpRegisters on VTL0 reach) while VTL2 runs; the
VP's saved engine context always holds VTL2's private state.
"""
import struct

from unicorn import x86_const as x86

# HV register name -> engine register, for the registers of a VTL0 context.
GPR_NAMES = {0x20000: "rax", 0x20001: "rcx", 0x20002: "rdx", 0x20003: "rbx", 0x20004: "rsp", 0x20005: "rbp",
             0x20006: "rsi", 0x20007: "rdi", 0x20008: "r8", 0x20009: "r9", 0x2000A: "r10", 0x2000B: "r11",
             0x2000C: "r12", 0x2000D: "r13", 0x2000E: "r14", 0x2000F: "r15", 0x20010: "rip", 0x20011: "rflags"}
CONTROL_NAMES = {0x40000: "cr0", 0x40001: "cr2", 0x40002: "cr3", 0x40003: "cr4"}
REG_EFER = 0x80001
SEGMENTS = {0x60000: "es", 0x60001: "cs", 0x60002: "ss", 0x60003: "ds", 0x60004: "fs", 0x60005: "gs"}
TABLES = {0x70000: x86.UC_X86_REG_IDTR, 0x70001: x86.UC_X86_REG_GDTR}
# Engine register name -> HV register name, for every VTL0 register kept by name.
HV_REGISTERS = {**{name: hv for hv, name in {**GPR_NAMES, **CONTROL_NAMES, **SEGMENTS}.items()}, "efer": REG_EFER}
SHARED = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
          "r15", "cr2")
MSR_EFER = 0xC0000080

ENTRY_REASON_VTL_CALL, ENTRY_REASON_INTERRUPT, ENTRY_REASON_INTERCEPT = 1, 2, 3
ASSIST_ENTRY_REASON, ASSIST_VTL0_RAX, ASSIST_VTL0_RCX, ASSIST_INTERCEPT_MESSAGE = 0x08, 0x10, 0x18, 0x70


def vtl0_long_mode_state(rip: int, rsp: int, cr3: int, gdt: int, gprs: dict | None = None) -> dict:
    """A VTL0 context in 64-bit mode (what firmware would leave an OS loader with)."""
    state = {0x20010: rip, 0x20004: rsp, 0x20011: 0x2, 0x40000: 0x80000031, 0x40002: cr3,
             0x40003: 0x00000620, REG_EFER: 0xD00, 0x70001: (0, gdt, 0x1F, 0), 0x70000: (0, 0, 0, 0),
             0x60001: 0x10, 0x60000: 0x18, 0x60002: 0x18, 0x60003: 0x18, 0x60004: 0x18, 0x60005: 0x18}
    for name, value in (gprs or {}).items():
        state[name] = value
    return state


def apply_vtl0(engine, state: dict) -> None:
    """Load a VTL0 register dict into the engine (private and shared registers)."""
    uc = engine.uc
    for name, reg in TABLES.items():
        if name in state:
            uc.reg_write(reg, state[name])
    for name in (0x40002, 0x40003):
        if name in state:
            engine.set_reg(CONTROL_NAMES[name], state[name])
    engine.set_msr(MSR_EFER, state.get(REG_EFER, 0))
    engine.set_reg("cr0", state.get(0x40000, 0x60000010))
    for name, seg in SEGMENTS.items():
        if name in state:
            engine.set_reg(seg, state[name])
    for name, reg in GPR_NAMES.items():
        engine.set_reg(reg, state.get(name, 0))
    engine.set_reg("cr2", state.get(0x40001, 0))


def capture_vtl0(engine, state: dict) -> None:
    """Store the engine's (VTL0) registers into the dict."""
    for name, reg in GPR_NAMES.items():
        state[name] = engine.reg(reg)
    for name, reg in CONTROL_NAMES.items():
        state[name] = engine.reg(reg)
    state[REG_EFER] = engine.msr(MSR_EFER)
    for name, seg in SEGMENTS.items():
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
        mem.write(assist_gpa + ASSIST_INTERCEPT_MESSAGE, message.ljust(0x100, b"\0")[:0x100])


def vtl0_rax_rcx(mem, assist_gpa: int) -> tuple[int, int]:
    return struct.unpack("<QQ", mem.read(assist_gpa + ASSIST_VTL0_RAX, 16))
