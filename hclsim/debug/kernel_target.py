"""The debug target of `hclsim boot --linux real --gdb`: the boot shim under DebugTarget, then,
from the kernel handoff on, the real kernel on the BSP (hclsim/real_linux.py) with the same
breakpoints and stepping (debug/stops.py's code hooks work on the one engine in both phases).

In the kernel there is one VP (the kernel's CPU 0). A stop inside a translated block gives back
the count of the block's instructions that did not run (Runner._rewind), so virtual time (the
instructions retired) is the same as in a run without the debugger. When the kernel ends (halts,
powers off, panics) its VP is the kernel's no longer: the gdb stub reports the process exited.
Watchpoints stay the shim's (the kernel phase does not offer them yet).
"""
import math

from hclsim.debug.kallsyms import KallsymsError, kernel_symbols
from hclsim.debug.events import FAULT, HANDOFF, IDLE, INTERRUPTED, DebugError, StopEvent, StopRequest
from hclsim.debug.stops import NextBreakpoint
from hclsim.debug.runner import Runner
from hclsim.debug.target import DebugTarget
from hclsim.hv.partition import REGISTER_NAMES
from hclsim.hv.vp import EXTERNAL

CLEAN = ("halted", "power-off")


class RealLinuxTarget:
    def __init__(self, machine):
        self.machine = machine
        self.shim = DebugTarget(machine)
        self.kernel = None                   # the RealLinux once the BSP took the handoff
        self.outcome = None                  # its RealLinuxResult once the kernel ended
        self.kernel_stop = None
        # The kernel's symbols from its own kallsyms tables, from the start (breakpoints on them
        # may be set before the handoff); a kernel without them is only addresses.
        self.kernel_symbols, self.kernel_symbols_error = None, None
        try:
            self.kernel_symbols = kernel_symbols(machine.kernel)
            self.images.add_kernel(self.kernel_symbols, machine.layout.region("kernel").start)
        except KallsymsError as exc:
            self.kernel_symbols_error = str(exc)

    @property
    def images(self):
        return self.shim.images

    @property
    def last_fault_report(self) -> str | None:
        return None if self.in_kernel else self.shim.last_fault_report

    # ---- the phase ----------------------------------------------------------------------
    @property
    def in_kernel(self) -> bool:
        return self.kernel is not None

    @property
    def current(self) -> int:
        return 0 if self.in_kernel else self.shim.current

    @property
    def last_stop(self) -> StopEvent:
        return self.kernel_stop if self.in_kernel else self.shim.last_stop

    def close(self) -> None:
        if self.kernel is not None and self.outcome is None:
            self.outcome = self.kernel.finish("interrupted", "the debugger ended the session")
        self.shim.close()

    def _enter_kernel(self) -> None:
        from hclsim.real_linux import RealLinux
        self.kernel = RealLinux(self.machine, hyperv=self.machine.config.hyperv, debugger=True)
        self.kernel.start()
        # The BSP's state is the engine's from here on: what reads it through the partition
        # (disassembly, backtraces, memory through its page tables) reads it live.
        self.machine.scheduler.loaded = self.machine.bsp
        self.kernel_stop = self.shim.last_stop

    # ---- VPs and state ----------------------------------------------------------------------
    def vp_indexes(self) -> list[int]:
        return [0] if self.in_kernel else self.shim.vp_indexes()

    def vp_state(self, i) -> str:
        if not self.in_kernel:
            return self.shim.vp_state(i)
        return EXTERNAL if self.outcome is not None else "running"

    def vp_label(self, i) -> str:
        if not self.in_kernel:
            return self.shim.vp_label(i)
        return "VP 0 Linux (real kernel)" + (f" {self.outcome.status}" if self.outcome else "")

    def _check(self, i) -> None:
        if i not in (None, 0):
            raise DebugError(f"no VP {i} in the real kernel (it runs on VP 0)")

    def registers(self, i=None) -> dict[str, int]:
        if not self.in_kernel:
            return self.shim.registers(i)
        self._check(i)
        regs = self.machine.engine.registers()
        return {name: regs.get(name, 0) for name in REGISTER_NAMES}

    def set_register(self, i, name: str, value: int) -> None:
        if not self.in_kernel:
            return self.shim.set_register(i, name, value)
        self._check(i)
        name = name.lower().lstrip("$")
        if name not in REGISTER_NAMES or name in ("cs", "ss", "efer"):
            raise DebugError(f"register {name!r} cannot be set in the real kernel")
        self.machine.engine.set_reg(name, value)

    def read_memory(self, i, addr: int, length: int, physical: bool = False) -> bytes:
        if not self.in_kernel:
            return self.shim.read_memory(i, addr, length, physical)
        e = self.machine.engine
        if physical:
            if not e.mem.contains(addr, length):
                raise DebugError(f"{length} bytes at GPA {addr:#x} are not RAM")
            return e.mem.read(addr, length)
        data = e.read_virtual(addr, length)
        if len(data) != length:
            raise DebugError(f"{addr + len(data):#x} is not mapped")
        return data

    def write_memory(self, i, addr: int, data: bytes, physical: bool = False) -> None:
        if not self.in_kernel:
            return self.shim.write_memory(i, addr, data, physical)
        e = self.machine.engine
        for k in range(len(data)):                   # byte by byte through the page tables
            pa = addr + k if physical else e.translate(addr + k)
            if pa < 0 or not e.mem.contains(pa, 1):
                raise DebugError(f"{addr + k:#x} is not mapped")
            e.mem.write(pa, data[k:k + 1])
        if not physical:
            e.remove_cache(addr, addr + len(data))   # code written: translated anew

    def add_breakpoint(self, addr: int) -> None:
        self.shim.add_breakpoint(addr)

    def remove_breakpoint(self, addr: int) -> None:
        self.shim.remove_breakpoint(addr)

    def add_watchpoint(self, addr: int, length: int, kind: str = "w", physical: bool = False) -> None:
        if self.in_kernel:
            raise DebugError("watchpoints are not offered in the real kernel yet")
        self.shim.add_watchpoint(addr, length, kind, physical)

    def remove_watchpoint(self, addr: int, length: int, kind: str = "w", physical: bool = False) -> None:
        if self.in_kernel:
            raise DebugError("watchpoints are not offered in the real kernel yet")
        self.shim.remove_watchpoint(addr, length, kind, physical)

    # ---- running -------------------------------------------------------------------------
    def step(self, i=None, count: int = 1, timeout: float | None = None) -> StopEvent:
        if not self.in_kernel:
            return self._shim_stop(self.shim.step(i, count, timeout))
        self._check(i)
        stops = self.shim.stops
        stops.begin_step(count)
        try:
            return self._resume(timeout)
        finally:
            stops.end_step()

    def cont(self, timeout: float | None = None) -> StopEvent:
        if not self.in_kernel:
            return self._shim_stop(self.shim.cont(timeout))
        self.shim.stops.end_stepping()
        return self._resume(timeout)

    def next(self, i=None, timeout: float | None = None) -> StopEvent:
        """step, but a CALL runs until it returns to this stack depth."""
        if not self.in_kernel:
            return self._shim_stop(self.shim.next(i, timeout))
        self._check(i)
        regs = self.registers(0)
        insn = self.shim.disassemble(0, regs["rip"], 1)
        if not insn or not insn[0][2].startswith("call"):
            return self.step(0, 1, timeout)
        return self._until([(regs["rip"] + len(insn[0][1]), NextBreakpoint(0, regs["rsp"]))], timeout)

    def finish(self, i=None, timeout: float | None = None) -> StopEvent:
        if not self.in_kernel:
            return self._shim_stop(self.shim.finish(i, timeout))
        self._check(i)
        found, why = self.shim.backtrace(0, 2)
        if len(found) < 2 or found[0].cfa is None:
            raise DebugError(f"\"finish\" not meaningful here: {why}")
        return self._until([(found[1].pc, NextBreakpoint(0, found[0].cfa))], timeout)

    def run_to(self, i, addresses: list[int], timeout: float | None = None) -> StopEvent:
        if not self.in_kernel:
            return self._shim_stop(self.shim.run_to(i, addresses, timeout))
        self._check(i)
        found, _why = self.shim.backtrace(0, 2)
        temps = [(a, NextBreakpoint(0, 0)) for a in addresses]
        if len(found) >= 2 and found[0].cfa is not None:
            temps.append((found[1].pc, NextBreakpoint(0, found[0].cfa)))
        return self._until(temps, timeout)

    def _until(self, temps, timeout) -> StopEvent:
        stops = self.shim.stops
        for address, temp in temps:
            stops.add_breakpoint(address, temp)
        try:
            return self.cont(timeout)
        finally:
            for address, temp in temps:
                stops.remove_breakpoint(address, temp)

    def __getattr__(self, name):
        """What reads the guest the same way in both phases (symbolize, disassemble, backtrace,
        resolve, ...) is the shim target's: the BSP stays the loaded VP on the one engine."""
        if name in ("shim", "kernel", "machine", "outcome", "kernel_stop"):
            raise AttributeError(name)
        return getattr(self.shim, name)

    def interrupt(self) -> None:
        if not self.in_kernel:
            return self.shim.interrupt()
        self.machine.engine.request_stop(StopRequest(INTERRUPTED))

    def _shim_stop(self, stop: StopEvent) -> StopEvent:
        if stop.reason == HANDOFF:                   # the BSP stands at the kernel's entry
            self._enter_kernel()
            symbols = (f"{len(self.kernel_symbols.symbols)} kernel symbols from kallsyms" if self.kernel_symbols
                       else f"no kernel symbols: {self.kernel_symbols_error}")
            stop.detail = f"kernel entry: handoff checked; the real kernel runs VP 0 (--linux real; {symbols})"
            self.kernel_stop = stop
        return stop

    def _resume(self, timeout: float | None) -> StopEvent:
        e = self.machine.engine
        if self.outcome is not None:
            return self.kernel_stop                  # the kernel is over: nothing runs any more
        self.shim.stops.arm_skip()                   # resuming at a breakpoint passes it
        limit = self.machine.config.timeout if timeout is None or math.isinf(timeout) else timeout
        status, detail, request = self.kernel.resume(limit)
        rip = e.reg("rip")
        if request is not None:
            Runner._rewind(e)
            stop = StopEvent(request.reason, 0, rip, request.detail, request.watch_address, request.watch_kind)
        elif status == "timeout":                    # the slice's limit: the kernel goes on when resumed
            stop = StopEvent("timeout", 0, rip, detail)
        else:
            self.outcome = self.kernel.finish(status, detail)
            reason = IDLE if status in CLEAN else FAULT
            stop = StopEvent(reason, 0, rip, f"the real kernel {status}: {self.outcome.panic or detail}")
        self.kernel_stop = stop
        return stop
