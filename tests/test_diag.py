"""The diag server of a running paravisor (issue 11): hybrid vsock, ttrpc with the public
protobufs, the services, `hclsim diag`, and bad input that leaves the server serving."""
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from hclsim.config import BootConfig
from hclsim.diag_client import DiagClient, RpcError, connect
from hclsim.hcl import ttrpc
from hclsim.hcl.pb import diag_pb2, inspect_service_pb2 as ipb, ttrpc_pb2
from google.protobuf import empty_pb2

CLI = [sys.executable, "-m", "hclsim"]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    from hclsim.system import start_kept_run
    path = str(tmp_path_factory.mktemp("diag") / "vm.sock")
    stop, t, box = start_kept_run(BootConfig(cpus=2), path)
    client = DiagClient(path, wait=30)
    client.call("diag.OpenhclDiag", "Ping", empty_pb2.Empty(), empty_pb2.Empty)
    yield path, client
    client.close()
    stop.set()
    t.join(30)
    assert "error" not in box, box.get("error")


def _empty():
    return empty_pb2.Empty()


def test_ping_and_the_hybrid_vsock_handshake_forms(vm):
    path, client = vm
    client.call("diag.OpenhclDiag", "Ping", _empty(), empty_pb2.Empty)
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"connect 00000001-facb-11e6-bd58-64006a7986d3\n")      # the service id form, any case
    assert s.recv(64) == b"OK 00000001-facb-11e6-bd58-64006a7986d3\n"
    s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"CONNECT 77\n")                                     # nobody listens there: closed, no OK
    assert s.recv(64) == b""
    s.close()


def test_inspect_tree_of_control_kernel_and_vm(vm):
    _path, client = vm
    root = client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="", depth=0),
                       ipb.InspectResponse).result
    names = {e.name: e.node.WhichOneof("variant") for e in root.dir.field1}
    assert names["control_state"] == "value" and names["vm"] == "unevaluated" and names["kernel"] == "unevaluated"
    from hclsim.diag_cli import node_json
    full = node_json(client.call("inspect.InspectService", "Inspect",
                                 ipb.InspectRequest(path="", depth=0xFFFFFFFF), ipb.InspectResponse).result)
    assert full["control_state"] == "started"
    assert full["kernel"]["cpus_online"] == "0-1"
    assert {v["name"] for v in full["mesh"]["hosts"].values()} == {"vm"}
    assert set(full["vm"]["vps"]) == {"0", "1"} and full["vm"]["vps"]["0"]["exits"] > 0
    assert full["vm"]["devices"]["COM1"]["regions"]["registers"]["start"] == 0x3F8
    memory = full["vm"]["memory"]
    assert memory["0x0"]["type"] == "VTL0" and {m["type"] for m in memory.values()} >= {"VTL0", "VTL2_RAM"}
    missing = client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="no/such", depth=0),
                          ipb.InspectResponse).result
    assert missing.failed.field1.WhichOneof("variant") == "not_found"
    with pytest.raises(RpcError, match="immutable"):
        client.call("inspect.InspectService", "Update", ipb.UpdateRequest(path="control_state", value="x"),
                    ipb.UpdateResponse)


def _read_all(conn) -> bytes:
    chunks = []
    while True:
        b = conn.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def test_kmsg_records_are_nul_separated_and_files_are_raw(vm):
    _path, client = vm
    conn_id, conn = client.data_connection()
    client.call("diag.UnderhillDiag", "Kmsg", diag_pb2.KmsgRequest(conn=conn_id), empty_pb2.Empty)
    records = _read_all(conn).split(b"\0")
    assert records[-1] == b"" and any(b"Linux version" in r for r in records)
    assert all(r.split(b";", 1)[0].count(b",") >= 3 for r in records[:-1])       # prio,seq,usec,flags;text
    conn_id, conn = client.data_connection()
    client.call("diag.UnderhillDiag", "ReadFile", diag_pb2.FileRequest(conn=conn_id, file_path="/proc/cmdline"),
                empty_pb2.Empty)
    cmdline = _read_all(conn)
    assert b"rdinit=/underhill-init" in cmdline and b"\0" not in cmdline
    with pytest.raises(RpcError, match="invalid connection id"):
        client.call("diag.UnderhillDiag", "Kmsg", diag_pb2.KmsgRequest(conn=10_000), empty_pb2.Empty)


def test_a_failed_read_or_exec_ends_its_data_connections(vm):
    """The server takes the data connections of a call that fails and shuts them down, so a
    client reading them sees their end (it used to leave them parked: the reader hung)."""
    _path, client = vm
    for path, error in (("/proc", "cannot read directory"), ("/no/such/file", "No such file or directory")):
        conn_id, conn = client.data_connection()
        with pytest.raises(RpcError, match=error):
            client.call("diag.UnderhillDiag", "ReadFile", diag_pb2.FileRequest(conn=conn_id, file_path=path,
                                                                               follow=True), empty_pb2.Empty)
        conn.settimeout(5)
        assert conn.recv(1) == b"", path                  # ended at once, not parked
        conn.close()
    ids, conns = zip(*(client.data_connection() for _ in range(3)))
    with pytest.raises(RpcError, match="failed to launch /no/such/program"):
        client.call("diag.UnderhillDiag", "Exec", diag_pb2.ExecRequest(command="/no/such/program", stdin=ids[0],
                                                                       stdout=ids[1], stderr=ids[2]),
                    diag_pb2.ExecResponse)
    for conn in conns:
        conn.settimeout(5)
        assert conn.recv(1) == b""
        conn.close()
    from hclsim.diag_cli import node_json
    parked = node_json(client.call("inspect.InspectService", "Inspect",
                                   ipb.InspectRequest(path="diag/parked_data_connections", depth=0),
                                   ipb.InspectResponse).result)
    assert parked == 0


def test_a_call_past_its_deadline_gets_deadline_exceeded(vm):
    """ttrpc's timeout_nano: a Wait on a program that waits for its stdin, with a 0.3 s timeout,
    is answered DeadlineExceeded at 0.3 s; the server goes on serving."""
    _path, client = vm
    in_id, conn_in = client.data_connection()
    pid = client.call("diag.UnderhillDiag", "Exec", diag_pb2.ExecRequest(command="sh", stdin=in_id),
                      diag_pb2.ExecResponse).pid
    t0 = time.monotonic()
    with pytest.raises(RpcError) as exc:
        client.call("diag.UnderhillDiag", "Wait", diag_pb2.WaitRequest(pid=pid), diag_pb2.WaitResponse, timeout=0.3)
    took = time.monotonic() - t0
    assert exc.value.code == ttrpc.DEADLINE_EXCEEDED and 0.25 < took < 3, (exc.value, took)
    client.call("diag.OpenhclDiag", "Ping", _empty(), empty_pb2.Empty)
    conn_in.close()                                      # sh reads EOF and exits; the server reaps it
    def listed() -> bool:
        out = _exec(client, "ps")[1].decode()
        return any(line.split()[0] == str(pid) for line in out.splitlines()[1:] if line.strip())
    for _ in range(100):
        if not listed():
            break
        time.sleep(0.05)
    assert not listed()                                  # the deadline did not lose the program's Wait


def test_data_connection_ids_count_from_one_native_endian(vm):
    path, _client = vm
    ids = []
    for _ in range(3):
        s = connect(path, 2)
        ids.append(struct.unpack("=Q", s.recv(8))[0])
        s.close()
    assert ids == sorted(ids) and ids[1] == ids[0] + 1 and ids[0] >= 1


def test_pause_and_resume_answer_as_openhcl_does(vm):
    _path, client = vm
    client.call("diag.UnderhillDiag", "Pause", _empty(), empty_pb2.Empty)
    with pytest.raises(RpcError, match="already paused"):
        client.call("diag.UnderhillDiag", "Pause", _empty(), empty_pb2.Empty)
    client.call("diag.UnderhillDiag", "Resume", _empty(), empty_pb2.Empty)
    with pytest.raises(RpcError, match="currently running"):
        client.call("diag.UnderhillDiag", "Resume", _empty(), empty_pb2.Empty)
    with pytest.raises(RpcError, match="already been started"):
        client.call("diag.UnderhillDiag", "Start", diag_pb2.StartRequest(), empty_pb2.Empty)


def _raw_call(path, frame: bytes) -> tuple[int, int, bytes] | None:
    s = connect(path, 1)
    s.sendall(frame)
    got = ttrpc.read_frame(s)
    s.close()
    return got


def _status(payload: bytes):
    r = ttrpc_pb2.Response.FromString(payload)
    assert r.WhichOneof("result") == "status"
    return r.status.code, r.status.message


def test_bad_requests_get_statuses_and_the_server_keeps_serving(vm):
    path, client = vm
    with pytest.raises(RpcError) as exc:
        client.call("nope.Service", "X", _empty(), empty_pb2.Empty)
    assert exc.value.code == ttrpc.UNIMPLEMENTED and "unknown service nope.Service" in exc.value.text
    with pytest.raises(RpcError) as exc:
        client.call("diag.OpenhclDiag", "Nope", _empty(), empty_pb2.Empty)
    assert exc.value.code == ttrpc.UNIMPLEMENTED
    bad = ttrpc_pb2.Request(service="diag.UnderhillDiag", method="Wait", payload=b"\xff\xff\xff").SerializeToString()
    _sid, _kind, payload = _raw_call(path, ttrpc.encode(1, ttrpc.TYPE_REQUEST, bad))
    assert _status(payload)[0] == ttrpc.INVALID_ARGUMENT
    _sid, _kind, payload = _raw_call(path, ttrpc.encode(1, ttrpc.TYPE_REQUEST, b"\xff\xff\xff"))
    assert _status(payload)[0] == ttrpc.INVALID_ARGUMENT
    sid, _kind, payload = _raw_call(path, ttrpc.encode(2, ttrpc.TYPE_REQUEST, b""))
    assert sid == 2 and _status(payload)[0] == ttrpc.INVALID_ARGUMENT              # even stream id
    # An oversized frame is read and dropped; the same connection then answers a Ping.
    s = connect(path, 1)
    big = ttrpc.MAX_MESSAGE + 1
    s.sendall(ttrpc.HEADER.pack(big, 5, ttrpc.TYPE_REQUEST, 0) + bytes(big))
    sid, _k, payload = ttrpc.read_frame(s)
    assert sid == 5 and _status(payload)[0] == 8                                   # ResourceExhausted
    ping = ttrpc_pb2.Request(service="diag.OpenhclDiag", method="Ping").SerializeToString()
    s.sendall(ttrpc.encode(7, ttrpc.TYPE_REQUEST, ping))
    sid, _k, payload = ttrpc.read_frame(s)
    assert sid == 7 and ttrpc_pb2.Response.FromString(payload).WhichOneof("result") == "payload"
    s.close()
    # A truncated frame, then the client vanishes.
    s = connect(path, 1)
    s.sendall(ttrpc.HEADER.pack(100, 9, ttrpc.TYPE_REQUEST, 0) + b"abc")
    s.close()
    client.call("diag.OpenhclDiag", "Ping", _empty(), empty_pb2.Empty)


def test_a_hundred_clients_at_once(vm):
    path, _client = vm
    errors, done = [], []

    def one():
        try:
            c = DiagClient(path)
            c.call("diag.OpenhclDiag", "Ping", _empty(), empty_pb2.Empty)
            c.close()
            done.append(1)
        except Exception as exc:
            errors.append(exc)
    threads = [threading.Thread(target=one) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(done) == 100
    time.sleep(0.5)
    _p, client = vm
    from hclsim.diag_cli import node_json
    diag = node_json(client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="diag", depth=1),
                                 ipb.InspectResponse).result)
    assert diag["connections"] <= 2                    # the fixture's, and no leak of the hundred


def _cli(*args, env=None, timeout=60):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([*CLI, "diag", *args], capture_output=True, text=True, timeout=timeout, env=e)


def test_cli_inspect_kmsg_file_and_errors(vm):
    path, _client = vm
    out = _cli(f"vsock:{path}", "inspect", "control_state")
    assert out.returncode == 0 and out.stdout.strip() == '"started"', out.stderr
    out = _cli(f"vsock:{path}", "inspect", "-r", "-j", "kernel")
    assert json.loads(out.stdout)["cpus_online"] == "0-1"
    out = _cli(f"vsock:{path}", "kmsg")
    assert out.returncode == 0 and "Linux version" in out.stdout and out.stdout.startswith("[")
    out = _cli(f"vsock:{path}", "file", "-p", "/proc/cmdline")
    assert "rdinit=/underhill-init" in out.stdout
    out = _cli(f"vsock:{path}", "pause")
    assert out.returncode == 0
    out = _cli(f"vsock:{path}", "pause")
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "already paused" in out.stderr
    assert _cli(f"vsock:{path}", "resume").returncode == 0
    out = _cli("vsock:/nonexistent/vm.sock", "inspect", env={"HCLSIM_DIAG_WAIT_S": "0"})
    assert out.returncode != 0 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1


def _boot_kept(config, path):
    from hclsim.system import start_kept_run
    return start_kept_run(config, path)


def test_a_confidential_vm_has_no_diag_services_and_safe_inspect_only(tmp_path):
    path = str(tmp_path / "cvm.sock")
    stop, t, box = _boot_kept(BootConfig(cpus=1, isolation="vbs"), path)
    try:
        client = None
        deadline = time.monotonic() + 30
        while client is None:
            try:
                client = DiagClient(path, wait=30)
                client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(), ipb.InspectResponse)
            except RpcError:
                break
        with pytest.raises(RpcError) as exc:
            client.call("diag.OpenhclDiag", "Ping", _empty(), empty_pb2.Empty)
        assert exc.value.code == ttrpc.UNIMPLEMENTED and "unknown service" in exc.value.text
        root = client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="", depth=0xFFFFFFFF),
                           ipb.InspectResponse).result
        assert [e.name for e in root.dir.field1] == ["control_state"]
        assert all(e.sensitivity.WhichOneof("variant") == "safe" for e in root.dir.field1)
        with pytest.raises(RpcError) as exc:               # the profiler stays registered
            client.call("profile.AzureProfiler", "Profile", __import__("hclsim.hcl.pb.profile_pb2",
                        fromlist=["x"]).ProfileRequest(conn=12345, duration=1), empty_pb2.Empty)
        assert exc.value.code != ttrpc.UNIMPLEMENTED
        client.close()
        # Calls that fail before the server takes their data connection end at once too.
        for args in (("file", "-p", "/proc/cmdline"), ("kmsg",), ("kmsg", "-f"), ("run", "cat", "/proc/cmdline")):
            out = _cli(f"vsock:{path}", *args, timeout=20)
            assert out.returncode == 1 and out.stderr.count("\n") == 1, (args, out.stderr)
            assert "unknown service diag.UnderhillDiag (Unimplemented)" in out.stderr, (args, out.stderr)
        assert time.monotonic() < deadline
    finally:
        stop.set()
        t.join(30)
    assert "error" not in box, box.get("error")


def _exec(client, command, args=(), stdin_data=None, tty=False):
    """Exec with data connections; (exit code, stdout, stderr)."""
    ids, conns = [], []
    for _ in range(2 if tty else 3):
        i, c = client.data_connection()
        ids.append(i)
        conns.append(c)
    req = diag_pb2.ExecRequest(command=command, args=list(args), tty=tty, stdin=ids[0], stdout=ids[1],
                               stderr=0 if tty else ids[2])
    pid = client.call("diag.UnderhillDiag", "Exec", req, diag_pb2.ExecResponse).pid
    if stdin_data is not None:
        conns[0].sendall(stdin_data)
    if not tty:
        conns[0].shutdown(socket.SHUT_WR)
    outs = {}
    threads = [threading.Thread(target=lambda k=k, c=c: outs.__setitem__(k, _read_all(c)))
               for k, c in zip(("out", "err"), conns[1:])]
    for t in threads:
        t.start()
    code = client.call("diag.UnderhillDiag", "Wait", diag_pb2.WaitRequest(pid=pid), diag_pb2.WaitResponse).exit_code
    for t in threads:
        t.join(10)
    return code, outs.get("out", b""), outs.get("err", b"")


def test_exec_runs_rootfs_programs_that_see_the_simulated_kernel(vm):
    _path, client = vm
    code, out, err = _exec(client, "cat", ["/proc/cmdline"])
    assert code == 0 and b"rdinit=/underhill-init" in out, (code, out, err)
    code, out, err = _exec(client, "/bin/sh", ["-c", "echo hi; exit 3"])
    assert (code, out) == (3, b"hi\n"), (code, out, err)
    code, out, err = _exec(client, "sh", ["-c", "kill -9 $$"])
    assert code == 255, (code, out, err)                       # a signal ended it
    code, out, err = _exec(client, "sh", stdin_data=b"echo from-stdin\n")
    assert code == 0 and out == b"from-stdin\n", (code, out, err)
    code, out, err = _exec(client, "ps")
    assert code == 0 and b"underhill-init" in out and b"openvmm_hcl" in out and b"underhill-vm" in out, \
        (code, out, err)
    with pytest.raises(RpcError, match="failed to launch nope"):
        _exec(client, "nope")
    with pytest.raises(RpcError, match="pid not found"):
        client.call("diag.UnderhillDiag", "Wait", diag_pb2.WaitRequest(pid=1), diag_pb2.WaitResponse)


def test_exec_with_a_tty_runs_a_shell_on_a_pty(vm):
    _path, client = vm
    code, out, _err = _exec(client, "/bin/sh", tty=True, stdin_data=b"echo on-a-pty\nexit 4\n")
    assert code == 4 and b"on-a-pty" in out


def test_cli_run_exits_with_the_remote_status(vm):
    path, _client = vm
    out = _cli(f"vsock:{path}", "run", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (out.returncode, out.stdout, out.stderr) == (7, "out\n", "err\n")


def test_profile_writes_speedscope_and_collapsed_stacks_and_reuses_its_host(vm, tmp_path):
    path, client = vm
    out = _cli(f"vsock:{path}", "profile", "--duration", "1", "-o", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    names = [p["name"] for p in prof["profiles"]]
    assert "vp 0" in names and "vp 1" in names and any(n.startswith("openvmm_hcl (") for n in names)
    names_of = [f["name"] for f in prof["shared"]["frames"]]
    frames = set(names_of)
    # Each VP's sample: where it runs, its VTL, the image, the function. Here both VPs are on Linux
    # CPUs (VP 1's sidecar CPU came online for it), in VTL0's image: vtl0 frames only. A sidecar
    # CPU's VTL2 is symbolized with the sidecar image (tests/test_diag_cli.py); the shim has
    # handed off before any profiler exists, so no profile of a running VM holds shim frames.
    for vp in ("vp 0", "vp 1"):
        stacks = [[names_of[i] for i in s] for p in prof["profiles"] if p["name"] == vp for s in p["samples"]]
        assert stacks and all(st[:3] == ["linux", "vtl0", "vtl0"] for st in stacks), (vp, stacks)
        assert all(st[3] in ("vtl0_halt", "step_power_off") or st[3].startswith("step_") for st in stacks), stacks
    assert not frames & {"shim", "sidecar", "?"}
    for p in prof["profiles"]:
        assert len(p["samples"]) == len(p["weights"]) and all(i < len(frames) + 1 for s in p["samples"] for i in s)
    from hclsim.diag_cli import node_json, resolve_host_pid
    first = resolve_host_pid(client, "profiler")
    out = _cli(f"vsock:{path}", "profile", "--duration", "1", "-o", str(tmp_path / "p.txt"), "--format", "collapsed")
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert lines and all(line.rsplit(" ", 1)[1].isdigit() for line in lines)
    assert any(line.startswith("vp_0;") for line in lines)
    assert resolve_host_pid(client, "profiler") == first        # the same host, reused
    hosts = node_json(client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="mesh/hosts",
                                                                                           depth=1),
                                  ipb.InspectResponse).result)
    assert {h["name"] for h in hosts.values()} == {"vm", "profiler"}


def test_the_profilers_memory_floor_and_limit():
    from hclsim.hcl.profiler import limit_arg
    assert limit_arg(100) == "LimitMB:75" and limit_arg(10) == "LimitMB:7"
    with pytest.raises(RuntimeError, match="Not enough memory"):
        limit_arg(9)


def test_log_level_is_an_updatable_leaf(vm):
    _path, client = vm
    from hclsim.diag_cli import value_json
    new = client.call("inspect.InspectService", "Update", ipb.UpdateRequest(path="trace/level", value="debug"),
                      ipb.UpdateResponse).new_value
    assert value_json(new) == "debug"
    with pytest.raises(RpcError, match="unknown level"):
        client.call("inspect.InspectService", "Update", ipb.UpdateRequest(path="trace/level", value="loud"),
                    ipb.UpdateResponse)
    client.call("inspect.InspectService", "Update", ipb.UpdateRequest(path="trace/level", value="info"),
                ipb.UpdateResponse)


def _host_fds_and_threads(client) -> tuple[int, int]:
    from hclsim.diag_cli import node_json
    proc = node_json(client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="proc", depth=0),
                                 ipb.InspectResponse).result)
    return len(os.listdir(f"/proc/{proc['pid']}/fd")), proc["threads"]


def test_no_descriptor_or_thread_leaks_after_clients_that_vanish(vm):
    path, client = vm
    before = _host_fds_and_threads(client)
    for _ in range(20):
        # a follower that goes away mid-stream, a data connection never used, a half-sent request
        conn_id, conn = client.data_connection()
        t = threading.Thread(target=lambda i=conn_id: client.call("diag.UnderhillDiag", "Kmsg",
                                                                  diag_pb2.KmsgRequest(follow=True, conn=i),
                                                                  empty_pb2.Empty), daemon=True)
        t.start()
        conn.recv(100)
        conn.close()
        t.join(10)
        assert not t.is_alive()                        # the follow ended when its peer hung up
        _i, unused = client.data_connection()
        unused.close()
        s = connect(path, 1)
        s.sendall(ttrpc.HEADER.pack(50, 1, ttrpc.TYPE_REQUEST, 0) + b"half")
        s.close()
    deadline = time.monotonic() + 10
    while True:
        after = _host_fds_and_threads(client)
        if after[0] <= before[0] and after[1] <= before[1] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after[0] <= before[0] and after[1] <= before[1], (before, after)


def test_start_launches_the_workers_of_a_vm_waiting_for_it(tmp_path):
    """`start -e NAME=VALUE -u NAME`: the workers get the control process's environment with
    those set and unset: -u OPENHCL_NO_SIDECAR_HOTPLUG (from the command line) turns hotplug
    back on, -e HCLSIM_TPM=1 gives the VM worker a vTPM in its own host (with swtpm)."""
    import shutil
    path = str(tmp_path / "wait.sock")
    stop, t, box = _boot_kept(BootConfig(cpus=2, host_bootargs="OPENHCL_WAIT_FOR_START=1 OPENHCL_NO_SIDECAR_HOTPLUG=1"),
                              path)
    tpm = shutil.which("swtpm") is not None
    try:
        client = DiagClient(path, wait=30)
        from hclsim.diag_cli import node_json
        root = node_json(client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="", depth=0),
                                     ipb.InspectResponse).result)
        assert root["control_state"] == "waiting_for_start" and "vm" not in root
        with pytest.raises(RpcError, match="not been started"):
            client.call("diag.UnderhillDiag", "Pause", _empty(), empty_pb2.Empty)
        out = _cli(f"vsock:{path}", "start", "-e", "HCLSIM_TPM=1" if tpm else "OPENHCL_HCLSIM_TEST=1",
                   "-u", "OPENHCL_NO_SIDECAR_HOTPLUG")
        assert out.returncode == 0, out.stderr
        for _ in range(100):
            state = node_json(client.call("inspect.InspectService", "Inspect",
                                          ipb.InspectRequest(path="control_state", depth=0),
                                          ipb.InspectResponse).result)
            if state == "started":
                break
            time.sleep(0.05)
        assert state == "started"
        vm = node_json(client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="vm", depth=2),
                                   ipb.InspectResponse).result)
        assert vm["sidecar"]["hotplug"] is True                          # -u took it away
        hosts = node_json(client.call("inspect.InspectService", "Inspect",
                                      ipb.InspectRequest(path="mesh/hosts", depth=2), ipb.InspectResponse).result)
        assert {h["name"] for h in hosts.values()} == ({"vm", "tpm"} if tpm else {"vm"})   # -e gave it
        assert _cli(f"vsock:{path}", "start").returncode == 1            # already started
        client.close()
    finally:
        stop.set()
        t.join(30)
    assert "error" not in box, box.get("error")


def test_crash_of_the_vm_worker_resets_the_vm_and_diag_comes_back(tmp_path):
    path = str(tmp_path / "crash.sock")
    stop, t, box = _boot_kept(BootConfig(cpus=1), path)
    try:
        client = DiagClient(path, wait=30)
        out = _cli(f"vsock:{path}", "crash", "panic", "-n", "vm")
        assert out.returncode == 0, out.stderr
        client.close()
        deadline = time.monotonic() + 30
        seen = b""
        while time.monotonic() < deadline:
            try:
                c = DiagClient(path, wait=5)
                conn_id, conn = c.data_connection()
                c.call("diag.UnderhillDiag", "Kmsg", diag_pb2.KmsgRequest(conn=conn_id), empty_pb2.Empty)
                seen = _read_all(conn)
                c.close()
                if b"Kernel panic" not in seen and seen.count(b"Linux version") == 1 and b"VM worker started" in seen:
                    break                     # the new boot's log: the VM came back
            except Exception:
                pass
            time.sleep(0.3)
        assert b"VM worker started" in seen
    finally:
        stop.set()
        t.join(30)
    assert "error" not in box, box.get("error")
    assert box["outcome"].resets == 1


def test_calls_in_flight_are_cancelled_when_the_control_process_ends(tmp_path):
    path = str(tmp_path / "cancel.sock")
    stop, t, box = _boot_kept(BootConfig(cpus=1), path)
    try:
        client = DiagClient(path, wait=30)
        in_id, conn_in = client.data_connection()
        pid = client.call("diag.UnderhillDiag", "Exec", diag_pb2.ExecRequest(command="sh", stdin=in_id),
                          diag_pb2.ExecResponse).pid        # waits on its stdin: Wait blocks
        got = {}

        def wait():
            try:
                client.call("diag.UnderhillDiag", "Wait", diag_pb2.WaitRequest(pid=pid), diag_pb2.WaitResponse)
            except RpcError as exc:
                got["code"] = exc.code
        w = threading.Thread(target=wait)
        w.start()
        time.sleep(0.3)
        from hclsim.diag_cli import resolve_host_pid
        os.kill(resolve_host_pid(client, "vm"), 9)       # the worker dies: the control process ends
        w.join(15)
        assert got.get("code") == ttrpc.CANCELLED
        conn_in.close()
        client.close()
    finally:
        stop.set()
        t.join(30)
