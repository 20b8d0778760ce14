"""The Hyper-V subset the firmware relies on: synthetic MSRs, the hypercall page and the hypercall
ABI (shared/design/hyperv-essentials.md sections 2, 3 and 8). Hypercall handlers themselves live
in hv/hypercalls.py.

Time is deterministic: TIME_REF_COUNT advances with the executed instruction count (1 ns each),
so the same image gives the same reference times run after run.
"""
import struct
from dataclasses import dataclass, field

import numpy as np

from hclsim.defs.hvdef import (HvCall, HV_CRASH_CTL_CRASH_MESSAGE, HV_CRASH_CTL_NOTIFY, HV_CRASH_MESSAGE_MAX,
                               HV_X64_MSR_APIC_FREQUENCY, HV_X64_MSR_CRASH_CTL, HV_X64_MSR_CRASH_P0,
                               HV_X64_MSR_GUEST_OS_ID, HV_X64_MSR_HYPERCALL, HV_X64_MSR_REFERENCE_TSC, HV_X64_MSR_TIME_REF_COUNT,
                               HV_X64_MSR_TSC_FREQUENCY, HV_X64_MSR_VP_ASSIST_PAGE, HV_X64_MSR_VP_INDEX,
                               HVCALL_VTL_CALL, HVCALL_VTL_RETURN, HvRegister)
from hclsim.defs.platform import ISOLATION_NONE, ISOLATION_SNP, ISOLATION_TDX
from hclsim.hv import hypercalls
from hclsim.cpu.apic import (APIC_BASE_BSP, APIC_BASE_WRITABLE, APIC_BASE_X2APIC, APIC_COL_BASE, APIC_COL_PENDING,
                             APIC_COL_SVR, APIC_COL_TPR, APIC_VERSION, SVR_APIC_ENABLE, X86_MSR_APIC_BASE,
                             X2APIC_MSR_EOI, X2APIC_MSR_ICR, X2APIC_MSR_ID, X2APIC_MSR_SVR, X2APIC_MSR_TPR,
                             X2APIC_MSR_VERSION, new_apic_table)
from hclsim.cpu.engine import GuestException
from hclsim.cpu.hypercall_fastpath import COL_STARTED, COL_START_PENDING, COL_VTL2_ENABLED, CTX_ENABLE, CTX_START, HvNativeArea

# Architectural MSRs Unicorn itself keeps per CPU: passed through.
PASSTHROUGH_MSRS = {0x10, 0x277, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084, 0xC0000100,
                    0xC0000101, 0xC0000102, 0xC0000103}

INSTRUCTIONS_PER_100NS = 100
TSC_FREQUENCY = 1_000_000_000   # the simulated TSC ticks once per instruction
APIC_FREQUENCY = 200_000_000


class GeneralProtection(GuestException):
    """The access raises #GP in the guest."""
    vector = 13


class InvalidOpcode(GuestException):
    """The instruction raises #UD in the guest (e.g. a VTL return from VTL0)."""
    vector = 6


@dataclass(frozen=True)
class Intercept:
    """Stop reason: a VTL0 instruction VTL2 must handle (in, out, cpuid, rdmsr, wrmsr, hypercall)."""
    kind: str


# Hypercalls from VTL0 that VTL2 intercepts rather than the hypervisor answering them: the VMBus
# ones, which the paravisor's VMBus server (or relay) handles.
VTL2_INTERCEPTED_HYPERCALLS = frozenset({HvCall.PostMessage, HvCall.SignalEvent})


@dataclass(frozen=True)
class VtlReturn:
    """Stop reason: the VP asked to return to VTL0."""
    fast: bool


@dataclass
class GuestCrash:
    """An enlightened panic (CRASH_CTL write): the guest's last words."""
    params: tuple
    message: str

    def summary(self) -> str:
        return self.message or "guest crash without message (P0=%#x P1=%#x)" % self.params[:2]


def hypercall_page_bytes() -> bytes:
    """The page the hypervisor overlays at the HYPERCALL MSR's GPN (Intel: vmcall)."""
    vmcall = b"\x0f\x01\xc1"
    page = bytearray(b"\xcc" * 4096)
    stubs = {
        0x00: vmcall + b"\xc3",
        0x04: b"\x89\xc1" + b"\xb8\x11\x00\x00\x00" + vmcall + b"\xc3",          # 32-bit VTL call
        hypercalls.VTL_CALL_OFFSET: b"\x48\x89\xc8" + b"\xb9\x11\x00\x00\x00" + vmcall + b"\xc3",
        0x1B: b"\x89\xc1" + b"\xb8\x12\x00\x00\x00" + vmcall + b"\xc3",          # 32-bit VTL return
        hypercalls.VTL_RETURN_OFFSET: b"\x48\x89\xc8" + b"\xb9\x12\x00\x00\x00" + vmcall + b"\xc3",
    }
    for offset, code in stubs.items():
        page[offset:offset + len(code)] = code
    return bytes(page)


@dataclass
class VpState:
    """Per-VP hypervisor state (the VP's own registers live in its engine context)."""
    index: int
    apic_id: int
    # apic_base, svr, tpr: properties over apic_row, this VP's row of Hypervisor.apic, which the
    # native MSR path (cpu/msr_fastpath.py) reads and writes too.
    apic_row: np.ndarray = field(repr=False)
    # vtl2_enabled, started, vtl2_context (EnableVpVtl's), start_context (StartVp's, taken by
    # the scheduler): properties over row `index` of the hypervisor's native area
    # (cpu/hypercall_fastpath.py).
    native: HvNativeArea = field(repr=False)
    vp_assist_page: int = 0
    mtrrs: dict = field(default_factory=dict)
    vtl0_registers: dict = field(default_factory=lambda: {HvRegister.Rip: 0xFFF0, HvRegister.Rflags: 0x2,
                                                          HvRegister.Cr0: 0x60000010})   # reset state
    vtl: int = 2                             # the VTL the VP runs in now
    irr: set = field(default_factory=set)    # requested vectors
    isr: list = field(default_factory=list)  # in service, innermost last

    def _flag(column):
        def get(self):
            return bool(self.native.vp[self.index, column])

        def set_(self, value):
            self.native.vp[self.index, column] = int(bool(value))
        return property(get, set_)

    vtl2_enabled = _flag(COL_VTL2_ENABLED)
    started = _flag(COL_STARTED)
    start_pending = _flag(COL_START_PENDING)   # a StartVp context waits for the scheduler
    del _flag

    @property
    def vtl2_context(self) -> bytes | None:
        return self.native.context_bytes(self.index, CTX_ENABLE) if self.vtl2_enabled else None

    @vtl2_context.setter
    def vtl2_context(self, raw: bytes) -> None:
        self.native.set_context(self.index, CTX_ENABLE, raw)

    @property
    def start_context(self) -> dict | None:
        if not self.start_pending:
            return None
        return hypercalls.parse_vp_context(self.native.context_bytes(self.index, CTX_START))

    @start_context.setter
    def start_context(self, raw: bytes | None) -> None:
        """The raw HvInitialVpContext of a StartVp, or None once the scheduler took it."""
        if raw is not None:
            self.native.set_context(self.index, CTX_START, raw)
        self.start_pending = raw is not None

    def take_start_context(self) -> bytes:
        """The raw HvInitialVpContext of the StartVp waiting for the scheduler, now taken."""
        self.start_pending = False
        return self.native.context_bytes(self.index, CTX_START)

    apic_base = property(lambda self: int(self.apic_row[APIC_COL_BASE]),
                         lambda self, v: self.apic_row.__setitem__(APIC_COL_BASE, v))
    svr = property(lambda self: int(self.apic_row[APIC_COL_SVR]),
                   lambda self, v: self.apic_row.__setitem__(APIC_COL_SVR, v))
    tpr = property(lambda self: int(self.apic_row[APIC_COL_TPR]),
                   lambda self, v: self.apic_row.__setitem__(APIC_COL_TPR, v))

    def request(self, vector: int) -> None:
        self.irr.add(vector)
        self.apic_row[APIC_COL_PENDING] = len(self.irr)

    @property
    def x2apic(self) -> bool:
        return bool(self.apic_base & APIC_BASE_X2APIC)

    def deliverable(self) -> int | None:
        """The vector to deliver next (highest priority above the one in service), if any."""
        if not self.irr or not self.svr & SVR_APIC_ENABLE:
            return None
        vector = max(self.irr)
        if self.isr and vector >> 4 <= self.isr[-1] >> 4:
            return None
        return vector

    def accept(self, vector: int) -> None:
        self.irr.discard(vector)
        self.apic_row[APIC_COL_PENDING] = len(self.irr)
        self.isr.append(vector)


@dataclass
class Hypervisor:
    mem: object
    apic_ids: list                       # VP index -> APIC id
    isolation: int = ISOLATION_NONE
    guest_os_id: int = 0
    hypercall_msr: int = 0
    reference_tsc_msr: int = 0
    crash_params: list = field(default_factory=lambda: [0] * 5)
    crash: GuestCrash | None = None

    def __post_init__(self):
        self.apic = new_apic_table(len(self.apic_ids))
        self.native = HvNativeArea(len(self.apic_ids))
        self.vps = [VpState(i, apic, self.apic[i], self.native)
                    for i, apic in enumerate(self.apic_ids)]
        bsp = self.vps[0]
        bsp.vtl2_enabled = bsp.started = True
        bsp.apic_base |= APIC_BASE_BSP
        self.ipis_sent = 0
        self._saved_page = None
        self.vp_by_apic = {apic: i for i, apic in enumerate(self.apic_ids)}

    @property
    def hypercall_log(self) -> list[tuple[int, int, int]]:
        """(vp, call code, status) of every hypercall, in order, native ones included."""
        return self.native.log_entries()

    @property
    def hardware_isolated(self) -> bool:
        return self.isolation in (ISOLATION_SNP, ISOLATION_TDX)

    def time_ref_count(self, engine) -> int:
        return engine.counters()["instructions"] // INSTRUCTIONS_PER_100NS

    # ---- MSRs ----------------------------------------------------------------------------
    def rdmsr(self, engine, vp: int, index: int) -> int:
        if index == HV_X64_MSR_GUEST_OS_ID:
            return self.guest_os_id
        if index == HV_X64_MSR_HYPERCALL:
            return self.hypercall_msr
        if index == HV_X64_MSR_VP_INDEX:
            return vp
        if index == HV_X64_MSR_TIME_REF_COUNT:
            return self.time_ref_count(engine)
        if index == HV_X64_MSR_REFERENCE_TSC:
            return self.reference_tsc_msr
        if index == HV_X64_MSR_TSC_FREQUENCY:
            return TSC_FREQUENCY
        if index == HV_X64_MSR_APIC_FREQUENCY:
            return APIC_FREQUENCY
        if index == HV_X64_MSR_VP_ASSIST_PAGE:
            return self.vps[vp].vp_assist_page
        if HV_X64_MSR_CRASH_P0 <= index < HV_X64_MSR_CRASH_CTL:
            return self.crash_params[index - HV_X64_MSR_CRASH_P0]
        if index == HV_X64_MSR_CRASH_CTL:
            return HV_CRASH_CTL_NOTIFY | HV_CRASH_CTL_CRASH_MESSAGE  # capabilities
        if index == X86_MSR_APIC_BASE:
            return self.vps[vp].apic_base
        if 0x800 <= index <= 0x8FF:
            return self._x2apic_read(vp, index)
        if index in PASSTHROUGH_MSRS:
            return engine.msr(index)
        if self._is_mtrr(index):
            return self.vps[vp].mtrrs.get(index, 0)
        raise GeneralProtection(f"rdmsr of unknown MSR {index:#x}")

    def wrmsr(self, engine, vp: int, index: int, value: int) -> None:
        if index == HV_X64_MSR_GUEST_OS_ID:
            self.guest_os_id = value
        elif index == HV_X64_MSR_HYPERCALL:
            self._write_hypercall_msr(engine, value)
        elif index == HV_X64_MSR_REFERENCE_TSC:
            self._write_reference_tsc_msr(value)
        elif index == HV_X64_MSR_VP_ASSIST_PAGE:
            if value & 0xFFE:
                raise GeneralProtection(f"VP_ASSIST_PAGE reserved bits set: {value:#x}")
            self.vps[vp].vp_assist_page = value
        elif HV_X64_MSR_CRASH_P0 <= index < HV_X64_MSR_CRASH_CTL:
            self.crash_params[index - HV_X64_MSR_CRASH_P0] = value
        elif index == HV_X64_MSR_CRASH_CTL:
            if value & HV_CRASH_CTL_NOTIFY:
                self.crash = self._read_crash(value)  # the machine ends the run
        elif index in PASSTHROUGH_MSRS:
            engine.set_msr(index, value)
        elif self._is_mtrr(index):
            self.vps[vp].mtrrs[index] = value
        elif index == X86_MSR_APIC_BASE:
            if value & ~APIC_BASE_WRITABLE:
                raise GeneralProtection(f"APIC_BASE reserved bits set: {value:#x}")
            self.vps[vp].apic_base = (value & ~APIC_BASE_BSP) | (self.vps[vp].apic_base & APIC_BASE_BSP)
        elif 0x800 <= index <= 0x8FF:
            self._x2apic_write(vp, index, value)
        else:
            raise GeneralProtection(f"wrmsr of {'read-only' if index in (HV_X64_MSR_VP_INDEX, HV_X64_MSR_TIME_REF_COUNT) else 'unknown'} MSR {index:#x}")

    # ---- x2APIC ---------------------------------------------------------------------------
    def _x2apic_check(self, vp: int, index: int) -> VpState:
        state = self.vps[vp]
        if not state.x2apic:
            raise GeneralProtection(f"x2APIC MSR {index:#x} accessed with x2APIC mode off")
        return state

    def _x2apic_read(self, vp: int, index: int) -> int:
        state = self._x2apic_check(vp, index)
        regs = {X2APIC_MSR_ID: state.apic_id, X2APIC_MSR_VERSION: APIC_VERSION, X2APIC_MSR_TPR: state.tpr,
                X2APIC_MSR_SVR: state.svr}
        if index in regs:
            return regs[index]
        if index == X2APIC_MSR_EOI:
            raise GeneralProtection("rdmsr of the write-only x2APIC EOI register")
        return 0  # ISR/TMR/IRR/LVT reads: nothing modelled there reads non-zero

    def _x2apic_write(self, vp: int, index: int, value: int) -> None:
        state = self._x2apic_check(vp, index)
        if index == X2APIC_MSR_EOI:
            if value:
                raise GeneralProtection("x2APIC EOI written with a non-zero value")
            if state.isr:
                state.isr.pop()
        elif index == X2APIC_MSR_SVR:
            state.svr = value & 0x1FF
        elif index == X2APIC_MSR_TPR:
            state.tpr = value & 0xFF
        elif index == X2APIC_MSR_ICR:
            self.send_ipi(vp, value)
        elif index in (X2APIC_MSR_ID, X2APIC_MSR_VERSION):
            raise GeneralProtection(f"wrmsr of read-only x2APIC register {index:#x}")

    def send_ipi(self, source_vp: int, icr: int) -> None:
        """An x2APIC ICR write: fixed interrupts to one, self, all or all-but-self."""
        vector, mode, shorthand = icr & 0xFF, (icr >> 8) & 7, (icr >> 18) & 3
        if mode != 0:
            raise GeneralProtection(f"IPI delivery mode {mode} is not supported (fixed only)")
        if vector < 16:
            return  # illegal vector: a real APIC records an error and drops it
        if shorthand == 0:
            target = self.vp_by_apic.get(icr >> 32)
            targets = [] if target is None else [target]
        elif shorthand == 1:
            targets = [source_vp]
        else:
            targets = [i for i in range(len(self.vps)) if shorthand == 2 or i != source_vp]
        for t in targets:
            self.raise_interrupt(t, vector)

    def raise_interrupt(self, vp: int, vector: int) -> None:
        """Request vector on vp (from an IPI or the host); the scheduler delivers it."""
        self.vps[vp].request(vector)
        self.ipis_sent += 1

    @staticmethod
    def _is_mtrr(index: int) -> bool:
        return index in (0x2FF, 0x250, 0x258, 0x259) or 0x268 <= index <= 0x26F or 0x200 <= index <= 0x21F

    def _write_reference_tsc_msr(self, value: int) -> None:
        """Enabled (bit 0): the reference TSC page at the GPN, TLFS's layout (TscSequence u32,
        reserved, TscScale u64, TscOffset i64): reference time (100 ns) = (TSC * scale) >> 64 +
        offset; the TSC ticks once an instruction (1 GHz), so scale = 2^64 / 100."""
        if value & 0xFFE:
            raise GeneralProtection(f"REFERENCE_TSC reserved bits set: {value:#x}")
        self.reference_tsc_msr = value
        gpa = value & ~0xFFF
        if value & 1 and self.mem is not None and self.mem.contains(gpa, 0x1000):
            self.mem.write(gpa, struct.pack("<IIQq", 1, 0, (1 << 64) // INSTRUCTIONS_PER_100NS, 0))

    def _write_hypercall_msr(self, engine, value: int) -> None:
        if self.hypercall_msr & 2:
            raise GeneralProtection("HYPERCALL MSR is locked")
        if value & 0xFFC:
            raise GeneralProtection(f"HYPERCALL MSR reserved bits set: {value:#x}")
        gpa = value & ~0xFFF
        if self._saved_page is not None:  # unmap the old overlay: the RAM underneath shows again
            old_gpa, data = self._saved_page
            self.mem.write(old_gpa, data)
            engine.code_changed(old_gpa, old_gpa + 4096)
            self._saved_page = None
        if value & 1:
            if not self.mem.contains(gpa, 4096):
                raise GeneralProtection(f"hypercall page GPA {gpa:#x} outside guest RAM")
            self._saved_page = (gpa, self.mem.read(gpa, 4096))
            self.mem.write(gpa, hypercall_page_bytes())
            engine.code_changed(gpa, gpa + 4096)
        self.hypercall_msr = value

    def _read_crash(self, ctl: int) -> GuestCrash:
        p = tuple(self.crash_params)
        message = ""
        if ctl & HV_CRASH_CTL_CRASH_MESSAGE and p[4]:
            length = min(p[4], HV_CRASH_MESSAGE_MAX)
            if self.mem.contains(p[3], length):
                message = self.mem.read(p[3], length).split(b"\0")[0].decode("utf-8", "replace")
        return GuestCrash(p, message)

    # ---- hypercalls ----------------------------------------------------------------------
    def hypercall(self, engine, vp: int) -> None:
        """Emulate the vmcall at RIP: ABI in RCX/RDX/R8, result in RAX, RIP += 3. From VTL0, the
        hypercalls VTL2 intercepts (the VMBus ones) stop the VP on the vmcall instead: VTL2 gets
        a hypercall intercept message and completes the call."""
        control = engine.reg("rcx")
        if control & 0xFFFF in (HVCALL_VTL_CALL, HVCALL_VTL_RETURN):
            self._vtl_switch(engine, vp, control)
            return
        if self.vps[vp].vtl == 0 and control & 0xFFFF in VTL2_INTERCEPTED_HYPERCALLS:
            engine.request_stop(Intercept("hypercall"))
            return
        result = hypercalls.dispatch(self, engine, vp, control, engine.reg("rdx"), engine.reg("r8"))
        self.native.append_log(vp, control & 0xFFFF, result & 0xFFFF)
        engine.set_reg("rax", result)
        engine.set_reg("rip", engine.reg("rip") + 3)

    def _vtl_switch(self, engine, vp: int, control: int) -> None:
        """HvCallVtlReturn from VTL2: the scheduler switches the VP to VTL0 at the stub's `ret`.
        Nothing is written to RAX (its input is RAX: bit 0 = fast)."""
        state = self.vps[vp]
        code = control & 0xFFFF
        if code == HVCALL_VTL_CALL or control != code or state.vtl != 2 or engine.reg("rax") & ~1:
            raise InvalidOpcode(f"invalid VTL {'call' if code == HVCALL_VTL_CALL else 'return'} "
                                    f"(control {control:#x}, VTL {state.vtl})")  # #UD on hardware
        self.native.append_log(vp, code, 0)
        engine.set_reg("rip", engine.reg("rip") + 3)
        engine.request_stop(VtlReturn(fast=bool(engine.reg("rax") & 1)))

    def msr_exit(self, engine, vp: int, kind: str) -> None:
        """Emulate the 'rdmsr' or 'wrmsr' at RIP (engine stopped on it)."""
        index = engine.reg("rcx") & 0xFFFFFFFF
        if kind == "rdmsr":
            value = self.rdmsr(engine, vp, index)
            engine.set_reg("rax", value & 0xFFFFFFFF)
            engine.set_reg("rdx", (value >> 32) & 0xFFFFFFFF)
        else:
            value = (engine.reg("rax") & 0xFFFFFFFF) | ((engine.reg("rdx") & 0xFFFFFFFF) << 32)
            self.wrmsr(engine, vp, index, value)
        engine.set_reg("rip", engine.reg("rip") + 2)

