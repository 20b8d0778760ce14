"""Where the debugger stops a VP before an instruction runs: breakpoints, `catch exit`
instructions and the single-step countdown, all as Unicorn code hooks.

Costs (measured in benches/bench_step.py): a code hook bounded to one address makes Unicorn call
it only from the translated block holding that address, so a breakpoint that is never reached
costs nothing; adding one retranslates the blocks holding it. Unicorn exit addresses would
instead re-invalidate their blocks on every emu_start. Stepping adds one hook on every address
(Unicorn emits hooks at translation time, so everything is retranslated once per stepping
session; cont() removes it again).

Sites (MSR, PAUSE, VTL0 intercepts) are code hooks the scheduler registered first, some native,
and an earlier hook that moves RIP runs its instruction before ours could stop it. So while a
stop point sits on a site, or while stepping, the sites are registered again through
_on_site (MSRs on the Python path), which decides first and then hands over to the scheduler.

Two details keep stops exact. A run resumed on a stop point must not stop there at once: the
first check of a run, at its first instruction, passes (`arm_skip`). And Unicorn runs each
iteration of a REP string instruction as its own block at the same address; the engine counts
the iterations as one instruction, so a check at the same address with the same instruction
count is the same instruction going on.
"""
from unicorn import unicorn_const as ucc

from hclsim.cpu import native
from hclsim.cpu.fastpath import H_BLOCKS, H_ICOUNT
from hclsim.debug.events import BREAKPOINT, EVENT, STEP, DebugError, StopRequest

MSR_X2APIC_ICR = 0x830
# Site kinds (scheduler) -> the `catch exit` kind that stops before them.
SITE_CATCH = {"rdmsr": "msr", "wrmsr": "msr", "pause": "pause", "vtl0:in": "io", "vtl0:out": "io",
              "vtl0:cpuid": "cpuid", "vtl0:rdmsr": "msr", "vtl0:wrmsr": "msr", "vtl0:pause": "pause"}
EXIT_CATCHES = ("hlt", "io", "cpuid", "msr", "hypercall", "pause", "ipi")
PY_SITE = "py:"   # site kinds re-registered for the Python handler (no native MSR path)


class NextBreakpoint:
    """`next`'s breakpoint at a call's return address: only VP vp, back at the caller's depth."""

    def __init__(self, vp: int, rsp: int):
        self.vp, self.rsp = vp, rsp

    def matches(self, engine) -> bool:
        return engine.current_vp.index == self.vp and engine.reg("rsp") >= self.rsp


class StopPoints:
    def __init__(self, machine, images):
        self.machine, self.images = machine, images
        self.breakpoints: dict[int, list] = {}   # address -> [None (a user breakpoint) | NextBreakpoint]
        self.catches: set[str] = set()
        self.step_left = None                    # instructions still to run while stepping, else None
        self._hooks: dict[int, int] = {}         # address -> its code hook
        self._exit_kinds = None                  # address -> catch kind, swept when first needed
        self._step_hook = None
        self._step_last = None
        self._skip = None
        self._last_hit = None
        self._scheduler_sites = None             # (sites, handler) while ours are registered
        self.watching = lambda: False            # watchpoints exist (their stops need our sites too)
        self.pending_watch = lambda: None        # a watchpoint hit by the previous instruction

    @property
    def engine(self):
        return self.machine.engine

    # ---- what to stop at --------------------------------------------------------------------
    def add_breakpoint(self, address: int, temporary: NextBreakpoint | None = None) -> None:
        entries = self.breakpoints.setdefault(address, [])
        if temporary is not None or None not in entries:
            entries.append(temporary)
        self.sync()

    def remove_breakpoint(self, address: int, temporary: NextBreakpoint | None = None) -> None:
        entries = self.breakpoints.get(address, [])
        if temporary not in entries:
            raise DebugError(f"no breakpoint at {address:#x}")
        entries.remove(temporary)
        if not entries:
            del self.breakpoints[address]
        self.sync()

    def set_catch(self, kind: str, enabled: bool) -> None:
        if kind not in EXIT_CATCHES:
            raise DebugError(f"unknown exit kind {kind!r}: one of {', '.join(EXIT_CATCHES)}")
        (self.catches.add if enabled else self.catches.discard)(kind)
        self.sync()

    def begin_step(self, count: int) -> None:
        """Stop before the (count+1)-th instruction from now (a REP string instruction is one)."""
        self.step_left, self._step_last = count, None
        if self._step_hook is None:
            self._step_hook = self.engine.uc.hook_add(ucc.UC_HOOK_CODE, self._on_step, None, 1, 0)
            self.engine.uc.ctl_flush_tb()  # blocks translated before the hook would not call it
        self.sync()

    def end_step(self) -> None:
        self.step_left = None

    def end_stepping(self) -> None:
        """Drop the every-instruction hook (before running freely again)."""
        self.step_left = None
        if self._step_hook is not None:
            native.binding_hook_del(self.engine.uc, self._step_hook)
            self._step_hook = None
        self.sync()

    def arm_skip(self) -> None:
        """The next run resumes the loaded VP: its first instruction is not a stop point."""
        h = self.engine.state.buf
        self._skip = (self.engine.reg("rip"), int(h[H_BLOCKS]) + 1)

    # ---- hooks --------------------------------------------------------------------------
    def _addresses(self) -> set[int]:
        """Addresses that need a code hook of ours (sites are checked by _on_site instead)."""
        wanted = set(self.breakpoints)
        if self.catches - {"ipi"}:
            if self._exit_kinds is None:
                self._exit_kinds = self.images.exit_instructions()
            wanted |= {a for a, k in self._exit_kinds.items() if k in self.catches}
        return wanted - set(self._sites())

    def _sites(self) -> dict:
        return self._scheduler_sites[0] if self._scheduler_sites else self.engine.sites

    def sync(self) -> None:
        """Make the engine's hooks match what is asked for."""
        uc = self.engine.uc
        wanted = self._addresses()
        for address in set(self._hooks) - wanted:
            native.binding_hook_del(uc, self._hooks.pop(address))  # Unicorn retranslates the blocks that called it
        for address in sorted(wanted - set(self._hooks)):
            self._hooks[address] = uc.hook_add(ucc.UC_HOOK_CODE, self._on_code, None, address, address)
            self._retranslate(address)
        sites = self._sites()
        need = self.step_left is not None or self._step_hook is not None or self.watching() or \
            any(a in sites for a in self.breakpoints) or \
            any(k in self.catches or (k == "wrmsr" and "ipi" in self.catches) for k in map(SITE_CATCH.get, sites.values()))
        if need and self._scheduler_sites is None:
            self._scheduler_sites = (dict(sites), self.engine.site_handler)
            ours = {a: PY_SITE + k if k in ("rdmsr", "wrmsr") else k for a, k in sites.items()}
            self.engine.set_sites(ours, self._on_site)  # retranslates everything
        elif not need and self._scheduler_sites is not None:
            self.engine.set_sites(*self._scheduler_sites)
            self._scheduler_sites = None

    def _retranslate(self, address: int) -> None:
        """Drop the translated blocks holding address, so they are translated with its hook.
        Unicorn finds them through the loaded VP's page tables and drops every block of that
        physical code whatever its virtual address, so one mapped alias is enough."""
        e = self.engine
        gpa = self.images.gpa_of(address)
        for va in self.images.aliases_of(address):
            if gpa is not None and e.translate(va) == gpa:
                e.remove_cache(va, va + 1)
                return
        e.uc.ctl_flush_tb()  # not code of a loaded image, or not mapped here: retranslate all

    def _on_code(self, uc, address, size, _user_data):
        try:
            request = self._before(address)
            if request is not None:
                self.engine.request_stop(request)
        except BaseException as exc:  # not through C frames: end the run and raise after it
            self.engine.request_stop(exc)

    def _on_step(self, uc, address, size, _user_data):
        try:
            if self._step_due(address):
                self.engine.request_stop(StopRequest(STEP))
        except BaseException as exc:
            self.engine.request_stop(exc)

    def _on_site(self, engine, address: int, kind: str) -> None:
        kind = kind[len(PY_SITE):] if kind.startswith(PY_SITE) else kind
        request = self.pending_watch() or self._before(address, kind)
        if request is None and self._step_due(address):
            request = StopRequest(STEP)
        if request is not None:
            engine.request_stop(request)  # RIP is still on the instruction: it has not run
            return
        self._scheduler_sites[1](engine, address, kind)

    # ---- decisions ----------------------------------------------------------------------
    def _step_due(self, address: int) -> bool:
        """Counts the instruction at address (once); True when it is one too many."""
        if self.step_left is None:
            return False
        key = (address, int(self.engine.state.buf[H_ICOUNT]))
        if key == self._step_last:
            return False  # counted already (another hook of ours, or a REP iteration)
        if self.step_left == 0:
            return True
        self.step_left -= 1
        self._step_last = key
        return False

    def _before(self, address: int, site_kind: str | None = None) -> StopRequest | None:
        entries = self.breakpoints.get(address)
        kind = self._catch_kind(address, site_kind)
        if entries is None and kind is None:
            return None
        h = self.engine.state.buf
        key = (address, int(h[H_ICOUNT]))
        skip, self._skip = self._skip, None
        if skip == (address, int(h[H_BLOCKS])) or key == self._last_hit:
            self._last_hit = key
            return None  # the instruction a resumed run starts with, or a REP iteration
        self._last_hit = key
        for entry in entries or ():
            if entry is None or entry.matches(self.engine):
                return StopRequest(BREAKPOINT, temporary=entry)
        if kind is not None:
            return StopRequest(EVENT, detail=self._catch_detail(kind, address))
        return None

    def _catch_kind(self, address: int, site_kind: str | None) -> str | None:
        if not self.catches:
            return None
        if site_kind is None:
            kind = (self._exit_kinds or {}).get(address)
        else:
            kind = SITE_CATCH.get(site_kind)
            if site_kind == "wrmsr" and "ipi" in self.catches and \
                    self.engine.reg("rcx") & 0xFFFFFFFF == MSR_X2APIC_ICR:
                return "ipi"
        return kind if kind in self.catches else None

    def _catch_detail(self, kind: str, address: int) -> str:
        e = self.engine
        if kind == "ipi":
            icr = (e.reg("rax") & 0xFFFFFFFF) | (e.reg("rdx") & 0xFFFFFFFF) << 32
            return f"catch exit ipi: x2APIC ICR write {icr:#x} (vector {icr & 0xFF:#x}, destination {icr >> 32})"
        if kind == "msr":
            return f"catch exit msr: MSR {e.reg('rcx') & 0xFFFFFFFF:#x}"
        if kind == "hypercall":
            return f"catch exit hypercall: control {e.reg('rcx'):#x}"
        if kind == "cpuid":
            return f"catch exit cpuid: leaf {e.reg('rax') & 0xFFFFFFFF:#x}"
        return f"catch exit {kind}"

    def close(self) -> None:
        """Remove every hook of ours (the machine runs on without the debugger)."""
        self.breakpoints.clear()
        self.catches.clear()
        self.end_stepping()
