"""RUN_VP by doorbell (defs/kabi.py RUN_DOORBELL): one dispatcher thread runs every Linux CPU's
VTL0 for the VMM, as the one engine runs them anyway. The VMM writes a CPU's next request number
and bumps the kick counter; the dispatcher takes the CPUs that rang in turn, a time slice each
(a VP that did not exit goes to the back), answers exits and cancels, and sleeps on the kick
counter when none is waiting. One thread instead of one per CPU: no lock handed from thread to
thread (and GIL to GIL) at every exit, which cost the 64-VP run most of its time.

Each slice is armed for the engine's own doorbell path (cpu/runvp_fastpath.py): VTL0's I/O
exits are answered from the exit hook and the next ring taken there, so that a VMM's loop on
its CPU never comes back here while nothing else needs the engine. The CPUs served and the
request last taken of each live in two arrays that hook reads.
"""
import threading
import time
from collections import deque

import numpy as np

from hclsim.cpu.runvp_fastpath import DoorbellRun
from hclsim.defs import futex, kabi
from hclsim.kernel_stub.mshv import SLICE_ANSWERED, SLICE_EXIT, SLICE_HALTED, SLICE_PREEMPTED
from hclsim.kernel_stub.vfs import KernelError

IDLE_WAIT_S = 0.05          # with halted VPs, their cancel words are looked at this often
SPIN_S = 0.0001             # how long an idle dispatcher spins for the next ring before sleeping


class Dispatcher:
    def __init__(self, mshv):
        self.mshv, self.pages = mshv, mshv.pages
        # The shared words as 32-bit items: one load or store each (struct.pack_into clears a
        # field before writing it, and the VMM spinning on its answer would see the gap).
        self.words = mshv.pages.view.cast("I")
        kick = mshv.pages.kick_page + kabi.DOORBELL_KICK
        self.kick, self.kick_addr = kick // 4, mshv.pages.address(kick)
        n = mshv.partition.vp_count
        self.registered = np.zeros(n, np.int64)  # 1: the CPU's RUN_VPs come by doorbell
        self.last = np.zeros(n, np.int64)        # the last request taken of each
        self.cpus: list[int] = []
        self.lock = threading.Lock()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="mshv-doorbell", daemon=True)
        self.thread.start()

    def add(self, cpu: int) -> None:
        run = self.pages.run_page(cpu)
        with self.lock:
            if not self.registered[cpu]:
                self.last[cpu] = self.words[(run + kabi.RUN_DOORBELL_ACK) // 4]
                self.registered[cpu] = 1
                self.cpus.append(cpu)
        futex.wake(self.kick_addr)

    def close(self) -> None:
        self.closing = True
        with self.lock:
            cpus = list(self.cpus)
        for cpu in cpus:
            run = self.pages.run_page(cpu)
            self.words[(run + kabi.RUN_DOORBELL_CLOSED) // 4] = 1
            futex.wake(self.pages.address(run + kabi.RUN_DOORBELL_ACK))
        futex.wake(self.kick_addr)
        self.thread.join(2)
        if not self.thread.is_alive():
            self.words.release()            # the pages are unmapped next

    def _answer(self, cpu: int, request: int, err: int) -> None:
        run = self.pages.run_page(cpu)
        self.words[(run + kabi.RUN_DOORBELL_ERRNO) // 4] = err
        self.words[(run + kabi.RUN_DOORBELL_ACK) // 4] = request
        futex.wake(self.pages.address(run + kabi.RUN_DOORBELL_ACK))

    def _rung(self, queue: deque, active: dict) -> None:
        """Queue the CPUs whose request number moved past the last one taken."""
        with self.lock:
            cpus = list(self.cpus)
        for cpu in cpus:
            if cpu in active:
                continue
            request = self.words[(self.pages.run_page(cpu) + kabi.RUN_DOORBELL) // 4]
            if request != self.last[cpu]:
                active[cpu] = request
                self.last[cpu] = request
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
            kicks = self.words[self.kick]
            self._rung(queue, active)
            for cpu in [c for c in halted if mshv.cancelled(c)]:
                halted.discard(cpu)
                self._finish(cpu, active, kabi.EINTR)
            if not queue:
                # A VMM alone on its CPU rings again within ~30 us: spin that long (no system
                # call) before sleeping, so its exit does not pay two wakeups.
                end = time.perf_counter() + SPIN_S
                while self.words[self.kick] == kicks and time.perf_counter() < end:
                    pass
                if self.words[self.kick] == kicks:
                    futex.wait(self.kick_addr, kicks, IDLE_WAIT_S if halted else 0.5)
                continue
            cpu = queue.popleft()
            bell = DoorbellRun(cpu, self.pages.address(0), self.pages.address(self.pages.register_page(cpu)),
                               active[cpu], self.registered, self.last, mshv.lock.waiting)
            try:
                outcome = mshv.run_slice(cpu, bell)
            except KernelError as exc:
                active[cpu] = bell.request
                self._finish(cpu, active, exc.errno)
                continue
            except Exception as exc:            # a bug: tell the VMM (EIO), log it, go on serving
                active[cpu] = bell.request
                mshv.log(f"mshv_vtl: BUG: RUN_VP by doorbell on CPU {cpu}: {type(exc).__name__}: {exc}", 1)
                self._finish(cpu, active, kabi.EIO)
                continue
            active[cpu] = bell.request       # the engine may have taken later rings
            if outcome == SLICE_ANSWERED:
                del active[cpu]
                mshv.end_answered(cpu)
            elif outcome == SLICE_EXIT:
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
