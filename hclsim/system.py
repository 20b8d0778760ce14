"""A whole paravisor run: the boot shim to the handoff (hclsim/machine.py), then the stand-in
kernel's userspace (kernel_stub/userspace.py: underhill_init, openvmm_hcl, underhill-vm as real
processes) until the guest powers the VM off. A kernel panic with `panic=-1` on the command line
(the boot shim puts it there) resets the VM: VTL2 boots again from the boot shim, at most
MAX_RESETS times; then the run ends with an error.
"""
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from hclsim import HclsimError
from hclsim.cpu.fault import GuestFaultError
from hclsim.machine import Machine

MAX_RESETS = 3


class SystemError_(HclsimError):
    """The run could not finish (too many resets, a panic without reboot, a timeout)."""


@dataclass
class Timeline:
    events: list = field(default_factory=list)     # (name, host seconds since the run began, detail)

    def add(self, name: str, t: float, detail: str = "") -> None:
        self.events.append((name, t, detail))


@dataclass
class SystemResult:
    boot: object                     # machine.BootResult of the last boot
    status: str                      # "power-off", "panic", "timeout", "interrupted", "running"
    timeline: Timeline
    com1: bytes                      # the VTL0 console, as COM1 received it
    consoles: dict                   # VP -> its console lines
    kmsg: str                        # the kernel log, as dmesg prints it
    process_tree: list
    panic: str | None = None
    resets: int = 0
    boots: int = 1
    kernel_console: bytes = b""      # what the kernel printed on its console (COM3)
    writes: list = field(default_factory=list)    # (path, value) of every accepted /proc/sys and /sys store
    vtl0_records: list = field(default_factory=list)   # each VP's VTL0 test guest record at the end

    @property
    def serial(self) -> dict:
        """The serial ports' output: COM3 holds the shim's log, then the kernel's console."""
        out = dict(self.boot.serial)
        out["COM3"] = out.get("COM3", b"") + self.kernel_console
        return out


RUN_PREFIX = "hclsim-vm-"
OWNER_FILE = "owner.pid"


def remove_stale_run_folders() -> None:
    """Run folders of runs whose process is gone (killed with -9: nothing of it could clean up)."""
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(RUN_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(root, name)
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue                          # not ours to judge
        try:
            os.kill(pid, 0)
            continue                          # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)


def run_system(config, *, on_serial=None, on_kmsg=None, on_console=None, on_event=None, keep_running=False,
               stop=None, timeout: float | None = None, vsock_path: str | None = None) -> SystemResult:
    """Boot and run until power off (or, with keep_running, until stop() is true after it).
    The host side of the VM's hybrid vsock is at vsock_path (default: vsock.sock in the run's
    folder), the same across resets; a "vsock" event names it. Without vsock_path, the VM's vsock
    ports are on real AF_VSOCK too where the host has loopback (kernel_stub/vsock.py). timeout
    (default config.timeout) bounds each boot up to its power off, a boot after a reset included. Raises GuestFaultError for a
    firmware fault, SystemError_ when the run cannot finish."""
    from hclsim.kernel_stub.vsock import Vsock
    remove_stale_run_folders()
    run_root = tempfile.mkdtemp(prefix=RUN_PREFIX)
    with open(os.path.join(run_root, OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))
    current = {}
    from hclsim.state_dir import StateDir, StateDirError
    try:
        state = StateDir(config.state_dir or os.path.join(run_root, "state"))
    except StateDirError as exc:
        shutil.rmtree(run_root, ignore_errors=True)
        raise SystemError_(str(exc)) from None
    host_path = vsock_path or os.path.join(run_root, "vsock.sock")
    try:            # real AF_VSOCK too where the host offers it, unless --vsock PATH asks for hybrid vsock
        vsock = Vsock(host_path, lambda text, level=6: current["us"].log(text, level) if current.get("us") else None,
                      real=vsock_path is None)
    except OSError as exc:
        state.close()
        shutil.rmtree(run_root, ignore_errors=True)
        raise SystemError_(f"cannot listen for hybrid vsock at {host_path}: {exc.strerror or exc}") from None
    try:
        return _run_system(config, run_root, vsock, current, on_serial=on_serial, on_kmsg=on_kmsg,
                           on_console=on_console, on_event=on_event, keep_running=keep_running, stop=stop,
                           timeout=timeout, vmgs_path=state.vmgs_path)
    finally:
        vsock.close()
        state.close()
        shutil.rmtree(run_root, ignore_errors=True)


def _run_system(config, run_root, vsock, current, *, on_serial, on_kmsg, on_console, on_event, keep_running, stop,
                timeout, vmgs_path) -> SystemResult:
    from hclsim.kernel_stub.userspace import Userspace
    timeline = Timeline()
    t_run = time.monotonic()

    def note(name: str, t: float, detail: str = "") -> None:
        timeline.add(name, t, detail)
        if on_event is not None:
            on_event(name, t, detail)
    resets = 0
    limit = timeout or config.timeout        # each boot's, from its shim entry to power off
    if on_event is not None:
        on_event("vsock", 0.0, vsock.host_path)       # where diag clients connect (not a stage)
    while True:
        deadline = time.monotonic() + limit      # restarted at each reset: a boot after a reset gets its own
        machine = Machine(config, on_serial=on_serial)
        us = None
        run_dir = os.path.join(run_root, f"boot{resets + 1}")
        os.makedirs(run_dir)
        try:
            t_boot = time.monotonic() - t_run
            note("shim", t_boot, f"boot {resets + 1}" if resets else "")
            try:
                result = machine.run_to_handoff()
            except GuestFaultError as exc:
                from hclsim.report import fault_report
                exc.report_dict = fault_report(exc, config, machine)   # while the machine is there
                raise
            base = time.monotonic() - t_run
            note("handoff", base, f"kernel entry {result.regs['rip']:#x}")

            def event(ev, base=base):
                note(ev.name, base + ev.t, ev.detail)
            us = current["us"] = Userspace(result.linux, result.handoff,
                                           machine.initrd.data if machine.initrd else None, run_dir,
                                           on_console=on_console, on_kmsg=on_kmsg, on_event=event, vsock=vsock,
                                           symbolize=machine.symbolize, vmgs_path=vmgs_path)
            us.start()
            status = _wait(us, deadline, keep_running, stop)
            outcome = SystemResult(result, status, timeline, bytes(us.com1),
                                   {vp: bytes(v) for vp, v in sorted(us.console.items())}, us.kmsg.text(),
                                   us.process_tree(), us.panic.message if us.panic else None, resets, resets + 1,
                                   bytes(us.com3), list(us.sysctl.writes))
        except KeyboardInterrupt:
            raise
        finally:
            if us is not None:
                tree = us.process_tree
                us.shutdown()
            records = _vtl0_records(machine)
            machine.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        outcome.vtl0_records = records
        if outcome.status != "panic":
            outcome.process_tree = tree()
            return outcome
        outcome.process_tree = tree()
        if us.args.panic_timeout >= 0:
            raise _attach(SystemError_(f"kernel panic: {outcome.panic} (panic={us.args.panic_timeout} on the "
                                       f"command line: the kernel halts, the host does not reset it)"), outcome)
        if resets >= MAX_RESETS:
            raise _attach(SystemError_(f"kernel panic: {outcome.panic}; the VM was reset {resets} times "
                                       f"and panicked again: giving up"), outcome)
        resets += 1
        note("reset", time.monotonic() - t_run, f"panic=-1: the host resets the VM (reset {resets})")


def start_kept_run(config, vsock_path: str, **kw):
    """A whole run of config kept up after power off (keep_running), in a thread: for tests,
    benches and tools that drive it through diag. (stop Event, the thread, a dict that gets
    "outcome" (the SystemResult) or "error" when the run ends); set stop, then join."""
    import threading
    stop = threading.Event()
    box = {}

    def run():
        try:
            box["outcome"] = run_system(config, keep_running=True, stop=stop.is_set, vsock_path=vsock_path, **kw)
        except Exception as exc:       # handed to whoever joins
            box["error"] = exc
    t = threading.Thread(target=run, name="kept-run", daemon=True)
    t.start()
    return stop, t, box


def _vtl0_records(machine) -> list:
    """Each VP's VTL0 test guest record (boot/vtl0_guest.py), as plain numbers and hex bytes."""
    if machine.vtl0_guest is None or machine.engine is None:
        return []
    from hclsim.boot.vtl0_guest import record_values
    return [record_values(rec) for rec in machine.vtl0_guest.results(machine.mem)]


def _attach(exc, outcome):
    exc.outcome = outcome
    return exc


def _wait(us, deadline: float, keep_running: bool, stop) -> str:
    """How the boot ended. The deadline bounds the boot up to power off; kept running after
    power off, nothing but stop() or a panic ends it."""
    while not us.wait(0.05):
        if stop is not None and stop():
            return "interrupted"
        if time.monotonic() > deadline:
            return "timeout"
    if us.panic is not None:
        return "panic"
    if keep_running:                 # up for diag until stopped; a panic (diag crash) resets the VM
        while not (stop is not None and stop()):
            if us.panic is not None:
                return "panic"
            time.sleep(0.1)
        return "interrupted"
    return "power-off"
