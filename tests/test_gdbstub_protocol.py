"""The gdb remote stub's protocol layer without a guest: framing, checksums, escapes, run-length
encoding, the register layout, and error replies to malformed packets (never a crash)."""
import socket
import threading
import xml.etree.ElementTree as ET

import pytest

from hclsim.debug import gdb_regs, rsp
from hclsim.debug.gdbserver import parse_address
from hclsim.debug.gdbstub import GdbStub
from hclsim.debug.target import DebugError, StopEvent
from hclsim import HclsimError


def test_checksum_and_frame():
    assert rsp.checksum(b"OK") == 0x9A
    assert rsp.frame(b"OK") == b"$OK#9a"
    assert rsp.frame(b"") == b"$#00"


@pytest.mark.parametrize("data", [b"plain", b"#$}*", bytes(range(256)), b"}" * 5, b""])
def test_escape_round_trip(data):
    escaped = rsp.escape(data)
    assert not set(escaped) & {ord("#"), ord("$"), ord("*")}
    assert rsp.unescape(escaped) == data


def test_escape_known_bytes():
    assert rsp.escape(b"a#b") == b"a}\x03b"
    assert rsp.unescape(b"}]}\x04") == b"}$"
    with pytest.raises(ValueError):
        rsp.unescape(b"abc}")


@pytest.mark.parametrize("data", [b"0" * n for n in range(1, 120)] + [b"00000000ffffffff" * 3, b"abc"])
def test_rle_round_trip_and_no_forbidden_counts(data):
    encoded = rsp.rle_encode(data)
    assert rsp.rle_decode(encoded) == data
    i = 0
    while i < len(encoded):
        if encoded[i] == ord("*"):
            assert encoded[i + 1] not in (ord("#"), ord("$")) and 29 + 3 <= encoded[i + 1] <= 126
            i += 1
        i += 1


def test_rle_known_and_malformed():
    assert rsp.rle_decode(b"0* ") == b"0000"        # ' ' is 32: three more copies
    assert rsp.rle_encode(b"0000") == b"0* "
    with pytest.raises(ValueError):
        rsp.rle_decode(b"*a")


def test_parser_events_split_feeds_and_noise():
    p = rsp.PacketParser()
    events = p.feed(b"+garbage$qSupp")
    assert events == [("ack",)]
    assert p.feed(b"orted#") == []
    assert p.feed(b"37") == [("packet", b"qSupported")]
    assert p.feed(b"-\x03$g#00$g#67") == [("nack",), ("interrupt",), ("bad", b"g"), ("packet", b"g")]
    assert p.feed(b"$m0,1#zz") == [("bad", b"m0,1")]


def test_connection_acks_retransmits_and_interrupts():
    a, b = socket.socketpair()
    b.settimeout(10)
    interrupts = []
    conn = rsp.Connection(a, on_interrupt=lambda: interrupts.append(1))
    try:
        b.sendall(rsp.frame(b"g") + b"\x03" + b"$g#00")
        assert conn.get(timeout=5) == b"g"
        assert conn.get(timeout=5) == rsp.INTERRUPTED and interrupts == [1]
        got = b""
        while got.count(b"+") + got.count(b"-") < 2:
            got += b.recv(100)
        assert got == b"+-"          # acked the good packet, asked for the bad one again
        sender = threading.Thread(target=conn.send, args=(b"OK",))
        sender.start()
        data = b""
        while data.count(b"$OK#9a") < 1:
            data += b.recv(100)
        b.sendall(b"-")              # nack the reply: it is sent again
        while data.count(b"$OK#9a") < 2:
            data += b.recv(100)
        b.sendall(b"+")
        sender.join(timeout=5)
        assert not sender.is_alive()
        b.sendall(rsp.frame(b"QStartNoAckMode"))
        assert conn.get(timeout=5) == b"QStartNoAckMode" and conn.no_ack
        b.close()
        assert conn.get(timeout=5) == rsp.CLOSED
    finally:
        conn.close()


def test_register_layout_follows_gdb_amd64():
    names = [r.name for r in gdb_regs.REGISTERS]
    assert names[:24] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                          "r12", "r13", "r14", "r15", "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"]
    assert names[24:40] == [f"st{i}" for i in range(8)] + ["fctrl", "fstat", "ftag", "fiseg", "fioff",
                                                         "foseg", "fooff", "fop"]
    assert names[40:57] == [f"xmm{i}" for i in range(16)] + ["mxcsr"]
    assert names[57:] == ["fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "efer"]
    root = ET.fromstring(gdb_regs.target_xml())
    assert root.find("architecture").text == "i386:x86-64"
    features = {f.get("name"): [r.get("name") for r in f.findall("reg")] for f in root.findall("feature")}
    assert set(features) == {"org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments",
                             "org.hclsim.x86.control"}
    assert features["org.hclsim.x86.control"] == ["cr0", "cr2", "cr3", "cr4", "efer"]


def test_register_block_round_trip():
    values = {name: (i + 1) * 0x0101010101 for i, name in enumerate(
        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15", "rip", "fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "efer"))}
    values.update(rflags=0x246, cs=0x8, ss=0x10, ds=0x10, es=0x10, fs=0, gs=0)
    block = gdb_regs.encode_all(values)
    assert len(block) == 2 * gdb_regs.G_SIZE
    assert gdb_regs.decode_all(block.encode()) == values
    with pytest.raises(ValueError):
        gdb_regs.decode_all(b"0" * (2 * gdb_regs.G_SIZE + 2))


class FakeTarget:
    """Just enough of DebugTarget for pure protocol tests (the real one is tested end to end)."""

    def __init__(self):
        self.current = 0
        self.regs = {0: {"rip": 0x1000, "rax": 1, "rflags": 2, "cr3": 0x5000},
                     1: {"rip": 0x2000, "rax": 2, "rflags": 2, "cr3": 0x6000}}
        self.mem = {0x1000 + i: i & 0xFF for i in range(0x1000)}
        self.breakpoints, self.watchpoints, self.steps = set(), set(), []
        self.last_stop = StopEvent("start", 0, 0x1000)

    def vp_indexes(self):
        return [0, 1]

    def vp_label(self, i):
        return f"VP {i} shim <VTL2> & co" if i == 0 else f"VP {i} sidecar VTL2 halted"

    def vp_state(self, i):
        return "runnable" if i == 0 else "halted"

    def registers(self, i):
        return dict(self.regs[i])

    def set_register(self, i, name, value):
        self.regs[i][name] = value

    def read_memory(self, i, addr, length, physical=False):
        if any(a not in self.mem for a in range(addr, addr + length)):
            raise DebugError(f"unmapped {addr:#x}")
        return bytes(self.mem[a] for a in range(addr, addr + length))

    def write_memory(self, i, addr, data, physical=False):
        self.read_memory(i, addr, len(data))
        for k, b in enumerate(data):
            self.mem[addr + k] = b

    def add_breakpoint(self, addr):
        self.breakpoints.add(addr)

    def remove_breakpoint(self, addr):
        self.breakpoints.discard(addr)

    def add_watchpoint(self, addr, length, kind="w", physical=False):
        self.watchpoints.add((addr, length, kind))

    def remove_watchpoint(self, addr, length, kind="w", physical=False):
        self.watchpoints.discard((addr, length, kind))

    def step(self, i=None, count=1):
        self.steps.append(i)
        self.regs[i]["rip"] += 1
        self.last_stop = StopEvent("step", i, self.regs[i]["rip"])
        return self.last_stop

    def cont(self, timeout=None):
        self.last_stop = StopEvent("watchpoint", 1, 0x2005, watch_address=0x1010, watch_kind="a")
        return self.last_stop

    def interrupt(self):
        pass


@pytest.fixture
def stub():
    return GdbStub(FakeTarget(), None, images=[])


@pytest.mark.parametrize("packet", [
    b"mzz,4", b"m1000", b"m-1,4", b"m 10,4", b"m,", b"M1000,2:123", b"M1000,4:12", b"X1000,2:a}", b"Xzz", b"p", b"p999", b"pxyz",
    b"P10=12", b"P=", b"G123", b"Hgzz", b"Hx1", b"Hg5", b"T9", b"Tzz", b"Z0,zz,1", b"Z0,1000",
    b"Z2,1000,0", b"vCont;x", b"vCont;s:77", b"vCont", b"qThreadExtraInfo,99", b"qXfer:features:read:a.xml:0,10",
    b"qXfer:features:read:target.xml:zz", b"Cxx", b"c1zz", b"m2000,4", b"M3000,1:00",
])
def test_malformed_packets_get_error_replies(stub, packet):
    reply = stub.handle(packet)
    assert reply[:1] == b"E" and len(reply) == 3, (packet, reply)


def test_unknown_packets_get_empty_replies(stub):
    for packet in (b"vMustReplyEmpty", b"qTStatus", b"!", b"Z9,1000,1", b"qXfer:auxv:read::0,10", b"QNonStop:1"):
        assert stub.handle(packet) == b""


def test_stub_basic_queries(stub):
    t = stub.target
    supported = stub.handle(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
    assert b"qXfer:features:read+" in supported and b"vContSupported+" in supported
    assert stub.handle(b"qAttached") == b"1" and stub.handle(b"qC") == b"QC1"
    assert stub.handle(b"qfThreadInfo") == b"m1,2" and stub.handle(b"qsThreadInfo") == b"l"
    assert bytes.fromhex(stub.handle(b"qThreadExtraInfo,2").decode()) == b"VP 1 sidecar VTL2 halted"
    threads = stub.handle(b"qXfer:threads:read::0,1000")
    root = ET.fromstring(threads[1:])
    assert [(th.get("id"), th.get("name")) for th in root] == [("1", "VP 0 shim <VTL2> & co"),
                                                               ("2", "VP 1 sidecar VTL2 halted")]
    xml = b""
    while True:   # read target.xml in small windows, as gdb may
        part = stub.handle(b"qXfer:features:read:target.xml:%x,40" % len(xml))
        xml += rsp.unescape(part[1:])
        if part[:1] == b"l":
            break
    assert xml == gdb_regs.target_xml()
    assert stub.handle(b"vCont?") == b"vCont;c;C;s;S"
    assert stub.handle(b"?") == b"T05thread:1;"
    assert stub.handle(b"Hg2") == b"OK"
    assert rsp.rle_decode(stub.handle(b"g"))[:16] == b"0200000000000000"
    assert stub.handle(b"p10") == b"0020000000000000"            # rip of VP 1
    assert stub.handle(b"P0=efbeadde00000000") == b"OK" and t.regs[1]["rax"] == 0xDEADBEEF
    assert stub.handle(b"p3d") == b"0060000000000000"            # cr3 (register 61)
    assert stub.handle(b"m1010,4") == b"10111213"
    assert stub.handle(b"m1ffe,8") == b"feff"                    # the readable prefix
    assert stub.handle(b"M1010,2:abcd") == b"OK" and t.mem[0x1011] == 0xCD
    assert stub.handle(b"X1010,2:}]\x05") == b"OK" and t.mem[0x1010] == ord("}") and t.mem[0x1011] == 5
    assert stub.handle(b"X1010,0:") == b"OK"


def test_stub_breakpoints_watchpoints_and_resume(stub):
    t = stub.target
    stub.handle(b"qSupported:swbreak+;hwbreak+")
    assert stub.handle(b"Z0,1004,1") == b"OK" and stub.handle(b"Z1,1004,1") == b"OK"
    assert stub.handle(b"z0,1004,1") == b"OK" and t.breakpoints == {0x1004}   # Z1 still holds it
    assert stub.handle(b"z1,1004,1") == b"OK" and t.breakpoints == set()
    assert stub.handle(b"Z4,1010,8") == b"OK" and t.watchpoints == {(0x1010, 8, "a")}
    assert stub.handle(b"vCont;s:2;c") == b"T05thread:2;" and t.steps == [1]
    assert stub.handle(b"vCont;s:1") == b"T05thread:1;" and t.steps == [1, 0]
    assert stub.handle(b"vCont;c") == b"T05thread:2;awatch:1010;"
    stub.clear_all()
    assert t.watchpoints == set() and t.breakpoints == set()
    assert stub.handle(b"D") == b"OK" and stub.ended == "detach"


def test_parse_address():
    assert parse_address("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert parse_address(":0") == ("0.0.0.0", 0)
    for bad in ("1234", "host:", "host:port", "h:99999"):
        with pytest.raises(HclsimError):
            parse_address(bad)


def test_a_failing_target_call_is_an_error_reply_and_a_log_line():
    target, logs = FakeTarget(), []
    target.registers = lambda i: 1 // 0
    stub = GdbStub(target, None, images=[], log=logs.append)
    assert stub.handle(b"g") == b"E01"
    assert "ZeroDivisionError" in logs[0]
    assert stub.handle(b"qC") == b"QC1"         # the session goes on
