"""`hclsim step`: a gdb-like prompt over the debugger core (hclsim.debug.target) for stepping
through the boot shim and the sidecar instruction by instruction.

The machine stops at the boot shim's first instruction. Commands are read from the prompt
(readline, history in ~/.hclsim_history) or, with --script FILE / -x CMD, run in order and then
the session ends (like gdb -batch). A bad command prints one error line and the session goes on.
"""
import cmd
import os
import sys
import threading

from hclsim import HclsimError
from hclsim.debug import display
from hclsim.debug.events import BREAKPOINT, EVENT, FAULT, START, WATCHPOINT, DebugError, StopEvent
from hclsim.debug.images import short_path
from hclsim.debug.source_cmds import SourceCommands
from hclsim.debug.target import EVENTS, REGISTER_NAMES, DebugTarget

HISTORY = os.path.expanduser("~/.hclsim_history")
EXIT_COMMAND_FAILED, EXIT_GUEST_FAULT = 1, 2
WATCH_KINDS = {"watch": "w", "rwatch": "r", "awatch": "a"}


def add_parser(sub, add_boot_options) -> None:
    p = sub.add_parser("step", help="step through the boot shim and sidecar at a gdb-like prompt")
    add_boot_options(p)
    p.add_argument("--linux", choices=["stand-in", "real"], default="stand-in",
                   help="after the handoff: stop there (the stand-in, default), or follow the BSP into the "
                        "--kernel image itself (real)")
    p.add_argument("--hyperv", action="store_true", help="with --linux real: the kernel sees the Hyper-V interface")
    p.add_argument("--script", metavar="FILE", help="run the commands in FILE, then exit")
    p.add_argument("-x", dest="commands", action="append", default=[], metavar="CMD",
                   help="run CMD (repeatable, after --script), then exit")
    p.add_argument("--quiet", action="store_true", help="do not echo the guest's serial output")
    p.add_argument("--snapshot", metavar="FILE",
                   help="go on from a snapshot (the `snapshot FILE` command's) instead of a new boot; "
                        "the boot options are the snapshot's")


class StepShell(SourceCommands, cmd.Cmd):
    prompt = "(hclsim) "
    intro = None

    def __init__(self, target: DebugTarget, out, timeout: float):
        super().__init__(stdout=out)
        self.target, self.out, self.timeout = target, out, timeout
        self.points: dict[int, tuple] = {}     # number -> ("break", addrs, text) | ("watch", key, text) | ("catch", event, text)
        self.next_point = 1
        self.x_format = (1, "x", "w")
        self.failed = self.faulted = False
        self.serial_open = False               # the guest's serial output ended mid-line

    # ---- plumbing ---------------------------------------------------------------------------
    def say(self, *lines: str) -> None:
        if self.serial_open:
            self.out.write("\n")
            self.serial_open = False
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()

    def serial(self, _name: str, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        self.out.write(text)
        self.out.flush()
        self.serial_open = not text.endswith("\n")

    def onecmd(self, line: str) -> bool:
        if line.strip():
            self.forget_listing(line)
        try:
            return super().onecmd(line)
        except (HclsimError, ValueError) as exc:
            self.failed = True
            self.say(f"error: {exc}")
        except Exception as exc:  # a bug must not end the session with a traceback
            self.failed = True
            self.say(f"error: internal error: {type(exc).__name__}: {exc}")
        return False

    def default(self, line: str) -> None:
        raise DebugError(f"unknown command {line.split()[0]!r} (help lists the commands)")

    def emptyline(self) -> None:
        if self.lastcmd.split()[:1] and self.lastcmd.split()[0] in ("si", "stepi", "ni", "nexti", "x", "list",
                                                                 "s", "step", "n", "next"):
            self.onecmd(self.lastcmd)  # gdb repeats these on Enter

    def _run(self, action):
        """Run action() (a step or continue) in a worker thread, so Ctrl-C can interrupt it."""
        result, done = {}, threading.Event()

        def work():
            try:
                result["stop"] = action()
            except BaseException as exc:
                result["error"] = exc
            finally:
                done.set()
        threading.Thread(target=work, name="hclsim-step-run", daemon=True).start()
        while not done.is_set():  # not Thread.join: a Ctrl-C inside it can mark the thread finished
            try:
                done.wait(0.1)
            except KeyboardInterrupt:
                self.serial_open = True  # the terminal echoed ^C: start the stop report on a new line
                self.target.interrupt()
        if "error" in result:
            raise result["error"]
        self._show(result["stop"])
        return result["stop"]

    def _show(self, stop) -> None:
        point = None
        if stop.reason == BREAKPOINT:
            point = next((f"Breakpoint {n}" for n, p in self.points.items() if p[0] == "break" and stop.rip in p[1]), None)
        elif stop.reason == WATCHPOINT:
            point = next((f"Hardware watchpoint {n}" for n, p in self.points.items() if p[0] == "watch"
                          and p[1][0] <= stop.watch_address < p[1][0] + p[1][1]), None)
        elif stop.reason == EVENT:
            point = next((f"Catchpoint {n}" for n, p in self.points.items() if p[0] == "catch"
                          and (p[1] in stop.detail or p[1] in ("vtl-switch", "intercept") and "VTL" in stop.detail)), None)
        if stop.reason == FAULT:
            self.faulted = True
        self.say(*display.stop_lines(self.target, stop, point))

    @staticmethod
    def _count(arg: str) -> int:
        arg = arg.strip()
        if not arg:
            return 1
        if not arg.isdigit() or int(arg) < 1:
            raise DebugError(f"expected a count, got {arg!r}")
        return int(arg)

    # ---- running ----------------------------------------------------------------------------
    def do_stepi(self, arg):
        """stepi [N]: run N instructions (default 1) of the current VP; the others do not run."""
        count = self._count(arg)
        self._run(lambda: self.target.step(self.target.current, count))

    def do_nexti(self, arg):
        """nexti [N]: like stepi, but a call runs until it returns (other VPs run meanwhile)."""
        count = self._count(arg)

        def nexts():
            for _ in range(count):
                stop = self.target.next(self.target.current, timeout=self.timeout)
                if stop.reason != "step":
                    break
            return stop
        self._run(nexts)

    def do_continue(self, arg):
        """continue: run every VP until a breakpoint, watchpoint, catchpoint, the kernel handoff,
        a fault, idle or Ctrl-C."""
        self._run(lambda: self.target.cont(self.timeout))

    do_si, do_ni, do_c = do_stepi, do_nexti, do_continue

    # ---- stop points --------------------------------------------------------------------------
    def _add_point(self, kind: str, what, text: str) -> int:
        n = self.next_point
        self.points[n] = (kind, what, text)
        self.next_point += 1
        return n

    def do_break(self, arg):
        """break LOC: stop before any VP executes LOC (0x1234, *0x1234, symbol, image:symbol,
        file.c:123, $rip+8)."""
        if not arg.strip():
            raise DebugError("break needs a location")
        addrs = self.target.locations(arg)
        for a in addrs:
            self.target.add_breakpoint(a)
        n = self._add_point("break", addrs, arg.strip())
        inside = self.target.instruction_at(self.target.current, addrs[0])
        if inside is not None and inside[0] != addrs[0]:
            start, length, text = inside
            self.say(f"warning: {addrs[0]:#x} is inside the instruction at {display.location(self.target, start)} "
                     f"({text}, {length} bytes): no VP ever executes from there; the instruction boundary is "
                     f"{start:#x}")
        self.say(f"Breakpoint {n} at {display.location(self.target, addrs[0])}"
                 + (f" (and {len(addrs) - 1} alias{'es' if len(addrs) > 2 else ''})" if len(addrs) > 1 else ""))

    do_b = do_break

    def _watch(self, arg: str, kind: str):
        words = arg.split()
        physical = "-phys" in words or (words[:1] == ["phys"])
        words = [w for w in words if w != "-phys"][1 if words[:1] == ["phys"] else 0:]
        if not 1 <= len(words) <= 2:
            raise DebugError("usage: watch [-phys] ADDR [LEN]   (or: watch phys ADDR [LEN])")
        addr = self.target.resolve(words[0])
        length = int(words[1], 0) if len(words) > 1 else 8
        self.target.add_watchpoint(addr, length, kind, physical)
        text = f"{'phys ' if physical else ''}{addr:#x} len {length}"
        n = self._add_point("watch", (addr, length, kind, physical), text)
        self.say(f"{'Hardware' if kind == 'w' else {'r': 'Hardware read', 'a': 'Hardware access (read/write)'}[kind]}"
                 f" watchpoint {n}: {text}")

    def do_watch(self, arg):
        """watch [-phys] ADDR [LEN]: stop after a write to LEN bytes (default 8) at ADDR, a
        virtual address as the accessing VP maps it, or a guest physical one with -phys."""
        self._watch(arg, "w")

    def do_rwatch(self, arg):
        """rwatch [-phys] ADDR [LEN]: stop after a read."""
        self._watch(arg, "r")

    def do_awatch(self, arg):
        """awatch [-phys] ADDR [LEN]: stop after a read or a write."""
        self._watch(arg, "a")

    def do_catch(self, arg):
        """catch vtl-switch | catch intercept | catch exit KIND (KIND: hlt io cpuid msr hypercall
        pause ipi): stop after a VTL switch / VTL0 intercept, or before an exiting instruction."""
        words = arg.split()
        event = words[1] if words[:1] == ["exit"] and len(words) == 2 else (words[0] if len(words) == 1 else "")
        if event not in EVENTS or (words[0] == "exit") == (event in ("vtl-switch", "intercept")):
            raise DebugError("usage: catch vtl-switch | catch intercept | catch exit "
                             "hlt|io|cpuid|msr|hypercall|pause|ipi")
        self.target.break_on(event)
        n = self._add_point("catch", event, arg.strip())
        self.say(f"Catchpoint {n} ({arg.strip()})")

    def do_delete(self, arg):
        """delete [N...]: delete breakpoints, watchpoints and catchpoints N (all without N)."""
        numbers = [int(w) for w in arg.split()] if arg.strip() else list(self.points)
        for n in numbers:
            if n not in self.points:
                raise DebugError(f"no breakpoint number {n}")
        for n in numbers:
            kind, what, _text = self.points.pop(n)
            if kind == "break":
                for a in what:
                    if not any(p[0] == "break" and a in p[1] for p in self.points.values()):
                        self.target.remove_breakpoint(a)
            elif kind == "watch":
                self.target.remove_watchpoint(*what)
            elif not any(p[0] == "catch" and p[1] == what for p in self.points.values()):
                self.target.break_on(what, False)

    do_d = do_delete

    # ---- looking at things ----------------------------------------------------------------------
    def do_info(self, arg):
        """info breakpoints | registers [NAMES] | threads | pagewalk ADDR | frame | line [LOC] | symbol ADDR"""
        words = arg.split()
        what, rest = (words[0], " ".join(words[1:])) if words else ("", "")
        table = {"breakpoints": self._info_breakpoints, "b": self._info_breakpoints, "break": self._info_breakpoints,
                 "registers": self._info_registers, "r": self._info_registers, "reg": self._info_registers,
                 "threads": self._info_threads, "pagewalk": self._info_pagewalk, "frame": self._info_frame,
                 "f": self._info_frame, "line": self._info_line, "symbol": self._info_symbol}
        if what not in table:
            raise DebugError("info what? breakpoints, registers [NAMES], threads, pagewalk ADDR, frame, line [LOC], "
                             "symbol ADDR")
        table[what](rest)

    def _info_breakpoints(self, _arg):
        if not self.points:
            self.say("No breakpoints, watchpoints or catchpoints.")
            return
        lines = ["Num  Type            What"]
        for n, (kind, what, text) in sorted(self.points.items()):
            if kind == "break":
                desc = "breakpoint      " + ", ".join(display.location(self.target, a) for a in what[:1]) + \
                       (f" (+{len(what) - 1} alias)" if len(what) > 1 else "") + f"  [{text}]"
            elif kind == "watch":
                desc = {"w": "hw watchpoint   ", "r": "read watchpoint ", "a": "acc watchpoint  "}[what[2]] + text
            else:
                desc = "catchpoint      " + text
            lines.append(f"{n:<4} {desc}")
        self.say(*lines)

    def _info_registers(self, arg):
        regs = self.target.registers(self.target.current)
        names = [w.lstrip("$").lower() for w in arg.split()] or list(REGISTER_NAMES)
        unknown = [n for n in names if n not in regs]
        if unknown:
            raise DebugError(f"unknown register {unknown[0]!r}: one of {', '.join(REGISTER_NAMES)}")
        self.say(*display.registers(regs, names, self.target.symbolize))

    def _info_threads(self, _arg):
        """gdb's numbering, as the gdb stub's: thread N is VP N-1."""
        lines = ["  Id   Target                        Where"]
        for i in self.target.vp_indexes():
            rip = self.target.registers(i)["rip"]
            mark = "*" if i == self.target.current else " "
            lines.append(f"{mark} {i + 1:<4} {self.target.vp_label(i):<29} {display.location(self.target, rip)}")
        self.say(*lines)

    def _info_pagewalk(self, arg):
        if not arg.strip():
            raise DebugError("info pagewalk needs an address")
        self.say(*display.page_walk(self.target, self.target.current, self.target.resolve(arg)))

    def do_x(self, arg):
        """x/FMT [-phys] ADDR: examine memory, e.g. x/8gx 0x1000, x/5i $rip, x/s SYMBOL,
        x/4gx -phys 0x1000 (FMT: count, format x d u o t a c s i, size b h w g)."""
        words = arg.split()
        physical = "-phys" in words
        words = [w for w in words if w != "-phys"]
        spec = words[0][1:] if words and words[0].startswith("/") else ""
        if spec or (words and words[0].startswith("/")):
            words = words[1:]
        if not words:
            raise DebugError("x needs an address: x/FMT [-phys] ADDR")
        count, fmt, size = display.parse_x_format(spec, self.x_format)
        self.x_format = (count, fmt, size)
        addr = self.target.resolve(" ".join(words))
        self.say(*display.examine(self.target, self.target.current, addr, count, fmt, size, physical))

    def do_disassemble(self, arg):
        """disassemble [ADDR [N]]: N instructions (default 10) from ADDR, or the function around
        RIP, with symbols and source lines."""
        words = arg.split()
        rip = self.target.registers(self.target.current)["rip"]
        end = None
        if words:
            start, count = self.target.resolve(words[0]), int(words[1], 0) if len(words) > 1 else 10
        else:
            span = self.target.function_span(rip)
            start, count = (span[0], 400) if span and span[1] - span[0] <= 4096 else (rip, 10)
            end = span[1] if span and span[1] - span[0] <= 4096 else None
        lines, last_line = [], None
        for a, _raw, text, sym, line in self.target.disassemble(self.target.current, start, count):
            if end is not None and a >= end:
                break
            if line and line != last_line:
                lines.append(f"   {short_path(line[0])}:{line[1]}")
                last_line = line
            lines.append(f"{'=> ' if a == rip else '   '}{a:#x}{' <' + sym + '>' if sym else ''}:\t{text}")
        self.say(*lines)

    do_disas = do_disassemble

    def do_thread(self, arg):
        """thread [N]: make thread N (VP N-1, gdb's numbering) the current one, or show it."""
        if arg.strip():
            if not arg.strip().isdigit():
                raise DebugError(f"thread takes a thread number (VP + 1), not {arg.strip()!r}")
            n = int(arg)
            if n - 1 not in self.target.vp_indexes():
                raise DebugError(f"no thread {n} (threads 1-{len(self.target.vp_indexes())}: VPs 0-"
                                 f"{len(self.target.vp_indexes()) - 1})")
            self.target.current = n - 1
        i = self.target.current
        rip = self.target.registers(i)["rip"]
        self.say(f"[Current thread is {i + 1} ({self.target.vp_label(i)})]", f"#0  {display.location(self.target, rip)}")

    def do_set(self, arg):
        """set $REG = VALUE: write a register of the current VP."""
        name, eq, value = arg.partition("=")
        if not eq or not name.strip().startswith("$"):
            raise DebugError("usage: set $REG = VALUE")
        self.target.set_register(self.target.current, name.strip(), self.target.resolve(value))

    def do_sidecar(self, arg):
        """sidecar run-vp CPU: after the handoff, run CPU's VTL0 through the VP loop as `hclsim
        sidecar run-vp` does (through the sidecar, or directly on a Linux CPU), showing each
        intercept and the COM1 output. sidecar start-vp CPU: only start RUN_VP on a sidecar CPU
        (continue then runs its VTL0 under the debugger: catch vtl-switch / catch intercept)."""
        words = arg.split()
        if len(words) != 2 or words[0] not in ("run-vp", "start-vp") or not words[1].isdigit():
            raise DebugError("usage: sidecar run-vp CPU | sidecar start-vp CPU")
        machine = self.target.machine
        linux = getattr(machine, "linux", None)
        if linux is None:
            raise DebugError("no kernel yet: continue to the kernel handoff first")
        from hclsim.devices.vtl0_test import TestDevices
        from hclsim.sidecar.vp_loop import VpRunner, vtl0_runner
        cpu = int(words[1])
        if words[0] == "start-vp":
            from hclsim.sidecar import layout as sl
            if linux.sidecar is None:
                raise DebugError("no sidecar driver: the machine runs without a sidecar")
            VpRunner(linux.partition, linux.sidecar, cpu, TestDevices())  # VTL0's initial registers
            linux.sidecar.start(cpu, sl.COMMAND_RUN_VP)
            self.say(f"RUN_VP started on CPU {cpu}")
            return
        if machine.vtl0_guest is None:
            raise DebugError("no VTL0 guest is loaded")
        from hclsim.defs.hvdef import message_name
        results = machine.vtl0_guest.results(machine.mem)
        devices = TestDevices()
        runner = vtl0_runner(linux, cpu, devices)
        seen = runner.run_until_halted(lambda: results[cpu]["done"] == 1)
        lines = [f"CPU {cpu}: {len(seen)} intercepts, VTL0 {'done' if results[cpu]['done'] else 'not done'}"]
        for m in seen:
            extra = "".join(f" {k}={m[k]:#x}" for k in ("port", "gpa", "msr") if k in m)
            lines.append(f"  {message_name(m['type'])} at {display.location(self.target, m['rip'])}{extra}")
        com1 = bytes(devices.com1).decode("utf-8", "replace")
        lines += [f"COM1: {line}" for line in com1.splitlines()] or ["COM1: (nothing)"]
        self.say(*lines)

    def do_snapshot(self, arg):
        """snapshot FILE: save the whole machine as it stands (hclsim step --snapshot FILE, or
        hclsim.snapshot.restore, goes on from here exactly)."""
        if not arg.strip():
            raise DebugError("usage: snapshot FILE")
        from hclsim import snapshot
        snapshot.save(self.target.machine, arg.strip())
        self.say(f"saved the machine to {arg.strip()} ({os.path.getsize(arg.strip()):,} bytes)")

    def do_quit(self, arg):
        """quit: end the session."""
        return True

    do_q = do_quit

    def do_EOF(self, arg):
        """Ctrl-D: end the session."""
        self.out.write("\n")
        return True


def cmd_step(args, config_from_args) -> int:
    from hclsim.machine import Machine
    config = config_from_args(args)
    commands = []
    if args.script:
        try:
            with open(args.script, encoding="utf-8") as f:
                commands += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as exc:
            raise HclsimError(f"--script {args.script}: {exc.strerror}") from None
    commands += args.commands
    shell_box = {}
    on_serial = None if args.quiet else lambda n, d: shell_box["shell"].serial(n, d)
    if args.snapshot:
        from hclsim import snapshot
        machine = snapshot.restore(args.snapshot, on_serial=on_serial)
        if getattr(machine, "linux", None) is not None:
            machine.close()
            raise HclsimError(f"--snapshot {args.snapshot}: taken after the kernel handoff; "
                              "hclsim step goes on from snapshots of the firmware's run")
        config = machine.config
    elif config.linux == "real":
        from hclsim.real_linux_cli import real_config
        config = real_config(config)
        machine = Machine(config, on_serial=on_serial)
    else:
        machine = Machine(config, on_serial=on_serial)
    if config.linux == "real":                   # the shim, then the real kernel (debug/kernel_target.py)
        from hclsim.debug.kernel_target import RealLinuxTarget
        target = RealLinuxTarget(machine)
    else:
        target = DebugTarget(machine)
    loaded = machine.scheduler.loaded
    if args.snapshot and loaded is not None:   # go on with the VP that was stopped
        rip = target.registers(loaded.index)["rip"]
        target.current = loaded.index
        target.last_stop = StopEvent(START, loaded.index, rip, f"restored from {args.snapshot}")
        target.runner.reported = (loaded.index, rip)
    try:
        shell = shell_box["shell"] = StepShell(target, sys.stdout, config.timeout)
        shell.say(*display.stop_lines(target, target.last_stop))
        if commands:
            for line in commands:
                if shell.onecmd(line):
                    break
        else:
            _interactive(shell)
            return 0
    finally:
        target.close()
        machine.close()
    if shell.failed:
        return EXIT_COMMAND_FAILED
    return EXIT_GUEST_FAULT if shell.faulted else 0


def _interactive(shell: StepShell) -> None:
    try:
        import readline
        readline.set_history_length(1000)
        if os.path.exists(HISTORY):
            readline.read_history_file(HISTORY)
    except (ImportError, OSError):
        readline = None
    try:
        while True:
            try:
                shell.cmdloop()
                break
            except KeyboardInterrupt:
                shell.out.write("^C\n")  # at the prompt: a new prompt, as gdb does
    finally:
        if readline is not None:
            try:
                readline.write_history_file(HISTORY)
            except OSError:
                pass
