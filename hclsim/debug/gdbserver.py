"""`hclsim boot --gdb HOST:PORT`: a TCP listener that lets gdb attach to a running simulation.

The guest runs on the thread that calls serve(); an accept thread hands new connections over
and stops the guest (DebugTarget.interrupt) so gdb finds it stopped, as `target remote` expects.
One gdb at a time. Without gdb the guest runs freely: through the kernel handoff, then the
sidecar VPs until they are all idle, and then it waits for gdb. The process ends when gdb
kills the simulation, or after gdb detached and the guest has nothing left to run.
"""
import queue
import socket
import sys
import threading

from hclsim import HclsimError
from hclsim.debug import rsp
from hclsim.debug.gdbstub import GdbStub, interrupt_while

EXIT_OK, EXIT_GUEST_FAULT = 0, 2
# How a gdb session can end the simulation: exit status and what to say.
ENDINGS = {"kill": (EXIT_OK, "simulation killed by gdb"),
           "exit": (EXIT_OK, "the simulation ended: every VP belongs to the Linux stand-in"),
           "fault": (EXIT_GUEST_FAULT, "the simulation ended: gdb resumed the guest from its fault")}


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be empty for all interfaces, or [v6]); HclsimError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise HclsimError(f"bad --gdb address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1234")
    return host.strip("[]") or "0.0.0.0", int(port)


def listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (OSError, OverflowError) as exc:
        raise HclsimError(f"cannot listen for gdb on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None


def _images(target) -> list:
    """(name, runtime base, FirmwareImage) per image, the boot shim first: where gdb finds them
    (the sidecar at the high alias it runs at)."""
    seen = {}
    for alias in target.images.aliases:
        seen.setdefault(alias.name, (alias.name, alias.base, alias.image))
    return list(seen.values())


class GdbServer:
    def __init__(self, target, host: str = "127.0.0.1", port: int = 0, wait: bool = False,
                 log=None, images=None, listener=None):
        self.target = target
        self.wait = wait
        self.log = log or (lambda text: print(f"hclsim: {text}", file=sys.stderr, flush=True))
        self.images = images if images is not None else _images(target)
        self.listener = listener or listen(host, port)
        self.address = self.listener.getsockname()[:2]
        self.pending = queue.Queue()
        self.finished = None            # "idle" or "fault": the free-running guest cannot go on
        self.attached_once = False      # then the process ends when the guest is done
        self._lock = threading.Lock()
        self._running_free = False      # the guest runs with no gdb attached
        self._in_session = False
        self._accepter = threading.Thread(target=self._accept, name="hclsim-gdb-accept", daemon=True)

    # ---- connections ---------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                busy = self._in_session or not self.pending.empty()
                if not busy:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # packets are small
                    self.pending.put(sock)
            if busy:
                self.log(f"refused a second gdb connection from {peer[0]}:{peer[1]}")
                sock.close()
            else:
                interrupt_while(self.target, self._lock, lambda: self._running_free)

    def _next_connection(self, block: bool):
        try:
            return self.pending.get(block=block)
        except queue.Empty:
            return None

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (close alone does not)
        except OSError:
            pass
        self.listener.close()

    # ---- the main loop -------------------------------------------------------------------------
    def serve(self) -> int:
        """Run until gdb kills the simulation, or detached and the guest is done; the exit status."""
        self._accepter.start()
        try:
            while True:
                if self.finished is not None and self.attached_once:
                    return EXIT_GUEST_FAULT if self.finished == "fault" else EXIT_OK
                waiting = self.finished is not None or (self.wait and not self.attached_once)
                sock = self._next_connection(block=waiting)
                if sock is not None:
                    self.attached_once = True
                    ended = self._session(sock)
                    if ended in ENDINGS:
                        outcome = getattr(self.target, "outcome", None)     # --linux real
                        self.log(f"the simulation ended: the real kernel {outcome.status}" if ended == "exit"
                                 and outcome is not None else ENDINGS[ended][1])
                        return ENDINGS[ended][0]
                    self.finished = None   # gdb may have changed what can run
                    continue
                self._run_free()
        finally:
            self.close()

    def _run_free(self) -> None:
        """Run the guest with no gdb attached until it stops for a reason worth acting on."""
        with self._lock:
            if not self.pending.empty():
                return
            self._running_free = True
        try:
            event = self.target.cont()
        finally:
            with self._lock:
                self._running_free = False
        if event.reason == "handoff":
            rest = "the sidecar VPs run on" if self.target.machine.linux.sidecar is not None else "no sidecar VPs to run"
            self.log(f"kernel handoff at {event.rip:#x}; {rest}")
        elif event.reason == "idle":
            self.finished = "idle"
            self.log("every VP is idle" + ("" if self.attached_once or self.pending.qsize() else "; waiting for gdb"))
        elif event.reason in ("fault", "timeout"):
            self.finished = "fault"
            report = getattr(self.target, "last_fault_report", None) or event.detail
            waiting = not (self.attached_once or self.pending.qsize())
            self.log(report + ("\nhclsim: waiting for gdb to inspect the guest" if waiting else ""))

    def _session(self, sock) -> str:
        """Serve one gdb until it detaches, goes away or the simulation ends: GdbStub.ended."""
        with self._lock:
            self._in_session = True
        stub = GdbStub(self.target, None, self.images, self.log)
        conn = rsp.Connection(sock, on_interrupt=stub.on_interrupt)
        stub.conn = conn
        self.log("gdb attached")
        try:
            while stub.ended is None:
                item = conn.get()
                if item == rsp.CLOSED:
                    stub.ended = "detach"
                    break
                if item == rsp.INTERRUPTED:
                    continue   # Ctrl-C while already stopped
                reply = stub.handle(item)
                if reply is not None and not conn.closed:
                    conn.send(reply)
            if stub.ended == "detach":
                stub.clear_all()
                self.log("gdb detached; the simulation continues")
            return stub.ended
        finally:
            conn.close()
            with self._lock:
                self._in_session = False


def serve_boot(config, address: str | None, wait: bool, reports: bool = False, on_serial=None,
               finish=None) -> int:
    """`hclsim boot --gdb`: build the machine, listen, serve; the process exit status.
    finish(machine, target), if given, runs when the session is over (e.g. to write --out)."""
    from hclsim.debug.target import DebugTarget
    from hclsim.machine import Machine

    if not address:
        raise HclsimError("--wait-gdb needs --gdb HOST:PORT")
    if reports:
        raise HclsimError("--gdb runs an interactive session: it writes no report (drop --out/--json)")
    listener = listen(*parse_address(address))   # a bad address fails before the machine is built
    machine = target = None
    try:
        machine = Machine(config, on_serial=on_serial)
        if config.linux == "real":                 # the shim, then the real kernel it hands over to
            from hclsim.debug.kernel_target import RealLinuxTarget
            target = RealLinuxTarget(machine)
        else:
            target = DebugTarget(machine)
        server = GdbServer(target, wait=wait, listener=listener)
        host, port = server.address
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        server.log(f"gdb stub listening on {shown}"
                   + (" (waiting for gdb at the shim's first instruction)" if wait else "")
                   + f"; attach with: gdb -ex 'file {machine.shim_path}' -ex 'target remote {shown}'")
        status = server.serve()
        if finish is not None:
            finish(machine, target)
        return status
    finally:
        listener.close()
        if target is not None:
            target.close()
        if machine is not None:
            machine.close()
