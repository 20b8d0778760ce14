"""Sidecar figures (issue 3):
- AP bring-up: sidecar_entry -> every AP IDLE (the call returns), for 8 .. 2048 vCPUs;
  goal at 1024: <= 50 ms median, and >= 100x faster than one Unicorn instance per vCPU (the
  baseline tests, run after the pooled ones: each reports speedup_vs_pooled from this run).
- one sidecar -> Linux CPU conversion; goal <= 1 ms median.
- AP bring-up per guest RAM variant (private anonymous, shared memfd without / with huge pages on
  shmem; see bench_memory.RAM_VARIANTS), each reporting vs_private from this run:
    .venv/bin/pytest benches/bench_sidecar.py --benchmark-only -s -k guest_ram
    .venv/bin/pytest benches/bench_sidecar.py --benchmark-only --benchmark-json=sidecar.json
"""
import pytest

from hclsim.benches.bench_memory import RAM_VARIANTS, guest_ram_variant
from hclsim.benches.goals import check_goal, median_s
from hclsim.config import BootConfig
from hclsim.machine import Machine
from hclsim.sidecar import layout as sl

SIZES = [8, 64, 256, 1024, 2048]
POOLED_MEDIAN_S = {}   # vCPUs -> median of test_ap_bring_up in this run
RAM_MEDIAN_S = {}      # (variant, vCPUs) -> median of test_ap_bring_up_guest_ram in this run


def _at_sidecar_entry(cpus: int) -> Machine:
    m = Machine(BootConfig(cpus=cpus, numa_nodes=max(1, cpus // 512)))
    stop = m.run_to(m.sidecar_entry)
    assert stop.vp is m.bsp, stop
    return m


def _bring_up(benchmark, cpus: int, rounds: int, engine_per_vp: bool = False) -> Machine:
    """Time sidecar_entry -> its return (every AP IDLE), a new machine each round."""
    machines = []

    def setup():
        while machines:
            machines.pop().close()
        m = _at_sidecar_entry(cpus)
        if engine_per_vp:
            m.use_engine_per_vp()
        machines.append(m)
        return (m, m.mem.read_u64(m.engine.translate(m.engine.reg("rsp")))), {}

    def bring_up(m, return_address):
        stop = m.run_to(return_address)
        assert stop.vp is m.bsp and m.engine.reg("rax") & 0xFF == 1  # sidecar_entry returned true
        m.close_vp_engines()

    benchmark.pedantic(bring_up, setup=setup, rounds=rounds, warmup_rounds=0)
    m = machines[0]
    benchmark.extra_info.update(cpus=cpus, vp_switches=m.scheduler.switches, msr_exits=m.scheduler.msr_exits + m.engine.counters()["msr_fast_exits"])
    for m in machines:
        m.close()


@pytest.mark.parametrize("cpus", SIZES)
def test_ap_bring_up(benchmark, cpus):
    _bring_up(benchmark, cpus, rounds=5 if cpus <= 1024 else 3)
    POOLED_MEDIAN_S[cpus] = median = median_s(benchmark)
    if cpus == 1024:
        check_goal(benchmark, "AP bring-up, 1024 vCPUs (median)", None if median is None else median * 1e3, 50,
                   unit=" ms")


@pytest.mark.parametrize("ram", RAM_VARIANTS)
@pytest.mark.parametrize("cpus", SIZES[:4])
def test_ap_bring_up_guest_ram(benchmark, ram, cpus):
    with guest_ram_variant(ram):
        _bring_up(benchmark, cpus, rounds=5)
    RAM_MEDIAN_S[ram, cpus] = median = benchmark.stats.stats.median
    benchmark.extra_info["guest_ram"] = ram
    if ("private", cpus) in RAM_MEDIAN_S:
        ratio = median / RAM_MEDIAN_S["private", cpus]
        benchmark.extra_info["vs_private"] = round(ratio, 3)
        print(f"\n{cpus} vCPUs, {ram} guest RAM: {median * 1e3:.1f} ms, {ratio:.2f}x private")


def test_sidecar_to_linux_conversion(benchmark):
    m = Machine(BootConfig(cpus=64))
    r = m.run_to_handoff()
    cpus = iter([c for c in range(64) if c not in r.linux.cpus.online])
    benchmark.pedantic(lambda: r.linux.cpus.online_cpu(next(cpus)), rounds=40, warmup_rounds=2)
    median = median_s(benchmark)
    check_goal(benchmark, "sidecar -> Linux CPU conversion (median)", None if median is None else median * 1e3, 1,
               unit=" ms")
    assert all(r.linux.sidecar.node_of(c).cpu_status(c) == sl.CPU_REMOVED for c in r.linux.cpus.online if c % 32)
    m.close()


def test_run_vp_round_trip_with_intercept(benchmark):
    """RUN_VP command -> VTL return -> VTL0 CPUID -> intercept -> VTL2 -> IDLE + attention."""
    import numpy as np

    from hclsim.boot.vtl0_guest import IMAGE_GPA
    from hclsim.hv import intercepts
    from hclsim.sidecar.vp_loop import VpRunner
    from hclsim.devices.vtl0_test import TestDevices
    m = Machine(BootConfig(cpus=8))
    r = m.run_to_handoff()
    sc, cpu = r.linux.sidecar, 3
    VpRunner(m.partition, sc, cpu, TestDevices())  # primes VTL0's shared registers
    gps = np.asarray(sc.node_of(cpu).command_page(cpu)["cpu_context"]["gps"])
    gps[0] = 0x40000000                  # EAX for the guest's CPUID; VTL0 RIP stays on it
    # VTL0 starts at the guest's CPUID step (from its entry, COM1's hello would come first)
    m.partition.set_registers(cpu, {"rip": IMAGE_GPA + m.vtl0_guest.image.symbol("step_cpuid")}, vtl=0)

    def round_trip():
        page = sc.run(cpu, sl.COMMAND_RUN_VP)
        return intercepts.parse(bytes(np.asarray(page["intercept_message"])))

    msg = benchmark.pedantic(round_trip, rounds=50, warmup_rounds=2)
    assert msg["type"] == intercepts.MSG_CPUID
    m.close()


@pytest.mark.parametrize("cpus", [64, 256, 1024])
def test_ap_bring_up_baseline_engine_per_vcpu(benchmark, cpus):
    """The same bring-up with a new Unicorn instance for every vCPU (the design the engine pool
    replaces): each VP pays for an engine and translates every block it runs itself.
    Compare with test_ap_bring_up[cpus] of the same run (goal: pooled >= 100x faster)."""
    _bring_up(benchmark, cpus, rounds=1 if cpus >= 1024 else 2, engine_per_vp=True)
    if cpus in POOLED_MEDIAN_S:
        ratio = benchmark.stats.stats.median / POOLED_MEDIAN_S[cpus]
        benchmark.extra_info["speedup_vs_pooled"] = round(ratio, 1)
        print(f"\n{cpus} vCPUs: pooled engines {ratio:.0f}x faster than one engine per vCPU")
        if cpus == 1024:
            check_goal(benchmark, "AP bring-up, 1024 vCPUs: pooled engines vs one per vCPU", ratio, 100,
                       at_most=False, unit="x")
