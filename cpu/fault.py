"""Guest fault reports: what a firmware developer needs when the guest dies — the vector, RIP
and its symbol, registers, a disassembly around RIP and the last serial lines.
"""
import capstone

from hclsim import HclsimError
from hclsim.cpu.engine import VECTOR_NAMES
from hclsim.cpu.pagetable import walk_steps

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs_detail = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs_detail.detail = True
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16
MAX_FUNCTION = 1 << 16    # decode from a function's start only when it is smaller than this


class GuestFaultError(HclsimError):
    """The guest faulted or crashed; str() is the one-line summary, .report the full text."""

    def __init__(self, summary: str, report: str):
        super().__init__(summary)
        self.report = report


class Symbolizer:
    """Maps guest addresses to 'image:symbol+off' over the loaded firmware images."""

    def __init__(self):
        self.images = []  # (name, runtime base, FirmwareImage)

    def add(self, name: str, base: int, image) -> None:
        self.images.append((name, base, image))

    def function_start(self, address: int) -> int | None:
        """Where the sized symbol holding address starts (an instruction boundary)."""
        for _name, base, image in self.images:
            if base <= address < base + image.span:
                off = address - base
                for start, size, _sym in image.symbols:
                    if start <= off < start + size and size <= MAX_FUNCTION:
                        return base + start
        return None

    def __call__(self, address: int) -> str | None:
        for name, base, image in self.images:
            if base <= address < base + image.span:
                sym = image.symbolize(address - base)
                return f"{name}:{sym}" if sym else f"{name}+{address - base:#x}"
        return None


def _decoded_up_to(engine, rip: int, symbolize, before: int, count: int) -> list | None:
    """Instructions from a boundary before rip through rip and on: decoded from the start of
    rip's function when the symbols know it (exact boundaries), else from the furthest point
    within `before` bytes whose decode lands on rip."""
    start = getattr(symbolize, "function_start", lambda a: None)(rip)
    tries = [start] if start is not None and start <= rip else []
    tries += [rip - back for back in range(min(before, rip), -1, -1)]
    for first in tries:
        code = engine.read_virtual(first, rip - first + 16 * count)
        insns = list(_cs.disasm(code, first))
        if any(i.address == rip for i in insns):
            return insns
    return None


def disassemble_around(engine, rip: int, symbolize, before: int = 24, count: int = 8) -> list[str]:
    """Instructions around rip (four before it), each starting on an instruction boundary."""
    insns = _decoded_up_to(engine, rip, symbolize, before, count)
    if insns is None:
        return [f"=> {rip:#018x} <no code mapped at RIP>"]
    at = [i.address for i in insns].index(rip)
    lines = []
    for insn in insns[max(0, at - 4):max(0, at - 4) + count]:
        mark = "=>" if insn.address == rip else "  "
        sym = symbolize(insn.address) or ""
        lines.append(f"{mark} {insn.address:#018x} {sym:<28} {insn.bytes.hex():<20} {insn.mnemonic} {insn.op_str}")
    return lines


def page_fault_error_code(engine, rip: int, address: int, steps) -> tuple[int, str]:
    """The #PF error code the CPU would push, and its meaning. Unicorn reports no error code, so
    it is derived: P from the page walk, I from the address being RIP's instruction, W from the
    faulting instruction writing memory; always supervisor (CPL 0)."""
    present = bool(steps) and all(v >= 0 and v & 1 for _name, _gpa, v in steps)
    fetch = rip <= address < rip + 16
    write = False
    if not fetch:
        insn = next(_cs_detail.disasm(engine.read_virtual(rip, 16), rip), None)
        write = insn is not None and any(op.type == capstone.x86.X86_OP_MEM and op.access & capstone.CS_AC_WRITE
                                         for op in insn.operands)
    code = (PF_P if present else 0) | (PF_W if write else 0) | (PF_I if fetch else 0)
    meaning = ", ".join(("protection violation" if present else "not-present page",
                         "write" if write else ("instruction fetch" if fetch else "read"), "supervisor mode"))
    return code, meaning


def format_registers(regs: dict) -> list[str]:
    order = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer",
             "cs", "ds", "es", "fs", "gs", "ss", "fs_base", "gs_base"]
    cells = [f"{name:>7} {regs[name]:#018x}" for name in order if name in regs]
    return ["  ".join(cells[i:i + 4]) for i in range(0, len(cells), 4)]


def fault_report(title: str, engine, exit, symbolize, serial_tail: list[str], detail: str = "") -> GuestFaultError:
    rip = exit.rip
    where = symbolize(rip)
    vector = f"{VECTOR_NAMES.get(exit.vector, 'vector ' + str(exit.vector))} " if exit.vector is not None else ""
    summary = f"{title}: {vector}at RIP {rip:#x}{' (' + where + ')' if where else ''}: {exit.message or detail}".rstrip(": ")
    lines = [summary, ""]
    if detail and detail != exit.message:
        lines += [detail, ""]
    regs = engine.registers()
    lines += ["registers:"] + ["  " + l for l in format_registers(regs)] + [""]
    if exit.fault_address is not None and regs["cr0"] & 0x80000000:
        steps = walk_steps(engine.mem.array(), regs["cr3"], exit.fault_address)
        if exit.vector == 14:
            code, meaning = page_fault_error_code(engine, rip, exit.fault_address, steps)
            lines += [f"#PF error code {code:#x}: {meaning} (derived: Unicorn reports none); CR2 = "
                      f"{exit.fault_address:#x}", ""]
        lines.append(f"page walk for {exit.fault_address:#x} (CR3 {regs['cr3']:#x}):")
        for name, gpa, value in steps:
            state = "outside RAM" if value < 0 else ("present" if value & 1 else "not present")
            lines.append(f"  {name} at {gpa:#x} = {value & (2**64 - 1):#018x} ({state})")
        lines.append("")
    lines += ["code:"] + ["  " + l for l in disassemble_around(engine, rip, symbolize)] + [""]
    lines += ["last serial lines:"] + (["  " + l for l in serial_tail] or ["  (none)"])
    return GuestFaultError(summary, "\n".join(lines))
