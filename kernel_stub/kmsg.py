"""The kernel's log ring (printk) and /dev/kmsg, as Linux keeps and serves them
(kernel/printk/printk.c, the pre-5.10 logbuf limits: LOG_LINE_MAX = 1024 - 32).

A record is one printk or one write(2) to /dev/kmsg: sequence number, facility, level,
timestamp and text. Text keeps its inner newlines (one record; /dev/kmsg escapes them as
\\x0a, dmesg prints each line with the record's timestamp). The ring holds `capacity` bytes
of records (16 bytes of header each, 8-byte aligned, as struct printk_log); a new record
drops the oldest ones until it fits. A reader whose next record was dropped gets EPIPE once
and goes on from the oldest record kept.

Records with a level below console_loglevel go to the consoles (add_console) as they are
logged, in order: the serial console, COM3.
"""
import threading
from dataclasses import dataclass

from hclsim.defs import kabi
from hclsim.kernel_stub.vfs import File, KernelError

LOG_LINE_MAX = 1024 - 32          # PREFIX_MAX 32: the longest text; a longer /dev/kmsg write is EINVAL
RECORD_HEADER = 16                # sizeof(struct printk_log)
LOG_ALIGN = 8
DEFAULT_MESSAGE_LOGLEVEL = 4      # CONFIG_MESSAGE_LOGLEVEL_DEFAULT: a userspace write without <N>
CONSOLE_LOGLEVEL_DEFAULT = 7      # CONFIG_CONSOLE_LOGLEVEL_DEFAULT: console gets level < 7
LOG_USER = 1                      # the facility of userspace records that name none (or 0)


@dataclass(frozen=True)
class Record:
    seq: int
    facility: int
    level: int
    ts_usec: int
    text: bytes
    pid: int = 0                  # who wrote it (0: the kernel)

    @property
    def prio(self) -> int:
        return self.facility << 3 | self.level

    def kmsg(self) -> bytes:
        """The record as a /dev/kmsg read returns it: `prio,seq,ts,flags;text\\n`, with every
        byte below ' ', from 127 up, and '\\' escaped \\xNN (msg_print_ext_body)."""
        body = "".join(chr(c) if 32 <= c < 127 and c != 0x5C else f"\\x{c:02x}" for c in self.text)
        return f"{self.prio},{self.seq},{self.ts_usec},-;{body}\n".encode("ascii")

    def dmesg(self) -> bytes:
        """The record as dmesg and the console print it: each line `[    s.uuuuuu] text`."""
        prefix = f"[{self.ts_usec // 1000000:5d}.{self.ts_usec % 1000000:06d}] ".encode()
        return b"".join(prefix + line + b"\n" for line in self.text.split(b"\n"))


def parse_user_write(data: bytes) -> tuple[int, int, bytes]:
    """(facility, level, text) of one write(2) to /dev/kmsg, as devkmsg_write reads it: the
    buffer is a C string (it ends at a NUL); a leading `<N>` (decimal, simple_strtoul: no
    digits is 0) gives level N & 7 and facility N >> 3 unless that is 0 (then LOG_USER);
    without one, LOG_USER at the default message level. The trailing newline is dropped."""
    text = data.split(b"\0", 1)[0]
    facility, level = LOG_USER, DEFAULT_MESSAGE_LOGLEVEL
    if text[:1] == b"<":
        end = 1
        while end < len(text) and 0x30 <= text[end] <= 0x39:
            end += 1
        if text[end:end + 1] == b">":
            n = int(text[1:end] or b"0") & 0xFFFFFFFF          # an unsigned int, as the kernel keeps it
            level = n & 7
            if n >> 3:
                facility = (n >> 3) & 0xFF                      # printk_info.facility is a u8
            text = text[end + 1:]
    if text.endswith(b"\n"):
        text = text[:-1]
    return facility, level, text


class Kmsg:
    def __init__(self, clock, capacity: int = 1 << 20, console_loglevel: int = CONSOLE_LOGLEVEL_DEFAULT):
        self.clock, self.capacity, self.console_loglevel = clock, capacity, console_loglevel
        self._records: list[Record] = []      # oldest first; _first is the seq of _records[0]
        self._first = 0
        self._next = 0
        self._used = 0
        self._cond = threading.Condition()
        self._console_lock = threading.RLock()  # consoles see records one at a time, in order
        self._consoles = []
        self.console_errors: list[BaseException] = []
        self.closed = False

    # ---- writing -------------------------------------------------------------------------
    def add_console(self, fn) -> None:
        """fn(record) for every later record with level < console_loglevel."""
        with self._console_lock:
            self._consoles.append(fn)

    @staticmethod
    def _cost(text: bytes) -> int:
        return (RECORD_HEADER + len(text) + LOG_ALIGN - 1) & ~(LOG_ALIGN - 1)

    def _store(self, facility: int, level: int, text: bytes, pid: int) -> Record:
        with self._console_lock:
            with self._cond:
                rec = Record(self._next, facility, level, max(0, int(self.clock() * 1e6)), text, pid)
                cost = self._cost(text)
                while self._records and self._used + cost > self.capacity:
                    self._used -= self._cost(self._records.pop(0).text)
                    self._first += 1
                self._records.append(rec)
                self._used += cost
                self._next += 1
                self._cond.notify_all()
            if level < self.console_loglevel:
                for fn in self._consoles:
                    try:
                        fn(rec)
                    except Exception as exc:  # a console failing never fails a printk
                        self.console_errors.append(exc)
            return rec

    def log(self, text, level: int = 6, facility: int = 0) -> Record:
        """A kernel message (printk): one record, cut at LOG_LINE_MAX, one trailing newline dropped."""
        raw = text.encode("utf-8", "backslashreplace") if isinstance(text, str) else bytes(text)
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        return self._store(facility, level & 7, raw[:LOG_LINE_MAX], 0)

    def write(self, data: bytes, caller=None) -> int:
        """A write(2) to /dev/kmsg: one record; EINVAL if longer than LOG_LINE_MAX."""
        data = bytes(data)
        if len(data) > LOG_LINE_MAX:
            raise KernelError(kabi.EINVAL, f"a /dev/kmsg write of {len(data)} bytes (at most {LOG_LINE_MAX})")
        facility, level, text = parse_user_write(data)
        self._store(facility, level, text, getattr(caller, "pid", 0))
        return len(data)

    # ---- reading -------------------------------------------------------------------------
    def records(self) -> list[Record]:
        """The records the ring holds, oldest first."""
        with self._cond:
            return list(self._records)

    @property
    def next_seq(self) -> int:
        return self._next

    def text(self) -> str:
        """The whole ring as dmesg prints it (for kmsg.log)."""
        return b"".join(r.dmesg() for r in self.records()).decode("utf-8", "backslashreplace")

    def open(self, flags: int, caller=None) -> "KmsgFile":
        return KmsgFile(self, flags, caller)

    def shutdown(self) -> None:
        """The kernel is going away: blocked and later reads return b"" (end of file)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class KmsgFile(File):
    """An open /dev/kmsg. A reader starts at the oldest record; each read returns one record."""

    def __init__(self, ring: Kmsg, flags: int, caller):
        self.ring, self.caller = ring, caller
        self.readable = flags & kabi.O_ACCMODE != kabi.O_WRONLY   # devkmsg_open: no reader state for O_WRONLY
        self.nonblock = bool(flags & kabi.O_NONBLOCK)
        self.closed = False
        with ring._cond:
            self.seq = ring._first

    def _ready(self) -> bool:
        return self.closed or self.ring.closed or self.seq < self.ring._next

    def read(self, count: int, nonblock: bool = False) -> bytes:
        if not self.readable:
            raise KernelError(kabi.EBADF, "/dev/kmsg opened write-only")
        ring = self.ring
        with ring._cond:
            if not self._ready():
                if nonblock:
                    raise KernelError(kabi.EAGAIN)
                ring._cond.wait_for(self._ready)
            if self.closed:
                raise KernelError(kabi.EBADF, "closed while reading")
            if self.seq >= ring._next:          # only when the ring shut down
                return b""
            if self.seq < ring._first:           # our next record is gone: say so once, go on from the oldest
                self.seq = ring._first
                raise KernelError(kabi.EPIPE, "records were dropped from the log ring")
            rec = ring._records[self.seq - ring._first]
            self.seq += 1                        # consumed even when too big for the buffer, as devkmsg_read
        out = rec.kmsg()
        if len(out) > count:
            raise KernelError(kabi.EINVAL, f"a {len(out)}-byte record does not fit in {count} bytes")
        return out

    def write(self, data: bytes) -> int:
        return self.ring.write(data, self.caller)

    def poll(self, timeout: float | None) -> bool:
        """True when a read would not block (a record, an EPIPE, or the end)."""
        if not self.readable:
            return True
        with self.ring._cond:
            return self.ring._cond.wait_for(self._ready, timeout)

    def close(self) -> None:
        with self.ring._cond:
            self.closed = True
            self.ring._cond.notify_all()
