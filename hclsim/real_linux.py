"""`hclsim boot --linux real`: a real Linux kernel takes the boot shim's handoff.

The shim runs as always; at the kernel entry the BSP goes on into the real kernel (startup_64,
RSI = the shim's boot_params: its e820, command line and initrd) on the same engine, with what a
PC gives a kernel booted `noapic nolapic`: the 8259 PICs, the 8254 PIT on IRQ 0 (and port 0x61),
the CMOS RTC, the four legacy 16550s on IRQ 4 and 3 (devices/). The host delivers exceptions,
interrupts and SYSCALL through the kernel's IDT (cpu/delivery.py). Time is virtual: the PIT and
the RTC run on the instructions retired (a 1 GHz virtual CPU), the run stops itself at the
next timer event (a deadline in the engine's block hook, never another thread), and a HLT with
interrupts on skips to the next event. The same kernel, initrd and command line therefore give
the same serial output and instruction counts every time.

The run ends when the kernel powers off, halts (a HLT with interrupts off: `reboot: System
halted`; without ACPI Linux turns a power-off into a halt), panics or triple-faults (`reboot=t`
after a panic with `panic=-1`), or at the timeout. Milestones are the console lines that mark
the boot's stages, each with the instructions retired and the wall time when it was printed.
"""
import gc
import re
import time

import numpy as np
from dataclasses import dataclass, field

from hclsim import HclsimError
from hclsim.cpu import engine as eng
from hclsim.cpu import block_clock, fastpath
from hclsim.cpu.delivery import Delivery, TripleFault
from hclsim.cpu.virtual_tsc import VirtualTsc
from hclsim.debug.events import StopRequest
from hclsim.devices.bus import Bus
from hclsim.devices.cmos_rtc import CmosRtc
from hclsim.devices.pic8259 import Pic8259
from hclsim.devices.pit8254 import Pit8254
from hclsim.devices.uart16550 import Uart16550
from hclsim.devices.virtual_clock import NS_PER_SECOND, VirtualClock

# config.REAL_LINUX_BOOTARGS, what the host's device tree adds to the command line: this
# platform has no local APIC or I/O APIC (noapic nolapic), VTL2 has no memory below 1 MiB for the
# real mode trampoline (OpenHCL blacklists init_real_mode; 6.1 calls it do_init_real_mode), the
# test initrd's program is /init, and KASLR off keeps runs comparable.
LEGACY_UARTS = (("COM1", 0x3F8, 4), ("COM2", 0x2F8, 3), ("COM3", 0x3E8, 4), ("COM4", 0x2E8, 3))
IRQ_WINDOW = (500, 50_000)    # instructions between looks for IF while an interrupt waits: from the first,
                              # doubled while IF stays off, up to the last. Spin locks with IRQs off last
                              # hundreds (a UART interrupt waiting 50k each time lost /init's last lines at
                              # the halt); the boot's early part runs with IF off for millions (a fixed 2k
                              # window made 44k slices there: ~1 s of loop overhead)
PORT_IO_NS = 1000             # virtual time a port access takes: ~1 us on ISA (Linux's io_delay writes
                              # port 0x80 for it); 1 ns made the TSC calibration poll the PIT 45k times, now 17k
MAX_SLICE = 50_000_000        # instructions a slice may run (~0.7 s): the timeout is looked at between
                              # slices; never a stop from another thread, whose moment would vary
MILESTONES = (                # (name, what starts the console line's text)
    ("linux_version", "Linux version "),
    ("command_line", "Command line: "),
    ("e820", "BIOS-e820: "),
    ("smpboot", "smpboot: "),
    ("free_initmem", "Freeing unused kernel image"),
    ("run_init", re.compile(r"Run \S+ as init process")),
    ("init", "init: "),
    ("power_down", "reboot: Power down"),
    ("halted", "reboot: System halted"),
    ("panic", "Kernel panic - not syncing: "),
)
KMSG_PREFIX = re.compile(r"^(<\d+>)?(\[\s*\d+\.\d+\] )?")


class RealLinuxError(HclsimError):
    pass


@dataclass
class Milestone:
    name: str
    line: str
    instructions: int
    wall_s: float


@dataclass
class RealLinuxResult:
    status: str                    # "halted", "power-off", "panic", "triple-fault", "timeout", "idle", "fault"
    milestones: list
    instructions: int              # in the kernel (from the handoff)
    wall_s: float
    console: bytes                 # what the kernel's console port received
    e820: list = field(default_factory=list)        # the BIOS-e820 lines as Linux printed them
    command_line: str | None = None
    panic: str | None = None
    detail: str = ""
    exceptions: dict = field(default_factory=dict)
    interrupts: int = 0
    syscalls: int = 0
    tsc_reads: int = 0
    idle_ns: int = 0               # virtual time spent halted
    port_ios: int = 0
    port_io_ns: int = 0            # virtual time port I/O took (PORT_IO_NS each)
    synthetic_msrs: dict | None = None   # with hyperv: reads, writes and refused (#GP) accesses

    def first(self, name: str):
        return next((m for m in self.milestones if m.name == name), None)


class _Console:
    """Lines of the console port, milestones noted as they complete."""

    def __init__(self, now):
        self.now, self.buf, self.lines, self.milestones = now, bytearray(), [], []
        self.data = bytearray()

    def feed(self, data: bytes) -> None:
        self.data += data
        self.buf += data
        while b"\n" in self.buf:
            raw, _, rest = bytes(self.buf).partition(b"\n")
            self.buf[:] = rest
            self._line(raw.decode("utf-8", "replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        text = KMSG_PREFIX.sub("", line, count=1)
        self.lines.append(text)
        for name, start in MILESTONES:
            hit = start.search(text) if isinstance(start, re.Pattern) else text.startswith(start)
            if hit and (name in ("e820", "init") or all(m.name != name for m in self.milestones)):
                instructions, wall = self.now()
                self.milestones.append(Milestone(name, text, instructions, wall))


class RealLinux:
    """The BSP of machine (standing at the kernel entry after run_to_handoff) into a real kernel."""

    def __init__(self, machine, console_port: str = "COM3", on_serial=None, hyperv: bool = False,
                 debugger: bool = False):
        """hyperv: show the kernel the Hyper-V CPUID leaves and serve its synthetic MSRs and
        hypercalls from the hypervisor model (hclsim/real_linux_hv.py), else a bare PC.
        debugger: a debugger's code hooks will stop the kernel (hclsim/debug/kernel_target.py)."""
        self.machine, self.engine = machine, machine.engine
        # Stops come only at blocks' starts (the deadline; a device's interrupt sets it), so
        # Unicorn's check after every load and store can go (cpu/uc_internals.py): ~10% of a
        # boot. Code hooks that stop or write RIP (a debugger's, the synthetic MSRs') need it,
        # and a run is the same with or without it.
        self.memory_exit_checks = hyperv or debugger
        self.console_port, self.on_serial = console_port, on_serial
        self.running = False                            # inside the engine's run (a device may stop it)
        self.stopped_by_debugger = False                # the last slice ended at a debugger's stop
        self.idle = 0                                   # instructions' worth of time not from instructions:
        self.halted = 0                                 # ... halted (skipped to the next timer event)
        self.start_icount = self.engine.counters()["instructions"]
        self.clock = VirtualClock(lambda: self._now() + self.idle)
        self.port_ios = 0
        self._gc_was_enabled = False                    # _take_over pauses the collector; _give_back resumes it
        self.port_io_units = PORT_IO_NS * self.clock.hz // NS_PER_SECOND
        self.t0 = time.perf_counter()
        self.console = _Console(lambda: (self._now() - self.start_icount, time.perf_counter() - self.t0))
        self.pic = Pic8259("pic", intr=self._intr)
        self.pit = Pit8254(self.clock, irq=lambda level: self.pic.set_irq(0, level))
        self.rtc = CmosRtc(self.clock, irq=lambda level: self.pic.set_irq(8, level))
        self.bus = Bus("pc")
        for dev in (self.pic, self.pit, self.rtc):
            self.bus.add(dev)
        for name, port, irq in LEGACY_UARTS:
            self.bus.add(Uart16550(name, port, sink=self._serial, native=False,
                                   irq=lambda level, irq=irq: self.pic.set_irq(irq, level)))
        self.delivery = Delivery(self.engine)
        self.tsc = VirtualTsc(self.engine)
        self.interrupts = 0
        self.irq_window = 0                             # the current look-again window (IRQ_WINDOW)
        self.hyperv = None
        if hyperv:
            from hclsim.real_linux_hv import SyntheticMsrs
            self.hyperv = SyntheticMsrs(machine, self.delivery)

    def _intr(self, level: bool) -> None:
        """The PIC's INTR output rose (a device raised its line during the run): end the slice
        where the next block starts (a deadline already passed), so the interrupt is taken about
        when it was raised, at a block's start whether or not Unicorn checks for stops after
        loads and stores."""
        if level and self.running:
            self.engine.state.buf[fastpath.H_DEADLINE] = 1

    def _port_io(self, port: int, size: int, value: int, is_in: bool) -> int:
        """Port I/O takes PORT_IO_NS of virtual time, as an ISA access does: the clock, the TSC
        and the slice's deadline move with it."""
        h = self.engine.state.buf
        self.port_ios += 1
        self.idle += self.port_io_units
        h[fastpath.H_TSC_IDLE] = self.idle
        if h[fastpath.H_DEADLINE] > 1:
            h[fastpath.H_DEADLINE] = max(self._now() + 1, int(h[fastpath.H_DEADLINE]) - self.port_io_units)
        return self.bus.engine_io(port, size, value, is_in)

    def _retired(self) -> int:
        """The instructions retired (exact between slices)."""
        return int(self.engine.state.buf[fastpath.H_ICOUNT])

    def _now(self) -> int:
        """The instructions retired as virtual time reads them inside a slice: where the current
        straight-line run began (block_clock.run_start), the same however Unicorn split it."""
        return block_clock.run_start(self.engine.state.buf)

    def _serial(self, name: str, data: bytes) -> None:
        self.machine.serial.setdefault(name, bytearray()).extend(data)
        if name == self.console_port:
            self.console.feed(data)
        if self.on_serial is not None:
            self.on_serial(name, data)

    # ---- the platform for the kernel ----------------------------------------------------------
    def _take_over(self) -> None:
        e = self.engine
        # Python's cyclic collector ran through the millions of objects the imports made (numba,
        # llvmlite) every few thousand port accesses: ~4% of the kernel phase. Nothing here makes
        # cycles that must go before the run ends.
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        for flush in e.after_run:
            flush()
        e.after_run = []
        self.bus.attach(e)
        e.io_handler = self._port_io
        if self.hyperv is None:
            plain_cpuid(e.state.cpuid_table)
        else:
            one_package(e.state.cpuid_table)
            e.state.buf[fastpath.H_MSR_TRAP] = 1
        e.uc.ctl_exits_enabled(False)         # no exit address: none can be revalidated (CR2, #DF)
        e.uc.ctl_flush_tb()
        e.set_memory_exit_checks(self.memory_exit_checks)
        self.delivery.install()
        self.tsc.on()

    def _give_back(self) -> None:
        e = self.engine
        if self._gc_was_enabled:
            gc.enable()
            self._gc_was_enabled = False
        self.delivery.uninstall()
        self.tsc.off()
        if self.hyperv is not None:
            self.hyperv.close()
            e.state.buf[fastpath.H_MSR_TRAP] = 0
        e.state.buf[fastpath.H_DEADLINE] = 0
        e.set_memory_exit_checks(True)
        e.uc.ctl_exits_enabled(True)
        e.set_exits(e.exits, force=True)

    # ---- running -------------------------------------------------------------------------
    def run(self, timeout: float = 600.0) -> RealLinuxResult:
        self.start()
        try:
            status, detail, _request = self.resume(timeout)
        except BaseException:
            self._give_back()
            raise
        return self.finish(status, detail)

    def start(self) -> None:
        """Give the engine the kernel's platform (the debugger then resumes and finishes)."""
        self._take_over()

    def finish(self, status: str, detail: str) -> RealLinuxResult:
        self._give_back()
        return self._result(status, detail)

    def resume(self, timeout: float) -> tuple[str, str, object]:
        """Run until the kernel ends ((status, detail, None)) or a debugger's hook stops it
        ("debug", "", its StopRequest; the VP stands before the instruction it stopped at).
        Resumed after a debugger's stop, the slice goes on as if it had not stopped: no
        interrupt taken there, the same deadline (so the run is the same as without it)."""
        return self._loop(timeout, resumed=self.stopped_by_debugger)

    def _loop(self, timeout: float, resumed: bool = False) -> tuple[str, str, object]:
        e, h = self.engine, self.engine.state.buf
        deadline_wall = time.perf_counter() + timeout
        self.stopped_by_debugger = False
        if resumed:                            # the slice a debugger stopped goes on as it was
            end = self._slice()
            if end is not None:
                return end
        while True:
            self.pit.update()
            self.rtc.update()
            if self.pic.has_interrupt() and e.reg("rflags") & (1 << 9):
                try:
                    self.delivery.interrupt(self.pic.acknowledge())
                except TripleFault as exc:
                    return "triple-fault", str(exc), None
                self.interrupts += 1
                self.irq_window = 0
            if time.perf_counter() > deadline_wall:
                return "timeout", f"no power off within {timeout:g} s", None
            retired = self._retired()
            next_ns = self._next_event_ns()
            stop = retired + self.clock.units_until(next_ns) if next_ns is not None else 0
            if self.pic.has_interrupt():       # IF is off: look again soon
                window = self.irq_window = min(2 * self.irq_window, IRQ_WINDOW[1]) if self.irq_window else IRQ_WINDOW[0]
                stop = min(stop, retired + window) if stop else retired + window
            else:
                self.irq_window = 0
            stop = min(stop, retired + MAX_SLICE) if stop else retired + MAX_SLICE
            h[fastpath.H_DEADLINE] = max(stop, retired + 1)
            end = self._slice()
            if end is not None:
                return end

    def _slice(self):
        """One engine run; None to go on, else the end (status, detail, debugger's request)."""
        e, h = self.engine, self.engine.state.buf
        self.running = True
        try:
            exit = e.run()
        except TripleFault as exc:                         # raised in the exception hook
            return "triple-fault", str(exc), None
        finally:
            self.running = False
        if exit.kind == eng.EXIT_STOP:
            reason = exit.stop_reason
            if isinstance(reason, TripleFault):
                return "triple-fault", str(reason), None
            if isinstance(reason, BaseException):
                raise reason
            if isinstance(reason, StopRequest):           # the debugger's (hclsim/debug/kernel_target.py)
                self.stopped_by_debugger = True
                return "debug", "", reason
            if reason == eng.STOP_PENDING:
                self._arm_block()
            return None                                    # the deadline (or a device's interrupt)
        if exit.kind == eng.EXIT_HLT:
            if not e.reg("rflags") & (1 << 9):
                return (*self._halted(), None)
            next_ns = self._next_event_ns()
            if next_ns is None and not self.pic.has_interrupt():
                return "idle", "the kernel halted with interrupts on and no timer armed", None
            if next_ns is not None and not self.pic.has_interrupt():   # skip the idle time to the timer
                skipped = self.clock.units_until(next_ns)
                self.idle += skipped
                self.halted += skipped
                h[fastpath.H_TSC_IDLE] = self.idle
            return None
        return "fault", exit.message or f"{exit.kind} at {exit.rip:#x}", None

    def _arm_block(self) -> None:
        """A block that (with hyperv) touches an MSR is about to run: hook its MSR instructions."""
        h = self.engine.state.buf
        address, size = int(h[fastpath.H_PENDING]) & 0xFFFFFFFFFFFFFFFF, int(h[fastpath.H_PENDING_SIZE])
        h[fastpath.H_PENDING] = h[fastpath.H_PENDING_SIZE] = 0
        code = np.frombuffer(self.engine.read_virtual(address, size), np.uint8)
        if self.hyperv is not None:
            self.hyperv.hook_block(address, code)
        self.engine.state.arm_block(address, size)

    def _next_event_ns(self):
        events = [t for t in (self.pit.next_event_ns(), self.rtc.next_event_ns()) if t is not None]
        return min(events) if events else None

    def _halted(self) -> tuple[str, str]:
        names = {m.name for m in self.console.milestones}
        if "panic" in names:
            return "panic", "the kernel halted after a panic"
        if "power_down" in names:
            return "power-off", "the kernel powered off"
        return "halted", "the kernel halted (a HLT with interrupts off)"

    def _result(self, status: str, detail: str) -> RealLinuxResult:
        c = self.console
        panic = next((m.line for m in c.milestones if m.name == "panic"), None)
        if status == "triple-fault" and panic:
            status = "panic"                                # reboot=t after panic=-1: the reset
        cmd = next((m.line[len("Command line: "):] for m in c.milestones if m.name == "command_line"), None)
        return RealLinuxResult(
            status=status, milestones=list(c.milestones), instructions=self._retired() - self.start_icount,
            wall_s=time.perf_counter() - self.t0, console=bytes(c.data),
            e820=[m.line for m in c.milestones if m.name == "e820"], command_line=cmd, panic=panic, detail=detail,
            exceptions={v: n for v, n in sorted(self.delivery.counts.items()) if v < 32}, interrupts=self.interrupts, syscalls=self.delivery.syscalls,
            tsc_reads=int(self.engine.state.buf[fastpath.H_TSC_READS]),
            synthetic_msrs=None if self.hyperv is None else {"reads": self.hyperv.reads, "writes": self.hyperv.writes,
                                                             "refused": self.hyperv.faults},
            idle_ns=self.halted * NS_PER_SECOND // self.clock.hz, port_ios=self.port_ios,
            port_io_ns=self.port_ios * PORT_IO_NS)


def one_package(table) -> None:
    """One logical processor per package in the topology leaves (Linux divides by their counts)."""
    for row in table:
        if row[0] in (0xB, 0x1F) and row[1] == 1:
            row[3] = 1


def plain_cpuid(table) -> None:
    """The CPUID a kernel sees in the kernel phase: no hypervisor (the Hyper-V leaves hidden and
    the hypervisor bit clear, so Linux takes the bare-metal path), one logical processor per
    package (Linux divides by the topology leaves' counts)."""
    one_package(table)
    for row in table:
        if row[0] == 1:
            row[4] &= ~(1 << 31)
        elif 0x40000000 <= row[0] < 0x50000000:
            row[0] = -2                                     # a leaf no one asks for
