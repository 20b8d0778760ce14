"""The `hclsim` command line. Errors are one clear line and a non-zero exit, never a traceback:
bad input (options, sizes, files, the --out and cache folders) is checked before any work and
exits 1; a guest fault exits 2; Ctrl-C exits 130 with "hclsim: interrupted" at any moment; a
closed stdout pipe (`hclsim boot | head -1`) ends the run quietly with 141, as SIGPIPE would.

Only the standard library is imported before the command line is parsed (`hclsim --version`
answers without loading the simulator); each command imports what it needs.
"""
import os
import signal
import sys

EXIT_INTERRUPTED = 130


def _interrupted(signum, frame):
    """SIGINT in the CLI: say so and exit 130 right here. Raising KeyboardInterrupt instead
    could land anywhere: in an import (a C extension's initialisation aborts on it), or in a
    Python callback that Unicorn or numba code called (ctypes prints and drops it, and the boot
    goes on)."""
    try:
        os.write(2, b"hclsim: interrupted\n")
    finally:
        os._exit(EXIT_INTERRUPTED)


def install_interrupt_handler() -> None:
    try:
        signal.signal(signal.SIGINT, _interrupted)
    except ValueError:                   # not the main thread: leave Ctrl-C alone
        pass


if os.path.basename(sys.argv[0] if sys.argv else "") == "hclsim":
    install_interrupt_handler()          # the console script: from its first import on


from hclsim import HclsimError, __version__  # noqa: E402  (after the Ctrl-C handler)

EXIT_ERROR = 1
EXIT_GUEST_FAULT = 2
EXIT_BROKEN_PIPE = 141          # 128 + SIGPIPE
DEFAULT_GDB_ADDRESS = "127.0.0.1:1234"   # `-s`, as QEMU's


class UsageError(HclsimError):
    """A bad command line or option value (one line, exit status 1)."""


def _parser_class():
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse, but a bad command line is one error line and exit status 1 (UsageError)."""

        def error(self, message):
            raise UsageError(f"{message} (see {self.prog} --help)")
    return Parser


def _size(text: str) -> int:
    import argparse
    from hclsim.config import ConfigError, parse_size
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    import argparse
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: a number of seconds, e.g. 30 or 0.5") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of seconds")
    return value


def _add_boot_options(p, suppress: bool = False) -> None:
    """The boot options (hclsim boot, sidecar, step). suppress: no defaults (an action
    sub-parser that takes them again after the action, without overriding the ones before)."""
    import argparse
    from hclsim.config import BootConfig
    d = BootConfig()

    def default(value):
        return argparse.SUPPRESS if suppress else value
    p.add_argument("--cpus", type=int, default=default(d.cpus), help="vCPUs (default 4, up to 2048)")
    p.add_argument("--numa-nodes", type=int, default=default(d.numa_nodes), help="NUMA nodes (default 1)")
    p.add_argument("--memory", type=_size, default=default(d.memory), metavar="SIZE",
                   help="guest RAM, VTL0 + VTL2 (default 1G; suffixes K, M, G)")
    p.add_argument("--vtl2-size", type=_size, default=default(d.vtl2_size), metavar="SIZE",
                   help="minimum VTL2 size (default 64M; grown to fit the images, within --memory)")
    p.add_argument("--kernel", metavar="PATH", default=default(None),
                   help="vmlinux ELF or bzImage (default: the shipped stand-in kernel)")
    p.add_argument("--initrd", metavar="PATH", default=default(None),
                   help="cpio newc initrd, compressed or not (default: the shipped initrd)")
    p.add_argument("--no-initrd", action="store_true", default=default(False), help="boot without an initrd")
    p.add_argument("--shim", metavar="PATH", default=default(None),
                   help="your own boot-shim ELF (default: built from boot/firmware/shim)")
    p.add_argument("--sidecar", metavar="PATH", default=default(None),
                   help="your own sidecar kernel ELF (default: built from sidecar/firmware)")
    p.add_argument("--no-sidecar", action="store_true", default=default(False),
                   help="ship no sidecar image (every CPU boots as a Linux CPU)")
    p.add_argument("--isolation", choices=["none", "vbs", "snp", "tdx"], default=default(d.isolation),
                   help="isolation type the VM claims (trust decisions only; default none)")
    p.add_argument("--static-cmdline", default=default(d.static_cmdline), metavar="STR",
                   help="the measured static command line (ParavisorCommandLine)")
    p.add_argument("--cmdline-policy", choices=["static", "append-chosen"], default=default(d.cmdline_policy),
                   help="whether the host's /chosen/bootargs may be appended (default append-chosen)")
    p.add_argument("--host-bootargs", default=default(d.host_bootargs), metavar="STR",
                   help="what the host puts in its device tree's /chosen/bootargs")
    p.add_argument("--no-com3", action="store_true", default=default(False),
                   help="the host offers no serial port at 0x3E8")
    p.add_argument("--timeout", type=_seconds, default=default(d.timeout), metavar="SECONDS",
                   help="stop a guest that runs this long, in host seconds (default 120)")
    p.add_argument("--vtl0-iterations", type=int, default=default(d.vtl0_iterations), metavar="N",
                   help=f"loop iterations of the VTL0 test guest's workload on every VP (default {d.vtl0_iterations})")
    p.add_argument("--vtl0-cmdline", default=default(d.vtl0_cmdline), metavar="STR",
                   help=f"the VTL0 test guest's command line, which it measures into the vTPM (default {d.vtl0_cmdline!r})")


def _add_output_options(p, suppress: bool = False, what: str = "report.json, serial.log, linux.dtb, "
                        "boot_params.bin, shim.log") -> None:
    import argparse

    def default(value):
        return argparse.SUPPRESS if suppress else value
    p.add_argument("--out", metavar="DIR", default=default(None), help=f"write {what} here")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="print JSON on stdout instead of the console text")
    p.add_argument("--quiet", action="store_true", default=default(False),
                   help="do not echo the guest's serial output, no progress lines")


# ---- checks before any work ---------------------------------------------------------------

def check_out_dir(path) -> None:
    """UsageError unless `--out path` can take every file a run writes there: a folder (made
    if missing) in which files can be created, with no folder or read-only file in the way.
    Nothing is left behind by the check."""
    import tempfile
    from pathlib import Path
    from hclsim.report import OUTPUT_NAMES
    out = Path(path)
    made = []
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {path}: is a file, not a folder")
        missing = out
        while not missing.exists() and missing != missing.parent:
            made.append(missing)
            missing = missing.parent
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_NAMES:
            target = out / name
            if target.is_dir():
                raise UsageError(f"--out {path}: {name} there is a folder, not a file")
            if target.exists() and not os.access(target, os.W_OK):
                raise UsageError(f"--out {path}: {name} there cannot be overwritten")
        fd, probe = tempfile.mkstemp(dir=out, prefix=".hclsim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write there: {exc.strerror or exc}") from None
    finally:
        for folder in made:          # the run makes them again when it writes
            try:
                folder.rmdir()
            except OSError:
                pass


def check_guest_ram(size: int) -> None:
    """GuestMemoryError now, before anything is built, if this host cannot map size bytes of
    guest RAM (the memfd is sparse: nothing is touched)."""
    from hclsim.cpu.memory import GuestMemory
    GuestMemory(size).close()


def config_from_args(args):
    """The validated BootConfig of the boot options, after the checks that need no work: the
    option values, the --out folder, the cache folder, whether the guest RAM can be mapped."""
    from hclsim.boot import firmware
    from hclsim.config import BootConfig
    config = BootConfig(cpus=args.cpus, numa_nodes=args.numa_nodes, memory=args.memory, vtl2_size=args.vtl2_size,
                        kernel=args.kernel, initrd=args.initrd, no_initrd=args.no_initrd, shim=args.shim,
                        sidecar=args.sidecar, no_sidecar=args.no_sidecar,
                        isolation=args.isolation, static_cmdline=args.static_cmdline,
                        cmdline_policy=args.cmdline_policy, host_bootargs=args.host_bootargs,
                        com3=not args.no_com3, timeout=args.timeout,
                        vtl0_iterations=args.vtl0_iterations,
                        device_workers=tuple(getattr(args, "device_worker", None) or ()),
                        tpm=bool(getattr(args, "tpm", False)), state_dir=getattr(args, "state", None),
                        vtl0_cmdline=args.vtl0_cmdline, linux=getattr(args, "linux", "stand-in"),
                        hyperv=bool(getattr(args, "hyperv", False))).validated()
    for option in ("kernel", "initrd", "shim", "sidecar"):
        path = getattr(config, option)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--{option} {path}: no such file")
    if getattr(args, "out", None):
        check_out_dir(args.out)
    firmware.check_cache_dir()
    check_guest_ram(config.memory)
    return config


def __getattr__(name):
    """hclsim.cli.Console, imported only when asked for (--version must import nothing)."""
    if name == "Console":
        from hclsim.console import Console
        return Console
    raise AttributeError(name)


def _wrote(paths) -> str:
    return "wrote " + ", ".join(str(p) for p in paths)


def cmd_boot(args) -> int:
    if args.gdb or args.wait_gdb:
        return _boot_gdb(args)
    config = config_from_args(args)
    if config.linux == "real":
        if args.until == "handoff" or args.keep_running or args.vsock or args.state:
            raise UsageError("--linux real runs the kernel itself to its power off: drop --until handoff, "
                             "--keep-running, --vsock and --state (they are the paravisor userspace's)")
        from hclsim import real_linux_cli
        from hclsim.console import Console
        console = Console(echo=not args.json and not args.quiet, progress=not args.json and not args.quiet)
        return real_linux_cli.cmd_real(args, real_linux_cli.real_config(config), console, _new_machine,
                                       _to_handoff)
    import json
    from hclsim.report import boot_report, write_outputs

    from hclsim.console import Console
    console = Console(echo=not args.json and not args.quiet, progress=not args.json and not args.quiet)
    if args.until != "handoff":
        from hclsim import run_cli
        if not _firmware_cached(config):
            _new_machine(config, console).close()      # build the firmware once, with its progress line
        return run_cli.cmd_run(args, config, console)
    if args.keep_running:
        raise UsageError("--keep-running keeps the paravisor up after power off: it needs the whole run "
                         "(drop --until handoff)")
    if args.vsock:
        raise UsageError("--vsock is the paravisor's diag address: it needs the whole run (drop --until handoff)")
    if args.state:
        raise UsageError("--state is the VM's state folder for its devices: it needs the whole run (drop --until handoff)")
    if args.tpm:
        raise UsageError("--tpm puts the vTPM on the VM worker's bus: it needs the whole run (drop --until handoff)")
    machine = _new_machine(config, console)
    try:
        result, code = _to_handoff(args, config, console, machine, "")
        if result is None:
            return code
    finally:
        machine.close()
    report = boot_report(result)
    wrote = []
    if args.out:
        h = result.handoff
        wrote = write_outputs(args.out, report, result.serial, dtb=h.dtb, boot_params=h.boot_params,
                              shim_log=result.shim_log)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_summary(result, report)
    if wrote:
        print(f"  {_wrote(wrote)}")
    return 0


def _new_machine(config, console):
    """Machine(config), with a progress line if the firmware must be built first (first use)."""
    from hclsim.machine import Machine
    if _firmware_cached(config):
        return Machine(config, on_serial=console.serial)
    from hclsim.boot import firmware
    with console.phase(f"building the firmware (first use; cached in {firmware.cache_dir()})"):
        return Machine(config, on_serial=console.serial)


def _firmware_cached(config) -> bool:
    from hclsim.boot import firmware
    from hclsim.kernel_stub import images
    specs = [firmware.VTL0_GUEST]
    specs += [] if config.shim else [firmware.SHIM]
    specs += [] if config.sidecar or config.no_sidecar else [firmware.SIDECAR]
    specs += [] if config.kernel else [images.STANDIN_KERNEL]
    try:
        return all(firmware.cached_path(spec).exists() for spec in specs)
    except (HclsimError, OSError):
        return True                    # the build itself will say what is wrong


def _to_handoff(args, config, console, machine, what: str):
    """The boot to the kernel entry, as a console phase: (its result, None), or after a guest
    fault (None, the exit code), the fault reported."""
    from hclsim.cpu.fault import GuestFaultError
    from hclsim.report import fault_report
    try:
        with console.phase(f"booting {config.cpus} vCPU{'s' if config.cpus > 1 else ''}{what}"):
            return machine.run_to_handoff(), None
    except GuestFaultError as exc:
        return None, _report_fault(args, exc, fault_report(exc, config, machine))


def _report_fault(args, exc, report: dict) -> int:
    """A guest fault: the error line on stderr, then the report (text on stderr, or JSON on
    stdout with --json); with --out the report also as report.json and fault.txt."""
    import json
    from hclsim.report import write_outputs
    wrote = []
    if args.out:
        wrote = write_outputs(args.out, report, getattr(exc, "serial", {}) or {},
                              shim_log=getattr(exc, "shim_log", None), files={"fault.txt": exc.report + "\n"})
    print(f"hclsim: error: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_GUEST_FAULT
    rest = exc.report.split("\n", 1)[1] if "\n" in exc.report else ""
    print(rest.lstrip("\n"), file=sys.stderr)
    if wrote:
        print(f"hclsim: {_wrote(wrote)}", file=sys.stderr)
    return EXIT_GUEST_FAULT


def _boot_gdb(args) -> int:
    if args.wait_gdb and not args.gdb:
        raise UsageError(f"--wait-gdb (-S) needs --gdb HOST:PORT (or -s: {DEFAULT_GDB_ADDRESS})")
    if args.json:
        raise UsageError("--gdb runs an interactive session: it prints no JSON report (drop --json; --out works)")
    config = config_from_args(args)              # checks the --out folder too, before the boot
    if config.linux == "real":
        if args.out:
            raise UsageError("--gdb with --linux real writes no --out files (run without --gdb for report.json)")
        from hclsim.real_linux_cli import real_config
        config = real_config(config)
    from hclsim.debug.gdbserver import serve_boot
    from hclsim.console import Console
    console = Console(echo=not args.quiet, progress=False)
    finish = (lambda machine, target: _gdb_outputs(args.out, machine, target)) if args.out else None
    return serve_boot(config, args.gdb, args.wait_gdb, False, on_serial=console.serial if not args.quiet else None,
                      finish=finish)


def _gdb_outputs(out, machine, target) -> None:
    """--gdb --out: what the session's run left, as `hclsim boot --out` writes it: report.json,
    the serial logs, linux.dtb, boot_params.bin and shim.log once the kernel took the handoff;
    else the serial logs, the shim log and, after a fault, fault.txt."""
    from hclsim.boot import image as vtl_image
    from hclsim.report import boot_report, write_outputs
    result = target.boot_result
    serial = {k: bytes(v) for k, v in machine.serial.items()}
    if result is not None:
        h = result.handoff
        wrote = write_outputs(out, boot_report(result), serial, dtb=h.dtb, boot_params=h.boot_params,
                              shim_log=result.shim_log)
    else:
        from dataclasses import asdict
        config = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                  for k, v in asdict(machine.config).items() if k != "host_cpu_order"}
        report = {"status": "no-handoff", "config": config,
                  "serial_lines": {k: v.count(b"\n") for k, v in serial.items()}}
        files = {"fault.txt": target.last_fault_report + "\n"} if target.last_fault_report else None
        wrote = write_outputs(out, report, serial, shim_log=vtl_image.read_shim_log(machine.mem, machine.image),
                              files=files)
    print(f"hclsim: {_wrote(wrote)}", file=sys.stderr)


def _print_summary(result, report) -> None:
    from hclsim.config import format_size
    from hclsim.report import e820_type_name, serial_notes, sidecar_off_reason
    h = result.handoff
    c = result.counters
    cfg = result.config
    lay = result.image.layout
    print(f"\nhclsim: kernel handoff at {report['handoff']['kernel_entry']} "
          f"(boot_params {report['handoff']['boot_params']}), shim ran {c['instructions']:,} instructions "
          f"in {result.timings['shim_to_handoff_ms']:.2f} ms (host time)")
    print(f"  kernel:   {result.kernel.path} ({result.kernel.format}{', ' + result.kernel.version if result.kernel.version else ''})")
    if result.initrd is not None:
        print(f"  initrd:   {result.initrd.path} ({format_size(len(result.initrd.data))} at {h.initrd_gpa:#x})")
    print(f"  cmdline:  {h.cmdline}")
    print(f"  CPUs:     {len(report['cpus'])} on {len({c['numa_node'] for c in report['cpus']})} NUMA node(s)")
    print(f"  memory:   {format_size(cfg.memory)} of guest RAM")
    grown = (f"; grown from --vtl2-size {format_size(cfg.vtl2_size)} to fit the images"
             if lay.vtl2_size > cfg.vtl2_size else "")
    print(f"  VTL2:     {format_size(lay.vtl2_size)} at {format_size(lay.vtl2_base)} "
          f"[{lay.vtl2_base:#x}, {lay.vtl2_base + lay.vtl2_size:#x}){grown}")
    for label, note in serial_notes(cfg, result.serial, h.cmdline):
        print(f"  {label + ':':<9} {note}")
    sc = report.get("sidecar")
    if sc:
        print(f"  sidecar:  {len(sc['nodes'])} node(s), {sc['idle_cpus']} CPUs IDLE, Linux CPUs "
              f"{_cpu_list(sc['linux_cpus'])}, bring-up {sc['bring_up_reftime_100ns'] / 10_000:.3f} ms guest time "
              f"({sc['bring_up_reftime_100ns']} x 100 ns, {sc['bring_up_instructions']:,} instructions)")
        for n in sc["nodes"]:
            states = ", ".join(f"{s} {n['cpu_status'].count(s)}" for s in dict.fromkeys(n["cpu_status"]))
            print(f"    node {n['index']}: CPUs {n['base_cpu']}-{n['base_cpu'] + n['cpu_count'] - 1}, "
                  f"control page {n['control_page']}: {states}")
    else:
        print(f"  sidecar:  {sidecar_off_reason(cfg, result.shim_log)}")
    print("  e820:")
    for e in h.e820:
        print(f"    [{e.addr:#012x}, {e.addr + e.size:#012x}) {e820_type_name(e.type):<9} {format_size(e.size)}")


def _cpu_list(cpus) -> str:
    """'0, 32, 64' or '0-7, 9' for long runs."""
    cpus = sorted(cpus)
    runs, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            runs.append(f"{start}" if start == cpu else f"{start}-{cpu}" if cpu > start + 1 else f"{start}, {cpu}")
            start = None
    return ", ".join(runs) or "none"


# ---- firmware build -----------------------------------------------------------------------

def _firmware_images() -> dict:
    from hclsim.boot import firmware
    from hclsim.kernel_stub import images
    return {"shim": firmware.SHIM, "sidecar": firmware.SIDECAR, "vtl0": firmware.VTL0_GUEST,
            "kernel": images.STANDIN_KERNEL, "init": firmware.INIT}


FIRMWARE_IMAGE_NAMES = ("shim", "sidecar", "vtl0", "kernel", "init")


def cmd_firmware_build(args) -> int:
    from hclsim.boot import firmware
    names = list(FIRMWARE_IMAGE_NAMES) if args.all else list(dict.fromkeys(args.image or ["shim"]))
    specs = _firmware_images()
    firmware.check_cache_dir()
    from hclsim.console import Console
    console = Console(echo=False, progress=True)
    paths = {}
    for name in names:
        spec = specs[name]
        if args.force or not firmware.cached_path(spec).exists():
            with console.phase(f"building the {name} image"):
                paths[name] = firmware.build(spec, force=args.force, verbose=args.verbose)
        else:
            paths[name] = firmware.build(spec)
    if len(paths) == 1:
        print(next(iter(paths.values())))
    else:
        for name, path in paths.items():
            print(f"{name} {path}")
    return 0


# ---- the parser -----------------------------------------------------------------------------

def build_parser():
    Parser = _parser_class()
    parser = Parser(prog="hclsim", description="Simulate the OpenHCL paravisor environment.")
    parser.add_argument("--version", action="version", version=f"hclsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="boot, sidecar, step, diag or firmware")

    p = sub.add_parser("boot", help="boot the paravisor: the boot shim, the kernel stand-in, its userspace "
                                    "processes and the VTL0 guest on every vCPU, until power off")
    _add_boot_options(p)
    _add_output_options(p, what="report.json, serial.log, linux.dtb, boot_params.bin, shim.log, kmsg.log, com1.log")
    p.add_argument("--until", choices=["handoff", "power-off"], default="power-off",
                   help="stop at the kernel handoff (firmware only), or run the whole system until the "
                        "guest powers off (default)")
    p.add_argument("--device-worker", action="append", metavar="NAME",
                   help="run the VTL0 device NAME (test_port, mmio_test, loop_port) in a device worker "
                        "process of its own (repeatable)")
    p.add_argument("--linux", choices=["stand-in", "real"], default="stand-in",
                   help="who takes the shim's handoff: the Linux stand-in and the paravisor's userspace "
                        "(default), or the --kernel image itself on the BSP until it powers off (real)")
    p.add_argument("--hyperv", action="store_true",
                   help="with --linux real: show the kernel the Hyper-V interface (its CPUID leaves, synthetic "
                        "MSRs and the reference TSC page from the hypervisor model, hypercalls) instead of a bare PC")
    p.add_argument("--tpm", action="store_true",
                   help="give the VM a vTPM (TPM 2.0 on swtpm) in its own device worker, underhill-tpm")
    p.add_argument("--state", metavar="DIR",
                   help="the VM's state folder, kept across runs: its VMGS (the vTPM's NV and PPI state) lives "
                        "there (default: a fresh one in the run's folder)")
    p.add_argument("--vsock", metavar="PATH",
                   help="put the host side of the VM's hybrid vsock (the diag server's address) at PATH "
                        "(default: vsock.sock in the run's folder); with --keep-running")
    p.add_argument("--keep-running", action="store_true",
                   help="stay up after power off (for the diag server) until Ctrl-C or SIGTERM")
    p.add_argument("--gdb", metavar="HOST:PORT", help="serve gdb's remote protocol here (gdb: target remote HOST:PORT)")
    p.add_argument("-s", dest="gdb", action="store_const", const=DEFAULT_GDB_ADDRESS,
                   help=f"shorthand for --gdb {DEFAULT_GDB_ADDRESS} (as QEMU's -s)")
    p.add_argument("--wait-gdb", "-S", dest="wait_gdb", action="store_true",
                   help="with --gdb: wait for gdb at the shim's first instruction (-S, as QEMU's)")
    p.set_defaults(func=cmd_boot)

    from hclsim import sidecar_cli
    sidecar_cli.add_parser(sub, _add_boot_options, _add_output_options)
    sub.choices["sidecar"].set_defaults(func=lambda args: sidecar_cli.cmd_sidecar(args, config_from_args))

    from hclsim import step_cli
    step_cli.add_parser(sub, _add_boot_options)
    sub.choices["step"].set_defaults(func=lambda args: step_cli.cmd_step(args, config_from_args))

    from hclsim import diag_cli
    diag_cli.add_parser(sub)
    sub.choices["diag"].set_defaults(func=diag_cli.cmd_diag)

    from hclsim import vmgs_cli
    vmgs_cli.add_parser(sub)

    fw = sub.add_parser("firmware", help="firmware tools")
    fw_sub = fw.add_subparsers(dest="firmware_command", required=True, metavar="{build}")
    b = fw_sub.add_parser("build", help="build the firmware images (cached by a hash of their sources) and print their paths")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--verbose", action="store_true", help="show the compiler commands")
    b.add_argument("--image", action="append", choices=FIRMWARE_IMAGE_NAMES, metavar="NAME",
                   help=f"which image: {', '.join(FIRMWARE_IMAGE_NAMES)} (default shim; repeatable)")
    b.add_argument("--all", action="store_true", help="every image, one 'NAME PATH' line each")
    b.set_defaults(func=cmd_firmware_build)
    return parser


def _run(argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:          # without building the parser (which loads the simulator)
        print(f"hclsim {__version__}")
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "step":             # the prompt uses Ctrl-C to interrupt `continue`
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return args.func(args)


def _quiet_stdout() -> None:
    """After a broken pipe: nothing more reaches stdout (nor the flush at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv=None) -> int:
    """The hclsim command; its exit status. As the program's entry (argv None) Ctrl-C exits 130
    at once, and the process ends here once its output is flushed (os._exit): tearing the
    interpreter down (engines, numba) takes a while in which Ctrl-C would only kill it."""
    if argv is None:
        install_interrupt_handler()
        status = _guarded(None)
        _flush()
        os._exit(status)
    return _guarded(argv)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout:
                _quiet_stdout()


def _guarded(argv) -> int:
    try:
        status = _run(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except HclsimError as exc:
        print(f"hclsim: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hclsim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"hclsim: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:           # --help, --version
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line (HCLSIM_TRACEBACK=1 shows where)
        if os.environ.get("HCLSIM_TRACEBACK"):
            raise
        print(f"hclsim: internal error: {type(exc).__name__}: {exc} (HCLSIM_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
