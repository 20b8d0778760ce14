"""A client of the paravisor's diag server over hybrid vsock (openhcl/diag_client in OpenVMM):
ttrpc calls on vsock port 1, data connections on port 2. Written from the public protocol
(hcl/proto/*.proto, hcl/ttrpc.py), as any host tool would be."""
import socket
import struct
import threading
import time

from hclsim import HclsimError
from hclsim.hcl import ttrpc
from hclsim.hcl.pb import ttrpc_pb2

CONTROL_PORT, DATA_PORT = 1, 2
CID_PREFIX = "vsock-cid:"     # a VM reached with real AF_VSOCK (hclsim's own form; ohcldiag-dev has none on Linux)
AF_VSOCK_CONNECT_S = 2.0
RETRY_S = 1.0                 # ohcldiag-dev's wait between connection attempts to a VM not up yet
_ID = struct.Struct("=Q")


class DiagClientError(HclsimError):
    pass


class NotReady(DiagClientError):
    """Nobody listens on that vsock port yet (the VM is booting, or gone)."""


class RpcError(DiagClientError):
    def __init__(self, code: int, message: str):
        super().__init__(f"{message} ({ttrpc.CODE_NAMES.get(code, code)})" if message else ttrpc.CODE_NAMES.get(code,
                                                                                                             str(code)))
        self.code, self.text = code, message


def parse_vm(text: str) -> str:
    """The address of a VM argument: the hybrid vsock path of "vsock:PATH" (or of a bare PATH,
    as on Linux), or "vsock-cid:CID" as it is for real AF_VSOCK."""
    if text.startswith(CID_PREFIX):
        cid = text[len(CID_PREFIX):]
        if not cid.isdigit() or int(cid) > 0xFFFFFFFF:
            raise DiagClientError(f"{text!r}: expected {CID_PREFIX}CID, CID a number (1: this host's loopback)")
        return text
    path = text[len("vsock:"):] if text.startswith("vsock:") else text
    if not path:
        raise DiagClientError(f"no hybrid vsock path in {text!r}")
    return path


def connect(path: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A connection to the guest's vsock port: through the host's Unix socket (hybrid vsock),
    or straight to it with AF_VSOCK for a "vsock-cid:CID" address."""
    if path.startswith(CID_PREFIX):
        return _connect_af_vsock(int(path[len(CID_PREFIX):]), port, min(timeout, AF_VSOCK_CONNECT_S))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        s.close()
        raise NotReady(f"no VM at {path} (nothing listens there)") from None
    except ConnectionRefusedError:
        s.close()
        raise NotReady(f"the VM at {path} is not accepting connections") from None
    try:
        s.sendall(f"CONNECT {port}\n".encode())
        ok = _recv_exact(s, 3)
        if ok != b"OK ":                    # closed before OK: nobody listens on that port
            raise NotReady(f"vsock port {port} refused the connection")
        rest = b""
        while not rest.endswith(b"\n"):
            b = s.recv(1)
            if not b or len(rest) > 11:
                raise DiagClientError("malformed hybrid vsock reply")
            rest += b
    except BaseException:
        s.close()
        raise
    s.settimeout(None)
    return s


def _connect_af_vsock(cid: int, port: int, timeout: float) -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise DiagClientError("this host has no AF_VSOCK")
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise DiagClientError(f"AF_VSOCK: {exc.strerror or exc}") from None
    s.settimeout(timeout)
    try:
        s.connect((cid, port))
    except (ConnectionResetError, ConnectionRefusedError, TimeoutError) as exc:
        s.close()
        raise NotReady(f"nothing answers on AF_VSOCK cid {cid} port {port} ({exc.strerror or 'timed out'})") from None
    except OSError as exc:
        s.close()
        raise DiagClientError(f"AF_VSOCK cid {cid} port {port}: {exc.strerror or exc}") from None
    s.settimeout(None)
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    """n bytes, or b"" when the peer hung up first."""
    try:
        return ttrpc.read_exact(s, n) or b""
    except EOFError:
        return b""


class DiagClient:
    def __init__(self, path: str, wait: float = 0.0):
        """wait: how long to keep retrying a VM that is not up yet (seconds)."""
        self.path = path
        deadline = time.monotonic() + wait
        while True:
            try:
                self.control = connect(path, CONTROL_PORT)
                break
            except NotReady:
                if time.monotonic() + RETRY_S > deadline:
                    raise
                time.sleep(RETRY_S)
        self._next_stream = 1
        self._lock = threading.Lock()
        self._waiting: dict[int, list] = {}
        self._reader = threading.Thread(target=self._read, name="diag-client", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                frame = ttrpc.read_frame(self.control)
                if frame is None:
                    break
                stream_id, _kind, payload = frame
                with self._lock:
                    slot = self._waiting.pop(stream_id, None)
                if slot is not None:
                    slot.append(payload)
                    slot[0].set()
        except (OSError, EOFError, ttrpc.FrameTooLong):
            pass
        with self._lock:
            slots, self._waiting = list(self._waiting.values()), {}
        for slot in slots:
            slot[0].set()

    def call(self, service: str, method: str, request, response_type, timeout: float | None = None):
        with self._lock:
            stream_id = self._next_stream
            self._next_stream += 2
            slot = [threading.Event()]
            self._waiting[stream_id] = slot
        req = ttrpc_pb2.Request(service=service, method=method, payload=request.SerializeToString(),
                                timeout_nano=int(timeout * 1e9) if timeout else 0)
        try:
            self.control.sendall(ttrpc.encode(stream_id, ttrpc.TYPE_REQUEST, req.SerializeToString()))
        except OSError as exc:
            raise DiagClientError(f"the diag connection broke: {exc}") from None
        slot[0].wait()
        if len(slot) < 2:
            raise DiagClientError("the diag server closed the connection")
        resp = ttrpc_pb2.Response.FromString(slot[1])
        if resp.WhichOneof("result") == "status":
            raise RpcError(resp.status.code, resp.status.message)
        return response_type.FromString(resp.payload)

    def data_connection(self) -> tuple[int, socket.socket]:
        s = connect(self.path, DATA_PORT)
        raw = _recv_exact(s, _ID.size)
        if len(raw) != _ID.size:
            s.close()
            raise DiagClientError("the data connection closed before its id")
        return _ID.unpack(raw)[0], s

    def close(self) -> None:
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.control.close()
