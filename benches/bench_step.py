"""The debugger's costs (issue 4 goals): one `stepi` at the `hclsim step` prompt (<= 1 ms), and a
boot (shim entry -> kernel handoff, 64 vCPUs with the sidecar) under the debugger with a
breakpoint that is never hit (< 5% slower than the plain boot; the ratio is in extra_info).
    .venv/bin/pytest benches/bench_step.py --benchmark-only
"""
import io

import pytest

from hclsim.benches.goals import check_goal, median_s
from hclsim.config import BootConfig
from hclsim.debug.target import DebugTarget
from hclsim.machine import Machine
from hclsim.step_cli import StepShell

BOOT = BootConfig(cpus=64, numa_nodes=2)
_medians = {}


def test_stepi_at_the_prompt(benchmark):
    """`stepi` as typed at the prompt: the step, then the stop line and its instruction."""
    machine = Machine(BootConfig(cpus=4))
    target = DebugTarget(machine)
    shell = StepShell(target, io.StringIO(), 30)
    try:
        shell.onecmd("break shim_main")
        shell.onecmd("continue")
        shell.onecmd("stepi")  # the first step of a session retranslates everything once
        benchmark.pedantic(lambda: shell.onecmd("stepi"), rounds=300, warmup_rounds=5)
        assert not shell.failed
        median = median_s(benchmark)
        check_goal(benchmark, "stepi at the prompt (median)", None if median is None else median * 1e3, 1,
                   unit=" ms")
    finally:
        target.close()
        machine.close()


@pytest.mark.parametrize("mode", ["plain", "debugger", "never-hit-breakpoint", "exit-address-breakpoint",
                                  "never-hit-watchpoint"])
def test_boot_under_the_debugger(benchmark, mode):
    """plain: Machine.run_to_handoff; debugger: DebugTarget.cont to the handoff; then the same
    with a breakpoint on the boot shim's panic(), which a good boot never reaches. For
    comparison, the alternatives: panic() as a Unicorn exit address (the scheduler's stop
    addresses) in a plain boot, and a watchpoint on a guest page nothing touches."""
    live = []

    def setup():
        while live:
            target, machine = live.pop()
            if target is not None:
                target.close()
            machine.close()
        machine = Machine(BOOT)
        target = None if mode in ("plain", "exit-address-breakpoint") else DebugTarget(machine)
        if mode == "never-hit-breakpoint":
            target.add_breakpoint(target.resolve("shim:panic"))
        elif mode == "exit-address-breakpoint":
            panic = machine.image.shim_base + machine.shim.symbol("panic")
            machine.scheduler.set_stop_addresses(machine.scheduler.stop_addresses | {panic})
        elif mode == "never-hit-watchpoint":
            target.add_watchpoint(0x7000, 8, "w", physical=True)  # a VTL0 page nothing uses during the boot
        live.append((target, machine))
        return (target, machine), {}

    def boot(target, machine):
        if target is None:
            result = machine.run_to_handoff()
            machine.scheduler.set_stop_addresses({machine.image.kernel_entry})
            return result
        stop = target.cont(timeout=60)
        assert stop.reason == "handoff", stop
        return target.boot_result

    result = benchmark.pedantic(boot, setup=setup, rounds=15, warmup_rounds=2)
    for target, machine in live:
        if target is not None:
            target.close()
        machine.close()
    _medians[mode] = median_s(benchmark)
    benchmark.extra_info["instructions"] = result.counters["instructions"]
    if mode != "plain" and _medians.get("plain") and _medians[mode]:
        ratio = _medians[mode] / _medians["plain"]
        benchmark.extra_info["ratio_vs_plain"] = round(ratio, 3)
        if mode == "never-hit-breakpoint":
            check_goal(benchmark, "64-vCPU boot under the debugger, never-hit breakpoint, vs plain", ratio, 1.05,
                       strict=True, unit="x")
