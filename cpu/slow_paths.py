"""The Python entry points the engines' native hooks call (slow port I/O, sites a native hook
passes on), keyed by uc handle, and the watchdog that stops an engine's run at a timeout."""
import ctypes
import threading
import time

from hclsim.cpu import hypercall_fastpath, msr_fastpath, native, runvp_fastpath


class SlowIoDispatch:
    """The single Python entry point native hooks call for slow port I/O, keyed by uc handle."""

    def __init__(self):
        self.engines: dict = {}        # uc handle -> its engine (cpu/engine.py)
        self.callback = native.SLOW_IO_PROTO(self._dispatch)
        self.address = ctypes.cast(self.callback, ctypes.c_void_p).value

    def _dispatch(self, uc_ptr, port, size, value, is_in):
        engine = self.engines.get(uc_ptr)
        if engine is None:
            return 0
        try:
            return engine.io_handler(port, size, value, bool(is_in)) & 0xFFFFFFFF
        except BaseException as exc:  # a Python exception must not unwind through C frames
            engine.request_stop(exc)
            return 0


SLOW_IO = SlowIoDispatch()


class SlowSiteDispatch:
    """The Python entry point for the sites native hooks pass on (cpu/msr_fastpath.py,
    cpu/runvp_fastpath.py), by kind index."""
    KINDS = {msr_fastpath.SITE_RDMSR: "rdmsr", msr_fastpath.SITE_WRMSR: "wrmsr",
             runvp_fastpath.SITE_IN: "vtl0:in", runvp_fastpath.SITE_OUT: "vtl0:out"}

    def __init__(self):
        self.engines: dict = {}        # uc handle -> its engine (cpu/engine.py)
        self.callback = native.SLOW_SITE_PROTO(self._dispatch)
        self.address = ctypes.cast(self.callback, ctypes.c_void_p).value

    def _dispatch(self, uc_ptr, address, kind):
        engine = self.engines.get(uc_ptr)
        if engine is None:
            return
        if kind == hypercall_fastpath.SLOW_INVALID:  # address: where to say whether it was handled
            try:
                handled = engine._on_invalid(engine.uc, None)
            except BaseException as exc:  # not through C frames: end the run and raise after it
                engine.request_stop(exc)
                handled = True
            ctypes.c_int64.from_address(address).value = int(bool(handled))
            return
        engine._on_site(engine.uc, address, 0, self.KINDS[kind])  # catches everything itself


SLOW_SITE = SlowSiteDispatch()


class Watchdog:
    """Stops engines that run past their deadline. Unicorn's own emu_start timeout starts and
    joins a thread on every call (~100 us each, more than most VP exits cost), so one shared
    thread checks instead, a few times a second."""
    PERIOD = 0.05

    def __init__(self):
        self.deadlines: dict[int, tuple] = {}
        self.lock = threading.Lock()
        self.thread = None

    def arm(self, engine, seconds: float) -> None:
        with self.lock:
            self.deadlines[id(engine)] = (engine, time.monotonic() + seconds)
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name="hclsim-watchdog", daemon=True)
                self.thread.start()

    def disarm(self, engine) -> None:
        with self.lock:
            self.deadlines.pop(id(engine), None)

    def _watch(self) -> None:
        while True:
            time.sleep(self.PERIOD)
            now = time.monotonic()
            with self.lock:
                late = [e for e, deadline in self.deadlines.values() if deadline <= now]
                for e in late:
                    del self.deadlines[id(e)]
            for e in late:
                e.request_stop("timeout")


WATCHDOG = Watchdog()
