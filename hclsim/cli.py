"""The `hclsim` command line. Errors are one clear line and a non-zero exit, never a traceback."""
import argparse
import json
import sys

from hclsim import HclsimError, __version__
from hclsim.config import BootConfig, parse_size

EXIT_ERROR = 1
EXIT_GUEST_FAULT = 2


def _add_boot_options(p: argparse.ArgumentParser) -> None:
    d = BootConfig()
    p.add_argument("--cpus", type=int, default=d.cpus, help="vCPUs (default %(default)s, up to 2048)")
    p.add_argument("--numa-nodes", type=int, default=d.numa_nodes, help="NUMA nodes (default %(default)s)")
    p.add_argument("--memory", type=parse_size, default=d.memory, metavar="SIZE",
                   help="guest RAM, VTL0 + VTL2 (default 1G)")
    p.add_argument("--vtl2-size", type=parse_size, default=d.vtl2_size, metavar="SIZE",
                   help="minimum VTL2 size (default 64M; grown to fit the images)")
    p.add_argument("--kernel", metavar="PATH", help="vmlinux ELF or bzImage (default: the shipped stand-in kernel)")
    p.add_argument("--initrd", metavar="PATH", help="cpio newc initrd, compressed or not (default: the shipped initrd)")
    p.add_argument("--no-initrd", action="store_true", help="boot without an initrd")
    p.add_argument("--shim", metavar="PATH", help="your own boot-shim ELF (default: built from boot/firmware/shim)")
    p.add_argument("--sidecar", metavar="PATH", help="your own sidecar kernel ELF (default: built from sidecar/firmware)")
    p.add_argument("--no-sidecar", action="store_true", help="ship no sidecar image (every CPU boots as a Linux CPU)")
    p.add_argument("--isolation", choices=["none", "vbs", "snp", "tdx"], default=d.isolation,
                   help="isolation type the VM claims (trust decisions only; default %(default)s)")
    p.add_argument("--static-cmdline", default=d.static_cmdline, metavar="STR",
                   help="the measured static command line (ParavisorCommandLine)")
    p.add_argument("--cmdline-policy", choices=["static", "append-chosen"], default=d.cmdline_policy,
                   help="whether the host's /chosen/bootargs may be appended (default %(default)s)")
    p.add_argument("--host-bootargs", default=d.host_bootargs, metavar="STR",
                   help="what the host puts in its device tree's /chosen/bootargs")
    p.add_argument("--no-com3", action="store_true", help="the host offers no serial port at 0x3E8")
    p.add_argument("--timeout", type=float, default=d.timeout, metavar="SECONDS",
                   help="stop a guest that runs this long (default %(default)s)")


def config_from_args(args) -> BootConfig:
    return BootConfig(cpus=args.cpus, numa_nodes=args.numa_nodes, memory=args.memory, vtl2_size=args.vtl2_size,
                      kernel=args.kernel, initrd=args.initrd, no_initrd=args.no_initrd, shim=args.shim,
                      sidecar=args.sidecar, no_sidecar=args.no_sidecar,
                      isolation=args.isolation, static_cmdline=args.static_cmdline,
                      cmdline_policy=args.cmdline_policy, host_bootargs=args.host_bootargs,
                      com3=not args.no_com3, timeout=args.timeout)


def cmd_boot(args) -> int:
    from hclsim.cpu.fault import GuestFaultError
    from hclsim.machine import boot
    from hclsim.report import boot_report, write_outputs

    config = config_from_args(args)
    live = None
    if not args.json and not args.quiet:
        def live(name, data):
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()
    if args.gdb or args.wait_gdb:
        from hclsim.debug.gdbserver import serve_boot
        return serve_boot(config, args.gdb, args.wait_gdb, args.out or args.json, on_serial=live)
    try:
        result = boot(config, on_serial=live)
    except GuestFaultError as exc:
        if args.out:
            paths = write_outputs(args.out, {"version": 1, "status": "fault", "error": str(exc)},
                                  getattr(exc, "serial", {}), shim_log=getattr(exc, "shim_log", None))
            (paths[0].parent / "fault.txt").write_text(exc.report + "\n")
        print(f"hclsim: error: {exc}", file=sys.stderr)
        print(exc.report.split("\n", 1)[1] if "\n" in exc.report else "", file=sys.stderr)
        return EXIT_GUEST_FAULT
    report = boot_report(result)
    if args.out:
        h = result.handoff
        write_outputs(args.out, report, result.serial, dtb=h.dtb, boot_params=h.boot_params, shim_log=result.shim_log)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_summary(result, report, args.out)
    return 0


def _print_summary(result, report, out) -> None:
    h = result.handoff
    c = result.counters
    print(f"\nhclsim: kernel handoff at {report['handoff']['kernel_entry']} "
          f"(boot_params {report['handoff']['boot_params']}), shim ran {c['instructions']:,} instructions "
          f"in {result.timings['shim_to_handoff_ms']:.2f} ms")
    print(f"  kernel:   {result.kernel.path} ({result.kernel.format}{', ' + result.kernel.version if result.kernel.version else ''})")
    if result.initrd is not None:
        print(f"  initrd:   {result.initrd.path} ({len(result.initrd.data):,} bytes at {h.initrd_gpa:#x})")
    print(f"  cmdline:  {h.cmdline}")
    print(f"  CPUs:     {len(report['cpus'])} on {len({c['numa_node'] for c in report['cpus']})} NUMA node(s)")
    print(f"  VTL2:     {report['vtl2']['base']} + {report['vtl2']['size']}")
    sc = report.get("sidecar")
    if sc:
        print(f"  sidecar:  {len(sc['nodes'])} node(s), {sc['idle_cpus']} CPUs IDLE, Linux CPUs {sc['linux_cpus']}, "
              f"bring-up {sc['bring_up_reftime_100ns'] / 10_000:.3f} ms guest time "
              f"({sc['bring_up_reftime_100ns']} x 100 ns, {sc['bring_up_instructions']:,} instructions)")
        for n in sc["nodes"]:
            states = ", ".join(f"{s} {n['cpu_status'].count(s)}" for s in dict.fromkeys(n["cpu_status"]))
            print(f"    node {n['index']}: CPUs {n['base_cpu']}-{n['base_cpu'] + n['cpu_count'] - 1}, "
                  f"control page {n['control_page']}: {states}")
    else:
        print("  sidecar:  not running")
    print("  e820:")
    for e in h.e820:
        print(f"    [{e.addr:#012x}, {e.addr + e.size:#012x}) {'RAM' if e.type == 1 else 'reserved'}")
    if out:
        print(f"  wrote {out}/report.json, serial.log, linux.dtb, boot_params.bin")


def cmd_firmware_build(args) -> int:
    from hclsim.boot import firmware
    path = firmware.build(firmware.SHIM, force=args.force, verbose=args.verbose)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hclsim", description="Simulate the OpenHCL paravisor environment.")
    parser.add_argument("--version", action="version", version=f"hclsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("boot", help="boot the VTL2 image through the boot shim to the kernel handoff")
    _add_boot_options(p)
    p.add_argument("--out", metavar="DIR", help="write report.json, serial.log, linux.dtb, boot_params.bin here")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the console")
    p.add_argument("--quiet", action="store_true", help="do not echo the guest's serial output")
    p.add_argument("--gdb", metavar="HOST:PORT", help="serve gdb's remote protocol here (gdb: target remote HOST:PORT)")
    p.add_argument("--wait-gdb", action="store_true", help="with --gdb: wait for gdb at the shim's first instruction")
    p.set_defaults(func=cmd_boot)

    from hclsim import sidecar_cli
    sidecar_cli.add_parser(sub, _add_boot_options)
    sub.choices["sidecar"].set_defaults(func=lambda args: sidecar_cli.cmd_sidecar(args, config_from_args))

    from hclsim import step_cli
    step_cli.add_parser(sub, _add_boot_options)
    sub.choices["step"].set_defaults(func=lambda args: step_cli.cmd_step(args, config_from_args))

    fw = sub.add_parser("firmware", help="firmware tools")
    fw_sub = fw.add_subparsers(dest="firmware_command", required=True)
    b = fw_sub.add_parser("build", help="build the boot shim (cached by a hash of its sources) and print its path")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--verbose", action="store_true", help="show the compiler commands")
    b.set_defaults(func=cmd_firmware_build)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HclsimError as exc:
        print(f"hclsim: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("hclsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
