"""`hclsim boot` running the whole system (the default; `--until handoff` keeps the firmware-only
boot in hclsim/cli.py): the boot shim's and the kernel's console (COM3) and the VTL0 console
(COM1) live, then a timeline (shim entry, handoff, PID 1, worker started, VTL0 running, power
off), the processes, and with --out kmsg.log, com1.log and the process tree in report.json.
"""
import json
import signal
import sys
import threading

EXIT_GUEST_FAULT = 2
TIMELINE_NAMES = {"shim": "boot shim entry", "handoff": "kernel handoff", "rootfs": "initrd unpacked as the rootfs",
                  "pid1": "PID 1 started", "worker": "worker started", "vtl0": "VTL0 running", "power-off": "power off", "panic": "kernel panic",
                  "reset": "VM reset"}


def system_report(outcome, base_report: dict) -> dict:
    report = dict(base_report)
    report["status"] = outcome.status
    report["system"] = {
        "status": outcome.status, "boots": outcome.boots, "resets": outcome.resets, "panic": outcome.panic,
        "timeline": [{"event": name, "t_s": round(t, 6), "detail": detail} for name, t, detail in
                     outcome.timeline.events],
        "processes": outcome.process_tree,
        "vtl0_console": {str(vp): text.decode("utf-8", "replace") for vp, text in outcome.consoles.items()},
    }
    return report


class Echo:
    """Live output: COM3 (the shim and the kernel's console) as it comes, VTL0's COM1 lines
    prefixed "vtl0: "; all under one lock so lines do not interleave mid-line."""

    def __init__(self, console, enabled: bool):
        self.console, self.enabled = console, enabled
        self.lock = threading.Lock()

    def kmsg(self, record) -> None:
        self.console.serial("COM3", record.dmesg())

    def com1(self, vp: int, data: bytes) -> None:
        if not self.enabled:
            return
        with self.lock:
            text = data.decode("utf-8", "replace")
            sys.stdout.write("".join(f"vtl0: {line}\n" for line in text.splitlines()))
            sys.stdout.flush()


def cmd_run(args, config, console) -> int:
    from hclsim.cpu.fault import GuestFaultError
    from hclsim.report import boot_report, write_outputs
    from hclsim.system import SystemError_, run_system
    echo = Echo(console, not args.json and not args.quiet)
    stop = threading.Event()
    if args.keep_running and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        vcpus = f"{config.cpus} vCPU{'s' if config.cpus > 1 else ''}"

        def phase(name, _t, detail):
            if name == "vsock":
                if args.keep_running:
                    console.note(f"diag: hclsim diag vsock:{detail} inspect   (the VM's hybrid vsock)")
            elif name == "shim":
                console.switch(f"booting {vcpus}")
            elif name == "handoff":
                console.switch(f"running the paravisor on {vcpus}")
        with console.phase(f"booting {vcpus}"):
            outcome = run_system(config, on_serial=console.serial, on_kmsg=echo.kmsg, on_console=echo.com1,
                                 keep_running=args.keep_running, stop=stop.is_set, on_event=phase,
                                 vsock_path=args.vsock)
    except GuestFaultError as exc:
        from hclsim.cli import _report_fault
        return _report_fault(args, exc, getattr(exc, "report_dict", None) or {"status": "fault", "error": str(exc)})
    except SystemError_ as exc:
        outcome = getattr(exc, "outcome", None)
        if outcome is not None and args.out:
            _write(args, outcome, system_report(outcome, boot_report(outcome.boot)), write_outputs)
        print(f"hclsim: error: {exc}", file=sys.stderr)
        if outcome is not None and not args.quiet:
            print(outcome.kmsg.rstrip("\n").rsplit("\n", 12)[-1] if outcome.kmsg else "", file=sys.stderr)
        return EXIT_GUEST_FAULT
    report = system_report(outcome, boot_report(outcome.boot))
    wrote = _write(args, outcome, report, write_outputs) if args.out else []
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from hclsim.cli import _print_summary
        _print_summary(outcome.boot, report)
        print_timeline(outcome)
        if wrote:
            print(f"  wrote {', '.join(str(p) for p in wrote)}")
    if outcome.status == "timeout":
        print(f"hclsim: error: the guest did not power off within {config.timeout:g} s", file=sys.stderr)
        return EXIT_GUEST_FAULT
    return 0


def _write(args, outcome, report, write_outputs):
    boot = outcome.boot
    h = boot.handoff
    serial = outcome.serial
    return write_outputs(args.out, report, serial, dtb=h.dtb, boot_params=h.boot_params, shim_log=boot.shim_log,
                         files={"kmsg.log": outcome.kmsg, "com1.log": outcome.com1})


def print_timeline(outcome) -> None:
    ends = {"power-off": "powered off", "interrupted": "stopped", "timeout": "timed out", "panic": "panicked"}
    total = outcome.timeline.events[-1][1] if outcome.timeline.events else 0.0
    print(f"\nhclsim: the VM {ends.get(outcome.status, outcome.status)} after {total:.3f} s (host time)"
          + (f", {outcome.resets} reset{'s' if outcome.resets != 1 else ''}" if outcome.resets else ""))
    print("  timeline:")
    for name, t, detail in outcome.timeline.events:
        label = TIMELINE_NAMES.get(name, name)
        if name in ("process", "worker"):      # "underhill-vm (pid 12, parent 11): argv"
            comm, _, rest = detail.partition(" (")
            label = f"{'worker' if name == 'worker' else 'process'} started ({comm})"
            detail = rest.replace(")", "", 1) if rest else ""
        print(f"    {t:8.3f} s  {label}" + (f": {detail}" if detail else ""))
    print("  processes:")
    for p in outcome.process_tree:
        status = f", {p['exit_status']}" if p["exit_status"] else ""
        print(f"    {p['pid']:>7}  parent {p['ppid']:>7}  {p['comm']:<16} {' '.join(p['argv'])}{status}")
    lines = sum(text.count(b"\n") for text in outcome.consoles.values())
    print(f"  VTL0 console: {lines} lines from {len(outcome.consoles)} VPs")
