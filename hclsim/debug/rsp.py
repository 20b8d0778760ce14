"""gdb Remote Serial Protocol framing: `$payload#cs` packets, acks, escapes, run-length
encoding, and a connection that reads packets on its own thread so that a Ctrl-C (a bare 0x03
byte) reaches the simulator while the main thread is busy running the guest.
"""
import queue
import socket
import threading

ESCAPE = 0x7D
INTERRUPT = 0x03
_MUST_ESCAPE = frozenset(b"#$}*")
_HEX = frozenset(b"0123456789abcdefABCDEF")

# Items a Connection's queue yields besides packet payloads (bytes).
INTERRUPTED = "interrupt"   # gdb sent Ctrl-C
CLOSED = "closed"           # the peer went away


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: bytes) -> bytes:
    """A packet ready to send. Binary payloads must already be escape()d."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape(data: bytes) -> bytes:
    """Escape the bytes that would end or confuse a packet (`#`, `$`, `}`, `*`)."""
    out = bytearray()
    for b in data:
        if b in _MUST_ESCAPE:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo escape() (gdb escapes the data of X and vFile packets). ValueError if it ends in `}`."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("packet ends inside an escape")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def rle_decode(data: bytes) -> bytes:
    """Expand `X*n` runs (the repeat count is n - 29 more copies). ValueError if malformed."""
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b == ord("*"):
            if not out or i + 1 >= len(data):
                raise ValueError("bad run-length encoding")
            out += out[-1:] * (data[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def rle_encode(data: bytes) -> bytes:
    """Compress runs of text replies (register dumps are mostly zeros). Counts whose code would
    be `#` or `$` (runs of 7 or 8) are shortened: they cannot appear in a packet body. Runs of
    `#`, `$`, `}`, `*` are never encoded: those bytes only occur escaped."""
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        run = 1
        while i + run < len(data) and data[i + run] == b and run < 98:
            run += 1
        out.append(b)
        extra = run - 1
        if extra >= 3 and b not in _MUST_ESCAPE:
            if extra + 29 in (ord("#"), ord("$")):
                extra = 5
            out += b"*" + bytes((extra + 29,))
            i += extra + 1
        else:
            i += 1
    return bytes(out)


class PacketParser:
    """Splits a byte stream into ('packet', payload), ('bad', payload) on a checksum mismatch,
    ('ack',), ('nack',) and ('interrupt',). Noise between packets is ignored, as gdb does.
    A body never holds a bare `#` (it is sent escaped), so the first one ends it."""

    def __init__(self):
        self.buf = bytearray()
        self.digits = None          # None: outside a packet; bytearray: reading the checksum
        self.in_packet = False

    def feed(self, data: bytes) -> list[tuple]:
        events = []
        for b in data:
            if not self.in_packet:
                if b == ord("$"):
                    self.in_packet, self.buf, self.digits = True, bytearray(), None
                elif b == ord("+"):
                    events.append(("ack",))
                elif b == ord("-"):
                    events.append(("nack",))
                elif b == INTERRUPT:
                    events.append(("interrupt",))
            elif self.digits is None:
                if b == ord("#"):
                    self.digits = bytearray()
                else:
                    self.buf.append(b)
            else:
                self.digits.append(b)
                if len(self.digits) == 2:
                    body = bytes(self.buf)
                    self.in_packet = False
                    ok = all(c in _HEX for c in self.digits) and int(self.digits, 16) == checksum(body)
                    events.append(("packet", body) if ok else ("bad", body))
        return events


class Connection:
    """One gdb connection. A reader thread acks packets, calls on_interrupt() for Ctrl-C and when
    the peer goes away, at once (the guest may be running on the main thread), and queues
    payloads for get()."""

    ACK_TIMEOUT = 2.0

    def __init__(self, sock: socket.socket, on_interrupt=None):
        self.sock = sock
        self.on_interrupt = on_interrupt
        self.no_ack = False
        self.incoming = queue.Queue()
        self._acked = threading.Event()
        self._nacked = False
        self._send_lock = threading.Lock()
        self.closed = False
        self.reader = threading.Thread(target=self._read, name="hclsim-gdb-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        parser = PacketParser()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                for event in parser.feed(data):
                    kind = event[0]
                    if kind == "packet":
                        if not self.no_ack:
                            self._raw_send(b"+")
                        if event[1] == b"QStartNoAckMode":
                            self.no_ack = True  # now, not after the reply: gdb's next packet may follow at once
                        self.incoming.put(event[1])
                    elif kind == "bad":
                        if not self.no_ack:
                            self._raw_send(b"-")  # gdb resends it
                    elif kind == "interrupt":
                        if self.on_interrupt is not None:
                            self.on_interrupt()
                        self.incoming.put(INTERRUPTED)
                    else:
                        self._nacked = kind == "nack"
                        self._acked.set()
        except OSError:
            pass
        self.closed = True
        self.incoming.put(CLOSED)
        if self.on_interrupt is not None:
            self.on_interrupt()   # gdb went away: stop a running guest so the session can end

    def _raw_send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def send(self, payload: bytes, retries: int = 3) -> None:
        """Send one packet; in ack mode resend it on `-` (a few times, then give up)."""
        packet = frame(payload)
        for _ in range(retries + 1):
            self._acked.clear()
            self._raw_send(packet)
            if self.no_ack or self.closed:
                return
            if not self._acked.wait(self.ACK_TIMEOUT) or not self._nacked:
                return

    def get(self, timeout=None):
        """The next payload, INTERRUPTED or CLOSED; None on timeout."""
        try:
            return self.incoming.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
