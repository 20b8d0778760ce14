"""The stand-in kernel's vsock, reached from the host as hybrid vsock (support/hybrid_vsock in
OpenVMM; shared/design/openhcl-userspace.md section 4, "Transport").

The host side is a Unix socket (in the run directory, or where `hclsim boot --vsock PATH`
puts it). A host client connects, writes "CONNECT <port>\\n" (the keyword in any case; the port
in decimal, or as its hvsocket service id "<port as 8 hex digits>-facb-11e6-bd58-64006a7986d3"),
and reads "OK <the same form>\\n"; from then on the connection is the guest listener's. No
relaying: the connected socket itself is handed (SCM_RIGHTS) to the process listening on that
vsock port, whose accept() returns it. A port nobody listens on gets the connection closed
before any OK, which a client takes as "the VM is not up yet" and retries.

A guest listener (VSOCK_LISTEN) is one end of a SOCK_SEQPACKET pair; the kernel keeps the other
and sends each accepted connection down it as a descriptor with a 4-byte port number.
"""
import array
import os
import re
import socket
import struct
import threading

from hclsim.defs import kabi
from hclsim.kernel_stub.vfs import KernelError

HANDSHAKE_TIMEOUT_S = 5.0
MAX_LINE = 64                      # "CONNECT " + a GUID + "\n" is 45 bytes
SERVICE_ID_SUFFIX = "-facb-11e6-bd58-64006a7986d3"
_CONNECT = re.compile(r"connect ([0-9a-f]{8})" + re.escape(SERVICE_ID_SUFFIX) + r"|connect (\d{1,10})", re.I)
_PORT = struct.Struct("<I")


def parse_connect(line: str) -> tuple[int, str]:
    """(port, the form to answer with) of a "CONNECT ..." line; ValueError if it is not one."""
    m = _CONNECT.fullmatch(line)
    if m is None:
        raise ValueError(f"not a CONNECT request: {line[:40]!r}")
    if m.group(1) is not None:
        return int(m.group(1), 16), line.split(" ", 1)[1]
    port = int(m.group(2))
    if port > 0xFFFFFFFF:
        raise ValueError(f"port {port} out of range")
    return port, str(port)


class Vsock:
    """The host side of one VM's hybrid vsock, and its guest listeners."""

    def __init__(self, host_path: str, log):
        self.host_path, self.log = host_path, log
        self._listeners: dict[int, socket.socket] = {}      # port -> the kernel's end
        self._lock = threading.Lock()
        self._closed = False
        if os.path.exists(host_path) and not os.path.isdir(host_path):
            os.unlink(host_path)                             # a stale socket of an earlier run
        self.host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.host.bind(host_path)
        self.host.listen(128)
        self._thread = threading.Thread(target=self._accept, name="vsock-host", daemon=True)
        self._thread.start()

    # ---- guest listeners ---------------------------------------------------------------
    def listen(self, port: int) -> int:
        """A listener on port for a guest process: the descriptor to hand it."""
        if not 0 <= port <= 0xFFFFFFFF:
            raise KernelError(kabi.EINVAL, f"vsock port {port} out of range")
        with self._lock:
            old = self._listeners.get(port)
            if old is not None and not _hung_up(old):
                raise KernelError(kabi.EADDRINUSE, f"vsock port {port} is taken")
            if old is not None:
                old.close()
            kernel_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            self._listeners[port] = kernel_end
        fd = os.dup(guest_end.fileno())
        guest_end.close()
        return fd

    # ---- the host side -----------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.host.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(conn,), name="vsock-connect", daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            line = _read_line(conn)
            port, form = parse_connect(line)
            with self._lock:
                listener = self._listeners.get(port)
            if listener is None or _hung_up(listener):
                return                                  # closed without OK: nobody listens there
            conn.settimeout(None)
            conn.sendall(f"OK {form}\n".encode())
            listener.sendmsg([_PORT.pack(port)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [conn.fileno()]))])
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if not self._closed:
                self.log(f"hv_sock: host connection dropped: {exc}", 7)
        finally:
            conn.close()                                # the guest holds its own descriptor now

    def close(self) -> None:
        self._closed = True
        try:
            self.host.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.host.close()
        try:
            os.unlink(self.host_path)
        except OSError:
            pass
        with self._lock:
            for s in self._listeners.values():
                s.close()
            self._listeners.clear()


def _read_line(conn: socket.socket) -> str:
    """The handshake line, read a byte at a time: what follows it is the guest's to read."""
    data = bytearray()
    while not data.endswith(b"\n"):
        if len(data) >= MAX_LINE:
            raise ValueError("CONNECT line too long")
        b = conn.recv(1)
        if not b:
            raise ValueError("the client hung up before CONNECT")
        data += b
    return data[:-1].decode("ascii")


def _hung_up(s: socket.socket) -> bool:
    """The guest's end of a listener is closed (its process exited or closed it)."""
    import select
    p = select.poll()
    p.register(s, select.POLLHUP)
    return any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in p.poll(0))
