"""Stack frames of the firmware from its DWARF call frame information (.debug_frame, read with
pyelftools), as gdb unwinds them: for each frame, the rule for the canonical frame address (CFA)
and where the caller's registers were saved; the return address is the caller's RIP. The
firmware is built -O2 without frame pointers, so CFI is the only reliable way up the stack;
assembly entry code has none, and the backtrace ends there ("no unwind information")."""
import bisect
import functools
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.dwarf.callframe import CFARule, FDE, RegisterRule

from hclsim.debug.dwarf import dwarf_info

# DWARF register numbers on x86-64 (System V ABI).
DWARF_REGS = ("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
              "r14", "r15", "rip")
MAX_FRAMES = 64


@dataclass(frozen=True)
class Frame:
    level: int
    pc: int            # the frame's RIP (for callers: the return address)
    cfa: int | None    # its canonical frame address (the caller's RSP after the return), if known
    regs: dict         # what is known of its registers (rsp, rbp, ...)


class FrameTable:
    """The decoded CFI rows of one ELF: (start offset, end offset, rows)."""

    def __init__(self, entries: list[tuple[int, int, list]]):
        self.entries = sorted(((start, end, [r["pc"] for r in rows], rows) for start, end, rows in entries),
                              key=lambda e: e[0])
        self.starts = [e[0] for e in self.entries]

    def row_at(self, offset: int):
        i = bisect.bisect_right(self.starts, offset) - 1
        if i < 0 or not self.entries[i][0] <= offset < self.entries[i][1]:
            return None
        _start, _end, pcs, rows = self.entries[i]
        j = bisect.bisect_right(pcs, offset) - 1
        return rows[j] if j >= 0 else None


@functools.lru_cache(maxsize=16)
def frame_table(path: str) -> FrameTable | None:
    try:
        dwarf = dwarf_info(path)
        if dwarf is None:
            return None
        if not dwarf.has_CFI():
            return None
        entries = []
        for entry in dwarf.CFI_entries():
            if isinstance(entry, FDE):
                start = entry.header["initial_location"]
                entries.append((start, start + entry.header["address_range"], entry.get_decoded().table))
    except (OSError, ELFError, KeyError, ValueError, TypeError):
        return None
    return FrameTable(entries) if entries else None


def unwind(images, read_u64, regs: dict, limit: int = MAX_FRAMES) -> tuple[list[Frame], str]:
    """The frames from regs (the stopped VP's registers) up, and why the walk ended.
    images: hclsim.debug.images.ImageMap; read_u64(va) -> int, raising on an unmapped address."""
    frames, regs = [], dict(regs)
    for level in range(limit):
        pc = regs["rip"]
        hit = images.at(pc)
        table = frame_table(hit[0].image.path) if hit else None
        row = None if table is None else table.row_at(hit[1] - (1 if level else 0))  # a call's return
        if row is None:
            frames.append(Frame(level, pc, None, regs))
            return frames, "no unwind information here"
        rule = row["cfa"]
        if not isinstance(rule, CFARule) or rule.reg is None or rule.reg >= len(DWARF_REGS) or \
                DWARF_REGS[rule.reg] not in regs:
            frames.append(Frame(level, pc, None, regs))
            return frames, "the frame address is an expression"
        cfa = (regs[DWARF_REGS[rule.reg]] + rule.offset) & (2**64 - 1)
        frames.append(Frame(level, pc, cfa, regs))
        caller = {"rsp": cfa}
        try:
            for number, reg_rule in row.items():
                if not isinstance(number, int) or number >= len(DWARF_REGS):
                    continue
                name = DWARF_REGS[number]
                if reg_rule.type == RegisterRule.OFFSET:
                    caller[name] = read_u64(cfa + reg_rule.arg)
                elif reg_rule.type == RegisterRule.SAME_VALUE and name in regs:
                    caller[name] = regs[name]
        except Exception:
            return frames, f"the stack at {cfa:#x} is not readable"
        for name in ("rbp", "rbx", "r12", "r13", "r14", "r15"):   # callee-saved: unchanged unless saved
            if name not in caller and name in regs:
                caller[name] = regs[name]
        if "rip" not in caller or caller["rip"] == 0 or images.at(caller["rip"]) is None:
            return frames, "the return address is outside the firmware"
        regs = caller
    return frames, f"stopped after {limit} frames"
