"""The instructions-retired clock the block hook keeps (cpu/fastpath.py), for a stop inside a
block.

The hook counts a translated block whole as it starts. A run that stops before RIP inside it (a
debugger's breakpoint or step, an exception the host delivers) has counted instructions that did
not run: `give_back` takes them off again and marks RIP as where the last block ended, so the
block Unicorn starts at RIP when the run goes on counts them then, as a continuation of the
same straight-line run (not a point where the deadline looks; see H_RUN_START). The counters are
then those of a run that never stopped there.
"""
import numpy as np

from hclsim.cpu.fastpath import H_BLOCK_COUNT, H_BLOCK_START, H_BLOCKS, H_ICOUNT, H_LAST_BLOCK, H_RUN_START
from hclsim.cpu.insnlen import count_instructions

MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def give_back(engine, rip: int | None = None) -> int:
    """Take off the count of the current block's instructions from RIP on (none ran); returns
    how many. Nothing if RIP is not inside the block the hook last counted."""
    h = engine.state.buf
    start, end = int(h[H_BLOCK_START]) & MASK64, int(h[H_LAST_BLOCK]) & MASK64
    rip = engine.reg("rip") if rip is None else rip
    if not start <= rip < end:
        return 0                                   # at a block boundary: nothing counted ahead
    code = engine.read_virtual(rip, end - rip)
    if len(code) != end - rip:
        return 0
    n = min(int(h[H_BLOCK_COUNT]), count_instructions(np.frombuffer(code, np.uint8), 0, len(code)))
    h[H_ICOUNT] -= n
    h[H_BLOCK_COUNT] -= n
    h[H_BLOCKS] -= 1                               # the block Unicorn starts at RIP counts as this one
    h[H_LAST_BLOCK] = _int64(rip)
    return n


def run_start(buf) -> int:
    """The instructions retired where the current straight-line run began (what virtual time
    reads inside a run, the same however Unicorn split the run into translations)."""
    return int(buf[H_RUN_START])
