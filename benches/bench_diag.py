"""The diag server, timed (issue 11), against one kept-running VM per module (run_system with
keep_running, a hybrid vsock in a temporary folder), through hclsim's client (hclsim/diag_client.py).

- test_inspect_round_trip: InspectService/Inspect of the root (depth 0) and of `vm` (forwarded
  to the VM worker over the mesh), median over many calls; goal <= 5 ms. Baseline (same run,
  interleaved): OpenhclDiag/Ping, the bare ttrpc round trip.
- test_kmsg_follow_latency: a Kmsg follow stream open; an inspect Update of trace/level makes
  the control process write a kmsg record; the time from sending the Update to the record
  arriving on the stream. Baseline: the Update's own round trip.
- test_hundred_clients: 100 clients at once, each connecting (hybrid vsock handshake), Ping,
  close; wall time for all, vs the same 100 one after another (same run).
- test_profiler_overhead: the VP loop's exit rate (inspect vm/vps/0/exits over a window) while a
  profile runs vs without (same VM, interleaved).

    .venv/bin/pytest benches/bench_diag.py --benchmark-only -s
"""
import statistics
import threading
import time

import pytest

from hclsim.benches.goals import check_goal
from hclsim.config import BootConfig
from hclsim.diag_client import DiagClient
from hclsim.hcl.pb import diag_pb2, inspect_service_pb2 as ipb, profile_pb2
from google.protobuf import empty_pb2

CALLS = 200
WINDOW_S = 2.0


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    from hclsim.system import start_kept_run
    path = str(tmp_path_factory.mktemp("diagbench") / "vm.sock")
    # one VP looping for minutes: exits to count while the figures are taken
    stop, t, box = start_kept_run(BootConfig(cpus=1, vtl0_iterations=50_000_000), path, timeout=3600)
    client = DiagClient(path, wait=60)
    client.call("diag.OpenhclDiag", "Ping", empty_pb2.Empty(), empty_pb2.Empty)
    yield path, client
    client.close()
    stop.set()
    t.join(60)


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _ms(values) -> float:
    return round(statistics.median(values) * 1e3, 3)


def test_inspect_round_trip(benchmark, vm):
    _path, c = vm
    ping = lambda: c.call("diag.OpenhclDiag", "Ping", empty_pb2.Empty(), empty_pb2.Empty)
    root = lambda: c.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="", depth=0),
                          ipb.InspectResponse)
    vmnode = lambda: c.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="vm", depth=0),
                            ipb.InspectResponse)
    pings, roots, vms = [], [], []

    def rounds():
        for _ in range(CALLS // 10):
            pings.extend(_timed(ping, 10))
            roots.extend(_timed(root, 10))
            vms.extend(_timed(vmnode, 10))
    benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    info = benchmark.extra_info
    info.update(calls=len(roots), ping_ms=_ms(pings), inspect_root_ms=_ms(roots), inspect_vm_ms=_ms(vms),
                root_vs_ping=round(statistics.median(roots) / statistics.median(pings), 2),
                vm_vs_ping=round(statistics.median(vms) / statistics.median(pings), 2))
    print(f"\ninspect round trip: root {_ms(roots)} ms, vm (through the worker) {_ms(vms)} ms; "
          f"Ping {_ms(pings)} ms ({info['root_vs_ping']}x / {info['vm_vs_ping']}x)")
    check_goal(benchmark, "Inspect round trip of vm, through the VM worker (median)", _ms(vms), 5, unit=" ms")


def test_kmsg_follow_latency(benchmark, vm):
    _path, c = vm
    conn_id, conn = c.data_connection()
    threading.Thread(target=lambda: c.call("diag.UnderhillDiag", "Kmsg", diag_pb2.KmsgRequest(follow=True,
                                                                                              conn=conn_id),
                                          empty_pb2.Empty), daemon=True).start()
    pending = bytearray()
    lock = threading.Lock()
    arrived = threading.Condition(lock)

    def reader():
        while True:
            try:
                b = conn.recv(65536)
            except OSError:
                return
            if not b:
                return
            with lock:
                pending.extend(b)
                arrived.notify_all()
    threading.Thread(target=reader, daemon=True).start()
    time.sleep(0.5)                              # the backlog of records arrives first
    latencies, updates = [], []

    def one(level: str):
        marker = f"log level set to {level}".encode()
        with lock:
            pending.clear()
        t0 = time.perf_counter()
        c.call("inspect.InspectService", "Update", ipb.UpdateRequest(path="trace/level", value=level),
               ipb.UpdateResponse)
        updates.append(time.perf_counter() - t0)
        with lock:
            arrived.wait_for(lambda: marker in pending, timeout=5)
            latencies.append(time.perf_counter() - t0)

    def rounds():
        for i in range(50):
            one("debug" if i % 2 else "info")
    benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    conn.close()
    info = benchmark.extra_info
    info.update(samples=len(latencies), write_to_client_ms=_ms(latencies), update_round_trip_ms=_ms(updates),
                vs_update=round(statistics.median(latencies) / statistics.median(updates), 2))
    print(f"\nkmsg -f: a kmsg write reaches the following client {_ms(latencies)} ms after the Update that "
          f"makes it is sent (the Update's own round trip {_ms(updates)} ms, {info['vs_update']}x)")


def test_hundred_clients(benchmark, vm):
    path, _c = vm

    def client():
        d = DiagClient(path)
        d.call("diag.OpenhclDiag", "Ping", empty_pb2.Empty(), empty_pb2.Empty)
        d.close()
    walls = {}

    def concurrent():
        threads = [threading.Thread(target=client) for _ in range(100)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        walls.setdefault("concurrent", []).append(time.perf_counter() - t0)

    def sequential():
        t0 = time.perf_counter()
        for _ in range(100):
            client()
        walls.setdefault("sequential", []).append(time.perf_counter() - t0)
    benchmark.pedantic(concurrent, setup=lambda: (sequential(), ((), {}))[1], rounds=3, warmup_rounds=0)
    conc, seq = statistics.median(walls["concurrent"]), statistics.median(walls["sequential"])
    benchmark.extra_info.update(concurrent_s=round(conc, 3), sequential_s=round(seq, 3),
                                concurrent_vs_sequential=round(conc / seq, 2))
    print(f"\n100 clients (connect, Ping, close): {conc * 1e3:.0f} ms at once, {seq * 1e3:.0f} ms one after "
          f"another ({conc / seq:.2f}x)")


def _exit_rate(c) -> float:
    def exits():
        r = c.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="vm/vps/0/exits", depth=0),
                   ipb.InspectResponse)
        return r.result.value.field1.kind.unsigned.value
    e0, t0 = exits(), time.perf_counter()
    time.sleep(WINDOW_S)
    return (exits() - e0) / (time.perf_counter() - t0)


def test_profiler_overhead(benchmark, vm):
    _path, c = vm
    idle, profiled = [], []

    def with_profile():
        conn_id, conn = c.data_connection()
        t = threading.Thread(target=lambda: c.call("profile.AzureProfiler", "Profile",
                                                   profile_pb2.ProfileRequest(conn=conn_id, duration=3),
                                                   empty_pb2.Empty), daemon=True)
        t.start()
        time.sleep(0.5)                          # the profiler host and binary are up
        profiled.append(_exit_rate(c))
        t.join(40)
        conn.close()
    benchmark.pedantic(with_profile, setup=lambda: (idle.append(_exit_rate(c)), ((), {}))[1], rounds=2,
                       warmup_rounds=0)
    base, prof = statistics.median(idle), statistics.median(profiled)
    benchmark.extra_info.update(exits_per_s_idle=round(base), exits_per_s_profiled=round(prof),
                                profiled_vs_idle=round(prof / base, 3))
    print(f"\nVP loop exits/s: {base:,.0f} without the profiler, {prof:,.0f} while it samples "
          f"({prof / base:.3f}x)")
