"""Deterministic scheduling of many VPs on one engine.

VPs run one at a time in VP-index order, round robin. A VP keeps the engine until it halts, or
executes PAUSE (a spin-wait: like VMX pause-loop exiting, it yields to the others), or reaches a
stop address. Interrupts (IPIs) are delivered through the guest IDT when a VP is loaded with
RFLAGS.IF set; a halted VP with a deliverable interrupt becomes runnable again. The order of
everything depends only on the guest's instructions, so runs repeat exactly.
"""
import gc
import time
from dataclasses import dataclass

from hclsim import HclsimError
from hclsim.cpu import engine as eng
from hclsim.cpu import interrupts
from hclsim.cpu.runvp_fastpath import ANSWERED
from hclsim.hv import intercepts, vtl
from hclsim.cpu.cpuid import cpuid_lookup
from hclsim.defs.hvdef import HV_VTL_ENTRY_REASON_INTERCEPT, HV_VTL_ENTRY_REASON_INTERRUPT
from hclsim.hv.hypervisor import Intercept, VtlReturn
from hclsim.hv.vp import EXTERNAL, HALTED, NOT_STARTED, RUNNABLE

# Why run() returned.
STOP_ADDRESS = "stop-address"   # a VP reached one of the stop addresses (e.g. the kernel entry)
STOP_IDLE = "idle"              # nothing can run: every VP halted with nothing to deliver
STOP_FAULT = "fault"
STOP_CRASH = "crash"
STOP_TIMEOUT = "timeout"
STOP_CONDITION = "condition"    # the caller's until() became true
STOP_INTERCEPT = "intercept"    # a Linux CPU's VTL0 needs the host (run_external_vtl0)
STOP_HALT = "halt"              # a Linux CPU's VTL0 halted (run_external_vtl0)
_GO_ON = object()               # an exit handled inside the turn: run on
PREEMPTED = "preempted"         # run_external_vtl0's time slice ended before an intercept
STOP_ANSWERED = "answered"      # a doorbell run's last exit was answered in the engine (cpu/runvp_fastpath.py)


YIELD = "yield"       # stop reasons the site handler gives the engine
CRASH = "crash"


class VpRunError(HclsimError):
    """Running a VP's VTL0 for the host failed (a fault, a timeout, a VP it cannot run)."""


@dataclass
class SchedulerStop:
    reason: str
    vp: object = None
    exit: object = None
    detail: str = ""
    message: bytes = b""      # STOP_INTERCEPT: the HvMessage


class Scheduler:
    def __init__(self, engine, hv, vps, msr_sites: dict, pause_sites: dict, stop_addresses: set,
                 vtl0_sites: dict | None = None):
        self.engine, self.hv, self.vps = engine, hv, vps
        self.msr_sites, self.pause_sites = msr_sites, pause_sites
        self.vtl0_sites = vtl0_sites or {}   # VTL0 code: intercepted instructions (and PAUSE)
        self.vtl_returns = self.intercepts = 0
        self.loaded = None          # the VP whose registers are in the engine
        self.parked = None          # a Linux CPU's VP whose VTL0 registers stay in the engine between RUN_VPs
        # Baseline mode for benchmarks: a function making one engine per VP (no pooling, no
        # shared translations), the design the engine pool is measured against.
        self.engine_factory = None
        self.vp_engines = {}
        self.next_index = 0
        self.switches = 0
        self.msr_exits = 0
        self.resume = None          # the VP a stop address interrupted: it goes on first, unperturbed
        self.set_stop_addresses(stop_addresses)
        sites = {**self.msr_sites, **self.pause_sites, **{a: "vtl0:" + k for a, k in self.vtl0_sites.items()}}
        engine.set_sites(sites, self._on_site)

    def set_stop_addresses(self, addresses) -> None:
        """Where run() returns STOP_ADDRESS (kernel entry, breakpoints): the engine's exits."""
        self.stop_addresses = set(addresses)
        self.engine.set_exits(self.stop_addresses)

    # ---- sites: handled inside the run, from the engine's per-address code hooks -------------
    def _on_site(self, engine, addr: int, kind: str) -> None:
        vp = engine.current_vp
        if kind.startswith("vtl0:"):  # VTL0's instructions that VTL2 intercepts (or PAUSE)
            kind = kind[5:]
            if kind == "pause":
                engine.set_reg("rip", addr + 2)
                engine.request_stop(YIELD)
            else:
                engine.set_reg("rip", addr)  # stop before it: VTL0 stays on the instruction
                engine.request_stop(Intercept(kind))
            return
        if kind in ("rdmsr", "wrmsr"):
            self.msr_exits += 1
            self.hv.msr_exit(engine, vp.index, kind)  # #GP raises: the engine ends the run
            if self.hv.crash is not None:
                engine.set_reg("rip", addr)
                engine.request_stop(CRASH)
            elif self._takes_interrupt(vp) and interrupts.interrupts_enabled(engine):
                self._inject(vp)  # e.g. a self-IPI, or the EOI unmasked a lower vector
        elif kind == "pause":  # a spin-wait: let the other VPs run (pause-loop exiting)
            engine.set_reg("rip", addr + 2)
            engine.request_stop(YIELD)
        elif kind == "irq-window":  # the NOP after an STI: a pending interrupt is taken here
            if self._takes_interrupt(vp) and interrupts.interrupts_enabled(engine):
                self._inject(vp)  # returns to this NOP, which is skipped then
            else:
                engine.set_reg("rip", addr + 1)

    # ---- VP selection ----------------------------------------------------------------------
    def _takes_interrupt(self, vp) -> bool:
        return self.hv.vps[vp.index].deliverable() is not None

    def _runnable(self, vp) -> bool:
        state = self.hv.vps[vp.index]
        if vp.state == NOT_STARTED and state.start_pending:
            return True
        if vp.state == RUNNABLE:
            return True
        if vp.state != HALTED or not self._takes_interrupt(vp):
            return False
        return vp.halted_with_interrupts or state.vtl == 0  # VTL2 interrupts preempt VTL0 regardless of IF

    def pick(self):
        """The next VP to run, round robin from the last one picked; None if none can run."""
        n = len(self.vps)
        for k in range(n):
            vp = self.vps[(self.next_index + k) % n]
            if self._runnable(vp):
                self.next_index = (vp.index + 1) % n
                return vp
        return None

    # ---- loading ---------------------------------------------------------------------------
    def _save(self, vp) -> None:
        state = self.hv.vps[vp.index]
        if state.vtl == 0 or self.parked is vp:
            self.parked = None
            vtl.capture_vtl0(self.engine, state.vtl0_registers)  # the VP's context keeps VTL2's state
        else:
            vp.save(self.engine)

    def _load(self, vp) -> None:
        if self.loaded is vp:
            return
        if self.loaded is not None:
            self._save(self.loaded)
        if self.engine_factory is not None:
            if vp.index not in self.vp_engines:
                engine = self.vp_engines[vp.index] = self.engine_factory()
                engine.set_exits(self.engine.exits)
                engine.set_sites(self.engine.sites, self._on_site)
            self.engine = self.vp_engines[vp.index]
        state = self.hv.vps[vp.index]
        if vp.state == NOT_STARTED:
            vp.start(self.engine, state.take_start_context())
            vp.state = RUNNABLE
        vp.load(self.engine)
        if state.vtl == 0:
            vtl.apply_vtl0(self.engine, state.vtl0_registers)
        self.loaded = vp
        self.switches += 1

    def unload(self) -> None:
        """Save the loaded VP (before the host reads or changes VP state)."""
        if self.loaded is not None:
            self._save(self.loaded)
            self.loaded = None

    # ---- VTL switches -------------------------------------------------------------------------
    def _assist_page(self, state) -> int:
        return state.vp_assist_page & ~0xFFF if state.vp_assist_page & 1 else 0

    def _vtl_return(self, vp, fast: bool) -> None:
        """VTL2 -> VTL0 on HvCallVtlReturn (the engine stopped at the stub's `ret`)."""
        state = self.hv.vps[vp.index]
        shared = vtl.shared_registers(self.engine)
        assist = self._assist_page(state)
        if not fast and assist:
            shared["rax"], shared["rcx"] = vtl.vtl0_rax_rcx(self.engine.mem, assist)
        vp.save(self.engine)
        state.vtl = 0
        vtl.apply_vtl0(self.engine, state.vtl0_registers)
        vtl.set_shared_registers(self.engine, shared)
        self.vtl_returns += 1

    def _vtl_entry(self, vp, reason: int, message: bytes = b"") -> None:
        """VTL0 -> VTL2 (intercept or interrupt): VTL0 stays on the intercepted instruction."""
        state = self.hv.vps[vp.index]
        vtl.capture_vtl0(self.engine, state.vtl0_registers)
        shared = vtl.shared_registers(self.engine)
        state.vtl = 2
        vp.load(self.engine)
        vtl.set_shared_registers(self.engine, shared)
        assist = self._assist_page(state)
        if assist:
            vtl.write_entry(self.engine.mem, assist, reason, message)
        vp.state = RUNNABLE
        self.intercepts += reason == HV_VTL_ENTRY_REASON_INTERCEPT

    def _intercept_message(self, vp, kind: str) -> bytes:
        e = self.engine
        if kind in ("in", "out"):
            message = intercepts.io_port(e, vp.index)
            if e.runvp.armed:                        # its next exits can be answered in the engine
                rip, cr3 = e.read_regs(("rip", "cr3"))
                e.runvp.learn(rip, cr3, *intercepts.io_form(e, rip, cr3))
            return message
        if kind == "hypercall":
            return intercepts.hypercall(e, vp.index)
        if kind == "cpuid":
            defaults = cpuid_lookup(e.state.cpuid_table, e.reg("rax") & 0xFFFFFFFF, e.reg("rcx") & 0xFFFFFFFF, vp.apic_id)
            return intercepts.cpuid(e, vp.index, tuple(int(v) for v in defaults))
        return intercepts.msr(e, vp.index, write=kind == "wrmsr")

    def _vtl0_intercept(self, vp, exit) -> bytes | None:
        """The HvMessage of an exit VTL0 makes for the VTL2 side to handle: an intercepted
        instruction, or an access to a GPA outside RAM (MMIO); None for any other exit."""
        if isinstance(exit.stop_reason, Intercept):
            return self._intercept_message(vp, exit.stop_reason.kind)
        if exit.kind == eng.EXIT_FAULT and exit.unmapped_write is not None and self.hv.vps[vp.index].vtl == 0:
            return intercepts.memory(self.engine, vp.index, exit.fault_address, exit.unmapped_write)
        return None

    def _inject(self, vp) -> None:
        state = self.hv.vps[vp.index]
        if state.vtl == 0:
            if state.deliverable() is not None:
                self._vtl_entry(vp, HV_VTL_ENTRY_REASON_INTERRUPT)  # VTL2's interrupt preempts VTL0
            return
        vector = state.deliverable()
        if vector is not None and interrupts.interrupts_enabled(self.engine):
            interrupts.deliver(self.engine, vector)
            state.accept(vector)
            vp.state = RUNNABLE

    # ---- running ---------------------------------------------------------------------------
    def run(self, until=None, timeout: float = 60.0) -> SchedulerStop:
        # No cyclic garbage comes from the run loop, but with thousands of VPs alive each
        # collection the loop's allocations trigger walks them all (~4% of AP bring-up).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run(until, timeout)
        finally:
            if collecting:
                gc.enable()

    def _run(self, until, timeout: float) -> SchedulerStop:
        deadline = time.monotonic() + timeout
        while True:
            if until is not None and until():
                return SchedulerStop(STOP_CONDITION)
            vp, self.resume = self.resume, None
            if vp is None or vp is not self.loaded or vp.state != RUNNABLE:
                vp = self.pick()
                if vp is None:
                    return SchedulerStop(STOP_IDLE)
                stop = self.begin_turn(vp)
                if stop is not None:
                    return stop
            # else: the VP a stop address interrupted goes on as if it had not been there
            stop = self.run_turn(vp, deadline)
            if stop is not None:
                if stop.reason == STOP_ADDRESS:
                    self.resume = vp
                return stop

    def begin_turn(self, vp) -> SchedulerStop | None:
        """Load vp and deliver what is pending for it, as at the start of every turn."""
        self._load(vp)
        try:
            self._inject(vp)
        except interrupts.DeliveryError as exc:
            return SchedulerStop(STOP_FAULT, vp, eng.VpExit(eng.EXIT_FAULT, self.engine.reg("rip"), message=str(exc)))
        return None

    def run_turn(self, vp, deadline: float, observer=None):
        """Run the loaded VP until it gives the engine up (None: it halted or yielded) or the run
        must stop (a SchedulerStop, or what an observer hook returned). Every exit goes through
        one table (_EXITS). observer (the debugger) may stop the run at each step:
            before_run(vp), on_event(vp, kind, detail) for "vtl-switch", "intercept" and
            "halt-wake", on_turn_end(vp, detail), on_request(vp, exit) when something else
            stopped the engine (a breakpoint, a step, the watchdog), on_timeout(vp);
        each returns None to go on, or what run_turn should return."""
        while True:
            if observer is not None:
                stop = observer.before_run(vp)
                if stop is not None:
                    return stop
            left = deadline - time.monotonic()
            if left <= 0:
                if observer is not None:
                    return observer.on_timeout(vp)
                return SchedulerStop(STOP_TIMEOUT, vp, eng.VpExit(eng.EXIT_STOP, self.engine.reg("rip")))
            exit = self.engine.run(timeout_us=int(left * 1e6) if left < 1e6 else 0)
            outcome = self._EXITS[self._classify(vp, exit)](self, vp, exit, observer)
            if outcome is not _GO_ON:
                return outcome

    def _classify(self, vp, exit) -> str:
        reason = exit.stop_reason
        if isinstance(reason, VtlReturn):
            return "vtl-return"
        if reason is ANSWERED:
            return "answered"
        if isinstance(reason, Intercept) or (exit.kind == eng.EXIT_FAULT and exit.unmapped_write is not None
                                             and self.hv.vps[vp.index].vtl == 0):
            return "intercept"           # an intercepted VTL0 instruction, or VTL0 MMIO
        if reason is YIELD:
            return "yield"
        if reason is CRASH:
            return "crash"
        if exit.kind == eng.EXIT_HLT:
            return "hlt"
        if exit.kind == eng.EXIT_ADDRESS:
            return "address"
        if exit.kind == eng.EXIT_FAULT:
            return "fault"
        if reason == "timeout":
            return "timeout"
        return "request"                 # someone else stopped the engine (the debugger)

    # ---- the exit table: each returns _GO_ON, None (the turn is over) or a stop -------------
    def _exit_vtl_return(self, vp, exit, observer):
        self._vtl_return(vp, exit.stop_reason.fast)
        return self._observe(observer, vp, "vtl-switch", "VTL return: the VP runs VTL0")

    def _exit_intercept(self, vp, exit, observer):
        message = self._vtl0_intercept(vp, exit)
        if vp.state == EXTERNAL:        # a Linux CPU: the intercept goes straight to the host
            self.intercepts += 1
            return SchedulerStop(STOP_INTERCEPT, vp, exit, message=message)
        self._vtl_entry(vp, HV_VTL_ENTRY_REASON_INTERCEPT, message)
        if observer is None:
            return _GO_ON
        reason = exit.stop_reason
        what = reason.kind if isinstance(reason, Intercept) else f"MMIO at {exit.fault_address:#x}"
        return self._observe(observer, vp, "intercept", f"VTL entry: {what} intercept in VTL0 at {exit.rip:#x}")

    def _exit_answered(self, vp, exit, observer):
        return SchedulerStop(STOP_ANSWERED, vp, exit)

    def _exit_yield(self, vp, exit, observer):
        if vp.state == EXTERNAL:        # PAUSE in a Linux CPU's VTL0: nothing else runs on it
            return _GO_ON
        return observer.on_turn_end(vp, "yielded at PAUSE") if observer is not None else None

    def _exit_crash(self, vp, exit, observer):
        exit.message = self.hv.crash.summary()
        return SchedulerStop(STOP_CRASH, vp, exit)

    def _exit_hlt(self, vp, exit, observer):
        if vp.state == EXTERNAL:
            return SchedulerStop(STOP_HALT, vp, exit)
        vp.state = HALTED
        vp.halted_with_interrupts = interrupts.interrupts_enabled(self.engine)
        if self._takes_interrupt(vp) and vp.halted_with_interrupts:
            self._inject(vp)  # an interrupt was already waiting: no need to sleep
            return self._observe(observer, vp, "halt-wake", "halted; an interrupt was waiting")
        return observer.on_turn_end(vp, "halted") if observer is not None else None

    def _exit_address(self, vp, exit, observer):
        if exit.rip in self.stop_addresses:
            return SchedulerStop(STOP_ADDRESS, vp, exit)
        return SchedulerStop(STOP_FAULT, vp, exit, "stopped at an exit address with no handler")

    def _exit_fault(self, vp, exit, observer):
        return SchedulerStop(STOP_FAULT, vp, exit)

    def _exit_timeout(self, vp, exit, observer):
        return observer.on_request(vp, exit) if observer is not None else SchedulerStop(STOP_TIMEOUT, vp, exit)

    def _exit_request(self, vp, exit, observer):
        if observer is not None:
            return observer.on_request(vp, exit)
        return SchedulerStop(STOP_FAULT, vp, exit, str(exit.stop_reason))

    _EXITS = {"vtl-return": _exit_vtl_return, "intercept": _exit_intercept, "answered": _exit_answered,
              "yield": _exit_yield,
              "crash": _exit_crash, "hlt": _exit_hlt, "address": _exit_address, "fault": _exit_fault,
              "timeout": _exit_timeout, "request": _exit_request}

    @staticmethod
    def _observe(observer, vp, kind: str, detail: str):
        if observer is None:
            return _GO_ON
        stop = observer.on_event(vp, kind, detail)
        return _GO_ON if stop is None else stop

    # ---- Linux CPUs ------------------------------------------------------------------------
    def run_external_vtl0(self, vp, timeout: float = 30.0, preempt: bool = False, doorbell=None):
        """Run VTL0 of a VP the Linux stand-in owns until it needs the host, as mshv_vtl's
        RUN_VP does on a Linux CPU: the same turn as any VP's, except that an intercept comes
        straight back to the caller (VTL2 code is not entered). Returns the intercept's
        HvMessage bytes, or None if VTL0 halted; VpRunError on a fault or a timeout, or with
        preempt, PREEMPTED when the time slice ran out (the VP goes on where it was next time).
        doorbell (a cpu.runvp_fastpath.DoorbellRun): the engine answers I/O exits and takes the
        next rings itself; ANSWERED when it gave the engine back with the last exit answered."""
        if vp.state != EXTERNAL:
            raise VpRunError(f"VP {vp.index} is not a Linux CPU")
        state = self.hv.vps[vp.index]
        engine = self.engine
        if not (self.loaded is vp and self.parked is vp):
            # The VP stays parked in the engine with its VTL0 registers after the run: the next
            # RUN_VP of the same VP (a VMM's loop on its CPU, the common case) goes on without
            # reloading ~70 registers; _save() captures VTL0 when another VP needs the engine.
            self.unload()
            vp.load(engine)                     # its VTL2 context underneath, as on hardware
            vtl.apply_vtl0(engine, state.vtl0_registers)
            self.loaded = self.parked = vp
        state.vtl = 0
        engine.current_vp = vp
        if doorbell is not None:
            engine.runvp.arm(vp.index, doorbell)
        try:
            stop = self.run_turn(vp, time.monotonic() + timeout)
        finally:
            state.vtl = 2                       # back in VTL2 (the kernel), VTL0 parked in the engine
            engine.current_vp = None
            if doorbell is not None:
                engine.runvp.disarm(doorbell)
                self.intercepts += doorbell.answered
        if stop.reason == STOP_ANSWERED:
            return ANSWERED
        if stop.reason == STOP_INTERCEPT:
            return stop.message
        if stop.reason == STOP_HALT:
            return None
        if stop.reason == STOP_TIMEOUT:
            if preempt:
                return PREEMPTED
            raise VpRunError(f"VP {vp.index}: VTL0 ran {timeout:g} s without an intercept")
        exit = stop.exit
        raise VpRunError(f"VP {vp.index} VTL0 stopped at {exit.rip:#x}: {exit.kind} {exit.message} {stop.detail}".rstrip())

    def mark_external(self, vp) -> None:
        """vp is now run by the Linux stand-in (the BSP after the handoff, onlined CPUs)."""
        if self.loaded is vp:
            self.unload()
        vp.state = EXTERNAL
