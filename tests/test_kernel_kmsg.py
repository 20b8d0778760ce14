"""kernel_stub/kmsg.py: the log ring and /dev/kmsg as Linux's printk keeps and serves them."""
import threading
import time

import pytest

from hclsim.defs import kabi
from hclsim.kernel_stub.kmsg import LOG_LINE_MAX, Kmsg, parse_user_write

from .kfs import CALLER, FakeClock, errno_of


@pytest.fixture
def ring():
    return Kmsg(FakeClock(1.5))


def reader(ring, flags=kabi.O_RDONLY):
    return ring.open(flags, CALLER)


def test_kernel_record_format(ring):
    ring.log("Linux version 6.6.0 (hclsim)\n")
    ring.clock.now = 12.0000071
    ring.log("second", level=3)
    f = reader(ring)
    assert f.read(4096) == b"6,0,1500000,-;Linux version 6.6.0 (hclsim)\n"
    assert f.read(4096) == b"3,1,12000007,-;second\n"


@pytest.mark.parametrize("data,expected", [
    (b"<21>underhill_init: hello\n", (2, 5, b"underhill_init: hello")),   # init's records: facility 2
    (b"<29>openvmm_hcl: x\n", (3, 5, b"openvmm_hcl: x")),
    (b"<5>no facility\n", (1, 5, b"no facility")),          # facility 0 from userspace is LOG_USER
    (b"plain\n", (1, 4, b"plain")),                          # default_message_loglevel 4
    (b"<>empty prefix", (1, 0, b"empty prefix")),           # simple_strtoul of no digits is 0
    (b"<x>not a prefix", (1, 4, b"<x>not a prefix")),
    (b"<12", (1, 4, b"<12")),
    (b"two newlines\n\n", (1, 4, b"two newlines\n")),        # only one is dropped
    (b"cut\0after a NUL\n", (1, 4, b"cut")),                 # the buffer is a C string
    (b"<4294967295>wraps", (0xFF, 7, b"wraps")),             # unsigned int; the facility a u8
])
def test_user_write_prefix(data, expected):
    assert parse_user_write(data) == expected


def test_user_write_records(ring):
    assert ring.write(b"<21>init: one\n", CALLER) == 14
    ring.write(b"no prefix", CALLER)
    recs = ring.records()
    assert [(r.prio, r.text, r.pid) for r in recs] == [(21, b"init: one", CALLER.pid), (12, b"no prefix", CALLER.pid)]
    f = reader(ring)
    assert f.read(100) == b"21,0,1500000,-;init: one\n"
    assert f.write(b"<13>via the file\n") == 17
    assert ring.records()[-1].text == b"via the file"


def test_write_longer_than_log_line_max_is_einval(ring):
    assert ring.write(b"x" * LOG_LINE_MAX) == LOG_LINE_MAX == 992
    assert errno_of(ring.write, b"x" * (LOG_LINE_MAX + 1)) == kabi.EINVAL
    assert len(ring.records()) == 1
    ring.log("y" * 2000)                                        # printk cuts a kernel message instead
    assert len(ring.records()[-1].text) == LOG_LINE_MAX


def test_escapes_and_multiline(ring):
    ring.log(b"tab\there\nsecond line\\ \xff\x7f")
    f = reader(ring)
    assert f.read(4096) == b"6,0,1500000,-;tab\\x09here\\x0asecond line\\x5c \\xff\\x7f\n"
    assert ring.text() == "[    1.500000] tab\there\n[    1.500000] second line\\ \\xff\x7f\n"


def test_dmesg_text(ring):
    ring.log("a")
    ring.clock.now = 123.456789
    ring.write(b"<14>b\n")
    assert ring.text() == "[    1.500000] a\n[  123.456789] b\n"


def test_eagain_einval_and_write_only(ring):
    f = reader(ring)
    assert errno_of(f.read, 4096, True) == kabi.EAGAIN
    ring.log("a record longer than ten bytes")
    assert errno_of(f.read, 10) == kabi.EINVAL
    assert errno_of(f.read, 4096, True) == kabi.EAGAIN      # the too-big record was consumed, as devkmsg_read
    w = reader(ring, kabi.O_WRONLY)
    assert errno_of(w.read, 4096) == kabi.EBADF
    assert w.poll(0) is True


def test_new_reader_starts_at_oldest_and_epipe_on_overwrite():
    ring = Kmsg(FakeClock(), capacity=256)
    slow = ring.open(kabi.O_RDONLY, CALLER)
    for i in range(20):
        ring.log(f"message {i:02d} " + "." * 20)
    recs = ring.records()
    assert 0 < len(recs) < 20 and recs[-1].seq == 19 and recs[0].seq == 20 - len(recs)
    assert sum((16 + len(r.text) + 7) // 8 * 8 for r in recs) <= 256
    assert slow.poll(0) is True
    assert errno_of(slow.read, 4096) == kabi.EPIPE
    first = recs[0].seq
    assert slow.read(4096).startswith(f"6,{first},".encode())   # on from the oldest kept record
    fresh = ring.open(kabi.O_RDONLY, CALLER)
    assert fresh.read(4096).startswith(f"6,{first},".encode())
    seqs = [first]
    while slow.poll(0):
        seqs.append(int(slow.read(4096, True).split(b",")[1]))
    assert seqs == list(range(first, 20))
    assert errno_of(slow.read, 4096, True) == kabi.EAGAIN


def test_blocking_read_woken_by_a_writer():
    ring = Kmsg(FakeClock())
    f = ring.open(kabi.O_RDONLY, CALLER)
    got = []
    t = threading.Thread(target=lambda: got.append(f.read(4096)))
    t.start()
    time.sleep(0.05)
    assert t.is_alive() and not got
    writer = threading.Thread(target=ring.write, args=(b"<14>wake up\n", CALLER))
    writer.start()
    writer.join()
    t.join(5)
    assert got == [b"14,0,0,-;wake up\n"]


def test_poll_waits_for_a_record():
    ring = Kmsg(FakeClock())
    f = ring.open(kabi.O_RDONLY, CALLER)
    assert f.poll(0) is False
    assert f.poll(0.01) is False
    threading.Timer(0.05, ring.log, args=("late",)).start()
    assert f.poll(5) is True


def test_shutdown_and_close_wake_blocked_readers():
    ring = Kmsg(FakeClock())
    a, b = ring.open(kabi.O_RDONLY, CALLER), ring.open(kabi.O_RDONLY, CALLER)
    results = {}

    def read(name, f):
        try:
            results[name] = f.read(4096)
        except Exception as exc:
            results[name] = exc.errno

    threads = [threading.Thread(target=read, args=("a", a)), threading.Thread(target=read, args=("b", b))]
    for t in threads:
        t.start()
    time.sleep(0.05)
    b.close()
    threads[1].join(5)
    assert results == {"b": kabi.EBADF}
    ring.shutdown()
    threads[0].join(5)
    assert results["a"] == b""
    assert a.read(4096) == b"" and a.poll(None) is True


def test_console_gets_levels_below_console_loglevel_in_order(ring):
    seen = []
    ring.add_console(lambda rec: seen.append((rec.level, rec.dmesg())))
    ring.log("info")                           # 6: printed
    ring.log("debug", level=7)                 # 7: not (suppress_message_printing: level >= 7)
    ring.write(b"<27>err from init\n")
    ring.write(b"<31>debug from init\n")
    assert seen == [(6, b"[    1.500000] info\n"), (3, b"[    1.500000] err from init\n")]


def test_a_failing_console_does_not_fail_printk(ring):
    def broken(rec):
        raise OSError("COM3 gone")
    ring.add_console(broken)
    ring.log("still logged")
    assert ring.records()[-1].text == b"still logged" and isinstance(ring.console_errors[0], OSError)
