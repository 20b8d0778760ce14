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


class _SharedRam:
    """Guest RAM both sides see (a MAP_SHARED region made before the fork), as the tpm worker
    maps the VM's RAM."""

    def __init__(self, size=0x20000):
        import mmap
        self.m = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)

    def read(self, gpa, n):
        return self.m[gpa:gpa + n]

    def write(self, gpa, data):
        self.m[gpa:gpa + len(data)] = data


def test_pcr_extend_round_trip(benchmark, tmp_path):
    """TPM2_PCR_Extend as the guest runs it: the command in guest RAM, the CRB START write
    through the proxy to the vTPM in a forked worker (its swtpm, its NV and volatile state kept
    after the command, the saved state committed), the response in guest RAM. Baselines (same
    run, interleaved): the vTPM on the bus in process, and swtpm alone (the engine's own cost)."""
    import struct
    from hclsim.devices import swtpm, vtpm
    from hclsim.hcl.vmgs import TPM_NVRAM, TPM_PPI, DeviceFiles
    if swtpm.swtpm_binary() is None:
        import pytest
        pytest.skip("swtpm is not installed")
    buf = 0x10000
    children, engines = [], []

    def fork_tpm(ram, name) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        engine = swtpm.Swtpm(str(tmp_path / name))
        engines.append(engine)
        pid = os.fork()
        if pid == 0:
            ours.close()
            try:
                dev = vtpm.Vtpm(engine)
                dev.guest_memory = ram
                DeviceServer(dev, theirs, commit=lambda blob: None).serve()
            finally:
                os._exit(0)
        theirs.close()
        children.append(pid)
        return ours

    def tpm_bus(dev):
        bus = Bus("vtl0")
        bus.add(dev)
        bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_MAP_SHARED_MEMORY)
        bus.pio_write(vtpm.DATA_PORT, 4, buf)
        return bus

    remote_ram, local_ram = _SharedRam(), _SharedRam()
    proxy = None
    try:
        proxy = ProxyDevice("tpm", fork_tpm(remote_ram, "worker"), relaunch=lambda: fork_tpm(remote_ram, "again"),
                            guest_memory=remote_ram, stores=DeviceFiles(None, (TPM_PPI, TPM_NVRAM)))
        _measure_extends(benchmark, tmp_path, proxy, remote_ram, local_ram, engines, tpm_bus, buf)
    finally:
        if proxy is not None:
            proxy.close()
        _reap(children)
        for e in engines:
            e.close()


def _measure_extends(benchmark, tmp_path, proxy, remote_ram, local_ram, engines, tpm_bus, buf):
    import struct
    from hclsim.devices import swtpm, vtpm
    from hclsim.hcl.vmgs import TPM_NVRAM, TPM_PPI, DeviceFiles
    local_engine = swtpm.Swtpm(str(tmp_path / "local"))
    engines.append(local_engine)
    local_files = DeviceFiles(None, (TPM_PPI, TPM_NVRAM))
    local_dev = vtpm.Vtpm(local_engine, nvram_store=local_files.file_store(TPM_NVRAM),
                          ppi_store=local_files.file_store(TPM_PPI))
    local_dev.guest_memory = local_ram
    bare = swtpm.Swtpm(str(tmp_path / "bare"))
    engines.append(bare)
    buses = {"worker": (tpm_bus(proxy), remote_ram), "in_process": (tpm_bus(local_dev), local_ram)}
    extend = swtpm.pcr_extend_sha256(16, bytes(32))              # PCR 16: the debug PCR, resettable
    times = {"worker": [], "in_process": [], "swtpm": []}
    for bus, ram in buses.values():
        ram.write(buf, swtpm.startup_clear())
        bus.mmio_write(vtpm.CRB_BASE + vtpm.START, 4, 1)
    bare.execute(swtpm.startup_clear())

    def guest_extend(bus, ram) -> None:
        ram.write(buf, extend)
        bus.mmio_write(vtpm.CRB_BASE + vtpm.START, 4, 1)
        while bus.mmio_read(vtpm.CRB_BASE + vtpm.START, 4):       # the guest polls START to 0
            pass
        assert struct.unpack_from(">I", ram.read(buf + 4096, 10), 6)[0] == 0

    def rounds():
        for _ in range(20):
            for name, (bus, ram) in buses.items():
                for _ in range(10):
                    t0 = time.perf_counter()
                    guest_extend(bus, ram)
                    times[name].append(time.perf_counter() - t0)
            for _ in range(10):
                t0 = time.perf_counter()
                bare.execute(extend)
                times["swtpm"].append(time.perf_counter() - t0)
    benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    benchmark.extra_info.update(extends=len(times["worker"]), **{f"{k}_us": round(v, 1) for k, v in us.items()},
                                worker_vs_in_process=round(us["worker"] / us["in_process"], 2),
                                worker_vs_swtpm=round(us["worker"] / us["swtpm"], 1))
    print(f"\nTPM2_PCR_Extend from the guest's side of the bus: {us['worker']:.0f} us median through the tpm "
          f"worker, {us['in_process']:.0f} us in process ({us['worker'] / us['in_process']:.2f}x), swtpm alone "
          f"{us['swtpm']:.0f} us ({us['worker'] / us['swtpm']:.1f}x)")
