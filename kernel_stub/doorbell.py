"""RUN_VP by doorbell (defs/kabi.py RUN_DOORBELL): one dispatcher thread runs every Linux CPU's
VTL0 for the VMM, as the one engine runs them anyway. The VMM writes a CPU's next request number
and bumps the kick counter; the dispatcher takes the CPUs that rang in turn, a time slice each
(a VP that did not exit goes to the back), answers exits and cancels, and sleeps on the kick
counter when none is waiting. One thread instead of one per CPU: no lock handed from thread to
thread (and GIL to GIL) at every exit, which cost the 64-VP run most of its time.
"""
import struct
import threading
import time
from collections import deque

from hclsim.defs import futex, kabi
from hclsim.kernel_stub.mshv import SLICE_EXIT, SLICE_HALTED, SLICE_PREEMPTED
from hclsim.kernel_stub.vfs import KernelError

_U32 = struct.Struct("<I")
IDLE_WAIT_S = 0.05          # with halted VPs, their cancel words are looked at this often
SPIN_S = 0.0001             # how long an idle dispatcher spins for the next ring before sleeping


class Dispatcher:
    def __init__(self, mshv):
        self.mshv, self.pages = mshv, mshv.pages
        self.m = mshv.pages.map
        self.kick = mshv.pages.kick_page + kabi.DOORBELL_KICK
        self.kick_addr = mshv.pages.address(self.kick)
        self.cpus: dict[int, int] = {}          # cpu -> the last request answered (or taken)
        self.lock = threading.Lock()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="mshv-doorbell", daemon=True)
        self.thread.start()

    def add(self, cpu: int) -> None:
        run = self.pages.run_page(cpu)
        with self.lock:
            if cpu not in self.cpus:
                self.cpus[cpu] = _U32.unpack_from(self.m, run + kabi.RUN_DOORBELL_ACK)[0]
        futex.wake(self.kick_addr)

    def close(self) -> None:
        self.closing = True
        with self.lock:
            cpus = list(self.cpus)
        for cpu in cpus:
            run = self.pages.run_page(cpu)
            _U32.pack_into(self.m, run + kabi.RUN_DOORBELL_CLOSED, 1)
            futex.wake(self.pages.address(run + kabi.RUN_DOORBELL_ACK))
        futex.wake(self.kick_addr)
        self.thread.join(2)

    def _answer(self, cpu: int, request: int, err: int) -> None:
        run = self.pages.run_page(cpu)
        _U32.pack_into(self.m, run + kabi.RUN_DOORBELL_ERRNO, err)
        _U32.pack_into(self.m, run + kabi.RUN_DOORBELL_ACK, request)
        futex.wake(self.pages.address(run + kabi.RUN_DOORBELL_ACK))

    def _rung(self, queue: deque, active: dict) -> None:
        """Queue the CPUs whose request number moved past the last one taken."""
        with self.lock:
            items = list(self.cpus.items())
        for cpu, last in items:
            if cpu in active:
                continue
            request = _U32.unpack_from(self.m, self.pages.run_page(cpu) + kabi.RUN_DOORBELL)[0]
            if request != last:
                active[cpu] = request
                with self.lock:
                    self.cpus[cpu] = request
                try:
                    self.mshv.begin_run(cpu)
                except KernelError as exc:
                    del active[cpu]
                    self._answer(cpu, request, exc.errno)
                    continue
                queue.append(cpu)

    def _finish(self, cpu: int, active: dict, err: int) -> None:
        request = active.pop(cpu)
        try:
            self.mshv.end_run(cpu)
        finally:
            self._answer(cpu, request, err)

    def _run(self) -> None:
        queue: deque = deque()
        active: dict[int, int] = {}            # cpu -> its request being served
        halted: set[int] = set()
        mshv = self.mshv
        while not self.closing:
            kicks = _U32.unpack_from(self.m, self.kick)[0]
            self._rung(queue, active)
            for cpu in [c for c in halted if mshv.cancelled(c)]:
                halted.discard(cpu)
                self._finish(cpu, active, kabi.EINTR)
            if not queue:
                # A VMM alone on its CPU rings again within ~30 us: spin that long (no system
                # call) before sleeping, so its exit does not pay two wakeups.
                end = time.perf_counter() + SPIN_S
                while _U32.unpack_from(self.m, self.kick)[0] == kicks and time.perf_counter() < end:
                    pass
                if _U32.unpack_from(self.m, self.kick)[0] == kicks:
                    futex.wait(self.kick_addr, kicks, IDLE_WAIT_S if halted else 0.5)
                continue
            cpu = queue.popleft()
            try:
                outcome = mshv.run_slice(cpu)
            except KernelError as exc:
                self._finish(cpu, active, exc.errno)
                continue
            except Exception as exc:            # a bug: tell the VMM (EIO), log it, go on serving
                mshv.log(f"mshv_vtl: BUG: RUN_VP by doorbell on CPU {cpu}: {type(exc).__name__}: {exc}", 1)
                self._finish(cpu, active, kabi.EIO)
                continue
            if outcome == SLICE_EXIT:
                self._finish(cpu, active, 0)
            elif outcome == SLICE_HALTED:
                halted.add(cpu)                 # until the VMM cancels it
            elif outcome == SLICE_PREEMPTED:
                queue.append(cpu)
        for cpu in list(active):
            try:
                mshv.end_run(cpu)
            except Exception:                   # shutting down: the pages go away next
                pass
