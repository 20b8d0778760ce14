"""Device workers, timed (issue 12): the proxy path (devices/device_worker.py ProxyDevice on a
bus, DeviceServer in a forked process over a SOCK_SEQPACKET pair, as the VM worker and a
device worker host use it), without the rest of the VM.

- test_mmio_round_trip: Bus.mmio_read of the MMIO test range through the proxy; goal <= 50 us
  median. Baseline (same run): the same read of the device on the bus in process.
- test_crash_to_running: SIGKILL of the worker process -> the next access answered by a new
  worker restored from the committed state (relaunch forks one); goal <= 200 ms.

    .venv/bin/pytest benches/bench_device_worker.py --benchmark-only -s
"""
import os
import signal
import socket
import statistics
import time

from hclsim.benches.goals import check_goal
from hclsim.devices.bus import Bus
from hclsim.devices.device_worker import DeviceServer, ProxyDevice
from hclsim.devices.vtl0_test import MmioTestRange
from hclsim.defs.platform import VTL0_MMIO_BASE

N = 3000


def _fork_worker(children: list) -> socket.socket:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:                                   # the worker: serve until the proxy hangs up
        ours.close()
        try:
            DeviceServer(MmioTestRange(), theirs).serve()
        finally:
            os._exit(0)
    theirs.close()
    children.append(pid)
    return ours


def _reap(children: list) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_mmio_round_trip(benchmark):
    children = []
    proxy_bus, local_bus = Bus("proxied"), Bus("local")
    proxy = proxy_bus.add(ProxyDevice("mmio_test", _fork_worker(children), relaunch=lambda: _fork_worker(children)))
    local_bus.add(MmioTestRange())
    remote, local = [], []

    def rounds():
        for _ in range(N // 100):
            for bus, out in ((local_bus, local), (proxy_bus, remote)):
                for _ in range(100):
                    t0 = time.perf_counter()
                    bus.mmio_read(VTL0_MMIO_BASE + 8, 4)
                    out.append(time.perf_counter() - t0)
    try:
        benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    finally:
        proxy.close()
        _reap(children)
    r_us, l_us = statistics.median(remote) * 1e6, statistics.median(local) * 1e6
    benchmark.extra_info.update(reads=len(remote), proxied_us=round(r_us, 1), in_process_us=round(l_us, 2),
                                proxied_vs_in_process=round(r_us / l_us, 1))
    print(f"\nMMIO read through a device worker: {r_us:.1f} us median, in process {l_us:.2f} us "
          f"({r_us / l_us:.0f}x)")
    check_goal(benchmark, "MMIO round trip through a device worker (median)", r_us, 50, unit=" us")


def test_crash_to_running(benchmark):
    children = []
    bus = Bus("proxied")
    proxy = bus.add(ProxyDevice("mmio_test", _fork_worker(children), relaunch=lambda: _fork_worker(children)))
    times = []

    def crash_once():
        bus.mmio_read(VTL0_MMIO_BASE, 4)
        victim = children[-1]
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        restarts = proxy.restarts
        while proxy.restarts == restarts:          # the reader sees the close and relaunches
            time.sleep(0.0005)
        bus.mmio_read(VTL0_MMIO_BASE, 4)           # answered by the new worker
        times.append(time.perf_counter() - t0)
    try:
        benchmark.pedantic(crash_once, rounds=10, warmup_rounds=0)
    finally:
        proxy.close()
        _reap(children)
    ms = statistics.median(times) * 1e3
    benchmark.extra_info.update(restarts=len(times), crash_to_running_ms=round(ms, 2))
    print(f"\nworker killed -> next access answered by its replacement: {ms:.2f} ms median")
    check_goal(benchmark, "a worker crash to the guest running again (median)", ms, 200, unit=" ms")


def test_whole_vm_exit_through_a_device_worker(benchmark):
    """The VTL0 loop's OUT on one VP in whole runs (run_system): the device in a worker vs on the
    VM worker's bus (same run, interleaved); per exit = (power off - VTL0 running) / iterations."""
    from hclsim.config import BootConfig
    from hclsim.system import run_system
    iterations = 5000
    worker, local = [], []

    def per_exit(config) -> float:
        r = run_system(config)
        ev = {name: t for name, t, _ in r.timeline.events}
        return (ev["power-off"] - ev["vtl0"]) / iterations

    benchmark.pedantic(lambda: worker.append(per_exit(BootConfig(cpus=1, vtl0_iterations=iterations,
                                                                 device_workers=("loop_port",)))),
                       setup=lambda: (local.append(per_exit(BootConfig(cpus=1, vtl0_iterations=iterations))),
                                      ((), {}))[1], rounds=3, warmup_rounds=0)
    w, l_ = statistics.median(worker) * 1e6, statistics.median(local) * 1e6
    benchmark.extra_info.update(worker_us_per_exit=round(w, 1), in_process_us_per_exit=round(l_, 1),
                                worker_vs_in_process=round(w / l_, 1))
    print(f"\nan I/O exit to a device in a worker, whole VM: {w:.1f} us; on the VM worker's bus {l_:.1f} us "
          f"({w / l_:.1f}x)")
