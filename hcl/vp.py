"""The VM worker's VP loop (underhill_core/src/vp.rs; shared/design/openhcl-userspace.md section 3):
a thread per CPU. A VP on a Linux CPU runs through RUN_VP (MSHV_VTL_RETURN_TO_LOWER_VTL) with
its run page and register page mapped; a VP on a sidecar CPU runs remotely through its node's
sidecar device until its first handled exit, then its CPU is onlined (write 1 to
/sys/devices/system/cpu/cpuN/online, one CPU at a time) and the VP goes on there with its state,
unless OPENHCL_NO_SIDECAR_HOTPLUG is set.

Intercepts are completed with the devices on the worker's bus: I/O ports and MMIO through the
bus, CPUID with the hypervisor's default results, MSR reads with the VP's synthetic register.
"""
import errno
import os
import struct
import threading
import time
from dataclasses import dataclass, field

from hclsim.defs import futex, kabi
from hclsim.hcl import linux
from hclsim.defs.hvdef import (HV_INTERCEPT_ACCESS_WRITE, MSR_REGISTERS, HvCall, HvMessageType, HvRegister,
                               HvStatus, parse_intercept)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CONTEXT = struct.Struct("<16Q")       # the run page context's GPRs
_GPRS = kabi.RUN_CONTEXT_GPRS
MSR_REGISTER = {msr: reg for reg, msr in MSR_REGISTERS.items()}
VMBUS_HYPERCALLS = (HvCall.PostMessage, HvCall.SignalEvent)
CURRENT = threading.local()            # the VP whose intercept a device is completing (console per VP)
ONLINE_LOCK = threading.Lock()         # CPUs come online one at a time (the real ONLINE_LOCK)
SPIN_S = 0.0002      # a VP thread spins (no system call) this long for RUN_VP's answer before sleeping...
SPIN_MAX_BUSY = 2    # ...while at most this many VP threads run (2 host cores)
SIDECAR_REGISTERS_HEADER = struct.Struct("<HBBH10x")
_DOORBELL, _ACK, _ERRNO, _CLOSED = (off // 4 for off in (kabi.RUN_DOORBELL, kabi.RUN_DOORBELL_ACK,
                                                        kabi.RUN_DOORBELL_ERRNO, kabi.RUN_DOORBELL_CLOSED))
_KICK = kabi.DOORBELL_KICK // 4


class VpError(Exception):
    pass


@dataclass
class VpStats:
    exits: int = 0
    remote_exits: int = 0                # exits handled while the VP ran on its sidecar CPU
    moved_ms: float | None = None        # how long the move to a Linux CPU took
    exit_kinds: dict = field(default_factory=dict)


class Doorbell:
    """RUN_VP through the run page's doorbell (defs/kabi.py RUN_DOORBELL): write the next request
    number, bump the kick counter and wake the kernel's dispatcher, sleep on the answer word until
    it has answered that request.

    The shared words go through memoryviews of 32-bit items: each access is one load or store.
    struct.pack_into clears a field before writing its bytes, so the kernel, which spins on
    the doorbell word, saw a request 0 between two real ones (and ran a VP on stale registers)."""

    def __init__(self, run, kick, loop):
        self.loop = loop
        self.words, self.kick = memoryview(run).cast("I"), memoryview(kick).cast("I")
        self.kick_addr = futex.address(kick, kabi.DOORBELL_KICK)
        self.ack_addr = futex.address(run, kabi.RUN_DOORBELL_ACK)
        self.request = self.words[_DOORBELL]

    def close(self) -> None:
        self.words.release()
        self.kick.release()

    def run(self) -> None:
        words = self.words
        self.request = request = (self.request + 1) & 0xFFFFFFFF
        words[_DOORBELL] = request
        with self.loop.kick_lock:          # one writer of the kick counter: this process
            self.kick[_KICK] = (self.kick[_KICK] + 1) & 0xFFFFFFFF
        futex.wake(self.kick_addr)
        if self.loop.busy <= SPIN_MAX_BUSY:     # few VPs: the answer comes within ~100 us
            end = time.perf_counter() + SPIN_S
            while words[_ACK] != request and time.perf_counter() < end:
                pass
        while (ack := words[_ACK]) != request:
            if words[_CLOSED]:
                raise OSError(errno.EPIPE, "the kernel has gone away")
            futex.wait(self.ack_addr, ack, 0.5)
        err = words[_ERRNO]
        if err:
            raise OSError(err, os.strerror(err))


class VpLoop:
    def __init__(self, vtl, sidecars: list, bus, log, no_sidecar_hotplug: bool = False):
        """vtl: the mshv_vtl File; sidecars: [(File, base_cpu, cpu_count, shmem mmap)]."""
        self.vtl, self.sidecars, self.bus, self.log = vtl, sidecars, bus, log
        self.no_hotplug = no_sidecar_hotplug
        self.stopping = threading.Event()
        self.stats: dict[int, VpStats] = {}
        self._run_pages: dict[int, object] = {}
        self._lock = threading.Lock()
        self._bus_lock = threading.Lock()      # the devices are not thread-safe; a VP at a time
        self.busy = 0                           # VP threads running now
        self._remote: dict = {}                 # cpu -> sidecar device, while the VP runs there
        self.kick_lock = threading.Lock()
        self._kick = None
        self.running = threading.Event()       # cleared while the VM is paused (diag Pause)
        self.running.set()
        self._forced: set[int] = set()          # sidecar VPs told to leave their CPU (inspect)
        self._on_sidecar: set[int] = set()      # VPs running on their sidecar CPU

    @property
    def paused(self) -> bool:
        return not self.running.is_set()

    def where(self, cpu: int) -> str:
        with self._lock:
            if cpu in self._on_sidecar:
                return "sidecar"
            if cpu in self._run_pages:
                return "linux"
        return "stopped" if self.stopping.is_set() else "idle"

    def pause(self) -> None:
        """Every VP stops between exits until resume() (runs cancelled as stop() does)."""
        self.running.clear()
        self._cancel_runs()

    def resume(self) -> None:
        self.running.set()

    def force_exit_sidecar(self, cpu: int, on: bool) -> bool:
        """Take a VP off its sidecar CPU now (its CPU is onlined, the VP goes on there)."""
        if not on:
            return False
        with self._lock:
            if cpu not in self._on_sidecar:
                raise ValueError(f"vp {cpu} is not running on a sidecar CPU")
            self._forced.add(cpu)
            dev = self._remote.get(cpu)
        if dev is not None:                      # running now: stop its command
            try:
                dev.ioctl(kabi.MSHV_SIDECAR_STOP, _U32.pack(cpu))
            except OSError:
                pass
        return True

    def _take_forced(self, cpu: int) -> bool:
        with self._lock:
            forced = cpu in self._forced
            self._forced.discard(cpu)
            return forced

    def kick_page(self):
        with self._lock:
            if self._kick is None:
                self._kick = self.vtl.mmap(kabi.MMAP_DOORBELL_PAGE * kabi.PAGE_SIZE, kabi.PAGE_SIZE)
            return self._kick

    # ---- the thread of one VP ---------------------------------------------------------
    def run(self, cpu: int, online: bool) -> None:
        with self._lock:
            self.busy += 1
        try:
            self._run(cpu, online)
        finally:
            with self._lock:
                self.busy -= 1

    def _run(self, cpu: int, online: bool) -> None:
        stats = self.stats.setdefault(cpu, VpStats())
        if not online:
            node = self._node_of(cpu)
            if node is None:
                raise VpError(f"cpu {cpu} is offline")
            with self._lock:
                self._on_sidecar.add(cpu)
            try:
                moving = self._run_remote(cpu, node, stats)
            finally:
                with self._lock:
                    self._on_sidecar.discard(cpu)
            if not moving:
                return
            if self.stopping.is_set():
                return
            t0 = time.perf_counter()
            with ONLINE_LOCK:
                linux.write_file(f"/sys/devices/system/cpu/cpu{cpu}/online", "1")
            stats.moved_ms = (time.perf_counter() - t0) * 1e3
        self._run_linux(cpu, stats)

    def _node_of(self, cpu: int):
        for node in self.sidecars:
            if node[1] <= cpu < node[1] + node[2]:
                return node
        return None

    def stop(self) -> None:
        """Cancel every run (the cancel word of each run page; the kernel checks it)."""
        self.stopping.set()
        self.running.set()
        self._cancel_runs()

    def _cancel_runs(self) -> None:
        with self._lock:
            pages = list(self._run_pages.values())
            remote = list(self._remote.items())
        for cpu, dev in remote:           # a VP running on its sidecar CPU: STOP its command
            try:
                dev.ioctl(kabi.MSHV_SIDECAR_STOP, _U32.pack(cpu))
            except OSError:
                pass
        for run in pages:
            try:
                run[kabi.RUN_CANCEL:kabi.RUN_CANCEL + 4] = _U32.pack(1)
                futex.wake(futex.address(run, kabi.RUN_CANCEL))     # a halted VP sleeps on it
            except (ValueError, BufferError):       # unmapped already
                pass

    # ---- a VP on a Linux CPU ----------------------------------------------------------
    def _run_linux(self, cpu: int, stats: VpStats) -> None:
        vtl = self.vtl
        run = vtl.mmap((kabi.MMAP_RUN_PAGE | cpu) * kabi.PAGE_SIZE, kabi.PAGE_SIZE)
        reg = vtl.mmap((kabi.MMAP_REGISTER_PAGE | cpu) * kabi.PAGE_SIZE, kabi.PAGE_SIZE)
        with self._lock:
            self._run_pages[cpu] = run
        arg = _U32.pack(cpu)
        ctx = kabi.RUN_CONTEXT
        vtl.ioctl(kabi.MSHV_HCLSIM_DOORBELL, arg)
        bell = Doorbell(run, self.kick_page(), self)
        try:
            while not self.stopping.is_set():
                self.running.wait()
                run[kabi.RUN_CANCEL:kabi.RUN_CANCEL + 4] = b"\0\0\0\0"
                if self.stopping.is_set():
                    return
                try:
                    bell.run()
                except InterruptedError:
                    continue
                msg = parse_intercept(run[kabi.RUN_EXIT_MESSAGE:kabi.RUN_EXIT_MESSAGE + 256])
                regs = dict(zip(_GPRS, _CONTEXT.unpack_from(run, ctx)))
                with self._bus_lock:
                    updates = self.complete(cpu, msg, regs)
                for name, value in updates.items():
                    _U64.pack_into(run, ctx + 8 * _GPRS.index(name), value & 0xFFFFFFFFFFFFFFFF)
                _U64.pack_into(reg, kabi.REGPAGE_RIP, msg["rip"] + msg["instruction_length"])
                dirty = _U32.unpack_from(reg, kabi.REGPAGE_DIRTY)[0] | kabi.DIRTY_IP
                _U32.pack_into(reg, kabi.REGPAGE_DIRTY, dirty)
                stats.exits += 1
        finally:
            bell.close()
            with self._lock:
                self._run_pages.pop(cpu, None)

    # ---- a VP on a sidecar CPU --------------------------------------------------------
    def _run_remote(self, cpu: int, node, stats: VpStats) -> bool:
        """Run cpu's VTL0 through the sidecar until its first handled exit (True: move it to a
        Linux CPU now) or until stopped (False)."""
        dev, base, _count, shmem = node
        page = (cpu - base) * kabi.SIDECAR_SHMEM_PAGES_PER_VP * kabi.PAGE_SIZE
        ctx = page + kabi.SIDECAR_CMD_CPU_CONTEXT
        start = self.get_registers(cpu, [HvRegister.Rax + i for i in range(16)])
        by_name = dict(zip(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
                            "r12", "r13", "r14", "r15"), start))
        for i, name in enumerate(_GPRS):
            _U64.pack_into(shmem, ctx + 8 * i, by_name.get(name, 0))
        arg = _U32.pack(cpu)
        while not self.stopping.is_set():
            _U32.pack_into(shmem, page + kabi.SIDECAR_CMD_COMMAND, kabi.SIDECAR_COMMAND_RUN_VP)
            with self._lock:
                self._remote[cpu] = dev
            try:
                if self.stopping.is_set():
                    return False
                self._sidecar_run(dev, arg, shmem, page, cpu)
            finally:
                with self._lock:
                    self._remote.pop(cpu, None)
            if not shmem[page + kabi.SIDECAR_CMD_REQUEST_DATA]:
                if self._take_forced(cpu):
                    return True                            # inspect asked: onto a Linux CPU now
                if self.paused and not self.stopping.is_set():
                    self.running.wait()
                    continue                               # paused: goes on where it stopped
                return False                               # stopped without an intercept
            off = page + kabi.SIDECAR_CMD_INTERCEPT_MESSAGE
            msg = parse_intercept(shmem[off:off + 256])
            regs = {n: _U64.unpack_from(shmem, ctx + 8 * i)[0] for i, n in enumerate(_GPRS)}
            with self._bus_lock:
                updates = self.complete(cpu, msg, regs)
            for name, value in updates.items():
                _U64.pack_into(shmem, ctx + 8 * _GPRS.index(name), value & 0xFFFFFFFFFFFFFFFF)
            req = page + kabi.SIDECAR_CMD_REQUEST_DATA
            body = SIDECAR_REGISTERS_HEADER.pack(1, 0, 0, 0) + kabi.REGISTER_ASSOC.pack(
                HvRegister.Rip, msg["rip"] + msg["instruction_length"], 0)
            shmem[req:req + len(body)] = body
            _U32.pack_into(shmem, page + kabi.SIDECAR_CMD_COMMAND, kabi.SIDECAR_COMMAND_SET_VP_REGISTERS)
            self._sidecar_run(dev, arg, shmem, page, cpu)
            stats.exits += 1
            stats.remote_exits += 1
            if not self.no_hotplug or self._take_forced(cpu):
                return True
        return False

    @staticmethod
    def _sidecar_run(dev, arg, shmem, page, cpu) -> None:
        dev.ioctl(kabi.MSHV_SIDECAR_RUN, arg)
        if shmem[page + kabi.SIDECAR_CMD_HAS_ERROR]:
            err = page + kabi.SIDECAR_CMD_ERROR
            text = bytes(shmem[err + 1:err + 1 + shmem[err]]).decode("utf-8", "replace")
            raise VpError(f"sidecar command on cpu {cpu} failed: {text}")

    # ---- registers through the kernel -------------------------------------------------
    def get_registers(self, cpu: int, names: list[int]) -> list[int]:
        arg = _U32.pack(cpu) + b"".join(kabi.REGISTER_ASSOC.pack(n, 0, 0) for n in names)
        _r, out = self.vtl.ioctl(kabi.MSHV_VTL_GET_VP_REGISTERS, arg)
        return [kabi.REGISTER_ASSOC.unpack_from(out, i * kabi.REGISTER_ASSOC.size)[1] for i in range(len(names))]

    # ---- completing an intercept ------------------------------------------------------
    def complete(self, cpu: int, msg: dict, regs: dict) -> dict:
        """The GPR updates that complete the intercepted instruction."""
        kind = msg["type"]
        CURRENT.vp = cpu
        stats = self.stats[cpu]
        stats.exit_kinds[kind] = stats.exit_kinds.get(kind, 0) + 1
        if kind == HvMessageType.X64IoPortIntercept:
            size = msg["size"]
            mask = (1 << (8 * size)) - 1
            if msg["access"] == HV_INTERCEPT_ACCESS_WRITE:
                self.bus.pio_write(msg["port"], size, regs["rax"] & mask)
                return {}
            return {"rax": (regs["rax"] & ~mask) | (self.bus.pio_read(msg["port"], size) & mask)}
        if kind == HvMessageType.X64CpuidIntercept:
            a, b, c, d = msg["default"]
            return {"rax": a, "rbx": b, "rcx": c, "rdx": d}
        if kind == HvMessageType.X64MsrIntercept:
            if msg["access"] == HV_INTERCEPT_ACCESS_WRITE:
                self.log.debug(f"cpu {cpu}: wrmsr {msg['msr']:#x} ignored")
                return {}
            reg = MSR_REGISTER.get(msg["msr"])
            value = self.get_registers(cpu, [reg])[0] if reg is not None else 0
            return {"rax": value & 0xFFFFFFFF, "rdx": value >> 32}
        if kind == HvMessageType.HypercallIntercept:
            # A VMBus hypercall: no VMBus server yet, so no connection is open (issue 11+).
            code = msg["control"] & 0xFFFF
            status = HvStatus.InvalidConnectionId if code in VMBUS_HYPERCALLS else HvStatus.InvalidHypercallCode
            return {"rax": int(status)}
        if kind == HvMessageType.UnmappedGpa:
            import hclsim.cpu.mmio_emulate as mmio_emulate   # capstone: only once a VP touches MMIO
            access = mmio_emulate.decode(msg["instruction_bytes"], msg["rip"])
            if access.write:
                self.bus.mmio_write(msg["gpa"], access.size, mmio_emulate.store_value(access, regs))
                return {}
            return mmio_emulate.complete_read(access, self.bus.mmio_read(msg["gpa"], access.size), regs)
        raise VpError(f"cpu {cpu}: unhandled intercept {kind:#x} at {msg['rip']:#x}")

