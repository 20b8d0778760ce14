"""The diag server of the control process (openhcl/diag_server; shared/design/openhcl-userspace.md
section 4): ttrpc on vsock port 1, data connections on vsock port 2.

Data connections: each accepted one is sent its id (8 bytes, native endian, counting from 1)
and parked until a call takes it by id; one that hangs up first is dropped. Control
connections: a thread each reading frames; every request runs on a thread of its own (Wait
and followed reads block), and its response is written under the connection's lock with the
request's stream id. Failures come back as google.rpc.Status: Unimplemented for an unknown
service or method, InvalidArgument for bad frames or protobuf, ResourceExhausted for an
oversized frame, Unknown with the handler's error text, DeadlineExceeded past timeout_nano.
Connections come by hybrid vsock or real AF_VSOCK (kernel_stub/vsock.py); inspect's
diag/transports counts the open ones by which.
"""
import select
import socket
import struct
import threading

from google.protobuf.message import DecodeError

from hclsim.hcl import linux, ttrpc
from hclsim.hcl.pb import status_pb2, ttrpc_pb2

CONTROL_PORT, DATA_PORT = 1, 2
RESOURCE_EXHAUSTED = 8
_ID = struct.Struct("=Q")


def transport_of(conn: socket.socket) -> str:
    """How a host client reached us: a real AF_VSOCK connection, or hybrid vsock (the host's Unix
    socket, handed over by the kernel)."""
    return "af_vsock" if conn.family == getattr(socket, "AF_VSOCK", -1) else "hybrid_vsock"


class DiagError(Exception):
    """A call failed: its text goes back to the client (code Unknown)."""


class DataConnections:
    """Port 2: parked connections by id."""

    def __init__(self, listener):
        self.listener = listener
        self._parked: dict[int, socket.socket] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        threading.Thread(target=self._accept, name="diag-data-accept", daemon=True).start()
        threading.Thread(target=self._watch, name="diag-data-watch", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return
            with self._lock:          # parked before the client learns its id: it may use it at once
                conn_id, self._next = self._next, self._next + 1
                self._parked[conn_id] = conn
            try:
                conn.sendall(_ID.pack(conn_id))
            except OSError:
                with self._lock:
                    self._parked.pop(conn_id, None)
                conn.close()
                continue
            self._wake_w.send(b"x")

    def _watch(self) -> None:
        """Drop parked connections whose peer hung up before a call took them."""
        while True:
            with self._lock:
                parked = dict(self._parked)
            p = select.poll()
            p.register(self._wake_r, select.POLLIN)
            by_fd = {}
            for conn_id, conn in parked.items():
                p.register(conn, select.POLLRDHUP | select.POLLHUP)
                by_fd[conn.fileno()] = conn_id
            for fd, ev in p.poll():
                if fd == self._wake_r.fileno():
                    self._wake_r.recv(4096)
                elif ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                    with self._lock:
                        conn = self._parked.pop(by_fd[fd], None)
                    if conn is not None:
                        conn.close()

    def take(self, conn_id: int) -> socket.socket:
        with self._lock:
            conn = self._parked.pop(conn_id, None)
        if conn is None:
            raise DiagError("invalid connection id" if conn_id == 0 or conn_id >= self._next
                            else "connection disconnected")
        self._wake_w.send(b"x")
        return conn

    def parked(self) -> int:
        with self._lock:
            return len(self._parked)


class Method:
    def __init__(self, request_type, handler):
        self.request_type, self.handler = request_type, handler


class DiagServer:
    """services: {"<package>.<Service>": {"Method": Method}}."""

    def __init__(self, services: dict, log):
        self.services, self.log = services, log
        self.control = linux.VsockListener(CONTROL_PORT)
        self.data = DataConnections(linux.VsockListener(DATA_PORT))
        self.connections = 0
        self.by_transport = {"hybrid_vsock": 0, "af_vsock": 0}     # open control connections, by how they came
        self._lock = threading.Lock()
        self._in_flight: dict[tuple, object] = {}    # (connection id, stream id) -> its write lock
        self._closing = False
        threading.Thread(target=self._accept, name="diag-accept", daemon=True).start()

    def shutdown(self) -> None:
        """The control process is ending: calls still running are answered Cancelled."""
        with self._lock:
            self._closing = True
            calls = list(self._in_flight.items())
            self._in_flight.clear()
        for (conn, stream_id), write_lock in calls:
            self._respond(conn, write_lock, stream_id, status=(ttrpc.CANCELLED, "the diag server is shutting down"))

    def _accept(self) -> None:
        while True:
            try:
                conn = self.control.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="diag-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        transport = transport_of(conn)
        with self._lock:
            self.connections += 1
            self.by_transport[transport] += 1
        write_lock = threading.Lock()
        try:
            while True:
                try:
                    frame = ttrpc.read_frame(conn)
                except ttrpc.FrameTooLong as exc:
                    self._respond(conn, write_lock, exc.stream_id, status=(RESOURCE_EXHAUSTED, str(exc)))
                    continue
                if frame is None:
                    return
                stream_id, kind, payload = frame
                if stream_id % 2 != 1:
                    self._respond(conn, write_lock, stream_id, status=(ttrpc.INVALID_ARGUMENT, "even stream id"))
                    continue
                if kind != ttrpc.TYPE_REQUEST:
                    self._respond(conn, write_lock, stream_id,
                                  status=(ttrpc.INVALID_ARGUMENT, f"invalid message type {kind}"))
                    continue
                threading.Thread(target=self._call, args=(conn, write_lock, stream_id, payload),
                                 name="diag-call", daemon=True).start()
        except (OSError, EOFError):
            return
        finally:
            with self._lock:
                self.connections -= 1
                self.by_transport[transport] -= 1
            conn.close()

    def _call(self, conn, write_lock, stream_id: int, payload: bytes) -> None:
        request = ttrpc_pb2.Request()
        try:
            request.ParseFromString(payload)
        except DecodeError as exc:
            self._respond(conn, write_lock, stream_id, status=(ttrpc.INVALID_ARGUMENT, f"invalid request: {exc}"))
            return
        service = self.services.get(request.service)
        if service is None:
            self._respond(conn, write_lock, stream_id,
                          status=(ttrpc.UNIMPLEMENTED, f"unknown service {request.service}"))
            return
        method = service.get(request.method)
        if method is None:
            self._respond(conn, write_lock, stream_id, status=(ttrpc.UNIMPLEMENTED, f"unknown method {request.method}"))
            return
        args = method.request_type()
        try:
            args.ParseFromString(request.payload)
        except DecodeError as exc:
            self._respond(conn, write_lock, stream_id, status=(ttrpc.INVALID_ARGUMENT, f"invalid {request.method} "
                                                                                     f"request: {exc}"))
            return
        timeout = request.timeout_nano / 1e9 if request.timeout_nano else None
        outcome = {}
        done = threading.Event()
        key = (conn, stream_id)
        with self._lock:
            closing = self._closing
            if not closing:
                self._in_flight[key] = write_lock
        if closing:
            self._respond(conn, write_lock, stream_id, status=(ttrpc.CANCELLED, "the diag server is shutting down"))
            return
        try:
            self._run_call(method, args, request, timeout, outcome, done)
        finally:
            with self._lock:
                answered = self._in_flight.pop(key, None) is None     # shutdown() answered it Cancelled
        if answered:
            return
        if "status" in outcome:
            self._respond(conn, write_lock, stream_id, status=outcome["status"])
        else:
            self._respond(conn, write_lock, stream_id, payload=outcome["reply"].SerializeToString())

    def _run_call(self, method, args, request, timeout, outcome: dict, done) -> None:
        def run():
            try:
                outcome["reply"] = method.handler(args)
            except DiagError as exc:
                outcome["status"] = (ttrpc.UNKNOWN, str(exc))
            except Exception as exc:            # a bug: the client gets its text, the server goes on
                self.log.error(f"diag: {request.service}/{request.method} failed: {type(exc).__name__}: {exc}")
                outcome["status"] = (ttrpc.UNKNOWN, f"{type(exc).__name__}: {exc}")
            done.set()
        if timeout is None:
            run()
        else:
            threading.Thread(target=run, name="diag-handler", daemon=True).start()
            if not done.wait(timeout):
                outcome.clear()
                outcome["status"] = (ttrpc.DEADLINE_EXCEEDED, "deadline exceeded")

    @staticmethod
    def _respond(conn, write_lock, stream_id: int, payload: bytes | None = None, status=None) -> None:
        response = ttrpc_pb2.Response()
        if status is not None:
            response.status.CopyFrom(status_pb2.Status(code=status[0], message=status[1]))
        else:
            response.payload = payload
        try:
            with write_lock:
                conn.sendall(ttrpc.encode(stream_id, ttrpc.TYPE_RESPONSE, response.SerializeToString()))
        except OSError:
            pass                                # the client went away; its call is forgotten
