"""The debugger's view of a machine: VPs as threads, their registers and memory, breakpoints,
watchpoints, catchpoints, and stepping/continuing under the deterministic scheduler. This is
the API `hclsim step` and the gdb remote stub are built on.

VP state is read and written through the partition (hv/partition.py), which knows where it
lives.
"""
import math
import time

import capstone

from hclsim.cpu.pagetable import LEVEL_NAMES, translate, walk_steps
from hclsim.hv.partition import REGISTER_NAMES, PartitionError
from hclsim.hv.vp import EXTERNAL, HALTED, NOT_STARTED
from hclsim.debug.events import START, DebugError, StopEvent  # noqa: F401 (DebugError, StopEvent: re-exported)
from hclsim.debug import frames
from hclsim.debug.images import ImageMap
from hclsim.debug.runner import Runner
from hclsim.debug.stops import EXIT_CATCHES, NextBreakpoint, StopPoints
from hclsim.debug.watch import Watchpoints

REGISTER_ALIASES = {"pc": "rip", "sp": "rsp", "fp": "rbp", "eflags": "rflags"}
RUN_EVENTS = ("vtl-switch", "intercept")
EVENTS = RUN_EVENTS + EXIT_CATCHES
CR0_PG = 1 << 31
PAGE = 4096
MAX_INSN = 15

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True
_BRANCHES = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL)


def _branch_target(insn) -> int | None:
    """The immediate target of a call/jump/loop, if it has one."""
    if not any(insn.group(g) for g in _BRANCHES):
        return None
    ops = insn.operands
    return ops[0].imm & (2**64 - 1) if len(ops) == 1 and ops[0].type == capstone.x86.X86_OP_IMM else None


class DebugTarget:
    def __init__(self, machine):
        """machine: a hclsim.machine.Machine, built and not yet run (the BSP stands at the boot
        shim's first instruction). close() before machine.close() gives its engine back clean."""
        self.machine = machine
        self.images = ImageMap(machine)
        self.stops = StopPoints(machine, self.images)
        self.watches = Watchpoints(machine, self.images, self._page_tables)
        self.runner = Runner(machine, self.stops, self.watches)
        self.stops.watching = lambda: bool(self.watches.items)
        self.stops.pending_watch = self.watches.pending
        self.current = 0
        rip = self.registers(0)["rip"]
        self.last_stop = StopEvent(START, 0, rip, "the boot shim's first instruction")
        self.runner.reported = (0, rip)

    @property
    def last_fault_report(self) -> str | None:
        """The guest fault report (registers, page walk, code, serial) of the last "fault" stop."""
        return self.runner.last_fault_report

    @property
    def boot_result(self):
        """machine.take_handoff()'s BootResult, once the BSP reached the kernel entry."""
        return self.runner.boot_result

    def close(self) -> None:
        """Remove every hook of the debugger (the engine goes back to the pool with the machine)."""
        self.watches.close()
        self.stops.close()  # after the watchpoints: they keep the sites registered through the debugger

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- VPs ------------------------------------------------------------------------------
    def vp_indexes(self) -> list[int]:
        return list(range(len(self.machine.vps)))

    def _vp(self, i):
        i = self.current if i is None else i
        if not isinstance(i, int) or not 0 <= i < len(self.machine.vps):
            raise DebugError(f"no VP {i} (VPs 0-{len(self.machine.vps) - 1})")
        return self.machine.vps[i]

    def vp_state(self, i) -> str:
        return self._vp(i).state

    def vp_label(self, i) -> str:
        vp = self._vp(i)
        if vp.state == EXTERNAL:
            return f"VP {vp.index} Linux"
        role = "boot shim" if vp.index == 0 else ("sidecar" if self.machine.sidecar is not None else "AP")
        if vp.state == NOT_STARTED:
            pending = self.machine.partition.start_pending(vp.index)
            return f"VP {vp.index} {role} {'start pending (StartVp)' if pending else 'not started'}"
        label = f"VP {vp.index} {role} VTL{self.machine.hv.vps[vp.index].vtl}"
        return label + " halted" if vp.state == HALTED else label

    # ---- registers: through the partition (hv/partition.py), wherever they live ---------------
    def registers(self, i=None) -> dict[str, int]:
        """The VP's registers in the VTL it runs now."""
        return self.machine.partition.registers(self._vp(i).index)

    def set_register(self, i, name: str, value: int) -> None:
        name = REGISTER_ALIASES.get(name.lower().lstrip("$"), name.lower().lstrip("$"))
        if name not in REGISTER_NAMES:
            raise DebugError(f"unknown register {name!r}: one of {', '.join(REGISTER_NAMES)}")
        try:
            self.machine.partition.set_registers(self._vp(i).index, {name: value})
        except PartitionError as exc:
            raise DebugError(str(exc)) from None

    # ---- memory ---------------------------------------------------------------------------
    def _paging(self, vp) -> tuple[bool, int]:
        if self.machine.scheduler.loaded is vp:
            e = self.machine.engine
            return bool(e.reg("cr0") & CR0_PG), e.reg("cr3")
        regs = self.registers(vp.index)
        return bool(regs["cr0"] & CR0_PG), regs["cr3"]

    def _gpa_chunks(self, vp, addr: int, length: int, physical: bool):
        """(GPA, bytes) pieces of [addr, addr+length) as VP vp sees it."""
        mem = self.machine.mem
        if physical:
            if not mem.contains(addr, length):
                raise DebugError(f"GPA range [{addr:#x}, {addr + length:#x}) is outside guest RAM")
            yield addr, length
            return
        paging, cr3 = self._paging(vp)
        ram = mem.array()
        done = 0
        while done < length:
            va = (addr + done) & ((1 << 64) - 1)
            pa = translate(ram, cr3, va) if paging else va
            if pa < 0 or not mem.contains(pa):
                why = LEVEL_NAMES.get(pa, "outside guest RAM")
                raise DebugError(f"{va:#x} is not mapped in VP {vp.index}'s page tables ({why})")
            n = min(length - done, PAGE - (va & (PAGE - 1)), mem.size - pa)
            yield pa, n
            done += n

    def read_memory(self, i, addr: int, length: int, physical: bool = False) -> bytes:
        vp = self._vp(i)
        return b"".join(self.machine.mem.read(pa, n) for pa, n in self._gpa_chunks(vp, addr, length, physical))

    def write_memory(self, i, addr: int, data: bytes, physical: bool = False) -> None:
        vp = self._vp(i)
        chunks = list(self._gpa_chunks(vp, addr, len(data), physical))  # all mapped before any write
        done = 0
        for pa, n in chunks:
            self.machine.mem.write(pa, data[done:done + n])
            self._code_written(pa, n)
            done += n

    def _code_written(self, gpa: int, length: int) -> None:
        """Host writes bypass Unicorn's self-modifying-code detection: drop what was translated
        from those bytes, and the instruction counts cached for blocks running into them."""
        if not self.images.executable(gpa, length):
            return
        engine = self.machine.engine
        for va in self.images.aliases_of(gpa):
            engine.state.invalidate_blocks(max(0, va - PAGE), va + length)
        if engine.translate(gpa) == gpa:
            engine.code_changed(gpa, gpa + length)
        else:
            engine.uc.ctl_flush_tb()

    def page_walk(self, i, va: int) -> list[tuple[str, int, int]]:
        """pagetable.walk_steps rows (level, entry GPA, entry value; -1 outside RAM); [] without paging."""
        paging, cr3 = self._paging(self._vp(i))
        return walk_steps(self.machine.mem.array(), cr3, va) if paging else []

    # ---- stop points ----------------------------------------------------------------------
    def add_breakpoint(self, addr: int) -> None:
        self.stops.add_breakpoint(addr)

    def remove_breakpoint(self, addr: int) -> None:
        if None not in self.stops.breakpoints.get(addr, []):
            raise DebugError(f"no breakpoint at {addr:#x}")
        self.stops.remove_breakpoint(addr)

    def breakpoints(self) -> list[int]:
        return sorted(a for a, entries in self.stops.breakpoints.items() if None in entries)

    def add_watchpoint(self, addr: int, length: int, kind: str = "w", physical: bool = False) -> None:
        self.watches.add(addr, length, kind, physical)
        self.stops.sync()

    def remove_watchpoint(self, addr: int, length: int, kind: str = "w", physical: bool = False) -> None:
        self.watches.remove(addr, length, kind, physical)
        self.stops.sync()

    def break_on(self, event: str, enabled: bool = True) -> None:
        """Stop at "vtl-switch" (after a VTL return or entry), "intercept" (after a VTL0 intercept's
        VTL entry) or before an exiting instruction: "hlt", "io", "cpuid", "msr", "hypercall",
        "pause", "ipi" (a WRMSR to the x2APIC ICR)."""
        if event in RUN_EVENTS:
            (self.runner.events.add if enabled else self.runner.events.discard)(event)
        elif event in EXIT_CATCHES:
            self.stops.set_catch(event, enabled)
        else:
            raise DebugError(f"unknown event {event!r}: one of {', '.join(EVENTS)}")

    def events(self) -> list[str]:
        return sorted(self.runner.events | self.stops.catches)

    # ---- running ----------------------------------------------------------------------------
    def _deadline(self, timeout) -> float:
        return math.inf if timeout is None else time.monotonic() + timeout

    def _turn(self, vp) -> StopEvent | None:
        """Make vp the VP whose turn it is (as if the scheduler had picked it)."""
        runner, sched = self.runner, self.machine.scheduler
        if runner.slice is vp and sched.loaded is vp:
            return None
        if vp.state == EXTERNAL:
            raise DebugError(f"VP {vp.index} is run by the Linux stand-in, not by the simulator")
        if not sched._runnable(vp):
            raise DebugError(f"VP {vp.index} is {vp.state}: it cannot run now"
                             + (" (an interrupt wakes it: continue)" if vp.state == HALTED else ""))
        sched.next_index = (vp.index + 1) % len(self.machine.vps)
        return runner.begin(vp)

    def step(self, i=None, count: int = 1, timeout: float | None = None) -> StopEvent:
        """Run exactly count instructions of VP i (a REP string instruction is one); the other
        VPs do not run. A VP exit on the way (VTL switch, halt, PAUSE yield) ends the step."""
        vp = self._vp(i)
        if count < 1:
            raise DebugError("step count must be at least 1")
        stop = self._turn(vp)
        if stop is not None:
            return self._stopped(stop)
        self.stops.begin_step(count)
        self.watches.sync()
        try:
            stop = self.runner.step(self._deadline(self.machine.config.timeout if timeout is None else timeout))
        finally:
            self.stops.end_step()
        return self._stopped(stop)

    def next(self, i=None, timeout: float | None = None) -> StopEvent:
        """step, but a CALL runs until it returns to this stack depth (the other VPs run meanwhile)."""
        vp = self._vp(i)
        regs = self.registers(vp.index)
        insn = self.disassemble(vp.index, regs["rip"], 1)
        if not insn or not insn[0][2].startswith("call"):
            return self.step(vp.index, 1, timeout)
        stop = self._turn(vp)
        if stop is not None:
            return self._stopped(stop)
        back = NextBreakpoint(vp.index, regs["rsp"])
        ret = regs["rip"] + len(insn[0][1])
        self.stops.add_breakpoint(ret, back)
        try:
            return self.cont(timeout)
        finally:
            self.stops.remove_breakpoint(ret, back)

    def cont(self, timeout: float | None = None) -> StopEvent:
        """Run every VP under the scheduler until a stop point, a fault, the handoff, idle,
        interrupt() or the timeout."""
        self.stops.end_stepping()
        self.watches.sync()
        return self._stopped(self.runner.cont(self._deadline(timeout)))

    def interrupt(self) -> None:
        """Thread-safe: the running cont() returns "interrupted" soon."""
        self.runner.interrupt()

    def _stopped(self, stop: StopEvent) -> StopEvent:
        if stop.vp < 0:
            stop.vp, stop.rip = self.current, self.registers(self.current)["rip"]
        self.current = stop.vp
        self.last_stop = stop
        self.runner.reported = (stop.vp, stop.rip)
        return stop

    def _page_tables(self) -> set[int]:
        """CR3 of every VP's VTL2 and VTL0 (where paging is on), for virtual watchpoints."""
        return self.machine.partition.paging_roots()

    # ---- code and symbols -------------------------------------------------------------------
    def symbolize(self, addr: int) -> str | None:
        return self.machine.symbolize(addr) or self.images.symbolize(addr)

    def source_line(self, addr: int) -> tuple[str, int] | None:
        return self.images.source_line(addr)

    def resolve(self, location: str) -> int:
        """An address from "0x1234", "*0x1234", "$rip+8", a symbol ("shim_main",
        "sidecar:ap_main+0x10") or "file.c:123" (the lowest address of that line's code)."""
        return self.locations(location)[0]

    def locations(self, location: str) -> list[int]:
        """Every address location names: a symbol or source line at each alias of its image
        (the sidecar's code runs at its identity alias first, then at its high alias)."""
        text = location.strip().lstrip("*").strip()
        if not text:
            raise DebugError("no location given")
        file, _, line = text.rpartition(":")
        if line.isdigit() and "." in file:
            found = self.images.line_addresses(file, int(line))
            return [a for addr in found for a in self.images.aliases_of(addr)]
        terms = text.replace("-", "+-").split("+")
        if not terms[0]:
            raise DebugError(f"cannot read location {location!r}")
        base = self._term(terms[0], location)
        offset = sum(self._number(t, location) for t in terms[1:] if t)
        return [(a + offset) & ((1 << 64) - 1) for a in base]

    def _term(self, term: str, location: str) -> list[int]:
        term = term.strip()
        if term.startswith("$"):
            name = REGISTER_ALIASES.get(term[1:].lower(), term[1:].lower())
            if name not in REGISTER_NAMES:
                raise DebugError(f"unknown register {term!r}")
            return [self.registers(self.current)[name]]
        if term[:1].isdigit():
            return [self._number(term, location)]
        found = self.images.symbol_addresses(term)
        if len(found) > 1:
            images = [self.images.at(a)[0].name for a in found]
            raise DebugError(f"{term} is in {' and '.join(images)}: say {images[0]}:{term}")
        if not found:
            raise DebugError(f"unknown symbol or address {term!r}")
        return [a for addr in found for a in self.images.aliases_of(addr)]

    @staticmethod
    def _number(text: str, location: str) -> int:
        try:
            return int(text.strip(), 0)
        except ValueError:
            raise DebugError(f"cannot read location {location!r}") from None

    def disassemble(self, i, addr: int, count: int) -> list[tuple]:
        """[(address, bytes, "mnemonic op_str", symbol, (file, line) or None)] of count instructions."""
        vp = self._vp(i)
        code = b""
        want = count * MAX_INSN
        while len(code) < want:  # as far as mapped
            va = addr + len(code)
            try:
                code += self.read_memory(vp.index, va, min(want - len(code), PAGE - (va & (PAGE - 1))))
            except DebugError:
                if not code:
                    raise
                break
        out = []
        for insn in _cs.disasm(code, addr, count):
            text = f"{insn.mnemonic} {insn.op_str}".strip()
            target = _branch_target(insn)
            if target is not None and self.symbolize(target):
                text += f" <{self.symbolize(target)}>"      # as gdb: call 0x84149d0 <log_msg>
            out.append((insn.address, bytes(insn.bytes), text, self.symbolize(insn.address),
                        self.source_line(insn.address)))
        return out

    def instruction_at(self, i, addr: int) -> tuple[int, int, str] | None:
        """(start, length, text) of the instruction covering addr, decoding its function from
        the start; None when addr is outside any function (nothing to decode from)."""
        span = self.function_span(addr)
        if span is None or span[1] - span[0] > 1 << 16:
            return None
        try:
            insns = self.disassemble(i, span[0], (addr - span[0]) + 1)
        except DebugError:
            return None
        for a, raw, text, _sym, _line in insns:
            if a <= addr < a + len(raw):
                return a, len(raw), text
            if a > addr:
                break
        return None

    def function_span(self, addr: int) -> tuple[int, int] | None:
        return self.images.function_span(addr)

    def line_span(self, addr: int):
        return self.images.line_span(addr)

    def variable(self, name: str):
        """(address, variables.Variable) of a global variable of the firmware, or None."""
        return self.images.variable(name)

    def backtrace(self, i=None, limit: int = frames.MAX_FRAMES) -> tuple[list, str]:
        """(frames, why the walk ended): the VP's call stack from its DWARF CFI (frames.py)."""
        vp = self._vp(i)
        return frames.unwind(self.images, lambda va: int.from_bytes(self.read_memory(vp.index, va, 8), "little"),
                             self.registers(vp.index), limit)

    def finish(self, i=None, timeout: float | None = None) -> StopEvent:
        """Run until the current function of VP i returns to its caller (the other VPs run)."""
        vp = self._vp(i)
        found, why = self.backtrace(vp.index, 2)
        if len(found) < 2 or found[0].cfa is None:
            raise DebugError(f"\"finish\" not meaningful here: {why}")
        stop = self._turn(vp)
        if stop is not None:
            return self._stopped(stop)
        back = NextBreakpoint(vp.index, found[0].cfa)
        self.stops.add_breakpoint(found[1].pc, back)
        try:
            return self.cont(timeout)
        finally:
            self.stops.remove_breakpoint(found[1].pc, back)

    def run_to(self, i, addresses: list[int], timeout: float | None = None) -> StopEvent:
        """`advance`/`until LOC`: run until VP i reaches one of addresses, or its current
        function returns (whichever comes first); the other VPs run meanwhile."""
        vp = self._vp(i)
        found, _why = self.backtrace(vp.index, 2)
        stop = self._turn(vp)
        if stop is not None:
            return self._stopped(stop)
        temps = [(a, NextBreakpoint(vp.index, 0)) for a in addresses]
        if len(found) >= 2 and found[0].cfa is not None:
            temps.append((found[1].pc, NextBreakpoint(vp.index, found[0].cfa)))
        for a, t in temps:
            self.stops.add_breakpoint(a, t)
        try:
            return self.cont(timeout)
        finally:
            for a, t in temps:
                self.stops.remove_breakpoint(a, t)
