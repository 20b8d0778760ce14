"""UnderhillWorker, the VM worker (underhill_core/src/worker.rs): opens the partition (/dev/mshv,
MSHV_CREATE_VTL, the sidecar nodes /dev/mshv_vtl_sidecar0, 1, ... until one is missing), puts
the VTL0 devices on its bus, starts a VP thread per CPU (hcl/vp.py), tells the host VTL0 has
started, and runs until the guest powers the VM off or the control process stops it.

The VTL0 console (COM1, a 16550 emulated here) goes to the host line by line, per VP, over the
host channel (/dev/hclsim_host: where the real worker's serial backend and GET notifications go
over VMBus).
"""
import struct
import threading
import time

from hclsim.defs import kabi
from hclsim.devices.vtl0_test import vtl0_bus
from hclsim.hcl import linux, options, vp
from hclsim.hcl import mesh_pb2 as pb


def cpu_list(text: str) -> list[int]:
    cpus = []
    for item in text.strip().split(","):
        if not item:
            continue
        first, _, last = item.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def is_cpu_online(cpu: int) -> bool:
    """/sys/devices/system/cpu/cpuN/online is "1"; no file but a cpuN folder: online (cpu0)."""
    try:
        return linux.read_file(f"/sys/devices/system/cpu/cpu{cpu}/online").strip() == b"1"
    except FileNotFoundError:
        return linux.stat_kind(f"/sys/devices/system/cpu/cpu{cpu}") == kabi.KIND_DIR


class UnderhillWorker:
    def __init__(self, params: bytes, channel, log):
        self.params = pb.UnderhillWorkerParams.FromString(params)
        self.channel, self.log = channel, log
        self.env = dict(self.params.env)
        self.opts = options.parse([], self.env)
        self.powered_off = threading.Event()
        self.stopped = threading.Event()
        self.loop = None
        self.host = None
        self._console: dict[int, bytearray] = {}
        self._host_lock = threading.Lock()

    # ---- the host channel ---------------------------------------------------------------
    def _to_host(self, kind: int, data: bytes = b"") -> None:
        with self._host_lock:
            try:
                self.host.write(bytes([kind]) + data)
            except OSError:
                pass

    def _console_output(self, _name: str, data: bytes) -> None:
        cpu = getattr(vp.CURRENT, "vp", 0)
        buf = self._console.setdefault(cpu, bytearray())
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            self._to_host(kabi.HOST_CONSOLE, struct.pack("<I", cpu) + line + b"\n")
            buf[:] = rest
        if len(buf) >= 1024:
            self._to_host(kabi.HOST_CONSOLE, struct.pack("<I", cpu) + bytes(buf))
            buf.clear()

    def _power_off(self) -> None:
        self.powered_off.set()

    # ---- the VM -------------------------------------------------------------------------
    def _open_sidecars(self) -> list:
        nodes = []
        for n in range(1024):
            try:
                dev = linux.open_file(f"/dev/mshv_vtl_sidecar{n}", kabi.O_RDWR | kabi.O_NONBLOCK)
            except FileNotFoundError:
                break
            _r, info = dev.ioctl(kabi.MSHV_SIDECAR_INFO)
            base, count, per_cpu = kabi.SIDECAR_INFO.unpack(info)
            nodes.append((dev, base, count, dev.mmap(0, count * per_cpu)))
        return nodes

    def run(self) -> None:
        t0 = time.monotonic()
        self.host = linux.open_file("/dev/hclsim_host", kabi.O_WRONLY)
        mshv = linux.open_file("/dev/mshv", kabi.O_RDWR)
        vtl = mshv.ioctl_file(kabi.MSHV_CREATE_VTL, path="mshv_vtl")
        present = cpu_list(linux.read_file("/sys/devices/system/cpu/present").decode())
        sidecars = self._open_sidecars()
        bus = vtl0_bus(len(present), console_sink=self._console_output, on_power_off=self._power_off)
        self.loop = loop = vp.VpLoop(vtl, sidecars, bus, self.log, no_sidecar_hotplug=self.opts.no_sidecar_hotplug)
        online = {cpu: is_cpu_online(cpu) for cpu in present}
        for cpu, up in online.items():
            if not up and loop._node_of(cpu) is None:
                raise vp.VpError(f"cpu {cpu} is offline")
        errors = []
        threads = [threading.Thread(target=self._vp_thread, args=(cpu, online[cpu], errors), name=f"vp-{cpu}",
                                    daemon=True) for cpu in present]
        for t in threads:
            t.start()
        self.channel.send(event=pb.WorkerEvent(started=pb.Empty()))
        self.log.info(f"VM started: {len(present)} VPs ({sum(not u for u in online.values())} on sidecar CPUs) "
                      f"in {(time.monotonic() - t0) * 1e3:.1f} ms")
        self._to_host(kabi.HOST_VTL0_STARTED)
        while not (self.powered_off.is_set() or self.stopped.is_set() or errors):
            self.powered_off.wait(0.05)
        loop.stop()
        for t in threads:
            t.join(5)
        if errors:
            raise errors[0]
        if self.powered_off.is_set():
            exits = sum(s.exits for s in loop.stats.values())
            moved = sorted(s.moved_ms for s in loop.stats.values() if s.moved_ms is not None)
            if moved:
                self.log.info(f"{len(moved)} sidecar VPs moved to Linux CPUs after their first exit: "
                              f"median {moved[len(moved) // 2]:.2f} ms, max {moved[-1]:.2f} ms each")
            remote = sum(s.remote_exits for s in loop.stats.values())
            self.log.info(f"the guest powered the VM off after {exits} intercepts ({remote} on sidecar CPUs)")
            self._to_host(kabi.HOST_POWER_OFF)
            self.stopped.wait()          # the host tears the VM down from here

    def _vp_thread(self, cpu: int, online: bool, errors: list) -> None:
        try:
            self.loop.run(cpu, online)
        except Exception as exc:         # a VP failing fails the worker (the real one panics)
            if not self.loop.stopping.is_set():
                import traceback
                frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.endswith("linux.py")]
                where = frames[-1]
                self.log.error(f"vp {cpu}: {exc} (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno} {where.line})")
                errors.append(exc)

    def stop(self) -> None:
        self.stopped.set()
        if self.loop is not None:
            self.loop.stop()
