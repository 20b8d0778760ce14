"""`hclsim boot --linux real --kernel BZIMAGE [--initrd CPIO]`: the boot shim, then the real
kernel on the BSP (hclsim/real_linux.py) until it powers off, halts or panics.

    hclsim boot --linux real --kernel /boot/vmlinuz-6.1.0-57-cloud-amd64       # the shipped test /init
    hclsim boot --linux real --kernel vmlinuz --initrd my.cpio --out run/      # report.json, serial.log
"""
import json
import sys

REAL_LINUX_MIN_VTL2 = 256 << 20       # the kernel's own memory: the Debian cloud kernel boots in it
EXIT_OK, EXIT_NOT_CLEAN = 0, 2
CLEAN = ("halted", "power-off")


def real_config(config):
    """The boot options' config for a real kernel: the shipped test initrd unless --initrd (or
    --no-initrd), no VTL0 test guest (VTL0 does not run), VTL2 at least 256 MiB."""
    changes = {"vtl0_guest": False, "vtl2_size": max(config.vtl2_size, REAL_LINUX_MIN_VTL2)}
    if config.initrd is None and not config.no_initrd:
        from hclsim.boot.initrd import real_init_initrd
        changes["initrd"] = str(real_init_initrd())
    return config.with_(**changes).validated()


def outcome_dict(outcome) -> dict:
    """The run as report.json's "real_linux" holds it."""
    return {"status": outcome.status, "detail": outcome.detail, "instructions": outcome.instructions,
            "wall_s": round(outcome.wall_s, 3),
            "instructions_per_s": round(outcome.instructions / outcome.wall_s) if outcome.wall_s else 0,
            "milestones": [{"name": m.name, "line": m.line, "instructions": m.instructions,
                            "wall_s": round(m.wall_s, 3)} for m in outcome.milestones],
            "command_line": outcome.command_line, "e820": outcome.e820, "panic": outcome.panic,
            "exceptions": {str(k): v for k, v in sorted(outcome.exceptions.items())},
            "interrupts": outcome.interrupts, "syscalls": outcome.syscalls, "tsc_reads": outcome.tsc_reads,
            "synthetic_msrs": outcome.synthetic_msrs,
            "idle_ns": outcome.idle_ns, "port_ios": outcome.port_ios, "port_io_ns": outcome.port_io_ns}


def cmd_real(args, config, console, new_machine, to_handoff) -> int:
    """to_handoff(args, config, console, machine, what): cli's boot to the kernel entry ((result,
    None), or (None, exit code) after it reported a guest fault)."""
    from hclsim.real_linux import RealLinux
    from hclsim.report import boot_report, write_outputs
    machine = new_machine(config, console)
    try:
        result, code = to_handoff(args, config, console, machine, " to the kernel")
        if result is None:
            return code
        run = RealLinux(machine, on_serial=console.serial, hyperv=config.hyperv)
        with console.phase("running the real kernel"):
            outcome = run.run(timeout=config.timeout)
        serial = {k: bytes(v) for k, v in machine.serial.items()}
    finally:
        machine.close()
    report = boot_report(result)
    report["real_linux"] = outcome_dict(outcome)
    wrote = []
    if args.out:
        h = result.handoff
        wrote = write_outputs(args.out, report, serial, dtb=h.dtb, boot_params=h.boot_params,
                              shim_log=result.shim_log)
    code = EXIT_OK if outcome.status in CLEAN else EXIT_NOT_CLEAN
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(outcome))
        if wrote:
            print("  wrote " + ", ".join(str(p) for p in wrote))
    if code:
        print(f"hclsim: error: the kernel did not finish cleanly: {outcome.status}: "
              f"{outcome.panic or outcome.detail}", file=sys.stderr)
    return code


def summary(outcome) -> str:
    rate = outcome.instructions / outcome.wall_s / 1e6 if outcome.wall_s else 0
    lines = [f"\nhclsim: the real kernel {outcome.status} after {outcome.instructions:,} instructions in "
             f"{outcome.wall_s:.1f} s ({rate:.0f} M instructions/s): {outcome.detail}",
             "  milestones:"]
    seen = set()
    for m in outcome.milestones:
        if m.name in ("e820", "init") and m.name in seen:
            continue
        seen.add(m.name)
        lines.append(f"    {m.instructions:>15,}  {m.wall_s:7.2f} s  {m.name:<14} {m.line[:90]}")
    if outcome.e820:
        lines.append("  e820 as Linux printed it:")
        lines += [f"    {line}" for line in outcome.e820]
    if outcome.command_line is not None:
        lines.append(f"  command line Linux saw: {outcome.command_line}")
    if outcome.panic:
        lines.append(f"  panic: {outcome.panic}")
    if outcome.synthetic_msrs is not None:
        m = outcome.synthetic_msrs
        lines.append(f"  Hyper-V synthetic MSRs: {m['reads']} reads, {m['writes']} writes, {m['refused']} refused (#GP)")
    lines.append(f"  exceptions {sum(outcome.exceptions.values())}, interrupts {outcome.interrupts}, "
                 f"syscalls {outcome.syscalls}, virtual TSC reads {outcome.tsc_reads}, idle {outcome.idle_ns / 1e9:.2f} s of virtual time, "
                 f"{outcome.port_ios} port accesses ({outcome.port_io_ns / 1e6:.1f} ms)")
    return "\n".join(lines)
