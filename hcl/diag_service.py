"""What the diag server's methods do (openhcl/diag_server/src/diag_service.rs; section 4 of
shared/design/openhcl-userspace.md), over the control process (hcl/control.py).

Programs run by Exec are rootfs programs started through the kernel (hcl/linux.spawn); their
stdio are the data connections themselves (each closes when the program and its children are
done), or a pty relayed to them with tty. Files are read through the kernel: a character device
(kmsg) one record per read, each sent with a NUL after it; a regular file raw.
"""
import errno
import os
import select
import socket
import threading

from hclsim.defs import kabi
from hclsim.hcl import inspect_tree, linux
from hclsim.hcl.diag_server import DiagError, Method
from hclsim.hcl.pb import diag_pb2 as dpb
from hclsim.hcl.pb import inspect_service_pb2 as ipb
from hclsim.hcl.pb import profile_pb2
from google.protobuf import empty_pb2

EMPTY = empty_pb2.Empty
READ_CHUNK = 2047            # one kmsg record per read at most, as the real server reads
FOLLOW_POLL_S = 0.2
DEFAULT_PATH = "/bin:/usr/bin"


class DiagService:
    def __init__(self, control):
        self.control = control
        self.children: dict[int, str] = {}
        self._lock = threading.Lock()

    def services(self, confidential_filtering: bool) -> dict:
        """The registered services; a confidential VM without CONFIDENTIAL_DEBUG has no diag
        services (calls get Unimplemented) and sees only Safe inspect nodes."""
        level = inspect_tree.SAFE if confidential_filtering else inspect_tree.SENSITIVE
        out = {"inspect.InspectService": {
                   "Inspect": Method(ipb.InspectRequest, lambda r: self.inspect(r, level)),
                   "Update": Method(ipb.UpdateRequest, lambda r: self.update(r, level))},
               "profile.AzureProfiler": {"Profile": Method(profile_pb2.ProfileRequest, self.profile)}}
        if not confidential_filtering:
            out["diag.OpenhclDiag"] = {"Ping": Method(EMPTY, lambda _r: EMPTY()),
                                       "MemoryProfileTrace": Method(dpb.MemoryProfileTraceRequest,
                                                                    self.memory_profile_trace)}
            out["diag.UnderhillDiag"] = {
                "Exec": Method(dpb.ExecRequest, self.exec), "Wait": Method(dpb.WaitRequest, self.wait),
                "Start": Method(dpb.StartRequest, self.start), "Crash": Method(dpb.CrashRequest, self.crash),
                "Kmsg": Method(dpb.KmsgRequest, self.kmsg), "Restart": Method(EMPTY, self.restart),
                "Pause": Method(EMPTY, self.pause), "Resume": Method(EMPTY, self.resume),
                "ReadFile": Method(dpb.FileRequest, self.read_file),
                "DumpSavedState": Method(EMPTY, self.dump_saved_state),
                "PacketCapture": Method(dpb.NetworkPacketCaptureRequest, self.packet_capture)}
        return out

    # ---- inspect ------------------------------------------------------------------------
    def inspect(self, req, level):
        return ipb.InspectResponse(result=inspect_tree.inspect(self.control.inspect_tree(), req.path, req.depth,
                                                               level))

    def update(self, req, level):
        try:
            return ipb.UpdateResponse(new_value=inspect_tree.update(self.control.inspect_tree(), req.path,
                                                                    req.value, level))
        except inspect_tree.InspectError as exc:
            raise DiagError(str(exc)) from None

    # ---- processes ----------------------------------------------------------------------
    def _resolve(self, command: str, env: dict) -> str:
        """command as PATH finds it (the kernel's RESOLVE: a regular file, links followed)."""
        candidates = [command] if "/" in command else \
            [f"{d.rstrip('/')}/{command}" for d in env.get("PATH", DEFAULT_PATH).split(":") if d]
        for path in candidates:
            try:
                linux.host_path(path)
                return path
            except OSError:
                continue
        raise DiagError(f"failed to launch {command}: No such file or directory (os error 2)")

    def exec(self, req):
        env = {} if req.clear_env else dict(os.environ)
        for pair in req.env:
            if pair.HasField("value"):
                env[pair.name] = pair.value
            else:
                env.pop(pair.name, None)
        conns = self._take_stdio(req)
        devnull = os.open("/dev/null", os.O_RDWR)
        unique = {id(c): c for c in conns.values() if c is not None}.values()
        try:
            path = self._resolve(req.command, env)
            if req.tty:
                pid = self._exec_tty(path, req, env, conns)
            else:
                stdio = [c.fileno() if c is not None else devnull for c in conns.values()]
                pid = linux.spawn(path, [req.command, *req.args], env, stdio=tuple(stdio))
        except (OSError, DiagError) as exc:
            for c in unique:                # nothing runs: the client's readers see the end now
                _close(c)
            if isinstance(exc, DiagError):
                raise
            raise DiagError(f"failed to launch {req.command}: {exc.strerror or exc}") from None
        finally:
            os.close(devnull)
        if not req.tty:
            for c in unique:
                c.close()                   # the program holds its own copies now
        with self._lock:
            self.children[pid] = req.command
        return dpb.ExecResponse(pid=pid)

    def _take_stdio(self, req) -> dict:
        """The data connections named by stdin, stdout and stderr (0: none), all or none."""
        data, conns = self.control.diag.data, {}
        try:
            for name in ("stdin", "stdout", "stderr"):
                conn_id = getattr(req, name)
                conns[name] = data.take(conn_id) if conn_id else None
        except DiagError:
            for c in conns.values():
                if c is not None:
                    _close(c)
            raise
        if req.combine_stderr and conns["stdout"] is not None:
            if conns["stderr"] is not None:
                _close(conns["stderr"])
            conns["stderr"] = conns["stdout"]
        return conns

    def _exec_tty(self, path, req, env, conns) -> int:
        master, slave = os.openpty()
        try:
            pid = linux.spawn(path, [req.command, *req.args], env, stdio=(slave, slave, slave), setsid=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        out = conns["stdout"]
        if conns["stderr"] is not None and conns["stderr"] is not out:
            conns["stderr"].close()         # the pty carries stderr with stdout
        feeder = None
        if conns["stdin"] is not None:
            feeder = threading.Thread(target=_pty_in, args=(conns["stdin"], master), name="diag-pty-in", daemon=True)
            feeder.start()
        threading.Thread(target=_pty_out, args=(master, out, conns["stdin"], feeder), name="diag-pty-out",
                         daemon=True).start()
        return pid

    def wait(self, req):
        with self._lock:
            known = req.pid in self.children
        if not known:
            raise DiagError("pid not found")
        try:
            _pid, status = os.waitpid(req.pid, 0)
        except ChildProcessError:
            raise DiagError("pid not found") from None
        finally:
            with self._lock:
                self.children.pop(req.pid, None)
        linux.exited(req.pid, status)
        return dpb.WaitResponse(exit_code=linux.wait_status_code(status))

    def crash(self, req):
        self.control.crash(req.pid)
        return EMPTY()

    # ---- the VM -------------------------------------------------------------------------
    def start(self, req):
        env = {p.name: p.value for p in req.env if p.HasField("value")}
        unset = [p.name for p in req.env if not p.HasField("value")]
        self.control.start(env, unset, list(req.args))
        return EMPTY()

    def pause(self, _req):
        self.control.pause()
        return EMPTY()

    def resume(self, _req):
        self.control.resume()
        return EMPTY()

    def restart(self, _req):
        self.control.require_started()
        raise DiagError("restarting the VM worker (servicing) is not simulated by hclsim")

    def dump_saved_state(self, _req):
        self.control.require_started()
        raise DiagError("saving the VM's state is not simulated by hclsim")

    def packet_capture(self, req):
        # The VTL0 test guest has no network adapters, so there is nothing to capture.
        return dpb.NetworkPacketCaptureResponse(num_streams=0)

    def memory_profile_trace(self, _req):
        raise DiagError("memory profile tracing is not enabled in this paravisor")

    def profile(self, req):
        conn = self.control.diag.data.take(req.conn)
        self.control.profile(req.duration, list(req.profiler_args), conn)
        return EMPTY()

    # ---- files --------------------------------------------------------------------------
    def kmsg(self, req):
        return self.read_file(dpb.FileRequest(follow=req.follow, conn=req.conn, file_path="/dev/kmsg"))

    def read_file(self, req):
        """The data connection is taken first, as the real server does, and shut down whatever
        happens: a client reading it sees the end of the stream even when the call fails."""
        conn = self.control.diag.data.take(req.conn)
        doing = "open"
        try:
            kind = linux.stat_kind(req.file_path)
            if kind is None:
                raise DiagError(f"failed to open {req.file_path}: No such file or directory (os error 2)")
            if kind == kabi.KIND_DIR:
                raise DiagError("cannot read directory")
            flags = kabi.O_RDONLY | (0 if req.follow else kabi.O_NONBLOCK)
            with linux.open_file(req.file_path, flags) as f:
                doing = "read"
                if kind == kabi.KIND_CHARDEV:
                    _send_records(f, conn, req.follow)
                else:
                    _send_file(f, conn, req.follow)
        except (BrokenPipeError, ConnectionResetError):
            pass                                   # the client stopped reading: done
        except OSError as exc:
            raise DiagError(f"failed to {doing} {req.file_path}: {exc.strerror or exc} (os error {exc.errno})") \
                from None
        finally:
            _close(conn)
        return EMPTY()


def _close(conn) -> None:
    """Shut the connection down (the peer sees its end at once, whoever else holds it) and close it."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def _peer_gone(conn) -> bool:
    p = select.poll()
    p.register(conn, select.POLLRDHUP | select.POLLHUP)
    return bool(p.poll(0))


def _send_records(f, conn, follow: bool) -> None:
    while True:
        if follow:
            while not f.poll(FOLLOW_POLL_S):
                if _peer_gone(conn):
                    return
        try:
            record = f.read(READ_CHUNK)
        except BlockingIOError:
            return                                 # EAGAIN: all records sent
        except OSError as exc:
            if exc.errno == errno.EPIPE:           # records were overwritten: go on from the oldest
                continue
            if exc.errno == errno.EAGAIN:
                return
            raise
        if not record:
            return
        conn.sendall(record + b"\0")


def _send_file(f, conn, follow: bool) -> None:
    while True:
        chunk = f.read(1 << 16)
        if chunk:
            conn.sendall(chunk)
            continue
        if not follow or _peer_gone(conn):
            return
        threading.Event().wait(FOLLOW_POLL_S)


def _pty_out(master: int, conn, stdin_conn=None, feeder=None) -> None:
    """The pty's output to conn until the program's session is done; then stdin's relay is
    ended before the master closes (its descriptor number must not be reused under it)."""
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:                        # EIO: the program and its session are done
                break
            if not data:
                break
            if conn is not None:
                conn.sendall(data)
    except OSError:
        pass
    finally:
        if stdin_conn is not None:
            try:
                stdin_conn.shutdown(socket.SHUT_RDWR)      # wakes the relay's recv
            except OSError:
                pass
        if feeder is not None:
            feeder.join(5)
        if stdin_conn is not None:
            stdin_conn.close()
        os.close(master)
        if conn is not None:
            conn.close()


def _pty_in(conn, master: int) -> None:
    try:
        while True:
            data = conn.recv(4096)
            if not data:
                break
            os.write(master, data)
    except OSError:
        pass
