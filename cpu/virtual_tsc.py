"""RDTSC and RDTSCP in virtual time: the instructions retired (plus the time a halted guest
skipped), never the host's TSC, which Unicorn 2.1.4 reads for both and offers no hook for.

The engine's block hook (cpu/fastpath.py, with H_TSC_TRAP on) finds a block that reads the TSC
when it first decodes it, and ends the run before the block runs. VirtualTsc.arm then puts a
native code hook over the block and drops the block's translation, so the retranslated block
calls it before each instruction: at an RDTSC/RDTSCP (the bytes say so) it loads EDX:EAX (and
ECX = TSC_AUX 0 for RDTSCP) and steps over the instruction. Hooking the block rather than the
instruction keeps code patched at run time right (Linux's alternatives put LFENCE; RDTSC or
RDTSCP where an RDTSC was, in a block of the same address and size).

The TSC runs at the virtual CPU's rate: one tick per instruction (devices/virtual_clock.py's
default 1 GHz), so the TSC and the PIT agree, and Linux's calibration finds 1000 MHz.
"""
import numpy as np
from numba import carray, cfunc, types
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from hclsim.cpu import fastpath as fp
from hclsim.cpu import native
from hclsim.cpu.pagetable import walk


@cfunc(types.void(types.voidptr, types.uint64, types.uint32, types.voidptr), cache=True)
def hook_rdtsc(uc, address, size, ud):
    h = fp._header(ud)
    ram = carray(fp._int_to_voidptr(h[fp.H_RAM_ADDR]), h[fp.H_RAM_SIZE], np.uint8)
    cr = np.zeros(1, np.int64)
    native.call_reg_access(h[fp.H_FN_REG_READ], uc, x86.UC_X86_REG_CR3, cr.ctypes.data)
    pa = walk(ram, cr[0], np.int64(address)) if h[fp.H_PAGING] else np.int64(address)
    if pa < 0 or pa + 3 > ram.shape[0] or (address & 0xFFF) > 0xFFD or ram[pa] != 0x0F:
        return                                      # not an RDTSC (any more): let it run
    if ram[pa + 1] == 0x31:
        length = 2
    elif ram[pa + 1] == 0x01 and ram[pa + 2] == 0xF9:
        length = 3
    else:
        return
    tsc = h[fp.H_ICOUNT] + h[fp.H_TSC_IDLE]
    h[fp.H_TSC_READS] += 1
    v = np.zeros(1, np.int64)
    v[0] = tsc & 0xFFFFFFFF
    native.call_reg_access(h[fp.H_FN_REG_WRITE], uc, x86.UC_X86_REG_RAX, v.ctypes.data)
    v[0] = (tsc >> 32) & 0xFFFFFFFF
    native.call_reg_access(h[fp.H_FN_REG_WRITE], uc, x86.UC_X86_REG_RDX, v.ctypes.data)
    if length == 3:
        v[0] = 0                                    # TSC_AUX: the CPU number Linux puts there
        native.call_reg_access(h[fp.H_FN_REG_WRITE], uc, x86.UC_X86_REG_RCX, v.ctypes.data)
    v[0] = np.int64(address) + length               # writing RIP ends the block: on past it
    native.call_reg_access(h[fp.H_FN_REG_WRITE], uc, x86.UC_X86_REG_RIP, v.ctypes.data)


class VirtualTsc:
    """Virtual RDTSC on an engine (on until off())."""

    def __init__(self, engine):
        self.engine = engine
        self.sites: dict[tuple, int] = {}               # (start, end) of a hooked block -> its hook
        self.arms = 0

    def on(self) -> None:
        self.engine.state.buf[fp.H_TSC_TRAP] = 1

    def off(self) -> None:
        e = self.engine
        e.state.buf[fp.H_TSC_TRAP] = 0
        for handle in self.sites.values():
            native.hook_del(e.uc, handle)
        self.sites.clear()

    @property
    def pending(self) -> bool:
        return self.engine.state.buf[fp.H_TSC_PENDING] != 0

    def pending_block(self) -> tuple[int, int]:
        """(address, size) of the block the run stopped before, taken (the slots cleared)."""
        h = self.engine.state.buf
        address, size = int(h[fp.H_TSC_PENDING]) & 0xFFFFFFFFFFFFFFFF, int(h[fp.H_TSC_PENDING_SIZE])
        h[fp.H_TSC_PENDING] = h[fp.H_TSC_PENDING_SIZE] = 0
        return address, size

    def arm(self) -> bool:
        """The run stopped before a block that reads the TSC: hook the block. The hook covers
        the block's whole range, not just its RDTSC: code patched in place (Linux's alternatives
        turn an RDTSC into LFENCE; RDTSC or RDTSCP) keeps its cached count and flags, and its
        RDTSC may have moved. True if a hook was added."""
        return self.arm_block(*self.pending_block())

    def arm_block(self, address: int, size: int, reads_tsc: bool = True) -> bool:
        """Hook the block at (address, size) if it reads the TSC; mark it handled either way."""
        e = self.engine
        added = False
        if reads_tsc and not any(start <= address and address + size <= end for start, end in self.sites):
            self.sites[(address, address + size)] = native.hook_add(
                e.uc, ucc.UC_HOOK_CODE, hook_rdtsc.address, e.state.address, begin=address, end=address + size - 1)
            e.remove_cache(address, address + size)        # retranslated with the hook in it
            added = True
        e.state.arm_tsc_block(address, size)
        self.arms += 1
        return added
