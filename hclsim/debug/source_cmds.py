"""`hclsim step`'s source-level commands, as gdb has them: step, next, finish, until, advance,
backtrace, print, info frame / line / symbol, list (which continues where it left off), and
Tab completion of commands and symbols. A mixin of hclsim.step_cli.StepShell, which provides
say(), _run(), target and the stop display."""
from hclsim.debug import display, variables
from hclsim.debug.events import DebugError, STEP
from hclsim.debug.images import section_name, short_path

MAX_LINE_STEPS = 200_000     # instructions `step`/`next` take on one source line before giving up
LIST_LINES = 10


class SourceCommands:
    list_next = None             # (path, first line) `list` shows next
    list_first = None            # (path, first line) `list` showed last, for `list -`
    print_count = 0              # gdb's value history: $1, $2, ...

    # ---- stepping by source line --------------------------------------------------------------
    def _line_steps(self, over_calls: bool, past_line: bool = False):
        """Step the current VP until its source line changes (step: into calls that have line
        information; next: over calls; until: also not back to an earlier line of the frame)."""
        t = self.target
        vp = t.current
        start_rip = t.registers(vp)["rip"]
        start_line = t.source_line(start_rip)
        if start_line is None:
            raise DebugError(f"no source line at {start_rip:#x}: use stepi / nexti")
        start_frame = _frame_cfa(t, vp)
        stop = None
        for _ in range(MAX_LINE_STEPS):
            rip = t.registers(vp)["rip"]
            insn = t.disassemble(vp, rip, 1)
            calls = bool(insn) and insn[0][2].startswith("call")
            stop = t.next(vp, timeout=self.timeout) if calls and over_calls else t.step(vp, 1)
            if stop.reason != STEP or stop.vp != vp:
                return stop
            rip = t.registers(vp)["rip"]
            line = t.source_line(rip)
            if line is None:
                if calls and not over_calls:   # into code without lines (assembly): back out of it
                    stop = t.finish(vp, timeout=self.timeout)
                    if stop.reason != STEP:
                        return stop
                continue
            if line == start_line:
                continue
            if past_line and line[0] == start_line[0] and line[1] < start_line[1] and \
                    _frame_cfa(t, vp) == start_frame:
                continue                        # until: a loop's jump back is not progress
            return stop
        raise DebugError(f"still on {short_path(start_line[0])}:{start_line[1]} after {MAX_LINE_STEPS:,} "
                         "instructions (a loop?): use until, advance or a breakpoint")

    def do_step(self, arg):
        """step [N]: run to the next source line, into calls that have line information."""
        for _ in range(self._count(arg)):
            stop = self._run(lambda: self._line_steps(over_calls=False))
            if stop.reason != STEP:
                break

    def do_next(self, arg):
        """next [N]: run to the next source line of this function, over calls."""
        for _ in range(self._count(arg)):
            stop = self._run(lambda: self._line_steps(over_calls=True))
            if stop.reason != STEP:
                break

    def do_until(self, arg):
        """until [LOC]: like next, but never back to an earlier line of this frame (out of a
        loop); with LOC, run until LOC or the current function returns."""
        if arg.strip():
            return self.do_advance(arg)
        self._run(lambda: self._line_steps(over_calls=True, past_line=True))

    def do_advance(self, arg):
        """advance LOC: run until the current VP reaches LOC or its current function returns."""
        if not arg.strip():
            raise DebugError("advance needs a location")
        addrs = self.target.locations(arg)
        self._run(lambda: self.target.run_to(self.target.current, addrs, timeout=self.timeout))

    def do_finish(self, arg):
        """finish: run until the current function returns; shows the value in RAX."""
        t = self.target
        frames, _why = t.backtrace(t.current, 1)
        self.say(f"Run till exit from #0  {display.location(t, frames[0].pc)}")
        stop = self._run(lambda: t.finish(t.current, timeout=self.timeout))
        if stop.reason == STEP:
            self.say(f"Value returned is rax = {t.registers(t.current)['rax']:#x}")

    do_s, do_n, do_u = do_step, do_next, do_until

    # ---- frames -----------------------------------------------------------------------------
    def do_backtrace(self, arg):
        """backtrace [N]: the current VP's call stack (from the firmware's DWARF call frame
        information), innermost first."""
        limit = self._count(arg) if arg.strip() else 64
        frames, why = self.target.backtrace(self.target.current, limit)
        lines = [f"#{f.level:<2} {display.location(self.target, f.pc)}" for f in frames]
        if why and len(frames) < limit:
            lines.append(f"(backtrace ends: {why})")
        self.say(*lines)

    do_bt = do_where = do_backtrace

    def _info_frame(self, _arg):
        t = self.target
        frames, why = t.backtrace(t.current, 2)
        f = frames[0]
        lines = [f"Stack level 0, frame at {f.cfa:#x}:" if f.cfa is not None else "Stack level 0, frame unknown:",
                 f" rip = {display.location(t, f.pc)}"]
        if len(frames) > 1:
            lines.append(f" saved rip = {frames[1].pc:#x}, called by frame at "
                         f"{frames[1].cfa:#x}" if frames[1].cfa is not None else f" saved rip = {frames[1].pc:#x}")
        else:
            lines.append(f" caller unknown: {why}")
        if f.cfa is not None:
            lines.append(f" Locals at {f.cfa:#x}, previous rsp {f.cfa:#x}; saved rip at {f.cfa - 8:#x}")
        self.say(*lines)

    def _info_line(self, arg):
        t = self.target
        addr = t.resolve(arg) if arg.strip() else t.registers(t.current)["rip"]
        span = t.line_span(addr)
        if span is None:
            raise DebugError(f"no line number information for {addr:#x}")
        (path, line), start, end = span
        sym = t.symbolize(start)
        self.say(f'Line {line} of "{short_path(path)}" starts at address {start:#x}{" <" + sym + ">" if sym else ""} '
                 f"and ends at {end:#x}.")

    def _info_symbol(self, arg):
        if not arg.strip():
            raise DebugError("info symbol needs an address")
        addr = self.target.resolve(arg)
        hit = self.target.images.at(addr)
        name = hit[0].image.symbolize(hit[1]) if hit else None
        if name is None:
            self.say(f"No symbol matches {arg.strip()}.")
            return
        sym, _, delta = name.partition("+")
        section = section_name(hit[0].image.path, hit[1]) or getattr(hit[0].image, "section", None) or "?"
        self.say(f"{sym}{f' + {int(delta, 16)}' if delta else ''} in section {section} of {hit[0].name}")

    # ---- print ------------------------------------------------------------------------------
    def do_print(self, arg):
        """print[/x] EXPR: a register ($rax), a global variable (through its DWARF type), &VAR,
        a function, or an address expression (0x10+4, symbol+8)."""
        fmt, expr = "", arg.strip()
        if expr.startswith("/"):
            fmt, _, expr = expr[1:].partition(" ")
            expr = expr.strip()
        if not expr:
            raise DebugError("print needs an expression")
        t = self.target
        found = t.variable(expr.lstrip("&")) if not expr.startswith("$") else None
        if found is not None:
            addr, var = found
            if expr.startswith("&"):
                text = f"({variables.type_name(var.type)} *) {addr:#x} <{t.symbolize(addr)}>"
            else:
                data = t.read_memory(t.current, addr, variables.type_size(var.type))
                text = variables.format_value(var.type, data, t.symbolize)
                if fmt == "x" and len(data) <= 8:
                    text = f"{int.from_bytes(data, 'little'):#x}"
        else:
            value = t.resolve(expr)
            sym = t.symbolize(value) if not expr.startswith("$") or expr[1:] in ("rip", "pc") else None
            text = (f"{value:#x}" if fmt == "x" or sym else str(value)) + (f" <{sym}>" if sym else "")
        self.print_count += 1
        self.say(f"${self.print_count} = {text}")

    do_p = do_print

    # ---- list -------------------------------------------------------------------------------
    def do_list(self, arg):
        """list [LOC]: the source lines around RIP or LOC; again: the next ten; `list -`: the ten before."""
        arg = arg.strip()
        if arg == "-":
            if self.list_first is None:
                raise DebugError("no previous list")
            path, first = self.list_first
            if first <= 1:
                raise DebugError(f"already at the start of {short_path(path)}")
            return self._list(path, max(1, first - LIST_LINES))
        if not arg and self.list_next is not None:    # the previous command listed too: go on
            return self._list(*self.list_next)
        addr = self.target.resolve(arg) if arg else self.target.registers(self.target.current)["rip"]
        line = self.target.source_line(addr)
        if line is None:
            raise DebugError(f"no source line for {addr:#x}")
        self._list(line[0], max(1, line[1] - LIST_LINES // 2), mark=line[1])

    do_l = do_list

    def forget_listing(self, line: str) -> None:
        """Called before each command: `list` goes on only right after a `list`."""
        if line.split()[:1] not in (["list"], ["l"]):
            self.list_next = None

    def _list(self, path: str, first: int, mark: int | None = None) -> None:
        lines = display.source_range(path, first, first + LIST_LINES - 1, mark)
        if not lines:
            raise DebugError(f"line {first} is past the end of {short_path(path)}")
        self.list_first, self.list_next = (path, first), (path, first + LIST_LINES)
        self.say(*lines)

    # ---- completion -------------------------------------------------------------------------
    def completedefault(self, text, line, begidx, endidx):
        """Tab after a command: symbols (image:name too), register names after $."""
        if text.startswith("$"):
            from hclsim.hv.partition import REGISTER_NAMES
            return ["$" + r for r in REGISTER_NAMES if r.startswith(text[1:])]
        return sorted(n for n in self.target.images.symbol_names() if n.startswith(text))[:200]

    def completenames(self, text, *ignored):
        return [n for n in super().completenames(text, *ignored) if n != "EOF"]

    def get_names(self):
        """help lists what a user types; Ctrl-D's handler (do_EOF) is not a command."""
        return [n for n in super().get_names() if n not in ("do_EOF", "help_EOF")]


def _frame_cfa(target, vp: int):
    frames, _why = target.backtrace(vp, 1)
    return frames[0].cfa if frames else None
