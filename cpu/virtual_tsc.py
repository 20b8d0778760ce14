"""RDTSC and RDTSCP in virtual time: the instructions retired (plus the time a halted guest
skipped), never the host's TSC, which QEMU's helpers read.

Unicorn 2.1.4 calls UC_HOOK_INSN hooks for RDTSC and RDTSCP from those helpers, and a hook that
returns 1 skips the host's read (its Python binding does not offer them; the C API does). The
hooks here are native: they load EDX:EAX with H_RUN_START + H_TSC_IDLE (and ECX = TSC_AUX 0
for RDTSCP): the instructions retired where the instruction's straight-line run began, which
does not depend on how Unicorn split the run into translations (cpu/fastpath.py), plus the time
a halted guest skipped.

The TSC runs at the virtual CPU's rate: one tick per instruction (devices/virtual_clock.py's
default 1 GHz), so the TSC and the PIT agree, and Linux's calibration finds 1000 MHz.
"""
import numpy as np
from numba import cfunc, njit, types
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from hclsim.cpu import fastpath as fp
from hclsim.cpu import native


@njit(cache=True)
def _load_tsc(uc, h):
    tsc = h[fp.H_RUN_START] + h[fp.H_TSC_IDLE]
    h[fp.H_TSC_READS] += 1
    v = np.zeros(1, np.int64)
    v[0] = tsc & 0xFFFFFFFF
    native.call_reg_access(h[fp.H_FN_REG_WRITE], uc, x86.UC_X86_REG_RAX, v.ctypes.data)
    v[0] = (tsc >> 32) & 0xFFFFFFFF
    native.call_reg_access(h[fp.H_FN_REG_WRITE], uc, x86.UC_X86_REG_RDX, v.ctypes.data)


@cfunc(types.int32(types.voidptr, types.voidptr), cache=True)
def hook_rdtsc(uc, ud):
    _load_tsc(uc, fp._header(ud))
    return 1                                        # skip QEMU's read of the host's TSC


@cfunc(types.int32(types.voidptr, types.voidptr), cache=True)
def hook_rdtscp(uc, ud):
    h = fp._header(ud)
    _load_tsc(uc, h)
    v = np.zeros(1, np.int64)                       # TSC_AUX: the CPU number Linux puts there
    native.call_reg_access(h[fp.H_FN_REG_WRITE], uc, x86.UC_X86_REG_RCX, v.ctypes.data)
    return 1


class VirtualTsc:
    """Virtual RDTSC and RDTSCP on an engine (on until off())."""

    def __init__(self, engine):
        self.engine = engine
        self.hooks: list[int] = []

    def on(self) -> None:
        e = self.engine
        if not self.hooks:
            self.hooks = [native.hook_add(e.uc, ucc.UC_HOOK_INSN, hook.address, e.state.address, insn)
                          for hook, insn in ((hook_rdtsc, x86.UC_X86_INS_RDTSC), (hook_rdtscp, x86.UC_X86_INS_RDTSCP))]

    def off(self) -> None:
        for handle in self.hooks:
            native.hook_del(self.engine.uc, handle)
        self.hooks = []

    @property
    def reads(self) -> int:
        return int(self.engine.state.buf[fp.H_TSC_READS])
