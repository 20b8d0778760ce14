"""HvMessage intercept messages (hyperv-essentials.md section 7) for VTL0 exits that VTL2 handles:
port I/O, CPUID, MSR access, memory access to unmapped GPAs (MMIO) and HLT."""
import struct

import capstone
from capstone import x86_const as csx

MSG_UNMAPPED_GPA = 0x80000000
MSG_IO_PORT = 0x80010000
MSG_MSR = 0x80010001
MSG_CPUID = 0x80010002
MSG_HALT = 0x80010007
ACCESS_READ, ACCESS_WRITE, ACCESS_EXECUTE = 0, 1, 2

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True


def _decode(engine, rip: int):
    code = engine.read_virtual(rip, 16)
    return next(_cs.disasm(code, rip), None), code


def _header(engine, vp_index: int, insn_len: int, access: int) -> bytes:
    cr0, efer, rflags = engine.reg("cr0"), engine.msr(0xC0000080), engine.reg("rflags")
    exec_state = ((cr0 & 1) << 2) | (((efer >> 10) & 1) << 4)  # CPL 0, CR0.PE, EFER.LMA; VTL 0
    cs = struct.pack("<QIHH", 0, 0xFFFFFFFF, engine.reg("cs"), 0xA09B)
    return struct.pack("<IBBH", vp_index, insn_len & 0xF, access, exec_state) + cs + \
        struct.pack("<QQ", engine.reg("rip"), rflags)


def _message(msg_type: int, payload: bytes) -> bytes:
    return struct.pack("<IBBHQ", msg_type, len(payload), 0, 0, 0) + payload


def io_port(engine, vp_index: int) -> bytes:
    insn, code = _decode(engine, engine.reg("rip"))
    is_in = insn.id in (csx.X86_INS_IN, csx.X86_INS_INSB, csx.X86_INS_INSD, csx.X86_INS_INSW)
    ops = [op for op in insn.operands]
    reg_op = next((op for op in ops if op.type == csx.X86_OP_REG and insn.reg_name(op.reg) in ("al", "ax", "eax")), None)
    size = {"al": 1, "ax": 2, "eax": 4}[insn.reg_name(reg_op.reg)] if reg_op else 1
    imm = next((op.imm for op in ops if op.type == csx.X86_OP_IMM), None)
    port = imm if imm is not None else engine.reg("rdx") & 0xFFFF
    payload = _header(engine, vp_index, insn.size, ACCESS_READ if is_in else ACCESS_WRITE)
    payload += struct.pack("<HBB4xQ", port, size, insn.size, engine.reg("rax")) + code[:16].ljust(16, b"\0")
    payload += bytes(0x30) + struct.pack("<QQQ", engine.reg("rcx"), engine.reg("rsi"), engine.reg("rdi"))
    return _message(MSG_IO_PORT, payload)


def cpuid(engine, vp_index: int, defaults: tuple) -> bytes:
    payload = _header(engine, vp_index, 2, ACCESS_EXECUTE)
    payload += struct.pack("<4Q", engine.reg("rax"), engine.reg("rcx"), engine.reg("rdx"), engine.reg("rbx"))
    eax, ebx, ecx, edx = defaults
    payload += struct.pack("<4Q", eax, ecx, edx, ebx)
    return _message(MSG_CPUID, payload)


def msr(engine, vp_index: int, write: bool) -> bytes:
    payload = _header(engine, vp_index, 2, ACCESS_WRITE if write else ACCESS_READ)
    payload += struct.pack("<I4xQQ", engine.reg("rcx") & 0xFFFFFFFF, engine.reg("rdx"), engine.reg("rax"))
    return _message(MSG_MSR, payload)


def memory(engine, vp_index: int, gpa: int, write: bool) -> bytes:
    rip = engine.reg("rip")
    insn, code = _decode(engine, rip)
    length = insn.size if insn else 0
    payload = _header(engine, vp_index, length, ACCESS_WRITE if write else ACCESS_READ)
    payload += struct.pack("<IBBBxQQ", 0, length, 0, 0, 0, gpa) + code[:16].ljust(16, b"\0")
    return _message(MSG_UNMAPPED_GPA, payload)


def parse(message: bytes) -> dict:
    """The fields tests and the host-side handler need from a message."""
    msg_type, length = struct.unpack_from("<IB", message)
    p = message[16:16 + length]
    vp, insn_len, access = struct.unpack_from("<IBB", p)
    rip, rflags = struct.unpack_from("<QQ", p, 0x18)
    out = {"type": msg_type, "vp": vp, "instruction_length": insn_len & 0xF, "access": access, "rip": rip}
    if msg_type == MSG_IO_PORT:
        out["port"], out["size"] = struct.unpack_from("<HB", p, 0x28)
        out["rax"] = struct.unpack_from("<Q", p, 0x30)[0]
    elif msg_type == MSG_CPUID:
        out["rax"], out["rcx"] = struct.unpack_from("<QQ", p, 0x28)
    elif msg_type == MSG_MSR:
        out["msr"] = struct.unpack_from("<I", p, 0x28)[0]
    elif msg_type == MSG_UNMAPPED_GPA:
        out["gpa"] = struct.unpack_from("<Q", p, 0x38)[0]
        out["instruction_length"] = p[0x2C]
    return out
