"""The gdb remote stub: answers gdb's Remote Serial Protocol packets on a DebugTarget.

Threads are vCPUs (thread id = VP index + 1). gdb's all-stop model maps directly onto the
simulator: every VP is stopped while gdb is in control, `continue` runs them all, and a step
runs only the stepped VP. `vCont;s:N;c` and `vCont;s:N` both step thread N alone — the other
VPs stay stopped, like gdb's `set scheduler-locking step` — because the simulator runs VPs one
at a time anyway and "the others run meanwhile" would be an arbitrary slice of their work.

The boot shim is linked at 0 and loaded elsewhere, so qOffsets tells gdb where (`file shim.elf`
before `target remote` then gives the right addresses); the other images (sidecar, VTL0 test
guest) are offered as shared libraries, so their symbols load by themselves.
"""
import threading
import time
from xml.sax.saxutils import quoteattr, escape as xml_escape

from hclsim.debug import gdb_regs
from hclsim.debug import rsp
from hclsim.debug.target import DebugError, StopEvent

PACKET_SIZE = 0x4000
THREADS_PER_REPLY = 256          # qfThreadInfo/qsThreadInfo chunk (2048 VPs fit in 8 replies)
SIGINT, SIGTRAP, SIGSEGV = 2, 5, 11
WATCH_KEYS = {"w": "watch", "r": "rwatch", "a": "awatch"}
WATCH_TYPES = {2: "w", 3: "r", 4: "a"}   # Z2/Z3/Z4
EFAULT, EINVAL, ENOENT = 0x0E, 0x16, 0x02
EXTERNAL = "external"            # DebugTarget.vp_state of a VP the Linux stand-in runs
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class PacketError(Exception):
    """A malformed or unusable packet: answered with `E<code>`."""

    def __init__(self, code: int = EINVAL):
        super().__init__(code)
        self.code = code


def _hex(text: bytes) -> int:
    """An unsigned hex field (int() alone would take signs, spaces and underscores)."""
    if not text or not all(c in _HEX_DIGITS for c in text):
        raise PacketError()
    return int(text, 16)


def interrupt_while(target, lock, running, period: float = 0.25) -> None:
    """target.interrupt() now and again until running() turns false: an interrupt that lands
    just before cont() starts is forgotten by it, and gdb would wait for a stop forever."""
    def repeat():
        while True:
            with lock:
                if not running():
                    return
                target.interrupt()
            time.sleep(period)
    threading.Thread(target=repeat, name="hclsim-gdb-interrupt", daemon=True).start()


class GdbStub:
    """One gdb session on a target. handle() answers a packet; `ended` tells the server when
    the session is over ("detach" or "kill")."""

    def __init__(self, target, conn, images=(), log=None):
        self.target = target
        self.conn = conn
        self.log = log or (lambda text: None)
        self.images = list(images)        # (name, runtime base, FirmwareImage), the boot shim first
        self.g_vp = None                  # Hg: the VP registers and memory refer to (None: current)
        self.c_vp = None                  # Hc: the VP `s` steps (None: current)
        self.gdb_features = set()
        self.breaks = {}                  # address -> {"sw", "hw"}: Z0 and Z1 share one target breakpoint
        self.watches = set()              # (address, length, kind)
        self.thread_list = []             # qfThreadInfo/qsThreadInfo cursor
        self.ended = None                 # "detach", "kill", "exit" (W sent) or "fault" (X sent)
        self._lock = threading.Lock()
        self._running = False
        self._interrupted = False

    # ---- Ctrl-C (reader thread) ----------------------------------------------------------------
    def on_interrupt(self) -> None:
        with self._lock:
            self._interrupted = True
        interrupt_while(self.target, self._lock, lambda: self._running)

    # ---- dispatch ------------------------------------------------------------------------------
    def handle(self, packet: bytes) -> bytes | None:
        """The reply payload for one packet (b"" = unsupported), or None when gdb expects none."""
        try:
            return self._dispatch(packet)
        except PacketError as exc:
            return b"E%02x" % exc.code
        except DebugError:
            return b"E%02x" % EFAULT
        except (ValueError, IndexError, KeyError):
            return b"E%02x" % EINVAL
        except Exception as exc:   # a bug must not end the session: report it and go on
            self.log(f"gdb packet {packet[:40]!r} failed: {type(exc).__name__}: {exc}")
            return b"E01"

    def _dispatch(self, p: bytes) -> bytes | None:
        if not p:
            return b""
        head = p[:1]
        simple = {b"?": self._why, b"g": self._read_regs, b"D": self._detach, b"k": self._kill}
        if head in simple:
            return simple[head]()
        handlers = {b"G": self._write_regs, b"p": self._read_reg, b"P": self._write_reg, b"m": self._read_mem,
                    b"M": self._write_mem, b"X": self._write_binary, b"H": self._set_thread,
                    b"T": self._thread_alive, b"Z": self._insert, b"z": self._remove, b"c": self._continue,
                    b"s": self._step, b"C": self._continue_signal, b"S": self._step_signal,
                    b"q": self._query, b"Q": self._set, b"v": self._v}
        handler = handlers.get(head)
        return handler(p[1:]) if handler else b""

    # ---- threads -------------------------------------------------------------------------------
    def _vp_of(self, tid: bytes, allow_any: bool = True) -> int | None:
        """VP index for a thread id; None for 0 (any) and -1 (all)."""
        if tid.startswith(b"p"):               # multiprocess form pPID.TID
            tid = tid.split(b".", 1)[1] if b"." in tid else b"-1"
        if tid in (b"0", b"-1"):
            if not allow_any:
                raise PacketError()
            return None
        vp = _hex(tid) - 1
        if vp not in self.target.vp_indexes():
            raise PacketError(ENOENT)
        return vp

    def _vp(self, which=None) -> int:
        return which if which is not None else self.target.current

    def _set_thread(self, p: bytes) -> bytes:
        op, vp = p[:1], self._vp_of(p[1:])
        if op == b"g":
            self.g_vp = vp
        elif op == b"c":
            self.c_vp = vp
        else:
            raise PacketError()
        return b"OK"

    def _thread_alive(self, p: bytes) -> bytes:
        self._vp_of(p, allow_any=False)
        return b"OK"

    def _thread_xml(self) -> bytes:
        rows = []
        for i in self.target.vp_indexes():
            rows.append(f'<thread id="{i + 1:x}" name={quoteattr(self.target.vp_label(i))}>'
                        f'{xml_escape(self.target.vp_state(i))}</thread>')
        return ('<?xml version="1.0"?>\n<threads>\n' + "\n".join(rows) + "\n</threads>\n").encode()

    def _libraries_xml(self) -> bytes:
        rows = [f'<library name={quoteattr(str(img.path))}><segment address="{base:#x}"/></library>'
                for _name, base, img in self.images[1:]]
        return ('<library-list>' + "".join(rows) + '</library-list>').encode()

    # ---- registers -----------------------------------------------------------------------------
    def _read_regs(self) -> bytes:
        return rsp.rle_encode(gdb_regs.encode_all(self.target.registers(self._vp(self.g_vp))).encode())

    def _write_regs(self, p: bytes) -> bytes:
        vp = self._vp(self.g_vp)
        current = self.target.registers(vp)
        for name, value in gdb_regs.decode_all(p).items():
            if current.get(name) != value:
                self.target.set_register(vp, name, value)
        return b"OK"

    def _register(self, p: bytes):
        n = _hex(p)
        if n >= len(gdb_regs.REGISTERS):
            raise PacketError()
        return gdb_regs.REGISTERS[n]

    def _read_reg(self, p: bytes) -> bytes:
        reg = self._register(p)
        value = self.target.registers(self._vp(self.g_vp)).get(reg.source, 0) if reg.source else 0
        return gdb_regs.encode(reg, value).encode()

    def _write_reg(self, p: bytes) -> bytes:
        number, _, value = p.partition(b"=")
        reg = self._register(number)
        if len(value) != reg.bits // 4:
            raise PacketError()
        decoded = gdb_regs.decode(reg, value)
        if reg.source is not None:
            self.target.set_register(self._vp(self.g_vp), reg.source, decoded)
        return b"OK"

    # ---- memory --------------------------------------------------------------------------------
    @staticmethod
    def _addr_len(p: bytes) -> tuple[int, int]:
        addr, _, length = p.partition(b",")
        return _hex(addr), _hex(length)

    def _read_mem(self, p: bytes) -> bytes:
        addr, length = self._addr_len(p)
        length = min(length, PACKET_SIZE // 2 - 8)
        vp = self._vp(self.g_vp)
        try:
            return self.target.read_memory(vp, addr, length).hex().encode()
        except DebugError:
            pass
        out = b""   # part of it is unmapped: gdb takes the readable prefix
        while len(out) < length:
            chunk = min(length - len(out), 0x1000 - ((addr + len(out)) & 0xFFF))
            try:
                out += self.target.read_memory(vp, addr + len(out), chunk)
            except DebugError:
                break
        if not out:
            raise PacketError(EFAULT)
        return out.hex().encode()

    def _write_mem(self, p: bytes) -> bytes:
        where, _, data = p.partition(b":")
        addr, length = self._addr_len(where)
        data = bytes.fromhex(data.decode("ascii"))
        if len(data) != length:
            raise PacketError()
        if data:
            self.target.write_memory(self._vp(self.g_vp), addr, data)
        return b"OK"

    def _write_binary(self, p: bytes) -> bytes:
        where, sep, data = p.partition(b":")
        if not sep:
            raise PacketError()
        addr, length = self._addr_len(where)
        data = rsp.unescape(data)
        if len(data) != length:
            raise PacketError()
        if data:
            self.target.write_memory(self._vp(self.g_vp), addr, data)
        return b"OK"

    # ---- breakpoints and watchpoints -----------------------------------------------------------
    def _z_args(self, p: bytes) -> tuple[int, int, int]:
        fields = p.split(b";", 1)[0].split(b",")
        if len(fields) != 3:
            raise PacketError()
        return _hex(fields[0]), _hex(fields[1]), _hex(fields[2])

    def _insert(self, p: bytes) -> bytes:
        ztype, addr, kind = self._z_args(p)
        if ztype in (0, 1):
            flavours = self.breaks.setdefault(addr, set())
            if not flavours:
                try:
                    self.target.add_breakpoint(addr)
                except DebugError:
                    del self.breaks[addr]
                    raise
            flavours.add("sw" if ztype == 0 else "hw")
            return b"OK"
        if ztype in WATCH_TYPES:
            if kind == 0:
                raise PacketError()
            watch = (addr, kind, WATCH_TYPES[ztype])
            if watch not in self.watches:
                self.target.add_watchpoint(addr, kind, WATCH_TYPES[ztype])
                self.watches.add(watch)
            return b"OK"
        return b""

    def _remove(self, p: bytes) -> bytes:
        ztype, addr, kind = self._z_args(p)
        if ztype in (0, 1):
            flavours = self.breaks.get(addr, set())
            flavours.discard("sw" if ztype == 0 else "hw")
            if not flavours and addr in self.breaks:
                del self.breaks[addr]
                self.target.remove_breakpoint(addr)
            return b"OK"
        if ztype in WATCH_TYPES:
            watch = (addr, kind, WATCH_TYPES[ztype])
            if watch in self.watches:
                self.watches.discard(watch)
                self.target.remove_watchpoint(addr, kind, WATCH_TYPES[ztype])
            return b"OK"
        return b""

    def clear_all(self) -> None:
        """Leave no breakpoint or watchpoint behind when gdb goes (detach, lost connection)."""
        for addr in list(self.breaks):
            self.target.remove_breakpoint(addr)
        for addr, length, kind in list(self.watches):
            self.target.remove_watchpoint(addr, length, kind)
        self.breaks.clear()
        self.watches.clear()

    # ---- running -------------------------------------------------------------------------------
    def stop_reply(self, event) -> bytes:
        if event.reason == "interrupted":
            signal = SIGINT
        elif event.reason == "fault":
            signal = SIGSEGV
        else:
            signal = SIGTRAP
        reply = f"T{signal:02x}thread:{event.vp + 1:x};"
        if event.reason == "watchpoint" and event.watch_kind in WATCH_KEYS:
            reply += f"{WATCH_KEYS[event.watch_kind]}:{event.watch_address or 0:x};"
        elif event.reason == "breakpoint":
            hw = self.breaks.get(event.rip, set()) == {"hw"}
            key = "hwbreak" if hw else "swbreak"
            if key + "+" in self.gdb_features:
                reply += key + ":;"
        return reply.encode()

    def _resume(self, step_vp=None) -> bytes:
        """Run (or step one VP) until something stops the guest; the stop reply, or W/X when
        the simulation is over."""
        before = self.target.last_stop
        if step_vp is not None:
            try:
                event = self.target.step(step_vp)
            except DebugError as exc:   # e.g. a halted VP: say why on gdb's console, then fail
                self.console(f"hclsim: {exc}\n")
                raise
        else:
            with self._lock:
                if self._interrupted:   # Ctrl-C came before we started running
                    self._interrupted = False
                    return self.stop_reply(self._interrupted_event())
                self._running = True
            try:
                event = self.target.cont()
            finally:
                with self._lock:
                    self._running = False
            if event.reason == "idle" and all(self.target.vp_state(i) == EXTERNAL for i in self.target.vp_indexes()):
                self.ended = "exit"   # every VP is the Linux stand-in's: the simulation has nothing left
                return b"W00"
            while event.reason == "idle":
                event = self._wait_idle()
        with self._lock:
            self._interrupted = False
        self.g_vp = None
        if event.reason in ("handoff", "fault", "event", "timeout") and event.detail:
            self.console(f"hclsim: {event.detail}\n")   # the kernel handoff, the fault's summary, ...
        if event.reason == "fault" and before.reason == "fault" and (before.vp, before.rip) == (event.vp, event.rip):
            self.ended = "fault"  # resumed without a fix: the guest dies of it, as a process of its signal
            return b"X%02x" % SIGSEGV
        return self.stop_reply(event)

    def console(self, text: str) -> None:
        """An `O` packet: gdb prints it while it waits for a stop reply."""
        if self.conn is not None:
            self.conn.send(b"O" + text.encode().hex().encode())

    def _wait_idle(self):
        """Every VP is halted with nothing to wake it: like real halted CPUs, stay "running"
        until gdb interrupts (or goes away)."""
        while True:
            item = self.conn.get()
            if item == rsp.INTERRUPTED:
                return self._interrupted_event()
            if item == rsp.CLOSED:
                self.ended = "detach"
                return self._interrupted_event()

    def _interrupted_event(self):
        vp = self.target.current
        return StopEvent("interrupted", vp, self.target.registers(vp)["rip"])

    def _set_pc(self, p: bytes, vp: int) -> None:
        if p:
            self.target.set_register(vp, "rip", _hex(p))

    def _continue(self, p: bytes) -> bytes:
        self._set_pc(p, self._vp(self.c_vp))
        return self._resume()

    def _step(self, p: bytes) -> bytes:
        vp = self._vp(self.c_vp)
        self._set_pc(p, vp)
        return self._resume(step_vp=vp)

    def _continue_signal(self, p: bytes) -> bytes:   # C sig[;addr]: no signals to deliver to a VP
        _hex(p[:2])
        return self._continue(p[3:])

    def _step_signal(self, p: bytes) -> bytes:
        _hex(p[:2])
        return self._step(p[3:])

    def _vcont(self, p: bytes) -> bytes:
        """vCont;action[:tid]...: a step action for a thread wins (only that VP steps)."""
        step, cont = None, False
        for action in p.split(b";")[1:]:
            verb, _, tid = action.partition(b":")
            if verb[:1] in (b"s", b"S"):
                vp = self._vp_of(tid) if tid else None
                if step is None:
                    step = vp if vp is not None else self._vp(self.c_vp)
            elif verb[:1] in (b"c", b"C"):
                cont = True
            else:
                raise PacketError()       # t (stop) is non-stop mode; r (range step) is not offered
        if step is not None:
            return self._resume(step_vp=step)
        if not cont:
            raise PacketError()
        return self._resume()

    def _why(self) -> bytes:
        event = self.target.last_stop
        if event.reason in ("interrupted", "start"):
            return f"T{SIGTRAP:02x}thread:{event.vp + 1:x};".encode()
        return self.stop_reply(event)

    def _detach(self) -> bytes:
        self.clear_all()
        self.ended = "detach"
        return b"OK"

    def _kill(self) -> None:
        self.ended = "kill"
        return None

    # ---- queries -------------------------------------------------------------------------------
    def _query(self, p: bytes) -> bytes:
        name, _, args = p.partition(b":")
        if name == b"Supported":
            self.gdb_features = {f.decode("ascii", "replace") for f in args.split(b";") if f}
            features = [f"PacketSize={PACKET_SIZE:x}", "qXfer:features:read+", "qXfer:threads:read+",
                        "QStartNoAckMode+", "vContSupported+", "swbreak+", "hwbreak+"]
            if len(self.images) > 1:
                features.append("qXfer:libraries:read+")
            return ";".join(features).encode()
        if name == b"Attached":
            return b"1"   # gdb detaches on quit: the simulation is not gdb's to kill
        if name == b"C":
            return b"QC%x" % (self.target.current + 1)
        if name == b"fThreadInfo":
            self.thread_list = [i + 1 for i in self.target.vp_indexes()]
            return self._thread_chunk()
        if name == b"sThreadInfo":
            return self._thread_chunk()
        if name.startswith(b"ThreadExtraInfo,"):
            vp = self._vp_of(name.split(b",", 1)[1], allow_any=False)
            return self.target.vp_label(vp).encode().hex().encode()
        if name == b"Offsets":
            base = self.images[0][1] if self.images else 0
            return b"Text=%x;Data=%x;Bss=%x" % (base, base, base)
        if name == b"Xfer":
            return self._xfer(args)
        if name == b"Symbol":
            return b"OK"
        return b""

    def _thread_chunk(self) -> bytes:
        if not self.thread_list:
            return b"l"
        chunk, self.thread_list = self.thread_list[:THREADS_PER_REPLY], self.thread_list[THREADS_PER_REPLY:]
        return b"m" + b",".join(b"%x" % t for t in chunk)

    def _xfer(self, args: bytes) -> bytes:
        """qXfer:object:read:annex:offset,length -> m/l + escaped data."""
        parts = args.split(b":")
        if len(parts) != 4 or parts[1] != b"read":
            return b""
        obj, annex, window = parts[0], parts[2], parts[3]
        if obj == b"features":
            if annex != b"target.xml":
                raise PacketError(ENOENT)
            data = gdb_regs.target_xml()
        elif obj == b"threads":
            data = self._thread_xml()
        elif obj == b"libraries" and len(self.images) > 1:
            data = self._libraries_xml()
        else:
            return b""
        offset, length = self._addr_len(window)
        piece = data[offset:offset + min(length, PACKET_SIZE // 2)]
        return (b"m" if offset + len(piece) < len(data) else b"l") + rsp.escape(piece)

    def _set(self, p: bytes) -> bytes:
        if p == b"StartNoAckMode":
            return b"OK"   # the server switches after sending this reply (it is still acked)
        return b""

    def _v(self, p: bytes) -> bytes | None:
        if p == b"Cont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"Cont;") or p == b"Cont":
            return self._vcont(p)
        if p.startswith(b"Kill"):
            self.ended = "kill"
            return b"OK"
        return b""   # vMustReplyEmpty, vFile, vRun, ...: not supported
