"""The stand-in kernel's vsock (shared/design/openhcl-userspace.md section 4, "Transport"):
real AF_VSOCK where the host offers vsock_loopback, and always hybrid vsock (support/hybrid_vsock
in OpenVMM), which is what ohcldiag-dev speaks on Linux.

Hybrid vsock: the host side is a Unix socket (in the run directory, or where `hclsim boot
--vsock PATH` puts it). A host client connects, writes "CONNECT <port>\\n" (the keyword in any
case; the port in decimal, or as its hvsocket service id "<port as 8 hex digits>-facb-11e6-bd58-64006a7986d3"),
and reads "OK <the same form>\\n"; from then on the connection is the guest listener's. No
relaying: the connected socket itself is handed (SCM_RIGHTS) to the process listening on that
vsock port, whose accept() returns it. A port nobody listens on gets the connection closed
before any OK, which a client takes as "the VM is not up yet" and retries.

Real AF_VSOCK: without --vsock, the kernel probes the host at start (probe_af_vsock: a listener
bound to VMADDR_CID_LOCAL, 1, that a connection to CID 1 reaches). When that works, each vsock
port a guest process listens on is also a real AF_VSOCK listener on (CID 1, port), for as long
as that guest listener lasts (a client connecting during a reset is refused, and retries); what
it accepts is handed to the guest listener the same way. Bound to CID 1, not
VMADDR_CID_ANY: only this host's processes reach it (not the VMs it runs, nor the hypervisor
it runs under).
A port another VM holds on AF_VSOCK stays hybrid only (logged).

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
VMADDR_CID_LOCAL = 1               # vsock_loopback's CID (not in Python 3.11's socket module)
PROBE_TIMEOUT_S = 1.0
REAL_POLL_MS = 500                 # how soon an AF_VSOCK listener notices its guest listener went
HYBRID, AF_VSOCK = "hybrid", "AF_VSOCK"


def probe_af_vsock(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether this host offers AF_VSOCK loopback: a listener bound to (CID 1, any port) that a
    connection to CID 1 reaches. (True, what) or (False, the step that failed and why)."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return False, "this Python has no AF_VSOCK"
    step = "socket(AF_VSOCK)"
    listener = client = None
    try:
        listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        step = f"bind to cid {VMADDR_CID_LOCAL}"
        listener.bind((VMADDR_CID_LOCAL, socket.VMADDR_PORT_ANY))
        step = "listen"
        listener.listen(1)
        port = listener.getsockname()[1]
        step = f"connect to cid {VMADDR_CID_LOCAL} port {port}"
        client = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        client.settimeout(timeout)
        client.connect((VMADDR_CID_LOCAL, port))
        step = "accept"
        listener.settimeout(timeout)
        listener.accept()[0].close()
    except OSError as exc:
        return False, f"{step}: {exc.strerror or exc}"
    finally:
        for s in (client, listener):
            if s is not None:
                s.close()
    return True, "vsock_loopback"


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
    """The host side of one VM's vsock, and its guest listeners. real: use AF_VSOCK too when the
    probe finds it (False: hybrid vsock only, as `--vsock PATH` asks)."""

    def __init__(self, host_path: str, log, real: bool = True):
        self.host_path, self.log = host_path, log
        self._listeners: dict[int, socket.socket] = {}      # port -> the kernel's end
        self._real: dict[int, socket.socket] = {}           # port -> its AF_VSOCK listener
        self._lock = threading.Lock()
        self._closed = False
        if real:
            ok, found = probe_af_vsock()
            self.why = found if ok else f"no AF_VSOCK loopback: {found}"
        else:
            ok, self.why = False, "--vsock PATH asks for hybrid vsock"
        self.transport = AF_VSOCK if ok else HYBRID
        if os.path.exists(host_path) and not os.path.isdir(host_path):
            os.unlink(host_path)                             # a stale socket of an earlier run
        self.host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.host.bind(host_path)
            self.host.listen(128)
        except OSError:
            self.host.close()
            raise
        self._thread = threading.Thread(target=self._accept, name="vsock-host", daemon=True)
        self._thread.start()

    def describe(self, port: int | None = None) -> str:
        """How host clients reach the guest (the port's, with port)."""
        hybrid = f"hybrid vsock at {self.host_path}"
        if self.transport == HYBRID:
            return f"{hybrid} ({self.why})"
        if port is not None and port not in self._real:
            return f"{hybrid} (AF_VSOCK port {port} is taken on this host)"
        return f"AF_VSOCK cid {VMADDR_CID_LOCAL} ({self.why}) and {hybrid}"

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
            if self.transport == AF_VSOCK:
                self._listen_real(port, kernel_end)
        fd = os.dup(guest_end.fileno())
        guest_end.close()
        self.log(f"hv_sock: vsock port {port}: {self.describe(port)}", 6)
        return fd

    def _listen_real(self, port: int, kernel_end: socket.socket) -> None:
        """The port's AF_VSOCK listener (under the lock), for as long as this guest listener
        lasts: a client connecting between two boots is refused, as by a VM not up yet."""
        old = self._real.pop(port, None)
        if old is not None:
            _shut(old)
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind((VMADDR_CID_LOCAL, port))
            s.listen(128)
        except OSError as exc:
            s.close()
            self.log(f"hv_sock: AF_VSOCK port {port}: {exc.strerror or exc}: hybrid vsock only for it", 4)
            return
        s.setblocking(False)
        self._real[port] = s
        threading.Thread(target=self._accept_real, args=(port, s, kernel_end), name=f"vsock-{port}",
                         daemon=True).start()

    def _accept_real(self, port: int, s: socket.socket, kernel_end: socket.socket) -> None:
        """Hand what s accepts to kernel_end's guest until that listener goes (its process
        exited, or another took the port); then s goes too, and the port is free."""
        import select
        try:
            while not self._closed:
                p = select.poll()
                p.register(s, select.POLLIN)
                p.register(kernel_end, select.POLLHUP)
                ready = {fd for fd, _ev in p.poll(REAL_POLL_MS)}
                with self._lock:
                    current = self._listeners.get(port) is kernel_end and self._real.get(port) is s
                if not current or _hung_up(kernel_end):
                    return
                if s.fileno() not in ready:
                    continue
                try:
                    conn, _addr = s.accept()
                except BlockingIOError:
                    continue
                try:
                    conn.setblocking(True)
                    kernel_end.sendmsg([_PORT.pack(port)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                             array.array("i", [conn.fileno()]))])
                except OSError as exc:
                    self.log(f"hv_sock: AF_VSOCK connection to port {port} dropped: {exc}", 7)
                finally:
                    conn.close()                        # the guest holds its own descriptor now
        except (OSError, ValueError):                   # closed under us (the run ends)
            return
        finally:
            with self._lock:
                if self._real.get(port) is s:
                    del self._real[port]
            _shut(s)

    def _hand_over(self, port: int, conn: socket.socket) -> bool:
        """Give conn to the guest listening on port; False when nobody does."""
        with self._lock:
            listener = self._listeners.get(port)
        if listener is None or _hung_up(listener):
            return False
        listener.sendmsg([_PORT.pack(port)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [conn.fileno()]))])
        return True

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
            self._hand_over(port, conn)
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
            for s in [*self._listeners.values(), *self._real.values()]:
                _shut(s)
            self._listeners.clear()
            self._real.clear()


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


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)                   # wakes a poll or accept on it
    except OSError:
        pass
    s.close()


def _hung_up(s: socket.socket) -> bool:
    """The guest's end of a listener is closed (its process exited or closed it)."""
    import select
    p = select.poll()
    p.register(s, select.POLLHUP)
    return any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in p.poll(0))
