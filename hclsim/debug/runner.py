"""Running the VPs under the debugger: the scheduler's own turns (hv/scheduler.py,
Scheduler.run_turn) with this runner as their observer, so a run can stop in the middle of a VP's
turn and go on from there exactly as if it had not stopped, and report VTL switches and the
kernel handoff on the way.

A VP's turn ("slice") lasts until it halts or yields; a debugger stop inside one leaves it
current, and the next step or continue carries on with it before the scheduler picks another VP
(no interrupt delivery in between, as in an uninterrupted run). The instruction counter counts a
translated block's instructions when the block is entered (cpu/fastpath.py), so a stop in the
middle of a block gives back the count of the instructions it did not run (`_rewind`); the
resumed run enters a block starting there and counts them then. Stepped and continued runs
therefore end with the same counters as an uninterrupted one.
"""
import gc
import threading
import time


from hclsim import HclsimError
from hclsim.cpu import block_clock
from hclsim.hv.scheduler import STOP_ADDRESS, STOP_FAULT, SchedulerStop
from hclsim.debug.events import (EVENT, FAULT, HANDOFF, IDLE, INTERRUPTED, STEP, TIMEOUT, StopEvent,
                                 StopRequest)

INTERRUPT_GRACE = 0.1      # seconds to wait for a natural stop before stopping the engine outright


class Runner:
    def __init__(self, machine, stops, watches):
        self.machine, self.stops, self.watches = machine, stops, watches
        self.slice = None               # the VP whose turn a debugger stop interrupted
        self.events: set[str] = set()   # "vtl-switch", "intercept"
        self.boot_result = None         # machine.take_handoff()'s result once the BSP got there
        self.last_fault_report = None
        self.reported = None            # (VP index, RIP) the last stop showed: resuming there passes it
        self.running = False
        self._stepping = False
        self._interrupt = threading.Event()

    @property
    def sched(self):
        return self.machine.scheduler

    # ---- interrupting ---------------------------------------------------------------------
    def interrupt(self) -> None:
        """From any thread. The run loop notices at the next VP exit; if the guest runs on without
        one, the engine is stopped outright after a short grace period."""
        self._interrupt.set()
        threading.Thread(target=self._force_stop, name="hclsim-debug-interrupt", daemon=True).start()

    def _force_stop(self) -> None:
        time.sleep(INTERRUPT_GRACE)
        for _ in range(100):
            if not (self.running and self._interrupt.is_set()):
                return
            self.machine.engine.request_stop(StopRequest(INTERRUPTED))
            time.sleep(0.05)  # again, in case it landed between two runs

    def _interrupted(self, vp) -> StopEvent:
        self._interrupt.clear()
        index = vp.index if vp is not None else -1
        return StopEvent(INTERRUPTED, index, self.machine.engine.reg("rip") if vp is not None else 0)

    # ---- running --------------------------------------------------------------------------
    def begin(self, vp) -> StopEvent | None:
        """Give vp its turn, as the scheduler does after picking it."""
        self.slice = vp
        stop = self.sched.begin_turn(vp)
        return None if stop is None else self._fault(vp, stop.exit)

    def _running(self):
        """As Scheduler.run: no garbage collection walks over the VPs while the guest runs."""
        collecting = gc.isenabled()
        gc.disable()
        self.running = True
        self._interrupt.clear()
        return collecting

    def _stopped(self, collecting: bool) -> None:
        self.running = False
        if collecting:
            gc.enable()

    def cont(self, deadline: float) -> StopEvent:
        collecting = self._running()
        if self.slice is not None and self.sched.loaded is not self.slice:
            self.slice = None  # something else ran the scheduler meanwhile (the sidecar driver's wait)
        try:
            while True:
                if self.slice is None:
                    if self._interrupt.is_set():
                        return self._interrupted(None)
                    vp = self.sched.pick()
                    if vp is None:
                        return StopEvent(IDLE, -1, 0, "no VP can run: every one is halted, external or not started")
                    stop = self.begin(vp)
                    if stop is not None:
                        return stop
                stop = self.run_slice(deadline)
                if stop is not None:
                    return stop
        finally:
            self._stopped(collecting)

    def step(self, deadline: float) -> StopEvent:
        collecting = self._running()
        try:
            return self.run_slice(deadline, stepping=True)
        finally:
            self._stopped(collecting)

    def run_slice(self, deadline: float, stepping: bool = False) -> StopEvent | None:
        """Run the current VP's turn (Scheduler.run_turn, with this runner as its observer) until
        it gives the engine up (None) or something stops it; stepping ends at any VP exit."""
        vp = self.slice
        if self.reported == (vp.index, self.sched.engine.reg("rip")):
            self.stops.arm_skip()  # a breakpoint here was reported already: run the instruction
        self.reported = None
        self._stepping = stepping
        stop = self.sched.run_turn(vp, deadline, observer=self)
        if isinstance(stop, SchedulerStop):   # an outcome the scheduler decides: a fault, the handoff
            if stop.reason == STOP_ADDRESS and vp is self.machine.bsp and stop.exit.rip == self.machine.image.kernel_entry:
                return self._handoff(vp, stop.exit)
            if stop.reason == STOP_ADDRESS:
                return self._fault(vp, stop.exit, STOP_FAULT, f"VP {vp.index} jumped to the kernel entry")
            return self._fault(vp, stop.exit, stop.reason, stop.detail)
        return stop

    # ---- the scheduler's observer hooks (Scheduler.run_turn) --------------------------------
    def before_run(self, vp) -> StopEvent | None:
        if self._interrupt.is_set():
            return self._interrupted(vp)
        self.watches.begin_run()
        return None

    def on_timeout(self, vp) -> StopEvent:
        return StopEvent(TIMEOUT, vp.index, self.sched.engine.reg("rip"), "the time limit passed")

    def on_request(self, vp, exit) -> StopEvent:
        """The engine stopped on a debugger request (breakpoint, step, interrupt) or the watchdog."""
        reason = exit.stop_reason
        if not isinstance(reason, StopRequest) and reason != "timeout":
            return self._fault(vp, exit, STOP_FAULT, str(reason))
        self._rewind(self.sched.engine)
        if self.watches.hit is not None:  # a watchpoint was hit just before this stop
            reason = self.watches.pending()
        if reason == "timeout":
            return StopEvent(TIMEOUT, vp.index, exit.rip, "the time limit passed")
        if reason.reason == INTERRUPTED:
            self._interrupt.clear()
        return StopEvent(STEP if reason.temporary is not None else reason.reason, vp.index, exit.rip,
                         reason.detail, reason.watch_address, reason.watch_kind)

    def on_event(self, vp, kind: str, detail: str) -> StopEvent | None:
        """A VTL switch, an intercept or a halt that went on at once: a catchpoint may stop here,
        and a step ends here."""
        kinds = ("intercept", "vtl-switch") if kind == "intercept" else (kind,)
        rip = self.sched.engine.reg("rip")
        if any(k in self.events for k in kinds):
            return StopEvent(EVENT, vp.index, rip, detail)
        return StopEvent(STEP, vp.index, rip, detail) if self._stepping else None

    def on_turn_end(self, vp, detail: str) -> StopEvent | None:
        self.slice = None
        return StopEvent(STEP, vp.index, self.sched.engine.reg("rip"), detail) if self._stepping else None

    # ---- outcomes -------------------------------------------------------------------------
    def _handoff(self, vp, exit) -> StopEvent:
        try:
            self.boot_result = self.machine.take_handoff()
        except HclsimError as exc:  # the stand-in refused the handoff
            self.last_fault_report = f"kernel handoff rejected: {exc}"
            return StopEvent(FAULT, vp.index, exit.rip, self.last_fault_report)
        self.slice = None  # the BSP is the Linux stand-in's now
        rest = "; the sidecar VPs run on" if self.machine.linux.sidecar is not None else ""
        return StopEvent(HANDOFF, vp.index, exit.rip, f"kernel entry: handoff checked; the Linux stand-in runs VP 0{rest}")

    def _fault(self, vp, exit, reason: str = STOP_FAULT, detail: str = "") -> StopEvent:
        err = self.machine._stop_error(SchedulerStop(reason, vp, exit, detail))
        self.last_fault_report = err.report
        return StopEvent(FAULT, vp.index, exit.rip, str(err))

    @staticmethod
    def _rewind(engine) -> None:
        """The run stopped before RIP, inside the last block it entered (counted whole on entry):
        give back the count of its instructions that have not run (cpu/block_clock.py)."""
        block_clock.give_back(engine)
