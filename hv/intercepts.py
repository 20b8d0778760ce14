"""HvMessage intercept messages (hyperv-essentials.md section 7) for VTL0 exits that VTL2 handles:
port I/O, CPUID, MSR access, memory access to unmapped GPAs (MMIO) and HLT. The layouts are
defs/hvdef.py's; this module fills them from the engine's state and reads them back."""
import ctypes
import struct

import capstone
from capstone import x86_const as csx

from hclsim.cpu.engine import MSR_EFER
from hclsim.defs.hvdef import (parse_intercept, HV_INTERCEPT_ACCESS_EXECUTE as ACCESS_EXECUTE, HV_INTERCEPT_ACCESS_READ as ACCESS_READ,
                               HV_INTERCEPT_ACCESS_WRITE as ACCESS_WRITE, HvMessage,
                               HvMessageType, HvX64CpuidInterceptMessage, HvX64HypercallInterceptMessage, HvX64InterceptMessageHeader,
                               HvX64IoPortInterceptMessage, HvX64MemoryInterceptMessage, HvX64MsrInterceptMessage)

MSG_UNMAPPED_GPA = HvMessageType.UnmappedGpa
MSG_IO_PORT = HvMessageType.X64IoPortIntercept
MSG_MSR = HvMessageType.X64MsrIntercept
MSG_CPUID = HvMessageType.X64CpuidIntercept
MSG_HALT = HvMessageType.X64Halt
MSG_HYPERCALL = HvMessageType.HypercallIntercept
CS_LONG_MODE_CODE = 0xA09B   # attributes of a present 64-bit ring-0 code segment

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True


def _decode(engine, rip: int):
    code = engine.read_virtual(rip, 16)
    return next(_cs.disasm(code, rip), None), code


_HEADER_REGS = ("cr0", "cs", "rip", "rflags")


def _header(h: HvX64InterceptMessageHeader, engine, vp_index: int, insn_len: int, access: int) -> None:
    (cr0, cs, rip, rflags), efer = engine.read_regs(_HEADER_REGS), engine.msr(MSR_EFER)
    h.vp_index = vp_index
    h.instruction_length_cr8 = insn_len & 0xF
    h.intercept_access_type = access
    h.execution_state = ((cr0 & 1) << 2) | (((efer >> 10) & 1) << 4)  # CPL 0, CR0.PE, EFER.LMA; VTL 0
    h.cs_segment.limit, h.cs_segment.selector, h.cs_segment.attributes = 0xFFFFFFFF, cs, CS_LONG_MODE_CODE
    h.rip, h.rflags = rip, rflags


def _message(msg_type: int, payload) -> bytes:
    msg = HvMessage()
    msg.header.message_type = msg_type
    msg.header.payload_size = ctypes.sizeof(payload)
    ctypes.memmove(msg.payload, ctypes.addressof(payload), ctypes.sizeof(payload))
    return bytes(msg)[:16 + ctypes.sizeof(payload)]


def _code(field, code: bytes) -> None:
    ctypes.memmove(field, code[:16].ljust(16, b"\0"), 16)


# The decoded form of an I/O instruction and its bytes: a loop's OUT is read and decoded once,
# not at every exit (capstone and the page walk cost ~30 us, most of an I/O exit's host time).
_IO_FORMS: dict = {}
_FORM_KEY = ("rip", "cr3")
_IO_FORMS_MAX = 4096


def io_form(engine, rip: int | None = None, cr3: int | None = None) -> tuple:
    """((is_in, size, imm or None, length), the 16 code bytes) of the I/O instruction at rip."""
    # By the loaded code (its digest), CR3 and RIP: the intercepted instructions are exit sites
    # found once in the image's code (cpu/exit_sites.py), which the simulation takes as unchanging.
    if rip is None:
        rip, cr3 = engine.read_regs(_FORM_KEY)
    key = (engine.code_signature, cr3, rip)
    cached = _IO_FORMS.get(key)
    if cached is not None:
        return cached
    code = engine.read_virtual(rip, 16)
    insn = next(_cs.disasm(code, rip), None)
    is_in = insn.id in (csx.X86_INS_IN, csx.X86_INS_INSB, csx.X86_INS_INSD, csx.X86_INS_INSW)
    ops = [op for op in insn.operands]
    reg_op = next((op for op in ops if op.type == csx.X86_OP_REG and insn.reg_name(op.reg) in ("al", "ax", "eax")),
                  None)
    size = {"al": 1, "ax": 2, "eax": 4}[insn.reg_name(reg_op.reg)] if reg_op else 1
    imm = next((op.imm for op in ops if op.type == csx.X86_OP_IMM), None)
    if len(_IO_FORMS) >= _IO_FORMS_MAX:
        _IO_FORMS.clear()
    cached = _IO_FORMS[key] = ((is_in, size, imm, insn.size), code)
    return cached


_IO_REGS = ("rax", "rcx", "rdx", "rsi", "rdi")


# The I/O intercept message in one struct.pack (its fields, in HvMessageHeader,
# HvX64InterceptMessageHeader, HvX64IoPortInterceptMessage order; checked equal to the ctypes
# build by tests/test_intercepts.py): filling the ctypes structs field by field cost ~10 us, most
# of an I/O exit's host time.
_IO_MESSAGE = struct.Struct("<IBBHQ" "IBBHQIHHQQ" "HBBIQ16s16x16xQQQ")
_IO_PAYLOAD = ctypes.sizeof(HvX64IoPortInterceptMessage)
assert _IO_MESSAGE.size == 16 + _IO_PAYLOAD
_IO_ALL_REGS = ("rip", "cr3", "cr0", "cs", "rflags", "rax", "rcx", "rdx", "rsi", "rdi")


def io_port(engine, vp_index: int) -> bytes:
    """The X64IoPortIntercept message of the I/O instruction at RIP (fast path of io_port_ctypes)."""
    rip, cr3, cr0, cs, rflags, rax, rcx, rdx, rsi, rdi = engine.read_regs(_IO_ALL_REGS)
    (is_in, size, imm, length), code = io_form(engine, rip, cr3)
    efer = engine.msr(MSR_EFER)
    return _IO_MESSAGE.pack(
        MSG_IO_PORT, _IO_PAYLOAD, 0, 0, 0,
        vp_index, length & 0xF, ACCESS_READ if is_in else ACCESS_WRITE, ((cr0 & 1) << 2) | (((efer >> 10) & 1) << 4),
        0, 0xFFFFFFFF, cs, CS_LONG_MODE_CODE, rip, rflags,
        imm if imm is not None else rdx & 0xFFFF, size, length, 0, rax, code[:16].ljust(16, b"\0"), rcx, rsi, rdi)


def io_port_ctypes(engine, vp_index: int) -> bytes:
    """io_port built field by field in the defs/hvdef.py structs: the reference the fast path is
    checked against."""
    (is_in, size, imm, length), code = io_form(engine)
    m = HvX64IoPortInterceptMessage()
    _header(m.header, engine, vp_index, length, ACCESS_READ if is_in else ACCESS_WRITE)
    rax, rcx, rdx, rsi, rdi = engine.read_regs(_IO_REGS)
    m.port_number = imm if imm is not None else rdx & 0xFFFF
    m.access_info, m.instruction_byte_count, m.rax = size, length, rax
    _code(m.instruction_bytes, code)
    m.rcx, m.rsi, m.rdi = rcx, rsi, rdi
    return _message(MSG_IO_PORT, m)


def cpuid(engine, vp_index: int, defaults: tuple) -> bytes:
    m = HvX64CpuidInterceptMessage()
    _header(m.header, engine, vp_index, 2, ACCESS_EXECUTE)
    m.rax, m.rcx, m.rdx, m.rbx = (engine.reg(r) for r in ("rax", "rcx", "rdx", "rbx"))
    (m.default_result_rax, m.default_result_rbx, m.default_result_rcx, m.default_result_rdx) = defaults
    return _message(MSG_CPUID, m)


_HYPERCALL_REGS = ("rax", "rbx", "rcx", "rdx", "r8", "rsi", "rdi")


def hypercall(engine, vp_index: int) -> bytes:
    """The hypercall intercept message of the vmcall at RIP (3 bytes), with the ABI's registers."""
    m = HvX64HypercallInterceptMessage()
    _header(m.header, engine, vp_index, 3, ACCESS_EXECUTE)
    m.rax, m.rbx, m.rcx, m.rdx, m.r8, m.rsi, m.rdi = engine.read_regs(_HYPERCALL_REGS)
    return _message(MSG_HYPERCALL, m)


def msr(engine, vp_index: int, write: bool) -> bytes:
    m = HvX64MsrInterceptMessage()
    _header(m.header, engine, vp_index, 2, ACCESS_WRITE if write else ACCESS_READ)
    m.msr_number, m.rdx, m.rax = engine.reg("rcx") & 0xFFFFFFFF, engine.reg("rdx"), engine.reg("rax")
    return _message(MSG_MSR, m)


def memory(engine, vp_index: int, gpa: int, write: bool) -> bytes:
    insn, code = _decode(engine, engine.reg("rip"))
    length = insn.size if insn else 0
    m = HvX64MemoryInterceptMessage()
    _header(m.header, engine, vp_index, length, ACCESS_WRITE if write else ACCESS_READ)
    m.instruction_byte_count, m.guest_physical_address = length, gpa
    _code(m.instruction_bytes, code)
    return _message(MSG_UNMAPPED_GPA, m)


def parse(message: bytes) -> dict:
    """The fields the host-side handler needs from a message (defs/hvdef.parse_intercept)."""
    return parse_intercept(message)
