"""Guest fault reports: what a firmware developer needs when the guest dies — the vector, RIP
and its symbol, registers, a disassembly around RIP and the last serial lines.
"""
import capstone

from hclsim import HclsimError
from hclsim.cpu.engine import VECTOR_NAMES
from hclsim.cpu.pagetable import walk_steps

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


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

    def __call__(self, address: int) -> str | None:
        for name, base, image in self.images:
            if base <= address < base + image.span:
                sym = image.symbolize(address - base)
                return f"{name}:{sym}" if sym else f"{name}+{address - base:#x}"
        return None


def disassemble_around(engine, rip: int, symbolize, before: int = 24, count: int = 8) -> list[str]:
    """Instructions around rip: a short run decoded from a little before it that lands on rip."""
    lines = []
    for back in range(min(before, rip), -1, -1):
        code = engine.read_virtual(rip - back, back + 16 * count)
        insns = list(_cs.disasm(code, rip - back))
        if any(i.address == rip for i in insns):
            start = max(0, [i.address for i in insns].index(rip) - 4)
            for insn in insns[start:start + count]:
                mark = "=>" if insn.address == rip else "  "
                sym = symbolize(insn.address) or ""
                lines.append(f"{mark} {insn.address:#018x} {sym:<28} {insn.bytes.hex():<20} {insn.mnemonic} {insn.op_str}")
            return lines
    return [f"=> {rip:#018x} <no code mapped at RIP>"]


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
        lines.append(f"page walk for {exit.fault_address:#x} (CR3 {regs['cr3']:#x}):")
        for name, gpa, value in walk_steps(engine.mem.array(), regs["cr3"], exit.fault_address):
            state = "outside RAM" if value < 0 else ("present" if value & 1 else "not present")
            lines.append(f"  {name} at {gpa:#x} = {value & (2**64 - 1):#018x} ({state})")
        lines.append("")
    lines += ["code:"] + ["  " + l for l in disassemble_around(engine, rip, symbolize)] + [""]
    lines += ["last serial lines:"] + (["  " + l for l in serial_tail] or ["  (none)"])
    return GuestFaultError(summary, "\n".join(lines))
