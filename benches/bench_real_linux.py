"""A real Linux kernel on the shim's handoff (issue 13), timed against QEMU TCG in the same run.

- test_shim_to_init_vs_qemu: `--linux real` from the shim's first instruction to the shipped
  /init's first line and to the kernel's halt, vs qemu-system-x86_64 (TCG, Debian's) booting the
  same kernel, initrd and command line (the one Linux saw in hclsim) to /init's first line and to
  its exit (-no-reboot); rounds alternate. Goal: hclsim's wall time to /init within 1.5x QEMU's.
  Also the guest instructions per second in the kernel phase.

    .venv/bin/pytest benches/bench_real_linux.py --benchmark-only -s

The kernel is HCLSIM_REAL_KERNEL, else .ci/real-images.sh's (HCLSIM_REAL_IMAGES), else the
newest /boot/vmlinuz-*.
"""
import glob
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from hclsim.benches.goals import check_goal

ROUNDS = 3


def _kernel() -> str | None:
    if os.environ.get("HCLSIM_REAL_KERNEL"):
        return os.environ["HCLSIM_REAL_KERNEL"]
    ci = Path(os.environ.get("HCLSIM_REAL_IMAGES") or "/var/cache/hclsim-real-images") / "vmlinuz"
    if ci.is_file():
        return str(ci)
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    return found[-1] if found else None


def _hclsim(kernel: str) -> dict:
    from hclsim.config import BootConfig
    from hclsim.machine import Machine
    from hclsim.real_linux import RealLinux
    from hclsim.real_linux_cli import real_config
    config = real_config(BootConfig(cpus=1, kernel=kernel, linux="real", timeout=300))
    t0 = time.perf_counter()
    machine = Machine(config)
    try:
        machine.run_to_handoff()
        shim_s = time.perf_counter() - t0
        outcome = RealLinux(machine).run(timeout=config.timeout)
    finally:
        machine.close()
    first_init = outcome.first("init")
    kernel_s = outcome.wall_s
    return {"init_s": shim_s + first_init.wall_s, "end_s": shim_s + kernel_s, "status": outcome.status,
            "instructions": outcome.instructions, "ips": outcome.instructions / kernel_s,
            "cmdline": outcome.command_line, "initrd": config.initrd}


def _qemu(kernel: str, initrd: str, cmdline: str) -> dict:
    """QEMU TCG to /init's first line and to its exit; the console on ttyS2 as in hclsim."""
    args = [shutil.which("qemu-system-x86_64"), "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline, "-monitor", "none",
            "-serial", "null", "-serial", "null", "-serial", "stdio"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    init_s, tail = None, b""
    for line in proc.stdout:
        if init_s is None and line.lstrip(b"\r").startswith(b"init: "):
            init_s = time.perf_counter() - t0
        tail = (tail + line)[-4096:]
    proc.wait(300)
    end_s = time.perf_counter() - t0
    if init_s is None:
        raise AssertionError(f"QEMU did not reach /init: {tail.decode(errors='replace')}")
    return {"init_s": init_s, "end_s": end_s}


def test_shim_to_init_vs_qemu(benchmark):
    kernel = _kernel()
    if kernel is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs a distribution kernel and qemu-system-x86_64 (.ci/run installs qemu-system-x86)")
    ours, theirs = [], []

    def round_():
        ours.append(_hclsim(kernel))
        theirs.append(_qemu(kernel, ours[-1]["initrd"], ours[-1]["cmdline"]))
    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=0)
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    h_init, q_init = med(ours, "init_s"), med(theirs, "init_s")
    h_end, q_end, ips = med(ours, "end_s"), med(theirs, "end_s"), med(ours, "ips")
    benchmark.extra_info.update(kernel=kernel, hclsim_to_init_s=round(h_init, 2), qemu_to_init_s=round(q_init, 2),
                                hclsim_to_halt_s=round(h_end, 2), qemu_to_exit_s=round(q_end, 2),
                                ratio_to_init=round(h_init / q_init, 2), instructions=ours[0]["instructions"],
                                kernel_instructions_per_s=round(ips))
    print(f"\nshim entry -> /init's first line: hclsim {h_init:.2f} s, QEMU TCG {q_init:.2f} s "
          f"({h_init / q_init:.2f}x); -> halt / exit: {h_end:.2f} s vs {q_end:.2f} s; "
          f"{ours[0]['instructions']:,} kernel instructions at {ips / 1e6:.0f} M/s")
    assert all(r["status"] == "halted" for r in ours)
    check_goal(benchmark, "shim entry -> /init, vs QEMU TCG (same run)", h_init / q_init, 1.5, unit="x")
