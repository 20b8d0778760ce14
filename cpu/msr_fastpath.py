"""Native (numba @cfunc) RDMSR/WRMSR sites for the local APIC registers every AP touches on
its way up (APIC_BASE to enter x2APIC mode, the spurious-vector register to enable it).

Each MSR site is a UC_HOOK_CODE hook on its address. These registers live in the hypervisor's
APIC table (cpu/apic.py: one int64 row per VP: base, SVR, TPR, pending-vector count),
whose address is in the fast-path header. Anything else, or anything that could change which
interrupt is deliverable (a VP with vectors pending), goes to the Python site handler, which
emulates the instruction exactly as before: the native path is a cache of the common case,
not a second implementation of the MSR space.
"""
import numpy as np
from numba import carray, cfunc, njit, types
from unicorn import x86_const as x86

from hclsim.cpu import native
from hclsim.cpu.apic import (APIC_BASE_BSP, APIC_BASE_WRITABLE, APIC_BASE_X2APIC, APIC_COL_BASE, APIC_COL_PENDING,
                             APIC_COL_SVR, APIC_COL_TPR, APIC_COLUMNS, X86_MSR_APIC_BASE, X2APIC_MSR_SVR,
                             X2APIC_MSR_TPR)
from hclsim.cpu.fastpath import (H_APIC_ROWS, H_APIC_TABLE, H_FN_REG_READ, H_FN_REG_WRITE,
                                 H_FN_SLOW_SITE, H_MSR_FAST, H_VP_INDEX, _header, _int_to_voidptr)

SITE_RDMSR, SITE_WRMSR = 0, 1


@njit(cache=True)
def _apic_row(h):
    vp = h[H_VP_INDEX]
    if h[H_APIC_TABLE] == 0 or vp < 0 or vp >= h[H_APIC_ROWS]:
        return np.zeros(0, np.int64)
    table = carray(_int_to_voidptr(h[H_APIC_TABLE]), (h[H_APIC_ROWS], APIC_COLUMNS), np.int64)
    row = table[vp]
    if row[APIC_COL_PENDING] != 0:
        return np.zeros(0, np.int64)
    return row


@njit(cache=True)
def msr_site(uc, h, address, is_write):
    """Emulate the RDMSR/WRMSR at address if it is a fast one; else hand it to Python."""
    regs = np.zeros(3, np.int64)   # rcx, rax, rdx
    native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_RCX, regs[0:].ctypes.data)
    index = regs[0] & 0xFFFFFFFF
    row = _apic_row(h)
    handled = False
    if row.shape[0] == APIC_COLUMNS:
        x2apic = (row[APIC_COL_BASE] & APIC_BASE_X2APIC) != 0
        if is_write:
            native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_RAX, regs[1:].ctypes.data)
            native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_RDX, regs[2:].ctypes.data)
            value = (regs[1] & 0xFFFFFFFF) | ((regs[2] & 0xFFFFFFFF) << 32)
            if index == X86_MSR_APIC_BASE and (value & ~APIC_BASE_WRITABLE) == 0:
                row[APIC_COL_BASE] = (value & ~APIC_BASE_BSP) | (row[APIC_COL_BASE] & APIC_BASE_BSP)
                handled = True
            elif index == X2APIC_MSR_SVR and x2apic:
                row[APIC_COL_SVR] = value & 0x1FF
                handled = True
            elif index == X2APIC_MSR_TPR and x2apic:
                row[APIC_COL_TPR] = value & 0xFF
                handled = True
        else:
            value = np.int64(-1)
            if index == X86_MSR_APIC_BASE:
                value = row[APIC_COL_BASE]
            elif index == X2APIC_MSR_SVR and x2apic:
                value = row[APIC_COL_SVR]
            elif index == X2APIC_MSR_TPR and x2apic:
                value = row[APIC_COL_TPR]
            if value >= 0:
                regs[1] = value & 0xFFFFFFFF
                regs[2] = (value >> 32) & 0xFFFFFFFF
                native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RAX, regs[1:].ctypes.data)
                native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RDX, regs[2:].ctypes.data)
                handled = True
    if handled:
        h[H_MSR_FAST] += 1
        regs[0] = np.int64(address) + 2   # both are 0F 30/32: skip the instruction
        native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RIP, regs[0:].ctypes.data)
    else:
        native.call_slow_site(h[H_FN_SLOW_SITE], uc, address, np.int32(SITE_WRMSR if is_write else SITE_RDMSR))


@cfunc(types.void(types.voidptr, types.uint64, types.uint32, types.voidptr), cache=True)
def hook_rdmsr(uc, address, size, ud):
    msr_site(uc, _header(ud), address, False)


@cfunc(types.void(types.voidptr, types.uint64, types.uint32, types.voidptr), cache=True)
def hook_wrmsr(uc, address, size, ud):
    msr_site(uc, _header(ud), address, True)
