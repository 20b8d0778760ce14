"""The paravisor's userspace, timed (issue 10): whole runs of hclsim.system.run_system (boot shim ->
handoff -> the stand-in kernel -> underhill-init -> openvmm_hcl -> underhill-vm running the VTL0
test guest on every VP -> power off), figures from the run's timeline (host seconds since the run
began) and kmsg.

- test_boot_64_to_power_off: 64 vCPUs, 2 NUMA nodes, to power off; every stage; goals: total
  <= 3 s, PID 1 -> VTL0 running on all 64 VPs <= 0.5 s. Baseline (same run, interleaved: one
  before each round): the firmware-only boot of the same config (Machine(config).run_to_handoff(),
  close()); vs_firmware_only = total / baseline.
- test_io_exits_through_the_worker: one VP, HCLSIM_BENCH_EXITS loop iterations (default 20000),
  each a 32-bit OUT to port 0x444 handled by the VM worker process; exits/s = the worker's
  intercepts / (power-off - vtl0); goal >= 50,000 exits/s. Beside it (same run, interleaved) the
  in-process ceiling: the worker's VP loop (hcl/vp.py VpLoop) as a thread of this process on the
  same kernel driver and engine, with no processes or kernel socket in between.
- test_sidecar_exits_and_conversion: 8 vCPUs, HCLSIM_BENCH_SIDECAR_ITERATIONS iterations (default
  500), with OPENHCL_NO_SIDECAR_HOTPLUG=1 (VPs 1..7 stay on their sidecar CPUs: every exit goes
  through the sidecar device; the timed run) vs the default (each sidecar VP becomes a Linux CPU
  after its first exit; the same-run baseline, one before each round). Exit rates and the ratio
  come from each run's work (VTL0 running -> the last "vp N done" console line): with VPs halted
  on sidecar CPUs, the power-off event also waits for the worker to stop them (remote_stop_s).

- test_consoles_repeat_and_the_process_tree: HCLSIM_BENCH_DETERMINISM_CPUS vCPUs (default 8; VPs on
  the Linux CPU and on sidecar CPUs), HCLSIM_BENCH_DETERMINISM_ITERATIONS iterations (default
  200), to power off, each round a new VM: every VP's VTL0 console is byte for byte the first
  round's (determinism), and the process tree is section 0's: underhill-init (the kernel's child)
  -> openvmm_hcl -> underhill-vm, by comm and parent pid. Asserted; recorded in extra_info.

HCLSIM_BENCH_ROUNDS overrides every test's round count (default 3 / 2 / 1 / 3; at least 2 for the
determinism check). Small knobs for a quick check:
    HCLSIM_BENCH_ROUNDS=1 HCLSIM_BENCH_EXITS=2000 HCLSIM_BENCH_SIDECAR_ITERATIONS=20 \
        HCLSIM_BENCH_DETERMINISM_CPUS=4 HCLSIM_BENCH_DETERMINISM_ITERATIONS=20 \
        .venv/bin/pytest benches/bench_userspace.py --benchmark-only -s
    .venv/bin/pytest benches/bench_userspace.py --benchmark-only --benchmark-json=userspace.json -s
"""
import hashlib
import logging
import os
import re
import statistics
import threading
import time

from hclsim.benches.goals import check_goal
from hclsim.config import BootConfig
from hclsim.devices.vtl0_test import TestDevices
from hclsim.hcl.vp import VpLoop
from hclsim.kernel_stub.mshv import InProcessVtl, Mshv
from hclsim.machine import Machine
from hclsim.system import run_system

TIMEOUT_S = 600.0
FIXED_INTERCEPTS_PER_VP = 49     # the guest's intercepts besides its loop (COM1 lines, steps, power off)
NO_HOTPLUG = "OPENHCL_NO_SIDECAR_HOTPLUG=1"
_MOVED_LINE = re.compile(r"(\d+) sidecar VPs moved to Linux CPUs after their first exit: median ([\d.]+) ms, "
                         r"max ([\d.]+) ms")
_POWER_OFF_LINE = re.compile(r"underhill-vm: the guest powered the VM off after (\d+) intercepts")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _rounds(default: int) -> int:
    return max(1, _env_int("HCLSIM_BENCH_ROUNDS", default))


def _run(config: BootConfig):
    """run_system to power off: (SystemResult, wall seconds including the teardown, the time of the
    last VP's "vp N done" console line on the run's timeline). That line comes just before the VP's
    power-off write, so vtl0 -> last done is the guest's work alone, whatever stopping the VPs
    after power off costs (the "power-off" event comes after the worker has joined its VP threads)."""
    clock = {}

    def on_event(name, t, _detail):
        clock.setdefault("base", time.monotonic() - t)       # run_system's time 0, on this clock

    def on_console(_vp, line):
        if line.rstrip().endswith(b" done") and "base" in clock:
            clock["done"] = time.monotonic() - clock["base"]
    t0 = time.perf_counter()
    r = run_system(config, on_event=on_event, on_console=on_console, timeout=TIMEOUT_S)
    wall = time.perf_counter() - t0
    assert r.status == "power-off", (r.status, r.panic, r.kmsg[-2000:])
    assert len(r.consoles) == config.cpus, sorted(r.consoles)
    return r, wall, clock.get("done")


def _times(r) -> dict:
    """Event name -> its first time; "process" -> [(comm, time)] in order (the VM worker's
    host, underhill-vm, is a "worker" event)."""
    out = {"process": []}
    for name, t, detail in r.timeline.events:
        if name in ("process", "worker"):
            out["process"].append((detail.split(" (", 1)[0], t))
        else:
            out.setdefault(name, t)
    return out


def _intercepts(r, config: BootConfig) -> tuple[int, bool]:
    """The worker's intercept count from its power-off line (True), else the guest's count (False)."""
    m = _POWER_OFF_LINE.search(r.kmsg)
    if m:
        return int(m.group(1)), True
    return config.cpus * (config.vtl0_iterations + FIXED_INTERCEPTS_PER_VP), False


def _median(values) -> float:
    return statistics.median(values)


def _r(x: float, digits: int = 4) -> float:
    return round(x, digits)


# ---- 1. 64 vCPUs, boot to power off -------------------------------------------------------
def test_boot_64_to_power_off(benchmark):
    config = BootConfig(cpus=64, numa_nodes=2)
    runs, baselines = [], []

    def setup():      # the baseline, untimed by pytest-benchmark: before each round, same config
        t0 = time.perf_counter()
        m = Machine(config)
        try:
            m.run_to_handoff()
        finally:
            m.close()
        baselines.append(time.perf_counter() - t0)
        return (), {}

    benchmark.pedantic(lambda: runs.append(_run(config)), setup=setup, rounds=_rounds(3), warmup_rounds=0)

    stages = []
    for r, wall, done in runs:
        t = _times(r)
        pid1 = t["pid1"]
        stage = {
            "total_s": t["power-off"],                  # run_system's start -> power off
            "start_to_shim_s": t["shim"],               # building the machine (image, engine)
            "shim_to_handoff_s": t["handoff"] - t["shim"],
            "handoff_to_pid1_s": pid1 - t["handoff"],
            "pid1_to_vtl0_s": t["vtl0"] - pid1,
            "vtl0_to_power_off_s": t["power-off"] - t["vtl0"],
            "vtl0_to_last_done_s": done - t["vtl0"],     # the last VP's "vp N done" console line
            "teardown_s": wall - t["power-off"],
        }
        for i, (comm, when) in enumerate(t["process"]):
            key = f"pid1_to_{comm}_s"
            stage[key if key not in stage else f"pid1_to_{comm}_{i}_s"] = when - pid1
        stage["intercepts"] = _intercepts(r, config)[0]
        stages.append(stage)

    info = benchmark.extra_info
    info.update(cpus=config.cpus, numa_nodes=config.numa_nodes, vtl0_iterations=config.vtl0_iterations,
                rounds=len(runs), figures="medians over the rounds, host seconds")
    for key in stages[0]:
        values = [s[key] for s in stages if key in s]
        info[key] = _median(values) if key == "intercepts" else _r(_median(values))
    baseline = _median(baselines)
    info["baseline_firmware_only_s"] = _r(baseline)
    info["vs_firmware_only"] = _r(info["total_s"] / baseline, 2)
    print(f"\n64 vCPUs to power off: {info['total_s']:.3f} s ({info['vs_firmware_only']:.1f}x the "
          f"firmware-only boot, {baseline * 1e3:.0f} ms); PID 1 -> VTL0 {info['pid1_to_vtl0_s'] * 1e3:.0f} ms, "
          f"VTL0 -> power off {info['vtl0_to_power_off_s']:.3f} s")
    check_goal(benchmark, "64 vCPUs: run start -> power off (median)", info["total_s"], 3, unit=" s")
    check_goal(benchmark, "64 vCPUs: PID 1 -> VTL0 running on every VP (median)", info["pid1_to_vtl0_s"], 0.5,
               unit=" s")


# ---- 2. I/O exits through the VM worker vs in process -------------------------------------
def _in_process_exits_per_s(iterations: int) -> tuple[float, int]:
    """The ceiling: the worker's own VP loop (hcl/vp.py VpLoop on the doorbell) as a thread of
    this process, over the same kernel driver (Mshv) and engine: no processes, no kernel socket."""
    m = Machine(BootConfig(cpus=1, vtl0_iterations=iterations))
    try:
        m.run_to_handoff()
        mshv = Mshv(m.linux.partition, m.linux.cpus, m.linux.sidecar, lambda _text, _level=6: None)
        mshv.prime(0)
        holder = {}
        devices = TestDevices(1, on_power_off=lambda: holder["loop"].stop())
        loop = holder["loop"] = VpLoop(InProcessVtl(mshv), [], devices.bus, logging.getLogger("bench"))
        thread = threading.Thread(target=loop.run, args=(0, True))
        t0 = time.perf_counter()
        thread.start()
        thread.join(TIMEOUT_S)
        elapsed = time.perf_counter() - t0
        mshv.close()
        assert devices.finished(0)
        exits = loop.stats[0].exits
    finally:
        m.close()
    return exits / elapsed, exits


def test_io_exits_through_the_worker(benchmark):
    iterations = _env_int("HCLSIM_BENCH_EXITS", 20000)
    config = BootConfig(cpus=1, vtl0_iterations=iterations)
    runs, ceiling = [], []

    def setup():      # the in-process ceiling, before each round
        ceiling.append(_in_process_exits_per_s(iterations))
        return (), {}

    benchmark.pedantic(lambda: runs.append(_run(config)), setup=setup, rounds=_rounds(2), warmup_rounds=0)

    rates, windows, done_windows = [], [], []
    for r, _wall, done in runs:
        t = _times(r)
        window = t["power-off"] - t["vtl0"]
        exits, from_kmsg = _intercepts(r, config)
        rates.append(exits / window)
        windows.append(window)
        done_windows.append(done - t["vtl0"])
    worker, in_process = _median(rates), _median(c[0] for c in ceiling)
    info = benchmark.extra_info
    info.update(cpus=1, vtl0_iterations=iterations, rounds=len(runs), worker_exits=exits,
                worker_exits_from="kmsg power-off line" if from_kmsg else "iterations + fixed per VP (no kmsg line)",
                in_process_exits=ceiling[0][1],
                vtl0_to_power_off_s=_r(_median(windows)), vtl0_to_last_done_s=_r(_median(done_windows)),
                worker_exits_per_s=round(worker), in_process_exits_per_s=round(in_process),
                worker_vs_in_process=_r(worker / in_process, 3),
                worker_us_per_exit=_r(1e6 / worker, 2), in_process_us_per_exit=_r(1e6 / in_process, 2))
    print(f"\none VP, {iterations} loop iterations: {worker:,.0f} exits/s through the VM worker, "
          f"{in_process:,.0f} exits/s in process ({worker / in_process:.2f}x)")
    check_goal(benchmark, "I/O exits per second per VP through the VM worker (median)", worker, 50000,
               at_most=False, unit=" exits/s")


# ---- 3. exits on sidecar CPUs vs converted VPs -------------------------------------------
def test_sidecar_exits_and_conversion(benchmark):
    iterations = _env_int("HCLSIM_BENCH_SIDECAR_ITERATIONS", 500)
    cpus = 8
    remote_cfg = BootConfig(cpus=cpus, vtl0_iterations=iterations, host_bootargs=NO_HOTPLUG)
    converted_cfg = BootConfig(cpus=cpus, vtl0_iterations=iterations)
    remote, converted = [], []

    def setup():      # the default (converting) run, before each round
        converted.append(_run(converted_cfg))
        return (), {}

    benchmark.pedantic(lambda: remote.append(_run(remote_cfg)), setup=setup, rounds=_rounds(1), warmup_rounds=0)

    def figures(runs, config):
        out = {"power_off_s": [], "work_s": [], "stop_s": [], "teardown_s": [], "exits": []}
        for r, wall, done in runs:
            t = _times(r)
            out["power_off_s"].append(t["power-off"])
            out["work_s"].append(done - t["vtl0"])           # VTL0 running -> the last "vp N done"
            out["stop_s"].append(t["power-off"] - done)      # -> the worker has stopped its VPs
            out["teardown_s"].append(wall - t["power-off"])
            out["exits"].append(_intercepts(r, config)[0])
        return {k: _median(v) for k, v in out.items()}

    rem, conv = figures(remote, remote_cfg), figures(converted, converted_cfg)
    assert not any(r.boot.linux.cpus.conversions_ms for r, _, _ in remote)    # no VP left its sidecar CPU
    sidecar_vps = cpus - len(remote[0][0].boot.linux.cpus.online)             # the VPs on sidecar CPUs
    per_vp_exits = rem["exits"] / cpus             # every VP runs the same guest
    sidecar_exits = per_vp_exits * sidecar_vps
    # The kernel side of each conversion, as the stand-in timed it (LinuxCpus.online_cpu: the
    # sidecar CPU removed, VTL0's state restored, the CPU brought up), per converted CPU.
    kernel_ms = [ms for r, _, _ in converted for ms in r.boot.linux.cpus.conversions_ms]
    converted_per_run = len(kernel_ms) / len(converted)
    # As the worker sees it: its write of cpuN/online through the kernel socket, the online lock
    # and the CPU lock included (hcl/worker.py logs the median and max per run).
    moved = [_MOVED_LINE.search(r.kmsg) for r, _, _ in converted]
    worker_ms = [float(m.group(2)) for m in moved if m]
    worker_max_ms = [float(m.group(3)) for m in moved if m]
    info = benchmark.extra_info
    info.update(
        cpus=cpus, sidecar_vps=sidecar_vps, vtl0_iterations=iterations, rounds=len(remote),
        remote_power_off_s=_r(rem["power_off_s"]), converted_power_off_s=_r(conv["power_off_s"]),
        remote_work_s=_r(rem["work_s"]), converted_work_s=_r(conv["work_s"]),
        remote_vs_converted=_r(rem["work_s"] / conv["work_s"], 3),
        remote_vs_converted_to_power_off=_r(rem["power_off_s"] / conv["power_off_s"], 3),
        remote_stop_s=_r(rem["stop_s"]), converted_stop_s=_r(conv["stop_s"]),
        remote_teardown_s=_r(rem["teardown_s"]), converted_teardown_s=_r(conv["teardown_s"]),
        remote_exits=rem["exits"], converted_exits=conv["exits"],
        sidecar_exits_per_s=round(sidecar_exits / rem["work_s"]),
        sidecar_exits_per_s_per_vp=round(per_vp_exits / rem["work_s"]),
        kernel_conversion_ms=_r(_median(kernel_ms), 3) if kernel_ms else None,
        converted_cpus_per_run=converted_per_run,
        worker_conversion_ms=_r(_median(worker_ms), 3) if worker_ms else None,
        worker_conversion_max_ms=_r(_median(worker_max_ms), 3) if worker_max_ms else None,
    )
    print(f"\n8 vCPUs, {iterations} iterations: VPs kept on sidecar CPUs {rem['work_s']:.3f} s of work "
          f"({info['sidecar_exits_per_s']:,} exits/s on the sidecar CPUs), {rem['stop_s']:.3f} s more to power off; "
          f"converted {conv['work_s']:.3f} s ({info['remote_vs_converted']:.2f}x); conversion: kernel "
          f"{info['kernel_conversion_ms']} ms, as the worker sees it {info['worker_conversion_ms']} ms "
          f"(max {info['worker_conversion_max_ms']} ms)")


# ---- 4. the VTL0 consoles run after run, and the process tree -------------------------------
SECTION0_TREE = (("underhill-init", None), ("openvmm_hcl", "underhill-init"), ("underhill-vm", "openvmm_hcl"))


def _tree(process_tree) -> tuple:
    """(comm, its parent's comm) of each process in order; None for the kernel's child (PID 1,
    whose parent is the machine process, this one)."""
    comm = {p["pid"]: p["comm"] for p in process_tree}
    return tuple((p["comm"], None if p["ppid"] == os.getpid() else comm.get(p["ppid"], f"pid {p['ppid']}"))
                 for p in process_tree)


def test_consoles_repeat_and_the_process_tree(benchmark):
    cpus = _env_int("HCLSIM_BENCH_DETERMINISM_CPUS", 8)
    iterations = _env_int("HCLSIM_BENCH_DETERMINISM_ITERATIONS", 200)
    config = BootConfig(cpus=cpus, vtl0_iterations=iterations)
    runs = []
    benchmark.pedantic(lambda: runs.append(_run(config)), rounds=max(2, _rounds(3)), warmup_rounds=0)

    first = runs[0][0].consoles
    differing = sorted({vp for r, _, _ in runs[1:] for vp in set(first) | set(r.consoles)
                        if r.consoles.get(vp) != first.get(vp)})
    trees = [_tree(r.process_tree) for r, _, _ in runs]
    digest = hashlib.sha256(b"".join(b"%d:" % vp + first[vp] for vp in sorted(first))).hexdigest()
    info = benchmark.extra_info
    info.update(cpus=cpus, vtl0_iterations=iterations, rounds=len(runs), vps=len(first),
                console_lines_per_vp=sorted({text.count(b"\n") for text in first.values()}),
                console_bytes=sum(len(text) for text in first.values()), console_sha256=digest[:16],
                consoles_identical=not differing, differing_vps=differing,
                process_tree=" -> ".join(comm for comm, _ in trees[0]),
                process_tree_as_section_0=all(t == SECTION0_TREE for t in trees),
                exit_statuses=sorted({p["exit_status"] or "none" for r, _, _ in runs for p in r.process_tree}))
    print(f"\n{cpus} vCPUs, {iterations} iterations, {len(runs)} rounds: VTL0 consoles "
          f"{'identical' if not differing else 'DIFFER on VPs ' + str(differing)} (sha256 {digest[:16]}, "
          f"{info['console_bytes']} bytes); process tree {info['process_tree']}"
          f"{'' if info['process_tree_as_section_0'] else ' NOT as section 0 names it: ' + str(trees)}")
    check_goal(benchmark, "VPs whose VTL0 console differs from the first round's", len(differing), 0, unit=" VPs")
    assert not differing, differing
    assert len(first) == cpus
    assert all(t == SECTION0_TREE for t in trees), trees
