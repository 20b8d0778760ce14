"""Text for `hclsim step`: locations, stops, registers, memory dumps (gdb's x/FMT) and page walks,
in gdb's layout where gdb has one."""
import os

from hclsim.cpu.pagetable import LEVEL_NAMES, translate
from hclsim.debug.events import (BREAKPOINT, EVENT, FAULT, HANDOFF, IDLE, INTERRUPTED, START, TIMEOUT,
                                 WATCHPOINT, DebugError)
from hclsim.debug.images import short_path

X_FORMATS = "xduotacsi"
X_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}
PER_LINE = {1: 8, 2: 8, 4: 4, 8: 2}


def location(target, addr: int) -> str:
    """'0x8414c00 <shim:shim_main> shim/main.c:48'"""
    text = f"{addr:#x}"
    sym = target.symbolize(addr)
    if sym:
        text += f" <{sym}>"
    line = target.source_line(addr)
    if line:
        text += f" {short_path(line[0])}:{line[1]}"
    return text


def instruction(target, vp: int, addr: int, mark: str = "=> ") -> str:
    try:
        insns = target.disassemble(vp, addr, 1)
    except DebugError as exc:
        return f"{mark}{addr:#x}:\t<{exc}>"
    if not insns:
        return f"{mark}{addr:#x}:\t<no instruction decodes here>"
    a, _raw, text, sym, _line = insns[0]
    return f"{mark}{a:#x}{' <' + sym + '>' if sym else ''}:\t{text}"


def stop_lines(target, stop, point: str | None = None) -> list[str]:
    """What the prompt prints when the VPs stop (point: 'Breakpoint 2' and the like)."""
    where = f"VP {stop.vp} stopped at {location(target, stop.rip)}"
    if stop.reason == FAULT:
        report = target.last_fault_report or stop.detail
        return [stop.detail] + [line for line in report.splitlines()[1:]]
    if stop.reason == IDLE:
        return [f"No VP can run ({stop.detail.split(': ', 1)[-1]})."]
    if stop.reason == HANDOFF:
        return [f"VP {stop.vp} reached the kernel entry {stop.rip:#x}: {stop.detail.split(': ', 1)[-1]}."]
    first = {BREAKPOINT: f"{point or 'Breakpoint'}, {where}",
             WATCHPOINT: f"{point or 'Watchpoint'}: {stop.detail}",
             EVENT: f"{point or 'Catchpoint'} ({stop.detail}), {where}",
             INTERRUPTED: f"Interrupted: {where}",
             TIMEOUT: f"Time limit reached: {where}",
             START: where}.get(stop.reason)
    if first is None:  # a step
        first = where + (f" ({stop.detail})" if stop.detail else "")
    lines = [first]
    if stop.reason == WATCHPOINT:
        lines.append(where)
    return lines + [instruction(target, stop.vp, stop.rip)]


def registers(regs: dict, names: list[str], symbolize) -> list[str]:
    lines = []
    for name in names:
        value = regs[name]
        extra = str(value) if name not in ("rip", "rflags", "cr0", "cr3", "cr4", "efer") else ""
        if name == "rip":
            sym = symbolize(value)
            extra = f"<{sym}>" if sym else ""
        elif name == "rflags":
            extra = "[ " + " ".join(f for bit, f in ((0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"),
                                                     (8, "TF"), (9, "IF"), (10, "DF"), (11, "OF")) if value >> bit & 1) + " ]"
        lines.append(f"{name:<14} {value:<#18x} {extra}".rstrip())
    return lines


def parse_x_format(spec: str, last: tuple[int, str, str]) -> tuple[int, str, str]:
    """'/8gx' -> (8, 'x', 'g'); count, format and size default as in gdb (to the last used)."""
    count, fmt, size = 1, last[1], last[2]
    digits = ""
    for ch in spec:
        if ch.isdigit():
            digits += ch
        elif ch in X_FORMATS:
            fmt = ch
        elif ch in X_SIZES:
            size = ch
        else:
            raise DebugError(f"bad x format /{spec}: count, then a format ({X_FORMATS}) and a size (bhwg)")
    if digits:
        count = int(digits)
    if fmt == "c" and not any(ch in X_SIZES for ch in spec):
        size = "b"
    if fmt == "a":
        size = "g"
    return count, fmt, size


def _value(data: bytes, fmt: str, size: int, symbolize) -> str:
    unsigned = int.from_bytes(data, "little")
    if fmt == "x":
        return f"0x{unsigned:0{2 * size}x}"
    if fmt == "d":
        return str(int.from_bytes(data, "little", signed=True))
    if fmt == "u":
        return str(unsigned)
    if fmt == "o":
        return f"0{unsigned:o}"
    if fmt == "t":
        return f"{unsigned:0{8 * size}b}"
    if fmt == "c":
        return f"{data[0]} " + (repr(chr(data[0])) if 32 <= data[0] < 127 else f"'\\x{data[0]:02x}'")
    if fmt == "a":
        sym = symbolize(unsigned)
        return f"{unsigned:#x}" + (f" <{sym}>" if sym else "")
    raise DebugError(f"format {fmt} does not apply here")


def examine(target, vp: int, addr: int, count: int, fmt: str, size_letter: str, physical: bool) -> list[str]:
    """gdb's x/FMT ADDR output."""
    if fmt == "i":
        if physical:
            raise DebugError("x/i reads through a VP's page tables: drop -phys")
        return [instruction(target, vp, a, "   " if a != target.registers(vp)["rip"] else "=> ")
                for a, *_ in target.disassemble(vp, addr, count)]
    if fmt == "s":
        lines, at = [], addr
        for _ in range(count):
            raw = b""
            while len(raw) < 4096 and not raw.endswith(b"\0"):
                raw += target.read_memory(vp, at + len(raw), 1, physical)
            lines.append(f"{_label(target, at, physical)}\t{raw.rstrip(chr(0).encode()).decode('latin-1')!r}")
            at += len(raw)
        return lines
    size = X_SIZES[size_letter]
    data = target.read_memory(vp, addr, count * size, physical)
    per = PER_LINE[size] if fmt not in ("a", "c") else (1 if fmt == "a" else 8)
    lines = []
    for row in range(0, count, per):
        cells = [_value(data[i * size:(i + 1) * size], fmt, size, target.symbolize)
                 for i in range(row, min(row + per, count))]
        lines.append(f"{_label(target, addr + row * size, physical)}\t" + "\t".join(cells))
    return lines


def _label(target, addr: int, physical: bool) -> str:
    if physical:
        return f"{addr:#x} (phys):"
    sym = target.symbolize(addr)
    return f"{addr:#x}{' <' + sym + '>' if sym else ''}:"


def page_walk(target, vp: int, va: int) -> list[str]:
    rows = target.page_walk(vp, va)
    if not rows:
        return [f"VP {vp} has paging off: {va:#x} is a physical address"]
    cr3 = target.registers(vp)["cr3"]
    lines = [f"page walk for {va:#x} in VP {vp} (CR3 {cr3:#x}):"]
    for name, gpa, value in rows:
        state = "outside RAM" if value < 0 else ("present" if value & 1 else "not present")
        flags = "" if value < 0 or not value & 1 else " " + " ".join(
            f for bit, f in ((1, "RW"), (2, "US"), (5, "A"), (6, "D"), (7, "PS"), (63, "NX")) if value >> bit & 1)
        lines.append(f"  {name:<5} at {gpa:#x} = {value & (2**64 - 1):#018x} ({state}{flags})")
    gpa = translate(target.machine.mem.array(), cr3, va)
    lines.append(f"  -> GPA {gpa:#x}" if gpa >= 0 else f"  -> not mapped ({LEVEL_NAMES.get(gpa, gpa)})")
    return lines


def source_range(path: str, first: int, last: int, mark: int | None = None) -> list[str]:
    """Lines first..last of path (those that exist), numbered, the line mark marked."""
    if not os.path.isfile(path):
        raise DebugError(f"source file {path} is not here")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().splitlines()
    return [f"{n:<6}{'>' if n == mark else ' '} {text[n - 1]}" for n in range(max(1, first), min(len(text), last) + 1)]
