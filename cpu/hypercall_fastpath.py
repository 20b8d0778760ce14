"""Native (numba @cfunc) vmcall: HvCallEnableVpVtl and HvCallStartVirtualProcessor, the two
hypercalls every sidecar AP start costs, done without entering Python when they succeed.

The invalid-instruction hook is a cfunc. For a vmcall whose call is one of those two and whose
input would succeed, it applies the call to the hypervisor's native area (per-VP flags and the
0xE0-byte HvInitialVpContext the call carries) and logs it; anything else (other calls, any
input that would fail, a log that is full, or not a vmcall at all) goes to Python's handler,
which owns every error status: the native path caches the success case only, so there is one
implementation of the hypercall ABI's rules.

The native area is one int64 numpy buffer (HvNativeArea): a small header, a row per VP
(EnableVpVtl done, started, start context waiting), two contexts per VP and the hypercall log
(vp, call code, status), which Python's hypercalls append to as well so the order is kept.
"""
import ctypes

import numpy as np
from numba import carray, cfunc, njit, types
from unicorn import x86_const as x86

from hclsim.cpu import native
from hclsim.cpu.fastpath import (H_FN_REG_READ, H_FN_REG_WRITE, H_FN_SLOW_SITE, H_HC_FAST, H_HV_AREA,
                                 H_RAM_ADDR, H_RAM_SIZE, H_VP_INDEX, _header, _int_to_voidptr)
from hclsim.cpu.pagetable import walk
from hclsim.defs.hvdef import HvCall, HvInitialVpContext

# Plain ints: numba compiles them in as constants.
HVCALL_ENABLE_VP_VTL, HVCALL_START_VIRTUAL_PROCESSOR = int(HvCall.EnableVpVtl), int(HvCall.StartVirtualProcessor)
PARTITION_ID_SELF = np.int64(-1)
CONTEXT_BYTES = ctypes.sizeof(HvInitialVpContext)
CONTEXT_SLOTS = CONTEXT_BYTES // 8
INPUT_BYTES = 16 + CONTEXT_BYTES                  # partition id, vp index, vtl, 3 reserved, context
SLOW_INVALID = 2                                   # the slow-site kind for "not handled here"

# Area header slots, then the per-VP rows' columns.
A_VPS, A_LOG_CAP, A_LOG_LEN, A_VP_OFF, A_CTX_OFF, A_LOG_OFF = range(6)
AREA_HEADER = 8
COL_VTL2_ENABLED, COL_STARTED, COL_START_PENDING, VP_COLUMNS = 0, 1, 2, 4
CTX_ENABLE, CTX_START = 0, 1


class HvNativeArea:
    """The hypervisor state the native vmcall path reads and writes, as numpy views."""

    def __init__(self, vps: int, log_capacity: int | None = None):
        log_cap = log_capacity or max(1024, 8 * vps)
        vp_off = AREA_HEADER
        ctx_off = vp_off + vps * VP_COLUMNS
        log_off = ctx_off + vps * 2 * CONTEXT_SLOTS
        self.buf = np.zeros(log_off + log_cap * 3, np.int64)
        b = self.buf
        b[A_VPS], b[A_LOG_CAP], b[A_VP_OFF], b[A_CTX_OFF], b[A_LOG_OFF] = vps, log_cap, vp_off, ctx_off, log_off
        self.vp = b[vp_off:ctx_off].reshape(vps, VP_COLUMNS)
        self.contexts = b[ctx_off:log_off].reshape(vps, 2, CONTEXT_SLOTS)
        self.log = b[log_off:].reshape(log_cap, 3)
        self.overflow = []

    @property
    def address(self) -> int:
        return self.buf.ctypes.data

    def context_bytes(self, vp: int, which: int) -> bytes:
        return self.contexts[vp, which].tobytes()

    def set_context(self, vp: int, which: int, raw: bytes) -> None:
        self.contexts[vp, which] = np.frombuffer(raw[:CONTEXT_BYTES].ljust(CONTEXT_BYTES, b"\0"), np.int64)

    def append_log(self, vp: int, code: int, status: int) -> None:
        """Python's hypercalls log here too. The buffer never moves (engines hold its address):
        once it is full, the native path defers to Python and entries go on in a list."""
        n = int(self.buf[A_LOG_LEN])
        if n < self.log.shape[0]:
            self.log[n] = (vp, code, status)
            self.buf[A_LOG_LEN] = n + 1
        else:
            self.overflow.append((vp, code, status))

    def log_entries(self) -> list[tuple[int, int, int]]:
        return [tuple(int(v) for v in row) for row in self.log[:int(self.buf[A_LOG_LEN])]] + self.overflow


@njit(cache=True)
def _u64(ram, pa):
    v = np.int64(0)
    for i in range(8):
        v |= np.int64(ram[pa + i]) << (8 * i)
    return v


@njit(cache=True)
def _try_fast(ram, area, vp, rcx, in_gpa):
    """The status of a succeeding EnableVpVtl/StartVp applied to area, or -1 for Python."""
    code = rcx & 0xFFFF
    if (code != HVCALL_ENABLE_VP_VTL and code != HVCALL_START_VIRTUAL_PROCESSOR) or (rcx >> 16) != 0:
        return -1
    if in_gpa & 7 or (in_gpa & 0xFFF) + INPUT_BYTES > 0x1000 or in_gpa < 0 or in_gpa + INPUT_BYTES > ram.shape[0]:
        return -1
    vps = area[A_VPS]
    if area[A_LOG_LEN] >= area[A_LOG_CAP] or vp < 0 or vp >= vps:
        return -1
    target = _u64(ram, in_gpa + 8) & 0xFFFFFFFF
    vtl = ram[in_gpa + 12]
    if _u64(ram, in_gpa) != PARTITION_ID_SELF or target >= vps or target == vp:
        return -1
    row = area[area[A_VP_OFF] + target * VP_COLUMNS:area[A_VP_OFF] + (target + 1) * VP_COLUMNS]
    if code == HVCALL_ENABLE_VP_VTL:
        if vtl != 2 or ram[in_gpa + 13] | ram[in_gpa + 14] | ram[in_gpa + 15] or row[COL_VTL2_ENABLED]:
            return -1
        row[COL_VTL2_ENABLED] = 1
        which = CTX_ENABLE
    else:
        if vtl > 2 or (vtl == 2 and not row[COL_VTL2_ENABLED]) or row[COL_STARTED]:
            return -1
        row[COL_STARTED] = 1
        row[COL_START_PENDING] = 1
        which = CTX_START
    ctx = area[A_CTX_OFF] + (target * 2 + which) * CONTEXT_SLOTS
    for i in range(CONTEXT_SLOTS):
        area[ctx + i] = _u64(ram, in_gpa + 16 + 8 * i)
    log = area[A_LOG_OFF] + area[A_LOG_LEN] * 3
    area[log], area[log + 1], area[log + 2] = vp, code, 0
    area[A_LOG_LEN] += 1
    return 0


@njit(cache=True)
def vmcall(uc, h):
    """1 if the instruction was handled (natively or by Python), 0 for a #UD."""
    regs = np.zeros(4, np.int64)   # rip, cr0, cr3, then scratch
    native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_RIP, regs[0:].ctypes.data)
    native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_CR0, regs[1:].ctypes.data)
    native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_CR3, regs[2:].ctypes.data)
    ram = carray(_int_to_voidptr(h[H_RAM_ADDR]), h[H_RAM_SIZE], np.uint8)
    rip = regs[0]
    pa = walk(ram, regs[2], rip) if regs[1] & 0x80000000 else rip
    if h[H_HV_AREA] != 0 and 0 <= pa and pa + 3 <= ram.shape[0] and (rip & 0xFFF) <= 0xFFD \
            and ram[pa] == 0x0F and ram[pa + 1] == 0x01 and (ram[pa + 2] == 0xC1 or ram[pa + 2] == 0xD9):
        area = carray(_int_to_voidptr(h[H_HV_AREA]), AREA_HEADER, np.int64)
        area = carray(_int_to_voidptr(h[H_HV_AREA]), area[A_LOG_OFF] + area[A_LOG_CAP] * 3, np.int64)
        native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_RCX, regs[3:].ctypes.data)
        rcx = regs[3]
        native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_RDX, regs[3:].ctypes.data)
        status = _try_fast(ram, area, h[H_VP_INDEX], rcx, regs[3])
        if status >= 0:
            h[H_HC_FAST] += 1
            regs[3] = status
            native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RAX, regs[3:].ctypes.data)
            regs[3] = rip + 3
            native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RIP, regs[3:].ctypes.data)
            return 1
    regs[3] = 0
    native.call_slow_site(h[H_FN_SLOW_SITE], uc, np.uint64(regs[3:].ctypes.data), np.int32(SLOW_INVALID))
    return np.int32(regs[3] != 0)


@cfunc(types.int32(types.voidptr, types.voidptr), cache=True)
def hook_invalid(uc, ud):
    return vmcall(uc, _header(ud))
