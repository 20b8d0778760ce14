"""`hclsim diag` (hclsim/diag_cli.py) as a user runs it: the real CLI in a subprocess against a
real kept-running VM, for the verbs and options tests/test_diag.py does not reach: inspect's
-l, -p/--period/--count, -u and -t, kmsg -f and -r, file -f, shell on a pty, crash of mesh
hosts other than the VM worker, the retry of a VM that is not up yet, errors that must be
one line and never hang, and `hclsim boot --keep-running --timeout`."""
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from hclsim.config import BootConfig
from hclsim.diag_client import DiagClient
from hclsim.hcl.pb import inspect_service_pb2 as ipb
from google.protobuf import empty_pb2

CLI = [sys.executable, "-m", "hclsim"]
HAVE_SWTPM = __import__("shutil").which("swtpm") is not None


def _env(**extra) -> dict:
    return dict(os.environ, **extra)


def _cli(vm: str, *args, timeout: float = 30, env=None, stdin=subprocess.DEVNULL):
    return subprocess.run([*CLI, "diag", vm, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or _env(), stdin=stdin)


def _one_error_line(out) -> str:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("hclsim: error: "), out.stderr
    return out.stderr.strip()


class Lines:
    """A CLI subprocess whose stdout (and stderr) lines are collected by threads as they come."""

    def __init__(self, argv, env=None):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env or _env(), stdin=subprocess.DEVNULL)
        self.out, self.err = [], []
        self._threads = [threading.Thread(target=self._collect, args=(s, d), daemon=True)
                         for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _collect(stream, into) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, text: str, timeout: float = 15.0, start: int = 0) -> int:
        """The index of the first stdout line from start holding text (fails after timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, line in enumerate(self.out[start:], start):
                if text in line:
                    return i
            if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads[:1]):
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen; stdout tail {self.out[-5:]}, stderr {self.err}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    """One VM for the module: 2 VPs, the sidecar CPU kept (no hotplug: VP 1 stays on it), a vTPM
    in its device worker host (underhill-tpm) when swtpm is there. A client is started before
    the VM exists (HCLSIM_DIAG_WAIT_S): it must wait and connect once the VM is up."""
    from hclsim.system import start_kept_run
    path = str(tmp_path_factory.mktemp("diagcli") / "vm.sock")
    early = subprocess.Popen([*CLI, "diag", f"vsock:{path}", "inspect", "proc/pid"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env(HCLSIM_DIAG_WAIT_S="60"))
    time.sleep(1.5)                          # it has tried (and retried) before the VM starts
    assert early.poll() is None and not os.path.exists(path)
    stop, t, box = start_kept_run(BootConfig(cpus=2, tpm=HAVE_SWTPM, host_bootargs="OPENHCL_NO_SIDECAR_HOTPLUG=1"),
                                  path)
    client = DiagClient(path, wait=30)
    client.call("diag.OpenhclDiag", "Ping", empty_pb2.Empty(), empty_pb2.Empty)
    for _ in range(200):                     # the VM worker started (and VTL0 ran: VP 1 is on its sidecar)
        if _json(client, "control_state") == "started" and _json(client, "vm/state") != "starting":
            break
        time.sleep(0.05)
    info = {"path": path, "vm": f"vsock:{path}", "client": client, "early": early}
    yield info
    client.close()
    stop.set()
    t.join(30)
    if early.poll() is None:
        early.kill()
    assert "error" not in box, box.get("error")


def _json(client, path: str, depth: int = 0xFFFFFFFF):
    from hclsim.diag_cli import node_json
    return node_json(client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path=path, depth=depth),
                                 ipb.InspectResponse, timeout=10).result)


def test_a_client_started_before_the_vm_connects_once_it_is_up(vm):
    out, err = vm["early"].communicate(timeout=60)
    assert vm["early"].returncode == 0, err
    assert int(out.strip()) == _json(vm["client"], "proc/pid") and err == ""
    bad = _cli(vm["vm"], "inspect", env=_env(HCLSIM_DIAG_WAIT_S="soon"))
    assert "HCLSIM_DIAG_WAIT_S='soon'" in _one_error_line(bad)


def test_file_errors_are_one_line_and_never_hang(vm):
    """file -p of a missing file or a directory (with -f too), run and shell of a missing
    program, crash of a pid that is no mesh host: one line, status 1, at once."""
    cases = [(("file", "-p", "/no/such/file"), "/no/such/file: No such file or directory"),
             (("file", "-f", "-p", "/no/such/file"), "/no/such/file: No such file or directory"),
             (("file", "-p", "/proc"), "/proc: cannot read directory"),
             (("file", "-f", "-p", "/proc"), "/proc: cannot read directory"),
             (("run", "/no/such/program"), "failed to launch /no/such/program"),
             (("shell", "/no/such/shell"), "failed to launch /no/such/shell"),
             (("crash", "panic", "-p", "1"), "no mesh host with pid 1"),
             (("crash", "panic", "-n", "nope"), "no mesh host named 'nope' (the hosts: underhill,"),
             (("start", "-e", "NOEQUALS"), "--env NOEQUALS: expected NAME=VALUE"),
             (("inspect", "-u", "x", "control_state"), "immutable node")]
    for args, text in cases:
        t0 = time.monotonic()
        line = _one_error_line(_cli(vm["vm"], *args, timeout=20))
        assert text in line, (args, line)
        assert time.monotonic() - t0 < 10, args
    assert _json(vm["client"], "diag/parked_data_connections") == 0      # none left behind


def test_inspect_limit_poll_update_and_timeout(vm):
    run = lambda *a: _cli(vm["vm"], "inspect", *a)          # noqa: E731
    hosts = {h["name"] for h in _json(vm["client"], "mesh/hosts").values()}
    levels = [json.loads(run("-r", "-j", "-l", str(n), "mesh").stdout) for n in (0, 1, 2)]
    assert levels[0] == {"hosts": None}                                    # -l 0: the children, unevaluated
    assert set(levels[1]["hosts"].values()) == {None} and len(levels[1]["hosts"]) == len(hosts)
    assert {h["name"] for h in levels[2]["hosts"].values()} == hosts       # -l 2: everything below mesh
    assert json.loads(run("-r", "-j", "mesh").stdout) == levels[2]
    assert json.loads(run("-j", "mesh").stdout) == levels[0]               # not recursive: depth 0
    t0 = time.monotonic()
    out = run("-p", "--period", "0.3", "--count", "3", "control_state")
    assert out.returncode == 0 and out.stdout.splitlines() == ['"started"'] * 3, out
    assert time.monotonic() - t0 >= 0.6                                     # two periods between three polls
    out = run("-u", "debug", "trace/level")
    assert (out.returncode, out.stdout.strip()) == (0, '"debug"'), out.stderr
    assert run("trace/level").stdout.strip() == '"debug"'
    assert run("trace/level", "--update", "info").stdout.strip() == '"info"'
    assert "unknown level" in _one_error_line(run("-u", "loud", "trace/level"))
    assert json.loads(run("-t", "0", "-r", "-j", "kernel").stdout)["cpus_present"] == "0-1"   # no timeout
    line = _one_error_line(run("-t", "0.000001", "-r", ""))       # 1 µs: the server answers DeadlineExceeded
    assert line == "hclsim: error: deadline exceeded (DeadlineExceeded)"


def test_kmsg_follow_gets_records_written_after_it_started(vm):
    follow = Lines([*CLI, "diag", vm["vm"], "kmsg", "-f"])
    try:
        first = follow.wait_for("diag server listening on vsock ports 1 and 2")
        assert follow.out[0].startswith("[") and "Linux version" in follow.out[0]
        time.sleep(0.3)
        assert _cli(vm["vm"], "run", "sh", "-c", "echo cli-follow-marker > /dev/kmsg").returncode == 0
        at = follow.wait_for("cli-follow-marker", start=first)
        assert follow.out[at].rstrip("\n").endswith("] cli-follow-marker")
        assert follow.proc.poll() is None                                  # still following
    finally:
        status = follow.interrupt()
    assert status == 130 and follow.err == ["hclsim: interrupted\n"], follow.err
    for _ in range(100):                                                   # the server's follower ended
        if _json(vm["client"], "diag/connections") == 1:
            break
        time.sleep(0.05)
    assert _json(vm["client"], "diag/connections") == 1


def test_file_follow_gets_what_is_appended(vm):
    assert _cli(vm["vm"], "run", "sh", "-c", "echo one > /tmp/followed").returncode == 0
    follow = Lines([*CLI, "diag", vm["vm"], "file", "-f", "-p", "/tmp/followed"])
    try:
        follow.wait_for("one")
        assert _cli(vm["vm"], "run", "sh", "-c", "echo two >> /tmp/followed").returncode == 0
        follow.wait_for("two")
        assert follow.out == ["one\n", "two\n"] and follow.proc.poll() is None
    finally:
        assert follow.interrupt() == 130
    out = _cli(vm["vm"], "file", "-p", "/tmp/followed")
    assert (out.returncode, out.stdout) == (0, "one\ntwo\n")


def _read_pty(fd: int, until: bytes, timeout: float = 15.0) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while until not in buf and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:                    # EIO: the other side closed
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_shell_runs_sh_on_a_pty_and_exits_with_its_status(vm):
    """`hclsim diag VM shell` on a terminal: raw mode, the remote /bin/sh on a pty, its exit status."""
    master, slave = os.openpty()
    proc = subprocess.Popen([*CLI, "diag", vm["vm"], "shell"], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, env=_env(TERM="xterm"))
    os.close(slave)
    try:
        assert b"# " in _read_pty(master, b"# ")                         # the prompt
        os.write(master, b"cat /proc/cmdline\r")
        got = _read_pty(master, b"boot_cpus=")
        assert b"rdinit=/underhill-init" in got, got
        os.write(master, b"echo $TERM; exit 5\r")
        assert b"xterm" in _read_pty(master, b"xterm\r\n")
        assert proc.wait(15) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def _hosts(client) -> dict:
    return {h["name"]: int(pid) for pid, h in _json(client, "mesh/hosts").items()}


def _wait_host(client, name: str, not_pid: int | None = None, gone: bool = False, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hosts = _hosts(client)
        if gone and name not in hosts or not gone and name in hosts and hosts[name] != not_pid:
            return hosts.get(name)
        time.sleep(0.1)
    raise AssertionError(f"{name}: {_hosts(client)}")


def test_profile_symbolizes_a_sidecar_cpus_vtl2_and_crash_of_the_profiler_host(vm, tmp_path):
    """VP 1 stays on its sidecar CPU (no hotplug): its samples are in VTL2, in the sidecar image.
    Then `crash panic -p PID` of the profiler host: it goes, the VM stays, the next profile
    starts a new one."""
    client = vm["client"]
    out = _cli(vm["vm"], "profile", "--duration", "1", "-o", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    prof = json.loads((tmp_path / "p.json").read_text())
    names = [f["name"] for f in prof["shared"]["frames"]]
    stacks = {p["name"]: [[names[i] for i in s] for s in p["samples"]] for p in prof["profiles"]}
    assert stacks["vp 1"] and all(st[:3] == ["sidecar", "vtl2", "sidecar"] for st in stacks["vp 1"]), stacks["vp 1"]
    assert all(st[3] == "ap_main" for st in stacks["vp 1"])               # the sidecar's idle loop, by name
    assert all(st[:3] == ["linux", "vtl0", "vtl0"] for st in stacks["vp 0"]), stacks["vp 0"]
    profiler, vm_pid = _hosts(client)["profiler"], _hosts(client)["vm"]
    out = _cli(vm["vm"], "crash", "panic", "-p", str(profiler))
    assert out.returncode == 0, out.stderr
    _wait_host(client, "profiler", gone=True)
    assert _hosts(client)["vm"] == vm_pid and _json(client, "control_state") == "started"
    with pytest.raises(ProcessLookupError):
        os.kill(profiler, 0)
    out = _cli(vm["vm"], "profile", "--duration", "1", "-o", str(tmp_path / "q.txt"), "--format", "collapsed")
    assert out.returncode == 0, out.stderr
    assert _hosts(client)["profiler"] != profiler


@pytest.mark.skipif(not HAVE_SWTPM, reason="swtpm is not installed (the vTPM's device worker needs it)")
def test_crash_of_a_device_worker_host_by_pid_and_by_name(vm):
    """underhill-tpm, listed in mesh/hosts as "tpm": `crash panic -p PID` and `-n NAME` (its
    name, or its process name underhill-tpm) panic it; the VM worker restarts it, the VM stays."""
    client = vm["client"]
    first, vm_pid = _hosts(client)["tpm"], _hosts(client)["vm"]
    for how in (("-p", str(first)), ("-n", "tpm"), ("-n", "underhill-tpm")):
        before = _hosts(client)["tpm"]
        out = _cli(vm["vm"], "crash", "panic", *how)
        assert out.returncode == 0, (how, out.stderr)
        after = _wait_host(client, "tpm", not_pid=before)
        assert after != before and _hosts(client)["vm"] == vm_pid, how
    assert _json(client, f"mesh/hosts/{after}/restarts") == 3
    assert _json(client, "control_state") == "started"


def test_kmsg_reconnect_and_a_reset_after_the_boot_timeout(tmp_path):
    """`hclsim boot --keep-running --timeout 5`: past 5 s (kept running after power off, where
    the timeout no longer applies) `crash panic -n vm` resets the VM, which boots again with a
    timeout of its own and comes back; `kmsg -f -r` follows across the reset, saying so in one
    informational line, and SIGTERM ends the run with status 0."""
    path = str(tmp_path / "vm.sock")
    t0 = time.monotonic()
    boot = subprocess.Popen([*CLI, "boot", "--keep-running", "--cpus", "1", "--timeout", "5", "--vsock", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    follow = None
    try:
        client = DiagClient(path, wait=30)
        client.call("diag.OpenhclDiag", "Ping", empty_pb2.Empty(), empty_pb2.Empty)
        follow = Lines([*CLI, "diag", f"vsock:{path}", "kmsg", "-f", "-r"])
        follow.wait_for("powered the VM off")
        client.close()
        time.sleep(max(0.0, 6.0 - (time.monotonic() - t0)))               # past the 5 s timeout
        assert boot.poll() is None
        out = _cli(f"vsock:{path}", "crash", "panic", "-n", "vm")
        assert out.returncode == 0, out.stderr
        second = follow.wait_for("Linux version", start=1, timeout=30)     # the new boot's log
        follow.wait_for("powered the VM off", start=second, timeout=30)
        assert boot.poll() is None                                          # not "did not power off within 5 s"
        out = _cli(f"vsock:{path}", "inspect", "control_state", env=_env(HCLSIM_DIAG_WAIT_S="10"))
        assert out.stdout.strip() == '"started"', out.stderr
        assert follow.proc.poll() is None
        assert follow.err == ["hclsim: kmsg: the VM went away; waiting for it to come back\n"], follow.err
    finally:
        if follow is not None:
            follow.interrupt()
        boot.send_signal(signal.SIGTERM)
        try:
            status = boot.wait(30)
        finally:
            if boot.poll() is None:
                boot.kill()
                boot.wait()
    err = boot.stderr.read()
    assert status == 0 and "did not power off" not in err and "error" not in err, err


def test_force_exit_sidecar_and_the_convert_trigger_move_vps_kept_on_sidecar_cpus(tmp_path):
    """With hotplug off every AP stays on its sidecar CPU; vm/vps/3/force_exit_sidecar (the API)
    and vm/sidecar/convert (`inspect -u 2 vm/sidecar/convert`, the CLI) each move one VP to a
    Linux CPU, where it goes on; VP 1 stays."""
    path = str(tmp_path / "sc.sock")
    from hclsim.system import start_kept_run
    stop, t, box = start_kept_run(BootConfig(cpus=4, vtl0_iterations=10000,
                                         host_bootargs="OPENHCL_NO_SIDECAR_HOTPLUG=1"), path)
    from hclsim.diag_cli import node_json

    def vps():
        tree = node_json(client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="vm/vps", depth=1),
                                     ipb.InspectResponse).result)
        return tree if isinstance(tree, dict) and "$error" not in tree else {}

    def wait_moved(vp: str) -> dict:
        for _ in range(200):
            now = vps()
            if now.get(vp, {}).get("moved_ms", "") != "":
                break
            time.sleep(0.05)
        return now
    try:
        client = DiagClient(path, wait=30)
        where = None
        for _ in range(100):
            where = {k: v["on"] for k, v in vps().items()}
            if all(where.get(vp) == "sidecar" for vp in ("1", "2", "3")):
                break
            time.sleep(0.05)
        assert all(where.get(vp) == "sidecar" for vp in ("1", "2", "3")), where
        client.call("inspect.InspectService", "Update", ipb.UpdateRequest(path="vm/vps/3/force_exit_sidecar",
                                                                         value="true"), ipb.UpdateResponse)
        assert wait_moved("3")["3"]["moved_ms"] != ""              # it went to a Linux CPU and went on there
        out = _cli(f"vsock:{path}", "inspect", "-u", "2", "vm/sidecar/convert")
        assert out.returncode == 0 and out.stdout.strip() == '"2"', (out.stdout, out.stderr)
        now = wait_moved("2")
        assert now["2"]["moved_ms"] != "" and now["2"]["exits"] > 0
        assert now["1"]["on"] == "sidecar" and now["1"]["moved_ms"] == ""     # only the VPs asked for
        online = node_json(client.call("inspect.InspectService", "Inspect",
                                       ipb.InspectRequest(path="kernel/cpus_online", depth=0),
                                       ipb.InspectResponse).result)
        assert online in ("0,2-3", "0,2,3"), online
        for bad, error in (("abc", "invalid literal"), ("7", "not running on a sidecar CPU")):
            assert error in _one_error_line(_cli(f"vsock:{path}", "inspect", "-u", bad, "vm/sidecar/convert"))
        client.close()
    finally:
        stop.set()
        t.join(30)
    assert "error" not in box, box.get("error")


# ---- the stand-in kernel's vsock: AF_VSOCK where the host offers it, hybrid vsock always -------
def _af_vsock_loopback() -> bool:
    """Independently of kernel_stub.vsock: does a connection to (CID 1, port) reach a listener?"""
    import socket
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        c = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except (AttributeError, OSError):
        return False
    try:
        s.bind((1, socket.VMADDR_PORT_ANY))
        s.listen(1)
        c.settimeout(1)
        c.connect((1, s.getsockname()[1]))
        return True
    except OSError:
        return False
    finally:
        c.close()
        s.close()


def _guest_accept(fd: int, timeout: float = 5.0):
    """What a guest listener descriptor delivers: (port, the connection)."""
    import array
    import socket
    import struct
    guest = socket.socket(fileno=fd)
    guest.settimeout(timeout)
    msg, anc, _f, _a = guest.recvmsg(4, socket.CMSG_SPACE(4))
    fds = array.array("i")
    for _level, _kind, data in anc:
        fds.frombytes(data[:len(data) - len(data) % 4])
    guest.close()
    return struct.unpack("<I", msg)[0], socket.socket(fileno=fds[0])


def test_the_vsock_probe_decides_the_transport_and_says_why(tmp_path):
    """Without --vsock the kernel probes AF_VSOCK loopback (a listener on CID 1 that a connection
    reaches); its answer matches an independent check of this host, and the transport, the
    kernel's log line for each listened port and the hybrid socket follow from it. With --vsock
    PATH there is no probe: hybrid vsock, as asked."""
    from hclsim.kernel_stub import vsock as kv
    ok, why = kv.probe_af_vsock()
    assert ok == _af_vsock_loopback(), why
    logged = []
    v = kv.Vsock(str(tmp_path / "probe.sock"), lambda text, level=6: logged.append(text), real=True)
    try:
        assert v.transport == (kv.AF_VSOCK if ok else kv.HYBRID)
        if not ok:                      # e.g. "no AF_VSOCK loopback: bind to cid 1: Cannot assign requested address"
            assert v.why == f"no AF_VSOCK loopback: {why}"
            assert why.startswith(("this Python has no AF_VSOCK", "socket(AF_VSOCK): ", "bind to cid 1: ",
                                   "listen: ", "connect to cid 1 port ", "accept: ")), why
        fd = v.listen(7)
        assert logged == [f"hv_sock: vsock port 7: {v.describe(7)}"] and str(tmp_path / "probe.sock") in logged[0]
        assert ("AF_VSOCK cid 1" in logged[0]) == ok
        from hclsim.diag_client import connect
        host = connect(str(tmp_path / "probe.sock"), 7)             # hybrid vsock works either way
        port, conn = _guest_accept(fd)
        host.sendall(b"ping")
        assert port == 7 and conn.recv(4) == b"ping"
        conn.close()
        host.close()
    finally:
        v.close()
    v = kv.Vsock(str(tmp_path / "asked.sock"), lambda *_a: None, real=False)
    try:
        assert (v.transport, v.why) == (kv.HYBRID, "--vsock PATH asks for hybrid vsock")
        assert v.describe(1) == f"hybrid vsock at {tmp_path / 'asked.sock'} (--vsock PATH asks for hybrid vsock)"
    finally:
        v.close()


@pytest.mark.skipif(not _af_vsock_loopback(), reason="this host has no AF_VSOCK loopback (vsock_loopback)")
def test_with_af_vsock_loopback_a_guest_listener_is_reached_at_cid_1(tmp_path):
    from hclsim.kernel_stub import vsock as kv
    from hclsim.diag_client import connect
    v = kv.Vsock(str(tmp_path / "v.sock"), lambda *_a: None, real=True)
    try:
        port = 0x48434C00 + os.getpid() % 0x100               # clear of another VM's ports 1 and 2
        fd = v.listen(port)
        host = connect("vsock-cid:1", port)
        got, conn = _guest_accept(fd)
        host.sendall(b"ping")
        assert got == port and conn.recv(4) == b"ping" and conn.family == __import__("socket").AF_VSOCK
    finally:
        v.close()


def test_the_module_vm_says_how_it_is_reached(vm):
    """--vsock PATH (start_kept_run gives one): hybrid vsock, in kmsg and in inspect diag/transports;
    `vsock-cid:1` on a host without AF_VSOCK loopback is one error line."""
    out = _cli(vm["vm"], "kmsg")
    line = f"hv_sock: vsock port 1: hybrid vsock at {vm['path']} (--vsock PATH asks for hybrid vsock)"
    assert line in out.stdout
    assert _json(vm["client"], "diag/transports") == {"hybrid_vsock": 1, "af_vsock": 0}
    if not _af_vsock_loopback():
        err = _one_error_line(_cli("vsock-cid:1", "inspect", env=_env(HCLSIM_DIAG_WAIT_S="0")))
        assert "vsock-cid:1:" in err and ("AF_VSOCK" in err or "nothing answers" in err), err
    assert "expected vsock-cid:CID" in _one_error_line(_cli("vsock-cid:x", "inspect"))
