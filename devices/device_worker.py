"""Chipset devices in their own process (workers/chipset_device_worker in OpenVMM; section 6 of
shared/design/openhcl-userspace.md), both ends, over one SOCK_SEQPACKET socket carrying
devices/device_worker.proto messages.

DeviceServer (in the device worker) sends DeviceInit (the device's static regions), then
answers each request: accesses with the id they came with, Stop/Reset/Save/Restore as RPCs.
After every write it completed, it hands the device's saved state to commit() (the worker
keeps it in its state folder), so a restarted worker goes on from the last committed state.

ProxyDevice (on the VM worker's bus) declares the regions DeviceInit named and answers every
access with a Deferred, completed when the reply with its id arrives: the thread waiting for a
reply reads it (whichever access it completes), so no thread switch sits in the round trip, and
a watcher thread only looks for the worker hanging up. A worker that goes away
(its socket closes: crashed, killed) or that does not answer within HANG_S fails every pending
access (a read floats high, as with no device) and is restarted: relaunch() gives a new socket
to a new worker, which restores the committed state; then accesses go on.
"""
import json
import os
import select
import socket
import threading
import time

from hclsim.defs.platform import Region
from hclsim.devices import device_worker_pb2 as pb
from hclsim.devices.bus import Deferred, IoError
from hclsim.devices.device_clients import GuestMemoryError, ProxiedGuestMemory, ProxiedStore, StoreError  # noqa: F401

MAX_PACKET = 1 << 20
PROTOCOL_VERSION = 1
HANG_S = 2.0                   # an access unanswered this long: the worker is hung
# A blocking wake-up across processes costs ~48 us each way on a 2-core VM (a SOCK_SEQPACKET
# ping-pong: 95 us), so both ends poll for the other's next message before they sleep, with a
# sched_yield between polls: in a whole VM the kernel's doorbell spins too, and plain spinning
# by a third thread on 2 cores doubled an exit (118 -> 208 us a loop write at 60 us, 426 us at
# 200 us); yielding, the worker's 60 us cost the whole VM nothing measurable and halved the
# bare round trip (61 -> 32 us).
SPIN_S = 30e-6
WORKER_SPIN_S = 60e-6
RESTART_WAIT_S = 10.0          # an access while the worker restarts waits this long for it


class WorkerGone(Exception):
    pass


def _send(sock, msg) -> None:
    try:
        sock.send(msg.SerializeToString())
    except OSError as exc:
        raise WorkerGone(f"the device worker is gone ({exc.strerror})") from None


def _regions(regions) -> list:
    return [pb.Region(name=r.name, start=r.start, end_inclusive=r.end - 1) for r in regions]


def _recv_spinning(sock, spin: float) -> bytes:
    """The next message: polled for spin seconds (no system call sleep), then waited for."""
    end = time.perf_counter() + spin
    while True:
        try:
            return sock.recv(MAX_PACKET, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.perf_counter() >= end:
                return sock.recv(MAX_PACKET)
            os.sched_yield()                    # a spinner that lets the others run


def state_bytes(device) -> bytes:
    """The device's saved state (devices/saved_state.py's blob) as bytes, for the wire and files."""
    return json.dumps(device.saved_state.encode(device.save()), sort_keys=True).encode()


def restore_bytes(device, blob: bytes | None) -> None:
    """Restore from state_bytes' bytes; None: as at power on (every field at its default)."""
    state = json.loads(blob) if blob is not None else {"package": device.saved_state.package}
    device.restore(device.saved_state.decode(state))


# ---- the worker's side ------------------------------------------------------------------------
class DeviceServer:
    """Serves one device object (devices/bus.py's duck type) on sock."""

    def __init__(self, device, sock: socket.socket, commit=None, restored: bool = False,
                 spin: float = WORKER_SPIN_S):
        self.device, self.sock, self.commit, self.restored = device, sock, commit, restored
        self.spin = spin
        self.started = False
        self._backlog: list[pb.DeviceRequest] = []     # requests that came while waiting for memory
        self._asked = 0
        if getattr(device, "uses_guest_memory", False) and getattr(device, "guest_memory", None) is None:
            device.guest_memory = ProxiedGuestMemory(self)      # not mapped for it: ask the proxy
        for attribute, file_id in getattr(device, "nonvolatile_stores", {}).items():
            if getattr(device, attribute, None) is None:
                setattr(device, attribute, ProxiedStore(self, file_id))

    def ask(self, kind: str, make):
        """A request of the worker's to the proxy (kind "memory" or "store"; make(id) builds it),
        and the proxy's answer: requests that come meanwhile wait in the backlog."""
        req_id, self._asked = self._asked + 1, self._asked + 1
        _send(self.sock, pb.DeviceResponse(**{kind: make(req_id)}))
        while True:
            data = _recv_spinning(self.sock, self.spin)
            if not data:
                raise (GuestMemoryError if kind == "memory" else StoreError)("the proxy hung up")
            req = pb.DeviceRequest()
            try:
                req.ParseFromString(data)
            except Exception:
                continue
            if req.WhichOneof("request") == kind and getattr(req, kind).id == req_id:
                return getattr(req, kind)
            self._backlog.append(req)

    def init_message(self, error: str = "") -> pb.DeviceInit:
        d = self.device
        return pb.DeviceInit(mmio=_regions(getattr(d, "mmio_regions", ())), pio=_regions(getattr(d, "pio_regions", ())),
                             error=error, restored=self.restored, version=PROTOCOL_VERSION)

    def serve(self) -> str | None:
        """Until the proxy hangs up (None), or the device says it cannot go on (its fatal
        reason, after the reply to the access that found it out: the worker then ends, and its
        proxy restarts it from its committed state)."""
        _send(self.sock, self.init_message())
        while True:
            if self._backlog:
                req = self._backlog.pop(0)
            else:
                try:
                    data = _recv_spinning(self.sock, self.spin)
                except OSError:
                    return
                if not data:
                    return
                req = pb.DeviceRequest()
                try:
                    req.ParseFromString(data)
                except Exception:               # DecodeError: a proxy speaking nonsense
                    continue
            reply = self.handle(req)
            if reply is not None:
                _send(self.sock, reply)
            fatal = getattr(self.device, "fatal", None)
            if fatal:
                return fatal

    def _saved(self) -> bytes:
        return state_bytes(self.device)

    def _pci(self, kind: str, r) -> pb.DeviceResponse:
        """Configuration space: a 4-byte register at offset, byte_enable naming the bytes."""
        fn = getattr(self.device, kind, None)
        try:
            if fn is None:
                result = IoError("not a PCI device")
            elif kind == "pci_config_read":
                result = fn(r.offset, r.byte_enable)
            else:
                result = fn(r.offset, r.value, r.byte_enable)
        except Exception as exc:
            result = IoError(f"{type(exc).__name__}: {exc}")
        if kind == "pci_config_read":
            if isinstance(result, IoError):
                return pb.DeviceResponse(read=pb.ReadResponse(id=r.id, error=result.message))
            return pb.DeviceResponse(read=pb.ReadResponse(id=r.id, data=(int(result) & 0xFFFFFFFF).to_bytes(4, "little")))
        if isinstance(result, IoError):
            return pb.DeviceResponse(write=pb.WriteResponse(id=r.id, error=result.message))
        if self.commit is not None:
            self.commit(self._saved())
        return pb.DeviceResponse(write=pb.WriteResponse(id=r.id))

    def handle(self, req: pb.DeviceRequest) -> pb.DeviceResponse | None:
        kind = req.WhichOneof("request")
        d = self.device
        if kind in ("mmio_read", "pio_read"):
            r = getattr(req, kind)
            fn = d.mmio_read if kind == "mmio_read" else d.pio_read
            try:
                result = fn(r.address, r.size)
            except GuestMemoryError as exc:
                result = IoError(f"guest memory: {exc}")
            except Exception as exc:            # a device bug is the access's error, not the worker's end
                result = IoError(f"{type(exc).__name__}: {exc}")
            if isinstance(result, Deferred):
                result = result.wait()
            if isinstance(result, IoError):
                return pb.DeviceResponse(read=pb.ReadResponse(id=r.id, error=result.message or "I/O error"))
            return pb.DeviceResponse(read=pb.ReadResponse(id=r.id, data=(int(result) & ((1 << (8 * r.size)) - 1))
                                                          .to_bytes(r.size, "little")))
        if kind in ("mmio_write", "pio_write"):
            w = getattr(req, kind)
            fn = d.mmio_write if kind == "mmio_write" else d.pio_write
            try:
                result = fn(w.address, len(w.data), int.from_bytes(w.data, "little"))
            except GuestMemoryError as exc:
                result = IoError(f"guest memory: {exc}")
            except Exception as exc:
                result = IoError(f"{type(exc).__name__}: {exc}")
            if isinstance(result, Deferred):
                result = result.wait()
            if isinstance(result, IoError):
                return pb.DeviceResponse(write=pb.WriteResponse(id=w.id, error=result.message or "I/O error"))
            if self.commit is not None:
                self.commit(self._saved())       # committed before the guest sees the write done
            return pb.DeviceResponse(write=pb.WriteResponse(id=w.id))
        if kind in ("pci_config_read", "pci_config_write"):
            return self._pci(kind, getattr(req, kind))
        if kind == "start":
            self.started = True
            return None
        rpc_id = getattr(req, kind).id
        try:
            if kind == "stop":
                self.started = False
                return pb.DeviceResponse(rpc=pb.RpcResponse(id=rpc_id))
            if kind == "reset":
                restore_bytes(d, None)                          # as at power on
                if self.commit is not None:
                    self.commit(self._saved())
                return pb.DeviceResponse(rpc=pb.RpcResponse(id=rpc_id))
            if kind == "save":
                return pb.DeviceResponse(rpc=pb.RpcResponse(id=rpc_id, state=self._saved()))
            if kind == "restore":
                restore_bytes(d, req.restore.state)
                if self.commit is not None:
                    self.commit(self._saved())
                return pb.DeviceResponse(rpc=pb.RpcResponse(id=rpc_id))
        except Exception as exc:
            return pb.DeviceResponse(rpc=pb.RpcResponse(id=rpc_id, error=f"{type(exc).__name__}: {exc}"))
        return pb.DeviceResponse(rpc=pb.RpcResponse(id=rpc_id, error=f"unknown request {kind}"))


# ---- the VM worker's side ---------------------------------------------------------------------
class ProxyDevice:
    """A device on the bus whose accesses go to its worker. relaunch() -> a new socket (a new
    worker, restored from its committed state); log(text) says what happened."""

    def __init__(self, name: str, sock: socket.socket, relaunch, log=lambda text: None, spin: float = SPIN_S,
                 guest_memory=None, stores=None):
        """guest_memory: read(gpa, n) -> bytes, write(gpa, data), for the worker's
        GuestMemoryRequests (None: each is answered with an error); stores: restore(file_id)
        -> bytes or None, persist(file_id, data), for its StoreRequests (the files of the VM's
        VMGS this device may use; None: each is an error)."""
        self.name, self.relaunch, self.log = name, relaunch, log
        self.spin = spin
        self.guest_memory = guest_memory
        self.stores = stores
        self.store_requests = 0
        self.memory_requests = 0
        self.restarts = 0
        self.failed_accesses = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._pending: dict[int, Deferred] = {}   # access id -> its completion
        self._next = 1
        self._rpcs: dict[int, list] = {}
        self._up = threading.Event()           # set while a worker serves us
        self._read_lock = threading.Lock()      # the waiter reading replies now
        self._connect(sock)

    # ---- the connection -----------------------------------------------------------------
    def _connect(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        raw = sock.recv(MAX_PACKET)
        sock.settimeout(None)
        if not raw:
            raise WorkerGone(f"device worker {self.name} closed before DeviceInit")
        init = pb.DeviceInit.FromString(raw)
        if init.version != PROTOCOL_VERSION:
            raise WorkerGone(f"device worker {self.name} speaks protocol {init.version}, not {PROTOCOL_VERSION}")
        if init.error:
            raise WorkerGone(f"device worker {self.name} refused the device: {init.error}")
        regions = {"mmio": tuple(Region(r.name, r.start, r.end_inclusive - r.start + 1) for r in init.mmio),
                   "pio": tuple(Region(r.name, r.start, r.end_inclusive - r.start + 1) for r in init.pio)}
        if hasattr(self, "mmio_regions") and (regions["mmio"], regions["pio"]) != (self.mmio_regions,
                                                                                   self.pio_regions):
            raise WorkerGone(f"device worker {self.name} came back with other regions")
        self.mmio_regions, self.pio_regions = regions["mmio"], regions["pio"]
        self.sock = sock
        self.restored = init.restored
        self._up.set()
        self._watcher = threading.Thread(target=self._watch, args=(sock,), name=f"proxy-{self.name}", daemon=True)
        self._watcher.start()
        _send(sock, pb.DeviceRequest(start=pb.Rpc()))

    def _watch(self, sock) -> None:
        """Notice a worker that goes away while nothing waits on it (POLLHUP only: replies are
        read by the threads waiting for them, without a thread switch in between)."""
        p = select.poll()
        p.register(sock, select.POLLRDHUP | select.POLLHUP)
        while self.sock is sock:
            try:
                events = p.poll(500)
            except (OSError, ValueError):
                return
            if any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL) for _fd, ev in events):
                self._lost(sock, "its socket closed (the worker exited or was killed)")
                return

    def _await(self, done: threading.Event, sock, timeout: float) -> bool:
        """Wait for done, reading replies meanwhile (whoever waits reads, one thread at a time,
        completing any access whose reply it reads). False when timeout passed first."""
        deadline = time.perf_counter() + timeout
        while not done.is_set():
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            if self._read_lock.acquire(blocking=False):
                try:
                    if not done.is_set():
                        self._read_one(sock, min(left, 0.05))
                finally:
                    self._read_lock.release()
            else:
                done.wait(min(left, 0.005))
        return True

    def _read_one(self, sock, timeout: float) -> None:
        end = time.perf_counter() + self.spin
        data = None
        while data is None:
            try:
                data = sock.recv(MAX_PACKET, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= end:
                    r, _w, _x = select.select([sock], [], [], timeout)
                    if not r:
                        return
                    end = time.perf_counter() + self.spin
                else:
                    os.sched_yield()
            except OSError:
                data = b""
        if not data:
            self._lost(sock, "its socket closed (the worker exited or was killed)")
            return
        self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        """Complete the access or RPC a reply names."""
        resp = pb.DeviceResponse()
        try:
            resp.ParseFromString(data)
        except Exception:                       # DecodeError: a worker speaking nonsense
            return
        kind = resp.WhichOneof("response")
        if kind is None:
            return
        body = getattr(resp, kind)
        if kind == "memory":
            self._serve_memory(body)
            return
        if kind == "store":
            self._serve_store(body)
            return
        if kind == "rpc":
            with self._lock:
                slot = self._rpcs.pop(body.id, None)
            if slot is not None:
                slot.append(body)
                slot[0].set()
            return
        with self._lock:
            done = self._pending.pop(body.id, None)
        if done is None:
            return
        if body.error:
            done.fail(body.error)
        elif kind == "read":
            done.complete(int.from_bytes(body.data, "little"))
        else:
            done.complete(0)

    def _serve_memory(self, req: pb.GuestMemoryRequest) -> None:
        """A worker's guest-memory access, answered from the VM's RAM."""
        self.memory_requests += 1
        reply = pb.GuestMemoryResponse(id=req.id)
        mem = self.guest_memory
        op = req.WhichOneof("op")
        try:
            if mem is None:
                raise ValueError("this VM gives the worker no guest memory")
            if op == "read":
                if req.read.length > MAX_PACKET // 2:
                    raise ValueError(f"a {req.read.length}-byte read is over the {MAX_PACKET // 2}-byte limit")
                reply.data = bytes(mem.read(req.read.address, req.read.length))
            elif op == "write":
                mem.write(req.write.address, req.write.data)
            elif op == "fill":
                mem.write(req.fill.address, bytes([req.fill.value & 0xFF]) * req.fill.length)
            else:
                raise ValueError("an empty guest memory request")
        except (ValueError, IndexError, OSError) as exc:
            reply.error = str(exc) or type(exc).__name__
        self._answer(memory=reply)

    def _answer(self, **reply) -> None:
        """A reply to a request of the worker's (the worker may be gone by now)."""
        sock = self.sock
        if sock is not None:
            try:
                _send(sock, pb.DeviceRequest(**reply))
            except WorkerGone:
                pass

    def _serve_store(self, req: pb.StoreRequest) -> None:
        """A worker's store access, answered from the VM's VMGS (only its own files)."""
        self.store_requests += 1
        reply = pb.StoreResponse(id=req.id)
        try:
            if self.stores is None:
                raise ValueError("this VM keeps no non-volatile store for the device")
            op = req.WhichOneof("op")
            if op == "restore":
                data = self.stores.restore(req.file_id)
                reply.present = data is not None
                reply.data = data or b""
            elif op == "persist":
                self.stores.persist(req.file_id, req.persist)
            else:
                raise ValueError("an empty store request")
        except Exception as exc:             # VmgsError, a file not the device's, the disk failing
            reply.error = str(exc) or type(exc).__name__
        self._answer(store=reply)

    def _lost(self, sock, why: str) -> None:
        """Fail what is pending on sock's worker, and bring a new worker up."""
        with self._lock:
            if sock is not self.sock or getattr(self, "_closing", False):
                return                       # an older worker's reader, or we hung up ourselves
            pending, self._pending = self._pending, {}
            rpcs, self._rpcs = self._rpcs, {}
            self.sock = None
            self._up.clear()
        for done in pending.values():
            self.failed_accesses += 1
            done.fail(f"device worker {self.name} lost: {why}")
        for slot in rpcs.values():
            slot[0].set()
        try:
            sock.close()
        except OSError:
            pass
        self.log(f"device worker {self.name}: {why}; restarting it from its last saved state")
        try:
            new = self.relaunch()
            self._connect(new)
        except Exception as exc:
            self.log(f"device worker {self.name}: restart failed: {exc}")
            return
        self.restarts += 1
        self.log(f"device worker {self.name}: restarted ({'restored' if self.restored else 'fresh'} state)")

    # ---- accesses ---------------------------------------------------------------------------
    def _access(self, kind: str, address: int, size: int, value: int | None, byte_enable: int = 0xF):
        done = Deferred()
        if not self._up.wait(RESTART_WAIT_S):       # a restart under way: the access waits for it
            self.failed_accesses += 1
            return IoError(f"device worker {self.name} did not come back")
        with self._lock:
            sock = self.sock
            if sock is None:
                self.failed_accesses += 1
                return IoError(f"device worker {self.name} is restarting")
            req_id, self._next = self._next, self._next + 1
            self._pending[req_id] = done
            self.requests += 1
        if kind == "pci_config_read":
            msg = pb.DeviceRequest(pci_config_read=pb.PciConfigRead(id=req_id, offset=address, byte_enable=byte_enable))
        elif kind == "pci_config_write":
            msg = pb.DeviceRequest(pci_config_write=pb.PciConfigWrite(id=req_id, offset=address, value=value,
                                                                      byte_enable=byte_enable))
        elif value is None:
            msg = pb.DeviceRequest(**{kind: pb.ReadRequest(id=req_id, address=address, size=size)})
        else:
            msg = pb.DeviceRequest(**{kind: pb.WriteRequest(id=req_id, address=address,
                                                           data=value.to_bytes(size, "little"))})
        try:
            _send(sock, msg)
        except WorkerGone:
            pass                              # its reader sees the close and fails this access
        return _HangWatch(done, self, sock)

    def pio_read(self, port: int, size: int):
        return self._access("pio_read", port, size, None)

    def pio_write(self, port: int, size: int, value: int):
        return self._access("pio_write", port, size, value)

    def mmio_read(self, gpa: int, size: int):
        return self._access("mmio_read", gpa, size, None)

    def mmio_write(self, gpa: int, size: int, value: int):
        return self._access("mmio_write", gpa, size, value)

    def pci_config_read(self, offset: int, byte_enable: int = 0xF):
        """A 4-byte configuration register (PciConfigRead); a Deferred of its value."""
        return self._access("pci_config_read", offset, 4, None, byte_enable)

    def pci_config_write(self, offset: int, value: int, byte_enable: int = 0xF):
        return self._access("pci_config_write", offset, 4, value & 0xFFFFFFFF, byte_enable)

    # ---- RPCs ---------------------------------------------------------------------------------
    def rpc(self, kind: str, state: bytes = b"", timeout: float = 10.0) -> pb.RpcResponse:
        slot = [threading.Event()]
        with self._lock:
            sock = self.sock
            if sock is None:
                raise WorkerGone(f"device worker {self.name} is restarting")
            rpc_id, self._next = self._next, self._next + 1
            self._rpcs[rpc_id] = slot
        msg = pb.DeviceRequest(restore=pb.RestoreRequest(id=rpc_id, state=state)) if kind == "restore" else \
            pb.DeviceRequest(**{kind: pb.Rpc(id=rpc_id)})
        _send(sock, msg)
        if not self._await(slot[0], sock, timeout) or len(slot) < 2:
            raise WorkerGone(f"device worker {self.name} did not answer {kind}")
        if slot[1].error:
            raise WorkerGone(f"device worker {self.name}: {kind} failed: {slot[1].error}")
        return slot[1]

    def close(self) -> None:
        with self._lock:
            sock, self.sock = self.sock, None
            self._closing = True
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class _HangWatch(Deferred):
    """The bus's wait on a proxied access, with the hang limit: past HANG_S the worker is taken
    for hung, killed by closing its socket (its host then exits), and restarted."""

    def __init__(self, done: Deferred, proxy: ProxyDevice, sock):
        self.inner, self.proxy, self.sock = done, proxy, sock

    @property
    def done(self) -> bool:
        return self.inner.done

    def wait(self, timeout: float = HANG_S):
        if not self.proxy._await(self.inner._done, self.sock, min(timeout, HANG_S)):
            self.proxy._lost(self.sock, f"no answer within {HANG_S:g} s (hung)")
            return self.inner.wait(1.0)
        return self.inner.wait(0)
