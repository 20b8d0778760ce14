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
