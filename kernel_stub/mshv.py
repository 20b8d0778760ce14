"""The mshv drivers of the stand-in kernel (openhcl/hcl/src/ioctl.rs is the user side):
/dev/mshv (CHECK_EXTENSION, CREATE_VTL), the mshv_vtl file (RUN_VP = RETURN_TO_LOWER_VTL on a
Linux CPU, GET/SET_VP_REGISTERS, mmap of the per-CPU run and register pages), /dev/mshv_vtl_low
(VTL0 memory) and /dev/mshv_vtl_sidecar<N> (START, STOP, RUN, INFO, read() of finished CPUs,
mmap of the node's command pages).

All simulated CPUs share one engine, so whoever runs one (a RUN_VP, a sidecar command being
waited for, a CPU being onlined) holds the CPU lock: a FIFO lock, for a time slice at a time, so
that 64 VPs' RUN_VPs take turns as 64 physical CPUs would run side by side.
"""
import mmap
from collections import deque
import os
import struct
import threading

import numpy as np

from hclsim.cpu.runvp_fastpath import ANSWERED
from hclsim.defs import futex, kabi
from hclsim.defs.hvdef import HV_MESSAGE_SIZE, MSR_REGISTERS, REGISTER_BY_NAME, VTL0
from hclsim.hv.scheduler import PREEMPTED, VpRunError
from hclsim.kernel_stub.vfs import CharDevice, File, KernelError
from hclsim.sidecar import layout as sl
from hclsim.sidecar.client import SidecarError

SLICE_S = 0.01               # one RUN_VP holds the engine this long at most while others wait
HALT_POLL_S = 0.5            # a halted VP's RUN_VP sleeps on its cancel word (futex), waking at least this often
SLICE_EXIT, SLICE_HALTED, SLICE_PREEMPTED, SLICE_ANSWERED = range(4)
MISC_MAJOR = 10
SIDECAR_MAJOR = 241          # a dynamic major (Linux hands them out from 254 down): one minor per node
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_GPR_NAMES = [n for n in kabi.RUN_CONTEXT_GPRS]
REGISTER_NAMES_BY_CODE = {int(code): name for name, code in REGISTER_BY_NAME.items()}
_CONTEXT = struct.Struct("<16Q")      # the run page's GPRs, the register page's GPRs
_CONTROL = struct.Struct("<QQ")       # RIP, RFLAGS
_CR = struct.Struct("<QQQ")           # CR0, CR3, CR4
_LOAD_NAMES = tuple(_GPR_NAMES)
_STORE_NAMES = tuple(_GPR_NAMES) + ("rsp", "rip", "rflags", "cr0", "cr3", "cr4", "efer")


class CpuLock:
    """A FIFO lock: waiters get the engine in the order they asked for it, handed over one at a
    time (no thundering herd: 64 waiting VPs cost one wakeup per release, not 64). waiting[0]
    counts the waiters where the engine's doorbell path sees it (it gives the engine back)."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque = deque()
        self.waiting = np.zeros(1, np.int64)

    def __enter__(self):
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
            self.waiting[0] += 1
        turn.acquire()                  # released by the holder handing the lock over

    def __exit__(self, *exc):
        with self._mutex:
            if self._waiters:
                self.waiting[0] -= 1
                self._waiters.popleft().release()
            else:
                self._held = False


class VpPages:
    """The run page and register page of every VP, in one memfd the VM worker maps."""

    def __init__(self, vp_count: int):
        self.vp_count = vp_count
        self.fd = os.memfd_create("hclsim-mshv-vtl-pages", os.MFD_CLOEXEC)
        size = (2 * vp_count + 1) * kabi.PAGE_SIZE          # run pages, register pages, the kick page
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        self.view = memoryview(self.map)
        self._base = futex.address(self.map, 0)

    def address(self, offset: int) -> int:
        return self._base + offset

    def run_page(self, cpu: int) -> int:
        return cpu * kabi.PAGE_SIZE

    def register_page(self, cpu: int) -> int:
        return (self.vp_count + cpu) * kabi.PAGE_SIZE

    @property
    def kick_page(self) -> int:
        return 2 * self.vp_count * kabi.PAGE_SIZE

    def file_offset(self, page_offset: int) -> int:
        """The memfd offset of an mshv_vtl mmap page offset (run page n or (1 << 16) | n, or the
        doorbell kick page)."""
        if page_offset == kabi.MMAP_DOORBELL_PAGE:
            return self.kick_page
        kind, cpu = page_offset >> 16, page_offset & 0xFFFF
        if cpu >= self.vp_count or kind not in (0, 1):
            raise KernelError(kabi.EINVAL, f"no page at offset {page_offset:#x}")
        return self.run_page(cpu) if kind == 0 else self.register_page(cpu)

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)


class Mshv:
    """The drivers over the partition, the Linux CPUs and the sidecar of one booted kernel."""

    def __init__(self, partition, linux_cpus, sidecar, log):
        self.partition, self.cpus, self.sidecar, self.log = partition, linux_cpus, sidecar, log
        self.lock = CpuLock()
        self.pages = VpPages(partition.vp_count)
        self.run_counts = [0] * partition.vp_count
        self.running: set[int] = set()
        self.dispatcher = None
        self._doorbell_lock = threading.Lock()
        self.closed = threading.Event()           # the kernel is going away (a blocked read returns)
        for cpu in range(partition.vp_count):
            page = self.pages.register_page(cpu)
            self.pages.map[page + kabi.REGPAGE_VERSION:page + kabi.REGPAGE_VERSION + 2] = b"\x01\x00"

    def device_nodes(self) -> list[CharDevice]:
        nodes = [CharDevice("mshv", MISC_MAJOR, 232, lambda fl, c: MshvFile(self), 0o600),
                 CharDevice("mshv_vtl_low", MISC_MAJOR, 233, lambda fl, c: Vtl0MemoryFile(self.partition.mem), 0o600),
                 CharDevice("mshv_hvcall", MISC_MAJOR, 234, lambda fl, c: File(), 0o600)]
        for node in (self.sidecar.nodes if self.sidecar is not None else []):
            nodes.append(CharDevice(f"mshv_vtl_sidecar{node.index}", SIDECAR_MAJOR, node.index,
                                    lambda fl, c, n=node: SidecarFile(self, n, fl), 0o600))
        return nodes

    def close(self) -> None:
        """Stop the doorbell dispatcher (a VMM waiting on a doorbell sees it closed)."""
        self.closed.set()
        if self.dispatcher is not None:
            self.dispatcher.close()
        self.pages.close()

    def start_doorbell(self, cpu: int) -> None:
        """MSHV_HCLSIM_DOORBELL: serve cpu's RUN_VPs by its doorbell (kernel_stub/doorbell.py)."""
        if not 0 <= cpu < self.partition.vp_count:
            raise KernelError(kabi.EINVAL, f"no CPU {cpu}")
        from hclsim.kernel_stub.doorbell import Dispatcher
        with self._doorbell_lock:
            if self.dispatcher is None:
                self.dispatcher = Dispatcher(self)
        self.dispatcher.add(cpu)

    # ---- RUN_VP on a Linux CPU ---------------------------------------------------------
    def run_vp(self, cpu: int) -> int:
        """MSHV_VTL_RETURN_TO_LOWER_VTL: VTL0 of cpu until an intercept (0, its message in the run
        page) or until the run page's cancel word is set (EINTR)."""
        self.begin_run(cpu)
        try:
            while True:
                outcome = self.run_slice(cpu)
                if outcome == SLICE_EXIT:
                    return 0
                if outcome == SLICE_HALTED:           # sleep until the VMM's cancel wakes us
                    while not self.cancelled(cpu):
                        futex.wait(self.pages.address(self.pages.run_page(cpu) + kabi.RUN_CANCEL), 0, HALT_POLL_S)
                    raise KernelError(kabi.EINTR)
        finally:
            self.end_run(cpu)

    def begin_run(self, cpu: int) -> None:
        """Checks, then the registers the VMM left in the pages go into the VP."""
        if not 0 <= cpu < self.partition.vp_count:
            raise KernelError(kabi.EINVAL, f"no CPU {cpu}")
        if cpu not in self.cpus.online:
            self.log(f"mshv_vtl: RUN_VP on CPU {cpu}, which is offline (a sidecar CPU)", 4)
            raise KernelError(kabi.EINVAL)
        if cpu in self.running:
            raise KernelError(kabi.EBUSY, f"CPU {cpu} is already running")
        self.running.add(cpu)
        with self.lock:          # the VP may be parked in the engine: its registers are the engine's
            self._load(cpu)

    def end_run(self, cpu: int) -> None:
        with self.lock:
            self._store(cpu)
        self.running.discard(cpu)

    def end_answered(self, cpu: int) -> None:
        """The end of a run whose exit the engine answered itself: its registers are in the
        pages already, and the VMM may be changing them."""
        self.running.discard(cpu)

    def cancelled(self, cpu: int) -> bool:
        return bool(_U32.unpack_from(self.pages.map, self.pages.run_page(cpu) + kabi.RUN_CANCEL)[0])

    def run_slice(self, cpu: int, doorbell=None) -> int:
        """One time slice of VTL0 (SLICE_EXIT with the message in the run page, SLICE_HALTED,
        SLICE_PREEMPTED); KernelError EINTR once cancelled, EFAULT on a fault. With a doorbell
        (cpu.runvp_fastpath.DoorbellRun) the engine answers I/O exits and takes the next rings
        itself: SLICE_ANSWERED when it gave the engine back with the last exit answered."""
        if self.cancelled(cpu):
            raise KernelError(kabi.EINTR)
        with self.lock:
            try:
                msg = self.partition.run_vtl0(cpu, SLICE_S, preempt=True, doorbell=doorbell)
            except VpRunError as exc:
                self.log(f"mshv_vtl: CPU {cpu}: {exc}", 3)
                raise KernelError(kabi.EFAULT) from None
            finally:
                if doorbell is not None:
                    self.run_counts[cpu] += doorbell.answered
        if msg is ANSWERED:
            return SLICE_ANSWERED
        if msg is PREEMPTED:
            return SLICE_PREEMPTED
        run = self.pages.run_page(cpu)
        if msg is None:                       # HLT
            self.pages.map[run + kabi.RUN_FLAGS:run + kabi.RUN_FLAGS + 4] = _U32.pack(kabi.RUN_FLAG_HALTED)
            return SLICE_HALTED
        self.pages.map[run + kabi.RUN_EXIT_MESSAGE:run + kabi.RUN_EXIT_MESSAGE + HV_MESSAGE_SIZE] = \
            bytes(msg).ljust(HV_MESSAGE_SIZE, b"\0")[:HV_MESSAGE_SIZE]
        self.run_counts[cpu] += 1
        return SLICE_EXIT

    def _load(self, cpu: int) -> None:
        """Registers the VMM left in the pages -> the VP's VTL0 (GPRs always; RIP, RFLAGS and RSP
        when the register page marks them dirty)."""
        m = self.pages.map
        names, values = _LOAD_NAMES, list(_CONTEXT.unpack_from(m, self.pages.run_page(cpu) + kabi.RUN_CONTEXT))
        reg = self.pages.register_page(cpu)
        dirty = _U32.unpack_from(m, reg + kabi.REGPAGE_DIRTY)[0]
        if dirty:
            extra = [(n, off) for bit, n, off in ((kabi.DIRTY_IP, "rip", kabi.REGPAGE_RIP),
                                                  (kabi.DIRTY_FLAGS, "rflags", kabi.REGPAGE_RFLAGS),
                                                  (kabi.DIRTY_GP, "rsp", kabi.REGPAGE_GP + 8 * 4)) if dirty & bit]
            names = names + tuple(n for n, _ in extra)
            values += [_U64.unpack_from(m, reg + off)[0] for _, off in extra]
            _U32.pack_into(m, reg + kabi.REGPAGE_DIRTY, 0)
        self.partition.write_vtl0(cpu, names, values)

    def _store(self, cpu: int) -> None:
        v = self.partition.read_vtl0(cpu, _STORE_NAMES)          # 16 GPRs, then _STORE_TAIL, efer
        m = self.pages.map
        _CONTEXT.pack_into(m, self.pages.run_page(cpu) + kabi.RUN_CONTEXT, *v[:16])
        reg = self.pages.register_page(cpu)
        rsp, rip, rflags, cr0, cr3, cr4, efer = v[16:]
        _CONTEXT.pack_into(m, reg + kabi.REGPAGE_GP, *v[:4], rsp, *v[5:16])    # RSP where CR2 is in the run page
        _CONTROL.pack_into(m, reg + kabi.REGPAGE_RIP, rip, rflags)
        _CR.pack_into(m, reg + kabi.REGPAGE_CR0, cr0, cr3, cr4)
        _U64.pack_into(m, reg + kabi.REGPAGE_EFER, efer)
        m[reg + kabi.REGPAGE_IS_VALID] = 1

    def prime(self, cpu: int) -> None:
        """Fill a CPU's pages from its VP state (before its first run, and after it moved)."""
        with self.lock:
            self._store(cpu)

    # ---- registers by name (GET/SET_VP_REGISTERS) --------------------------------------
    def get_registers(self, cpu: int, names: list[int]) -> list[int]:
        """VTL0 registers by HvRegister code; a synthetic MSR's register reads the MSR."""
        for code in names:
            if code not in REGISTER_NAMES_BY_CODE and code not in MSR_REGISTERS:
                raise KernelError(kabi.EINVAL, f"unknown register {code:#x}")
        with self.lock:
            regs = self.partition.registers(cpu, VTL0, [REGISTER_NAMES_BY_CODE[c] for c in names
                                                        if c in REGISTER_NAMES_BY_CODE])
            return [regs[REGISTER_NAMES_BY_CODE[c]] if c in REGISTER_NAMES_BY_CODE
                    else self.partition.rdmsr(cpu, MSR_REGISTERS[c]) for c in names]

    def set_registers(self, cpu: int, pairs: list[tuple[int, int]]) -> None:
        values = {}
        for code, value in pairs:
            name = REGISTER_NAMES_BY_CODE.get(code)
            if name is None:
                raise KernelError(kabi.EINVAL, f"unknown register {code:#x}")
            values[name] = value
        with self.lock:
            self.partition.set_registers(cpu, values, vtl=VTL0)
            self._store(cpu)


def _cpu_arg(arg: bytes) -> int:
    if len(arg) < 4:
        raise KernelError(kabi.EFAULT, "the argument is shorter than the CPU number")
    return _U32.unpack_from(arg)[0]


class MshvFile(File):
    def __init__(self, mshv: Mshv):
        self.mshv = mshv

    def ioctl(self, request, arg):
        if request == kabi.MSHV_CHECK_EXTENSION:
            cap = _cpu_arg(arg)
            return int(cap in (kabi.MSHV_CAP_REGISTER_PAGE,)), b""
        if request == kabi.MSHV_CREATE_VTL:
            return VtlFile(self.mshv), b""
        raise KernelError(kabi.ENOTTY)


class VtlFile(File):
    """The mshv_vtl file: RUN_VP, registers, and the pages to mmap."""

    def __init__(self, mshv: Mshv):
        self.mshv = mshv

    def ioctl(self, request, arg):
        m = self.mshv
        if request == kabi.MSHV_VTL_RETURN_TO_LOWER_VTL:
            return m.run_vp(_cpu_arg(arg)), b""
        if request == kabi.MSHV_HCLSIM_DOORBELL:
            m.start_doorbell(_cpu_arg(arg))
            return 0, b""
        if request in (kabi.MSHV_VTL_GET_VP_REGISTERS, kabi.MSHV_VTL_SET_VP_REGISTERS):
            cpu = _cpu_arg(arg)
            if not 0 <= cpu < m.partition.vp_count:
                raise KernelError(kabi.EINVAL, f"no CPU {cpu}")
            body = arg[4:]
            if len(body) % kabi.REGISTER_ASSOC.size:
                raise KernelError(kabi.EINVAL, "register list is not a whole number of HvRegisterAssoc")
            pairs = [kabi.REGISTER_ASSOC.unpack_from(body, i) for i in range(0, len(body), kabi.REGISTER_ASSOC.size)]
            if request == kabi.MSHV_VTL_SET_VP_REGISTERS:
                m.set_registers(cpu, [(name, lo) for name, lo, _hi in pairs])
                return 0, b""
            values = m.get_registers(cpu, [name for name, _lo, _hi in pairs])
            return 0, b"".join(kabi.REGISTER_ASSOC.pack(name, v, 0) for (name, _l, _h), v in zip(pairs, values))
        raise KernelError(kabi.ENOTTY)

    def mmap(self, offset, length):
        pages = self.mshv.pages
        if length != kabi.PAGE_SIZE:
            raise KernelError(kabi.EINVAL, "run and register pages are mapped one page at a time")
        return pages.fd, pages.file_offset(offset // kabi.PAGE_SIZE)


class InProcessVtl:
    """The mshv_vtl file as a VMM holds it (mmap, ioctl) for a VMM thread inside the kernel's own
    process: the VM worker's VP loop without the process boundary (benches, tests)."""

    def __init__(self, mshv: Mshv):
        self.file = VtlFile(mshv)

    def mmap(self, offset: int, length: int):
        fd, file_offset = self.file.mmap(offset, length)
        return mmap.mmap(fd, length, mmap.MAP_SHARED, offset=file_offset)

    def ioctl(self, request: int, arg: bytes):
        return self.file.ioctl(request, bytes(arg))


class Vtl0MemoryFile(File):
    def __init__(self, mem):
        self.mem = mem

    def mmap(self, offset, length):
        if self.mem.fd is None:
            raise KernelError(kabi.ENODEV, "guest RAM is private to the machine process (HCLSIM_GUEST_RAM)")
        if offset + length > self.mem.size:
            raise KernelError(kabi.EINVAL, "beyond guest RAM")
        return self.mem.fd, offset


class SidecarFile(File):
    """/dev/mshv_vtl_sidecar<N>: the node's CPUs, driven by whoever waits for them. START hands
    a CPU the command its page holds; read() returns the CPUs whose commands finished (u32
    each): with O_NONBLOCK EAGAIN when none has, else it runs the node's CPUs until one does
    (and sleeps while none has a command to run)."""

    WAIT_POLL_S = 0.05

    def __init__(self, mshv: Mshv, node, flags: int = 0):
        self.mshv, self.node = mshv, node
        self.nonblock = bool(flags & kabi.O_NONBLOCK)

    def _cpu(self, arg) -> int:
        cpu = _cpu_arg(arg)
        if not self.node.owns(cpu):
            raise KernelError(kabi.EINVAL, f"CPU {cpu} is not in sidecar node {self.node.index}")
        return cpu

    def ioctl(self, request, arg):
        sc, node = self.mshv.sidecar, self.node
        if request == kabi.MSHV_SIDECAR_INFO:
            info = node.info()
            return 0, kabi.SIDECAR_INFO.pack(info.base_cpu, info.cpu_count, info.per_cpu_shmem)
        if request in (kabi.MSHV_SIDECAR_START, kabi.MSHV_SIDECAR_RUN):
            cpu = self._cpu(arg)
            with self.mshv.lock:
                try:
                    sc.start_written(cpu)
                except SidecarError as exc:
                    raise KernelError(kabi.EBUSY, str(exc)) from None
            if request == kabi.MSHV_SIDECAR_RUN:
                self._wait_for(cpu)
            return 0, b""
        if request == kabi.MSHV_SIDECAR_STOP:
            cpu = self._cpu(arg)
            with self.mshv.lock:
                return int(sc.stop(cpu)), b""
        raise KernelError(kabi.ENOTTY)

    def _drive(self, done) -> None:
        """Run the sidecar CPUs a slice at a time until done()."""
        sc = self.mshv.sidecar
        while True:
            with self.mshv.lock:
                sc.poll()
                if done():
                    return
                self.mshv.partition.run(until=lambda: (sc.poll() or True) and done(), timeout=SLICE_S)
                if done():
                    return

    def _wait_for(self, cpu: int) -> None:
        sc = self.mshv.sidecar
        self._drive(lambda: cpu in sc.completed)
        with self.mshv.lock:
            sc.completed.discard(cpu)
            stopped = sc.stopped[self.node.index]
            if cpu in stopped:
                stopped.remove(cpu)

    def _busy(self) -> bool:
        """A CPU of the node has a command to finish (RUN, STOP or REMOVE)."""
        return any(int(s) in (sl.CPU_RUN, sl.CPU_STOP, sl.CPU_REMOVE) for s in self.node.status)

    def _wait_finished(self) -> None:
        sc, index = self.mshv.sidecar, self.node.index
        while True:
            with self.mshv.lock:
                sc.poll()
                if sc.stopped[index]:
                    return
                busy = self._busy()
            if busy:
                self._drive(lambda: bool(sc.stopped[index]))
                return
            if self.mshv.closed.wait(self.WAIT_POLL_S):          # nothing to run: sleep until a START
                raise KernelError(kabi.EINTR, "the kernel is going away")

    def read(self, count, nonblock=False):
        sc = self.mshv.sidecar
        if count < 4:
            raise KernelError(kabi.EINVAL, "read() of a sidecar device takes at least one u32")
        if not (nonblock or self.nonblock):
            self._wait_finished()
        with self.mshv.lock:
            sc.poll()
            done = sc.read_stopped(self.node.index)[:count // 4]
            for cpu in done:
                sc.completed.discard(cpu)
        if not done:
            raise KernelError(kabi.EAGAIN)
        return b"".join(_U32.pack(c) for c in done)

    def mmap(self, offset, length):
        node, mem = self.node, self.mshv.partition.mem
        if mem.fd is None:
            raise KernelError(kabi.ENODEV, "guest RAM is private to the machine process (HCLSIM_GUEST_RAM)")
        if offset < 0 or length <= 0 or offset + length > node.cpu_count * sl.SHMEM_PAGES_PER_VP * kabi.PAGE_SIZE:
            raise KernelError(kabi.EINVAL, "beyond the node's command pages")
        return mem.fd, node.shmem_base + offset
