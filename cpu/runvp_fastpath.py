"""RUN_VP by doorbell inside the engine: a Linux CPU's VTL0 port I/O exits answered from the
exit hook itself, without leaving uc_emu_start.

The doorbell protocol (defs/kabi.py RUN_DOORBELL) has the VMM ring, the kernel run VTL0 to its
next intercept, write the message and registers into the run and register pages and answer. In
Python each exit cost ~27 us in the kernel alone: stopping the engine, classifying the exit,
building the message, storing 23 registers, answering, reloading them, restarting the engine
(the 50,000 exits/s goal leaves 20 us for the whole round trip, the VMM process included). Here
a native site hook on VTL0's IN/OUT does the kernel's half in place: it builds the
X64IoPortIntercept message (byte for byte what hv/intercepts.io_port builds; tested), stores the
registers as Mshv._store would, answers the request and FUTEX_WAKEs the VMM, then spins for the
next ring and loads what the VMM left as Mshv._load would, and returns into the guest.

It is a cache of the common case, as the MSR and hypercall fast paths are: it declines (the
site goes to Python, exactly as before) when not armed for the running VP, for a site it has
not learned yet (the first exit of each I/O instruction takes the Python path, which teaches it
the decoded instruction), and it hands the engine back ("bails out": the run ends with the exit
answered, ANSWERED) when anyone else needs the engine: another CPU rang, a thread waits for the
CPU lock, the request is a cancel, the kernel closes, or no ring came within the spin budget.
"""
import ctypes
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic
from unicorn import x86_const as x86

from hclsim.cpu import native
from hclsim.cpu.hypercall_fastpath import _u64
from hclsim.cpu.fastpath import (H_FN_REG_READ, H_FN_REG_WRITE, H_FN_SLOW_SITE, H_FN_UC_STOP, H_NATIVE_STOP,
                                 H_RUNVP_AREA, H_VP_INDEX, _header, _int_to_voidptr)
from hclsim.defs import kabi
from hclsim.defs.hvdef import (HV_INTERCEPT_ACCESS_READ, HV_INTERCEPT_ACCESS_WRITE, HV_MESSAGE_SIZE,
                               HvMessageHeader, HvMessageType, HvX64InterceptMessageHeader,
                               HvX64IoPortInterceptMessage, HvX64SegmentRegister)

SITE_IN, SITE_OUT = 3, 4  # SLOW_SITE kinds (msr_fastpath has 0 and 1, hypercall_fastpath 2)
ANSWERED = "answered"     # the stop reason of a run the hook ended with its last exit answered

# The area: int64 slots, then the learned sites, then the register buffers.
(A_ARMED, A_VP, A_RUN, A_REG, A_REQUEST, A_PHASE, A_EXITS, A_BAILS, A_SPIN_NS, A_FN_SYSCALL, A_FN_CLOCK,
 A_CONTENDED, A_VP_COUNT, A_REGISTERED, A_LAST, A_PAGES, A_NSITES, A_REG_BATCH_READ, A_REG_BATCH_WRITE,
 A_IDS, A_PTRS, A_VALS, A_ANSWERED) = range(23)
PHASE_RUNNING, PHASE_ANSWERED = 0, 1
A_SITES = 32
SITE_COLUMNS, SITES_MAX = 8, 64       # (address, cr3, is_in, size, imm or -1, length, code[0:8], code[8:16])
AREA_SLOTS = A_SITES + SITE_COLUMNS * SITES_MAX

# The registers read at an exit, in one uc_reg_read_batch: the run page's 16 (CR2 in RSP's slot),
# then RSP, RIP, RFLAGS, CR0, CR3, CR4, CS.
_UC = {name: getattr(x86, "UC_X86_REG_" + name.upper()) for name in kabi.RUN_CONTEXT_GPRS + ("rsp",)}
READ_IDS = [_UC[n] for n in kabi.RUN_CONTEXT_GPRS] + [_UC["rsp"], x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS,
                                                      x86.UC_X86_REG_CR0, x86.UC_X86_REG_CR3, x86.UC_X86_REG_CR4,
                                                      x86.UC_X86_REG_CS]
R_RSP, R_RIP, R_RFLAGS, R_CR0, R_CR3, R_CR4, R_CS = range(16, 23)
N_READ = len(READ_IDS)
UC_X86_REG_MSR = x86.UC_X86_REG_MSR
MSR_EFER = 0xC0000080
CS_LONG_MODE_CODE = 0xA09B
SYS_FUTEX, FUTEX_WAKE, CLOCK_MONOTONIC = 202, 1, 1
CHECK_EVERY = 64          # spin iterations between looks at the clock and at the other CPUs

# The message's field offsets, from the defs/hvdef.py declarations (not restated here).
_P = ctypes.sizeof(HvMessageHeader)
_H = HvX64IoPortInterceptMessage.header.offset
M_TYPE = HvMessageHeader.message_type.offset
M_PAYLOAD_SIZE = HvMessageHeader.payload_size.offset
M_VP = _P + _H + HvX64InterceptMessageHeader.vp_index.offset
M_LENGTH = _P + _H + HvX64InterceptMessageHeader.instruction_length_cr8.offset
M_ACCESS = _P + _H + HvX64InterceptMessageHeader.intercept_access_type.offset
M_EXEC = _P + _H + HvX64InterceptMessageHeader.execution_state.offset
_CS = _P + _H + HvX64InterceptMessageHeader.cs_segment.offset
M_CS_LIMIT = _CS + HvX64SegmentRegister.limit.offset
M_CS_SELECTOR = _CS + HvX64SegmentRegister.selector.offset
M_CS_ATTRIBUTES = _CS + HvX64SegmentRegister.attributes.offset
M_RIP = _P + _H + HvX64InterceptMessageHeader.rip.offset
M_RFLAGS = _P + _H + HvX64InterceptMessageHeader.rflags.offset
M_PORT = _P + HvX64IoPortInterceptMessage.port_number.offset
M_ACCESS_INFO = _P + HvX64IoPortInterceptMessage.access_info.offset
M_BYTE_COUNT = _P + HvX64IoPortInterceptMessage.instruction_byte_count.offset
M_RAX = _P + HvX64IoPortInterceptMessage.rax.offset
M_CODE = _P + HvX64IoPortInterceptMessage.instruction_bytes.offset
M_RCX = _P + HvX64IoPortInterceptMessage.rcx.offset
M_RSI = _P + HvX64IoPortInterceptMessage.rsi.offset
M_RDI = _P + HvX64IoPortInterceptMessage.rdi.offset
IO_PAYLOAD = ctypes.sizeof(HvX64IoPortInterceptMessage)
MSG_IO_PORT = int(HvMessageType.X64IoPortIntercept)
ACCESS_READ, ACCESS_WRITE = int(HV_INTERCEPT_ACCESS_READ), int(HV_INTERCEPT_ACCESS_WRITE)
MESSAGE_SIZE = HV_MESSAGE_SIZE
RUN_EXIT_MESSAGE, RUN_CONTEXT, RUN_CANCEL = kabi.RUN_EXIT_MESSAGE, kabi.RUN_CONTEXT, kabi.RUN_CANCEL
RUN_DOORBELL, RUN_ACK, RUN_ERRNO, RUN_CLOSED = (kabi.RUN_DOORBELL, kabi.RUN_DOORBELL_ACK, kabi.RUN_DOORBELL_ERRNO,
                                               kabi.RUN_DOORBELL_CLOSED)
REGPAGE_GP, REGPAGE_RIP, REGPAGE_RFLAGS = kabi.REGPAGE_GP, kabi.REGPAGE_RIP, kabi.REGPAGE_RFLAGS
REGPAGE_CR0, REGPAGE_CR3, REGPAGE_CR4 = kabi.REGPAGE_CR0, kabi.REGPAGE_CR3, kabi.REGPAGE_CR4
REGPAGE_EFER, REGPAGE_IS_VALID, REGPAGE_DIRTY = kabi.REGPAGE_EFER, kabi.REGPAGE_IS_VALID, kabi.REGPAGE_DIRTY
DIRTY_IP, DIRTY_FLAGS, DIRTY_GP = kabi.DIRTY_IP, kabi.DIRTY_FLAGS, kabi.DIRTY_GP
CONTEXT_RSP_SLOT = kabi.RUN_CONTEXT_GPRS.index("cr2")      # the register page has RSP there
PAGE_SIZE = kabi.PAGE_SIZE

_i8p = ir.IntType(8).as_pointer()
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)


# ---- intrinsics: shared-memory words another process writes, and C calls by address ---------
@intrinsic
def load_u32(typingctx, addr):
    """An acquire load (never hoisted out of a spin loop, unlike a plain array read)."""
    sig = types.uint32(types.int64)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(builder.inttoptr(args[0], _i32.as_pointer()), "acquire", 4)
    return sig, codegen


@intrinsic
def store_u32(typingctx, addr, value):
    """A sequentially consistent store: the answer is seen after everything written before it."""
    sig = types.void(types.int64, types.uint32)

    def codegen(context, builder, signature, args):
        builder.store_atomic(args[1], builder.inttoptr(args[0], _i32.as_pointer()), "seq_cst", 4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def call_syscall(typingctx, fnptr, nr, a1, a2, a3):
    """long syscall(long nr, ...) through an address (futex: nr, address, op, value)."""
    sig = types.int64(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_i64, [_i64], var_arg=True)
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, args[1:])
    return sig, codegen


@intrinsic
def call_clock(typingctx, fnptr, clock, ts_ptr):
    """int clock_gettime(clockid_t, struct timespec *) through an address."""
    sig = types.int32(types.int64, types.int32, types.int64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_i32, [_i32, _i8p])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, [args[1], builder.inttoptr(args[2], _i8p)])
    return sig, codegen


@intrinsic
def call_reg_batch(typingctx, fnptr, uc, ids, ptrs, count):
    """uc_reg_read_batch/uc_reg_write_batch(uc, int *ids, void **vals, int count) by address."""
    sig = types.int32(types.int64, types.voidptr, types.int64, types.int64, types.int32)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_i32, [_i8p, _i8p, _i8p, _i32])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, [args[1], builder.inttoptr(args[2], _i8p), builder.inttoptr(args[3], _i8p),
                                 args[4]])
    return sig, codegen


# ---- the hook ----------------------------------------------------------------------------
@njit(cache=True)
def _now_ns(a, ts):
    call_clock(a[A_FN_CLOCK], np.int32(CLOCK_MONOTONIC), ts.ctypes.data)
    return ts[0] * 1000000000 + ts[1]


@njit(cache=True)
def _others_rang(a, cpu):
    """Another CPU served by doorbell rang since its last request was taken (_rung's test)."""
    registered = carray(_int_to_voidptr(a[A_REGISTERED]), a[A_VP_COUNT], np.int64)
    last = carray(_int_to_voidptr(a[A_LAST]), a[A_VP_COUNT], np.int64)
    for c in range(a[A_VP_COUNT]):
        if c != cpu and registered[c] != 0:
            if np.int64(load_u32(a[A_PAGES] + c * PAGE_SIZE + RUN_DOORBELL)) != last[c]:
                return True
    return False


@njit(cache=True)
def _find_site(a, address, cr3):
    for i in range(a[A_NSITES]):
        r = A_SITES + i * SITE_COLUMNS
        if a[r] == address and a[r + 1] == cr3:
            return r
    return -1


@njit(cache=True)
def _put64(page, off, value):
    for i in range(8):
        page[off + i] = (value >> (8 * i)) & 0xFF


@njit(cache=True)
def write_exit(a, vals, efer, site):
    """The intercept message into the run page, the registers into the run and register pages
    (Mshv._store's layout), as the kernel leaves them for the VMM at an exit."""
    run = carray(_int_to_voidptr(a[A_RUN]), PAGE_SIZE, np.uint8)
    reg = carray(_int_to_voidptr(a[A_REG]), PAGE_SIZE, np.uint8)
    m = RUN_EXIT_MESSAGE
    run[m:m + MESSAGE_SIZE] = 0
    _put64(run, m + M_TYPE, MSG_IO_PORT)          # u32 type, then zero bytes: written as one u64
    run[m + M_PAYLOAD_SIZE] = IO_PAYLOAD
    vp = a[A_VP]
    for i in range(4):
        run[m + M_VP + i] = (vp >> (8 * i)) & 0xFF
    length = a[site + 5]
    run[m + M_LENGTH] = length & 0xF
    run[m + M_ACCESS] = ACCESS_READ if a[site + 2] else ACCESS_WRITE
    state = ((vals[R_CR0] & 1) << 2) | (((efer >> 10) & 1) << 4)
    run[m + M_EXEC] = state & 0xFF
    run[m + M_EXEC + 1] = (state >> 8) & 0xFF
    for i in range(4):
        run[m + M_CS_LIMIT + i] = 0xFF
    cs = vals[R_CS]
    run[m + M_CS_SELECTOR] = cs & 0xFF
    run[m + M_CS_SELECTOR + 1] = (cs >> 8) & 0xFF
    run[m + M_CS_ATTRIBUTES] = CS_LONG_MODE_CODE & 0xFF
    run[m + M_CS_ATTRIBUTES + 1] = CS_LONG_MODE_CODE >> 8
    _put64(run, m + M_RIP, vals[R_RIP])
    _put64(run, m + M_RFLAGS, vals[R_RFLAGS])
    port = a[site + 4] if a[site + 4] >= 0 else vals[2] & 0xFFFF     # imm8, or DX
    run[m + M_PORT] = port & 0xFF
    run[m + M_PORT + 1] = (port >> 8) & 0xFF
    run[m + M_ACCESS_INFO] = a[site + 3]
    run[m + M_BYTE_COUNT] = length
    _put64(run, m + M_RAX, vals[0])
    _put64(run, m + M_CODE, a[site + 6])
    _put64(run, m + M_CODE + 8, a[site + 7])
    _put64(run, m + M_RCX, vals[1])
    _put64(run, m + M_RSI, vals[6])
    _put64(run, m + M_RDI, vals[7])
    for i in range(16):
        _put64(run, RUN_CONTEXT + 8 * i, vals[i])
        _put64(reg, REGPAGE_GP + 8 * i, vals[R_RSP] if i == CONTEXT_RSP_SLOT else vals[i])
    _put64(reg, REGPAGE_RIP, vals[R_RIP])
    _put64(reg, REGPAGE_RFLAGS, vals[R_RFLAGS])
    _put64(reg, REGPAGE_CR0, vals[R_CR0])
    _put64(reg, REGPAGE_CR3, vals[R_CR3])
    _put64(reg, REGPAGE_CR4, vals[R_CR4])
    _put64(reg, REGPAGE_EFER, efer)
    reg[REGPAGE_IS_VALID] = 1


@njit(cache=True)
def _bail(uc, h, a, address):
    """Give the engine back: the run ends on the instruction with its exit answered."""
    rip = np.zeros(1, np.int64)
    rip[0] = address
    native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RIP, rip.ctypes.data)
    a[A_BAILS] += 1
    h[H_NATIVE_STOP] = 1
    native.call_uc_stop(h[H_FN_UC_STOP], uc)


@njit(cache=True)
def vtl0_io_site(uc, h, address, kind):
    a = carray(_int_to_voidptr(h[H_RUNVP_AREA]), AREA_SLOTS, np.int64) if h[H_RUNVP_AREA] != 0 else np.zeros(0, np.int64)
    if a.shape[0] == 0 or a[A_ARMED] == 0 or a[A_VP] != h[H_VP_INDEX] or a[A_PHASE] != PHASE_RUNNING:
        native.call_slow_site(h[H_FN_SLOW_SITE], uc, address, np.int32(kind))
        return
    vals = carray(_int_to_voidptr(a[A_VALS]), N_READ, np.int64)
    call_reg_batch(a[A_REG_BATCH_READ], uc, a[A_IDS], a[A_PTRS], np.int32(N_READ))
    site = _find_site(a, address, vals[R_CR3])
    if site < 0:                         # not learned yet: Python builds this one and teaches us
        native.call_slow_site(h[H_FN_SLOW_SITE], uc, address, np.int32(kind))
        return
    msr = np.zeros(2, np.int64)          # struct uc_x86_msr {u32 rid; u64 value}
    msr[0] = MSR_EFER
    native.call_reg_access(h[H_FN_REG_READ], uc, UC_X86_REG_MSR, msr.ctypes.data)
    vals[R_RIP] = address
    write_exit(a, vals, msr[1], site)
    # The answer: errno 0, then the request number, then wake a VMM sleeping on it.
    run = a[A_RUN]
    store_u32(run + RUN_ERRNO, np.uint32(0))
    store_u32(run + RUN_ACK, np.uint32(a[A_REQUEST] & 0xFFFFFFFF))
    call_syscall(a[A_FN_SYSCALL], SYS_FUTEX, run + RUN_ACK, FUTEX_WAKE, 0x7FFFFFFF)
    a[A_EXITS] += 1
    a[A_ANSWERED] += 1
    a[A_PHASE] = PHASE_ANSWERED
    # The next ring, unless someone else needs the engine.
    contended = carray(_int_to_voidptr(a[A_CONTENDED]), 1, np.int64)
    ts = np.zeros(2, np.int64)
    deadline = np.int64(0)
    spins = 0
    request = np.int64(0)
    while True:
        request = np.int64(load_u32(run + RUN_DOORBELL))
        if request != a[A_REQUEST]:
            break
        if spins % CHECK_EVERY == 0:
            if contended[0] > 0 or load_u32(run + RUN_CLOSED) != 0 or _others_rang(a, a[A_VP]):
                _bail(uc, h, a, address)
                return
            now = _now_ns(a, ts)
            if deadline == 0:
                deadline = now + a[A_SPIN_NS]
            elif now > deadline:
                _bail(uc, h, a, address)
                return
        spins += 1
    if load_u32(run + RUN_CANCEL) != 0 or contended[0] > 0:
        _bail(uc, h, a, address)          # Python takes this request (and answers EINTR)
        return
    # Take it (Mshv.begin_run): the GPRs the VMM left, and RIP/RFLAGS/RSP if it marked them.
    last = carray(_int_to_voidptr(a[A_LAST]), a[A_VP_COUNT], np.int64)
    last[a[A_VP]] = request
    a[A_REQUEST] = request
    a[A_PHASE] = PHASE_RUNNING
    runp = carray(_int_to_voidptr(run), PAGE_SIZE, np.uint8)
    regp = carray(_int_to_voidptr(a[A_REG]), PAGE_SIZE, np.uint8)
    for i in range(16):
        vals[i] = _u64(runp, RUN_CONTEXT + 8 * i)
    call_reg_batch(a[A_REG_BATCH_WRITE], uc, a[A_IDS], a[A_PTRS], np.int32(16))
    dirty = np.int64(load_u32(a[A_REG] + REGPAGE_DIRTY))
    one = np.zeros(1, np.int64)
    if dirty & DIRTY_FLAGS:
        one[0] = _u64(regp, REGPAGE_RFLAGS)
        native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RFLAGS, one.ctypes.data)
    if dirty & DIRTY_GP:
        one[0] = _u64(regp, REGPAGE_GP + 8 * CONTEXT_RSP_SLOT)
        native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RSP, one.ctypes.data)
    # RIP always: the intercepted instruction must not run here (an unadvanced RIP exits again).
    one[0] = _u64(regp, REGPAGE_RIP) if dirty & DIRTY_IP else np.int64(address)
    if dirty:
        store_u32(a[A_REG] + REGPAGE_DIRTY, np.uint32(0))
    native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RIP, one.ctypes.data)


@cfunc(types.void(types.voidptr, types.uint64, types.uint32, types.voidptr), cache=True)
def hook_vtl0_in(uc, address, size, ud):
    vtl0_io_site(uc, _header(ud), address, SITE_IN)


@cfunc(types.void(types.voidptr, types.uint64, types.uint32, types.voidptr), cache=True)
def hook_vtl0_out(uc, address, size, ud):
    vtl0_io_site(uc, _header(ud), address, SITE_OUT)


# ---- the Python side -----------------------------------------------------------------------
_libc = ctypes.CDLL(None)
_SYSCALL = ctypes.cast(_libc.syscall, ctypes.c_void_p).value
_CLOCK = ctypes.cast(_libc.clock_gettime, ctypes.c_void_p).value
_BATCH_READ = ctypes.cast(native._raw.uc_reg_read_batch, ctypes.c_void_p).value
_BATCH_WRITE = ctypes.cast(native._raw.uc_reg_write_batch, ctypes.c_void_p).value
SPIN_NS = 100_000      # as the Python dispatcher's spin: a VMM alone on its CPU rings within ~30 us


@dataclass
class DoorbellRun:
    """One RUN_VP slice by doorbell, as the kernel arms the engine for it (kernel_stub/doorbell.py).
    request: the request being served; afterwards the one being served, or with ANSWERED the
    last one answered. answered: exits the hook answered during the slice."""
    cpu: int
    pages_address: int        # run page of CPU 0; CPU n's is n pages on
    register_page: int        # this CPU's register page address
    request: int
    registered: np.ndarray    # int64 per CPU: served by doorbell
    last: np.ndarray          # int64 per CPU: the last request taken
    contended: np.ndarray     # int64[1]: threads waiting for the CPU lock
    answered: int = 0


class RunVpFastPath:
    """The area behind the hooks of one engine."""

    def __init__(self):
        self.buf = np.zeros(AREA_SLOTS, np.int64)
        self.ids = np.array(READ_IDS, np.int32)
        self.vals = np.zeros(N_READ, np.int64)
        self.ptrs = np.array([self.vals.ctypes.data + 8 * i for i in range(N_READ)], np.int64)
        a = self.buf
        a[A_FN_SYSCALL], a[A_FN_CLOCK] = _SYSCALL, _CLOCK
        a[A_REG_BATCH_READ], a[A_REG_BATCH_WRITE] = _BATCH_READ, _BATCH_WRITE
        a[A_IDS], a[A_PTRS], a[A_VALS] = self.ids.ctypes.data, self.ptrs.ctypes.data, self.vals.ctypes.data
        a[A_SPIN_NS] = SPIN_NS
        self._keep = ()
        self._learned: set = set()

    @property
    def address(self) -> int:
        return self.buf.ctypes.data

    @property
    def armed(self) -> bool:
        return bool(self.buf[A_ARMED])

    def learn(self, address: int, cr3: int, form: tuple, code: bytes) -> None:
        """An I/O instruction the Python path decoded: (is_in, size, imm or None, length)."""
        a = self.buf
        if (address, cr3) in self._learned or a[A_NSITES] >= SITES_MAX:
            return
        self._learned.add((address, cr3))
        is_in, size, imm, length = form
        code = code[:16].ljust(16, b"\0")
        row = A_SITES + int(a[A_NSITES]) * SITE_COLUMNS
        a[row:row + SITE_COLUMNS] = (address, cr3, int(is_in), size, -1 if imm is None else imm, length,
                                     int.from_bytes(code[:8], "little", signed=True),
                                     int.from_bytes(code[8:], "little", signed=True))
        a[A_NSITES] += 1

    def reset(self) -> None:
        """Another machine: counters as new, nothing learned."""
        self.buf[A_EXITS] = self.buf[A_BAILS] = 0
        self.forget()

    def forget(self) -> None:
        """New code: the learned sites no longer hold."""
        self.buf[A_NSITES] = 0
        self._learned.clear()
        self.buf[A_PHASE] = PHASE_RUNNING
        self.disarm(None)

    def arm(self, vp_index: int, run: DoorbellRun) -> None:
        a = self.buf
        self._keep = (run.registered, run.last, run.contended)
        a[A_VP], a[A_VP_COUNT] = vp_index, run.registered.shape[0]
        a[A_PAGES] = run.pages_address
        a[A_RUN] = run.pages_address + run.cpu * PAGE_SIZE
        a[A_REG] = run.register_page
        a[A_REGISTERED], a[A_LAST] = run.registered.ctypes.data, run.last.ctypes.data
        a[A_CONTENDED] = run.contended.ctypes.data
        a[A_REQUEST], a[A_PHASE], a[A_ANSWERED] = run.request, PHASE_RUNNING, 0
        a[A_ARMED] = 1

    def disarm(self, run: DoorbellRun | None) -> bool:
        """Unarm; fills run's request and answered. True if the slice ended answered (ANSWERED)."""
        a = self.buf
        a[A_ARMED] = 0
        self._keep = ()
        if run is not None:
            run.request, run.answered = int(a[A_REQUEST]), int(a[A_ANSWERED])
        return bool(a[A_PHASE] == PHASE_ANSWERED)

    def counters(self) -> dict:
        return {"runvp_fast_exits": int(self.buf[A_EXITS]), "runvp_bails": int(self.buf[A_BAILS])}
