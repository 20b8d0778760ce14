"""`hclsim diag <VM> <command>`: ohcldiag-dev's shape (openhcl/ohcldiag-dev), against the diag
server of a running `hclsim boot --keep-running` (its address: vsock:PATH, printed at boot, or
vsock-cid:1 where the host has AF_VSOCK loopback).

    hclsim diag vsock:/tmp/vm.sock inspect -r vm/vps/0
    hclsim diag vsock:/tmp/vm.sock kmsg -f
    hclsim diag vsock:/tmp/vm.sock run cat /proc/cmdline
"""
import argparse
import json
import os
import socket
import sys
import threading
import time

from hclsim.diag_client import DiagClient, DiagClientError, RpcError, parse_vm
from hclsim.hcl import ttrpc

WAIT_S = 20.0        # how long a VM that is not up yet is retried (ohcldiag-dev's reconnect timeout);
                     # HCLSIM_DIAG_WAIT_S overrides it
UNLIMITED = 0xFFFFFFFF
STREAM_REPLY_S = 10.0   # how long the call's reply may trail the end of its data connection


def add_parser(sub) -> None:
    p = sub.add_parser("diag", help="talk to a running paravisor's diag server (ohcldiag-dev's commands)")
    p.add_argument("vm", metavar="VM", help="the VM: vsock:PATH (the hybrid vsock path hclsim boot printed)")
    cmds = p.add_subparsers(dest="diag_command", required=True, metavar="COMMAND")
    i = cmds.add_parser("inspect", aliases=["i"], help="read the inspect tree")
    i.add_argument("path", nargs="?", default="")
    i.add_argument("-r", "--recursive", action="store_true")
    i.add_argument("-l", "--limit", type=int, metavar="N", help="with -r: at most N levels")
    i.add_argument("-j", "--json", action="store_true")
    i.add_argument("-p", "--poll", action="store_true", help="repeat every --period seconds")
    i.add_argument("--period", type=float, default=1.0)
    i.add_argument("--count", type=int, help="with -p: this many times")
    i.add_argument("-u", "--update", metavar="VALUE", help="update the leaf at PATH to VALUE")
    i.add_argument("-t", "--timeout", type=float, default=1.0, help="seconds (0: none)")
    u = cmds.add_parser("update")              # hidden and deprecated, as in ohcldiag-dev: inspect -u
    cmds._choices_actions = [a for a in cmds._choices_actions if a.dest != "update"]
    u.add_argument("path")
    u.add_argument("value")
    k = cmds.add_parser("kmsg", help="the kernel log")
    k.add_argument("-f", "--follow", action="store_true")
    k.add_argument("-r", "--reconnect", action="store_true", help="wait for the VM and reconnect")
    f = cmds.add_parser("file", help="a file of the paravisor")
    f.add_argument("-p", "--file-path", required=True)
    f.add_argument("-f", "--follow", action="store_true")
    r = cmds.add_parser("run", help="run a program of the paravisor's rootfs; exits with its status")
    r.add_argument("cmd")
    r.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (options included)")
    sh = cmds.add_parser("shell", help="a shell in the paravisor (a pty)")
    sh.add_argument("shell", nargs="?", default="/bin/sh")
    sh.add_argument("args", nargs=argparse.REMAINDER)
    s = cmds.add_parser("start", help="start the workers of a paravisor waiting for Start")
    s.add_argument("-e", "--env", action="append", default=[], metavar="X=Y")
    s.add_argument("-u", "--unset", action="append", default=[], metavar="NAME")
    s.add_argument("args", nargs="*")
    cmds.add_parser("pause", help="pause the VM's VPs")
    cmds.add_parser("resume", help="resume the VM's VPs")
    c = cmds.add_parser("crash", help="crash a paravisor process")
    c.add_argument("kind", choices=["panic"])
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("-p", "--pid", type=int)
    who.add_argument("-n", "--name", help="a mesh host's name (vm, ...), or underhill for the control process")
    pr = cmds.add_parser("profile", help="profile the VM for a while")
    pr.add_argument("--duration", type=int, default=5)
    pr.add_argument("-o", "--output", required=True)
    pr.add_argument("--format", choices=["speedscope", "collapsed"], default="speedscope")


def cmd_diag(args) -> int:
    path = parse_vm(args.vm)
    command = {"i": "inspect"}.get(args.diag_command, args.diag_command)
    try:
        client = DiagClient(path, wait=_wait_s())
    except DiagClientError as exc:
        raise DiagClientError(f"{args.vm}: {exc}") from None
    try:
        return _COMMANDS[command](client, args)
    except RpcError as exc:
        print(f"hclsim: error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _wait_s() -> float:
    text = os.environ.get("HCLSIM_DIAG_WAIT_S", "")
    try:
        return max(0.0, float(text)) if text else WAIT_S
    except ValueError:
        raise DiagClientError(f"HCLSIM_DIAG_WAIT_S={text!r}: expected a number of seconds") from None


# ---- the commands ------------------------------------------------------------------------------
def _pb():
    from hclsim.hcl.pb import diag_pb2, inspect_service_pb2
    from google.protobuf import empty_pb2
    return diag_pb2, inspect_service_pb2, empty_pb2


def _inspect(client, args) -> int:
    _d, ipb, _e = _pb()
    if args.update is not None:
        return _update(client, args.path, args.update)
    depth = (args.limit if args.limit is not None else UNLIMITED) if args.recursive else 0
    n = 0
    while True:
        resp = client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path=args.path, depth=depth),
                           ipb.InspectResponse, timeout=args.timeout or None)
        if args.json:
            print(json.dumps(node_json(resp.result)))
        else:
            print(node_text(resp.result))
        n += 1
        if not args.poll or (args.count is not None and n >= args.count):
            return 0
        time.sleep(args.period)


def _update(client, path: str, value: str) -> int:
    _d, ipb, _e = _pb()
    resp = client.call("inspect.InspectService", "Update", ipb.UpdateRequest(path=path, value=value),
                       ipb.UpdateResponse)
    print(value_text(resp.new_value))
    return 0


def _deprecated_update(client, args) -> int:
    print("hclsim: `update` is deprecated; use `inspect PATH -u VALUE`", file=sys.stderr)
    return _update(client, args.path, args.value)


def _stream(client, method: str, request_fields: dict, nul_separated: bool):
    """Kmsg or ReadFile: what the data connection carries goes to stdout until it ends. The
    call runs on a thread of its own; when it fails, the connection is shut down, which wakes
    the reader (a close from another thread would not). (0 or 1, the call's error or None)."""
    d, _i, _e = _pb()
    conn_id, conn = client.data_connection()
    request = d.KmsgRequest(conn=conn_id, **request_fields) if method == "Kmsg" else \
        d.FileRequest(conn=conn_id, **request_fields)
    outcome = {}

    def call():
        try:
            client.call("diag.UnderhillDiag", method, request, _e.Empty)
        except DiagClientError as exc:
            outcome["error"] = exc
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    t = threading.Thread(target=call, name="diag-stream-call", daemon=True)
    t.start()
    out = sys.stdout.buffer
    pending = b""
    try:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                break
            if not data:
                break
            if nul_separated:
                pending += data
                *records, pending = pending.split(b"\0")
                for rec in records:
                    out.write(kmsg_line(rec))
            else:
                out.write(data)
            out.flush()
    finally:
        conn.close()
    t.join(STREAM_REPLY_S)              # the reply follows the end of the stream
    error = outcome.get("error")
    return (1 if error is not None else 0), error


def _went_away(error) -> bool:
    """The call ended because the VM (its control process) went away: cancelled at its
    shutdown, or the connection broke."""
    if isinstance(error, RpcError):
        return error.code == ttrpc.CANCELLED
    return isinstance(error, DiagClientError)


def _kmsg(client, args) -> int:
    """With -r: when the VM goes away (a reset, a crash), say so in one line, wait for it
    (Ping) and go on with the new boot's log; an error that is not the VM going away ends it."""
    clients = []
    try:
        while True:
            try:
                status, error = _stream(client, "Kmsg", {"follow": args.follow}, True)
            except DiagClientError as exc:          # no data connection: the VM is going away
                status, error = 1, exc
            gone = _went_away(error) if error is not None else args.follow
            if not (args.reconnect and gone):
                if error is not None:
                    print(f"hclsim: error: {error}", file=sys.stderr)
                return status
            print("hclsim: kmsg: the VM went away; waiting for it to come back", file=sys.stderr)
            sys.stderr.flush()
            client = _wait_for_server(args.vm)
            clients.append(client)
    finally:
        for c in clients:
            c.close()


def _wait_for_server(vm: str):
    """A client of the VM once its diag server answers a Ping (ohcldiag-dev's wait_for_server)."""
    _d, _i, e = _pb()
    while True:
        client = None
        try:
            client = DiagClient(parse_vm(vm), wait=_wait_s())
            client.call("diag.OpenhclDiag", "Ping", e.Empty(), e.Empty, timeout=5)
            return client
        except DiagClientError:
            if client is not None:
                client.close()
            time.sleep(1)


def _file(client, args) -> int:
    status, error = _stream(client, "ReadFile", {"follow": args.follow, "file_path": args.file_path}, False)
    if error is not None:
        text = str(error)
        print(f"hclsim: error: {text if args.file_path in text else f'{args.file_path}: {text}'}", file=sys.stderr)
    return status


def _run(client, args) -> int:
    d, _i, _e = _pb()
    ids, conns = [], []
    for _ in range(3):
        conn_id, conn = client.data_connection()
        ids.append(conn_id)
        conns.append(conn)
    stdin, stdout, stderr = conns
    resp = client.call("diag.UnderhillDiag", "Exec",
                       d.ExecRequest(command=args.cmd, args=args.args, stdin=ids[0], stdout=ids[1], stderr=ids[2]),
                       d.ExecResponse)
    pumps = [threading.Thread(target=_pump, args=(stdout, sys.stdout.buffer), daemon=True),
             threading.Thread(target=_pump, args=(stderr, sys.stderr.buffer), daemon=True)]
    for p in pumps:
        p.start()
    if sys.stdin is not None and not sys.stdin.isatty():
        threading.Thread(target=_feed, args=(sys.stdin.buffer, stdin), daemon=True).start()
    else:
        stdin.close()
    code = client.call("diag.UnderhillDiag", "Wait", d.WaitRequest(pid=resp.pid), d.WaitResponse).exit_code
    for p in pumps:
        p.join(5)
    return code


def _shell(client, args) -> int:
    d, _i, _e = _pb()
    in_id, conn_in = client.data_connection()
    out_id, conn_out = client.data_connection()
    env = [d.EnvPair(name="TERM", value=os.environ.get("TERM", "xterm-256color"))]
    resp = client.call("diag.UnderhillDiag", "Exec",
                       d.ExecRequest(command=args.shell, args=args.args, tty=True, stdin=in_id, stdout=out_id,
                                     env=env), d.ExecResponse)
    saved = None
    if sys.stdin.isatty():
        import termios
        import tty
        saved = termios.tcgetattr(sys.stdin.fileno())
        tty.setraw(sys.stdin.fileno())
    try:
        threading.Thread(target=_feed, args=(sys.stdin.buffer, conn_in), daemon=True).start()
        pump = threading.Thread(target=_pump, args=(conn_out, sys.stdout.buffer), daemon=True)
        pump.start()
        code = client.call("diag.UnderhillDiag", "Wait", d.WaitRequest(pid=resp.pid), d.WaitResponse).exit_code
        pump.join(2)
    finally:
        if saved is not None:
            import termios
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    return code


def _start(client, args) -> int:
    d, _i, _e = _pb()
    env = []
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq:
            raise DiagClientError(f"--env {item}: expected NAME=VALUE")
        env.append(d.EnvPair(name=name, value=value))
    env += [d.EnvPair(name=name) for name in args.unset]
    client.call("diag.UnderhillDiag", "Start", d.StartRequest(env=env, args=args.args), _e.Empty)
    return 0


def _simple(method: str):
    def run(client, _args) -> int:
        _d, _i, e = _pb()
        client.call("diag.UnderhillDiag", method, e.Empty(), e.Empty)
        return 0
    return run


def _crash(client, args) -> int:
    d, ipb, e = _pb()
    pid = args.pid
    if pid is None:
        pid = resolve_host_pid(client, args.name)
    client.call("diag.UnderhillDiag", "Crash", d.CrashRequest(pid=pid), e.Empty)
    return 0


def resolve_host_pid(client, name: str) -> int:
    """A mesh host's pid by its name, as ohcldiag-dev finds it: inspect mesh/hosts/<pid>/name
    (the control process itself: "underhill", its proc/pid)."""
    _d, ipb, _e = _pb()
    resp = client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path="", depth=UNLIMITED),
                       ipb.InspectResponse, timeout=5)
    tree = node_json(resp.result)
    if name in ("underhill", "openvmm_hcl", "control"):
        return int(tree["proc"]["pid"])
    hosts = tree.get("mesh", {}).get("hosts") or {}
    names = []
    for pid, host in hosts.items():
        if isinstance(host, dict) and isinstance(host.get("name"), str):
            if name in (host["name"], f"underhill-{host['name']}"):     # its name, or its process name
                return int(pid)
            names.append(host["name"])
    raise DiagClientError(f"no mesh host named {name!r} (the hosts: {', '.join(['underhill', *sorted(names)])})")


def _profile(client, args) -> int:
    """profile.AzureProfiler/Profile; what the profiler writes to the data connection goes to -o."""
    from hclsim.hcl.pb import profile_pb2
    from google.protobuf import empty_pb2
    if args.duration <= 0:
        raise DiagClientError("--duration must be at least 1 second")
    existed = os.path.exists(args.output)
    out = open(args.output, "wb")              # before profiling: a bad -o fails at once
    done = False
    try:
        conn_id, conn = client.data_connection()
        received = []
        reader = threading.Thread(target=lambda: received.append(_read_all(conn)), daemon=True)
        reader.start()
        try:
            client.call("profile.AzureProfiler", "Profile",
                        profile_pb2.ProfileRequest(conn=conn_id, duration=args.duration,
                                                   profiler_args=[f"format={args.format}"]), empty_pb2.Empty)
            reader.join(10)
        finally:
            conn.close()
        data = received[0] if received else b""
        if not data:
            raise DiagClientError("the profiler sent no profile")
        out.write(data)
        done = True
    finally:
        out.close()
        if not done and not existed:
            os.unlink(args.output)
    print(f"wrote {args.output} ({len(data)} bytes, {args.format})")
    return 0


def _read_all(conn) -> bytes:
    chunks = []
    try:
        while True:
            b = conn.recv(65536)
            if not b:
                break
            chunks.append(b)
    except OSError:
        pass
    return b"".join(chunks)


def _pump(src, dst) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.write(data)
            dst.flush()
    except (OSError, ValueError):
        pass


def _feed(src, conn) -> None:
    try:
        while True:
            data = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(1)
    except (OSError, ValueError):
        pass


_COMMANDS = {"inspect": _inspect, "update": _deprecated_update, "kmsg": _kmsg, "file": _file, "run": _run,
             "shell": _shell, "start": _start, "pause": _simple("Pause"), "resume": _simple("Resume"),
             "crash": _crash, "profile": _profile}


# ---- output ------------------------------------------------------------------------------------
def value_json(v):
    kind = v.kind.WhichOneof("variant")
    if kind is None:
        return None
    inner = getattr(v.kind, kind)
    return inner.field1 if kind == "signed" else inner.value


def value_text(v) -> str:
    raw = value_json(v)
    flags = v.flags.field1
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int):
        return f"{raw:#x}" if flags & 1 else f"{raw:#b}" if flags & 4 else str(raw)
    if isinstance(raw, bytes):
        return "<" + raw.hex() + ">"
    if isinstance(raw, str):
        return json.dumps(raw)
    return str(raw)


def node_json(n):
    kind = n.WhichOneof("variant")
    if kind == "value":
        return value_json(n.value.field1)
    if kind == "dir":
        return {e.name: node_json(e.node) for e in n.dir.field1}
    if kind == "failed":
        return {"$error": error_text(n.failed.field1)}
    return None


def error_text(e) -> str:
    kind = e.WhichOneof("variant")
    inner = getattr(e, kind) if kind else None
    text = {"not_found": "not found", "not_a_directory": "not a directory", "immutable": "immutable node",
            "unresolved": "unresolved", "internal": "internal error"}.get(kind)
    if text is not None:
        return text
    return f"{kind}: {inner.value}" if inner is not None and hasattr(inner, "value") else str(kind)


def node_text(n, indent: int = 0) -> str:
    kind = n.WhichOneof("variant")
    if kind == "value":
        return value_text(n.value.field1)
    if kind == "failed":
        return f"error ({error_text(n.failed.field1)})"
    if kind == "dir":
        if not n.dir.field1:
            return "{}"
        pad = "    " * (indent + 1)
        lines = [f"{pad}{e.name}: {node_text(e.node, indent + 1)}," for e in n.dir.field1]
        return "{\n" + "\n".join(lines) + "\n" + "    " * indent + "}"
    return "_"


def kmsg_line(record: bytes) -> bytes:
    """A /dev/kmsg record ("prio,seq,usec,flags;text") as dmesg prints it: [  secs.usec] text."""
    head, sep, text = record.partition(b";")
    if not sep:
        return record + b"\n"
    fields = head.split(b",")
    try:
        usec = int(fields[2])
    except (IndexError, ValueError):
        return text.rstrip(b"\n") + b"\n"
    body = text.split(b"\n", 1)[0]
    return f"[{usec // 1_000_000:5d}.{usec % 1_000_000:06d}] ".encode() + body + b"\n"
