"""UnderhillWorker, the VM worker (underhill_core/src/worker.rs): opens the partition (/dev/mshv,
MSHV_CREATE_VTL, the sidecar nodes /dev/mshv_vtl_sidecar0, 1, ... until one is missing), puts
the VTL0 devices on its bus, starts a VP thread per CPU (hcl/vp.py), tells the host VTL0 has
started, and runs until the guest powers the VM off or the control process stops it.

The VTL0 console (COM1, a 16550 emulated here) goes to the host line by line, per VP, over the
host channel (/dev/hclsim_host: where the real worker's serial backend and GET notifications go
over VMBus).
"""
import os
import socket
import struct
import threading
import time

from hclsim.defs import kabi
from hclsim.devices.vtl0_test import vtl0_bus
from hclsim.hcl import guest_ram, linux, options, vp
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
    def __init__(self, params: bytes, channel, log, fds=()):
        self.params = pb.UnderhillWorkerParams.FromString(params)
        self.channel, self.log = channel, log
        self.env = dict(self.params.env)
        self.opts = options.parse([], self.env)
        self.powered_off = threading.Event()
        self.stopped = threading.Event()
        self.loop = None
        self.host = None
        self.proxies: dict = {}
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

    # ---- device workers -------------------------------------------------------------------
    def _worker_socket(self, name: str) -> socket.socket:
        """MakeWorker(name): the control process starts its host; the reply brings our end."""
        fds: list[int] = []
        reply = self.channel.call(timeout=20, fds_out=fds, control=pb.ControlRequest(make_worker=name))
        for extra in fds[1:]:
            os.close(extra)
        if reply.error or not fds:
            if fds:
                os.close(fds[0])
            raise vp.VpError(f"device worker {name}: {reply.error or 'no socket came with the reply'}")
        return socket.socket(fileno=fds[0])

    def _guest_ram(self):
        """VTL0's RAM for the device workers' guest-memory requests (once, None if not mappable)."""
        if not hasattr(self, "_ram"):
            try:
                self._ram = guest_ram.map_vtl0()
            except OSError as exc:
                self._ram = None
                self.log.warn(f"device workers get no guest memory: {exc.strerror or exc}")
        return self._ram

    def _proxy(self, name: str, stores=None):
        from hclsim.devices.device_worker import ProxyDevice
        proxy = ProxyDevice(name, self._worker_socket(name), relaunch=lambda: self._worker_socket(name),
                            log=self.log.warn, guest_memory=self._guest_ram(), stores=stores)
        self.log.info(f"device {name} runs in its worker (underhill-{name})")
        return proxy

    def _open_vmgs(self):
        """The VM's VMGS on the host's disk (/dev/vmgs), formatted if blank as OpenHCL formats an
        empty one; None when the host offers no disk (the vTPM's state is then ephemeral)."""
        from hclsim.hcl import vmgs
        try:
            self.vmgs_disk = linux.open_file("/dev/vmgs", kabi.O_RDWR)
        except FileNotFoundError:
            self.log.warn("no VMGS disk: the vTPM's NV state lasts as long as the VM")
            return None
        self.vmgs = vmgs.Vmgs(self.vmgs_disk.fileno())
        sizes = ", ".join(f"{vmgs.FILE_NAMES.get(i, i)} {n} bytes" for i, n in sorted(self.vmgs.files().items()))
        self.log.info("VMGS: " + ("formatted a blank disk" if self.vmgs.formatted_now else
                                  f"sequence {self.vmgs.sequence}, {sizes or 'no files'}"))
        return self.vmgs

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
        names = [n for n in self.env.get("HCLSIM_DEVICE_WORKERS", "").split(",") if n]
        self.proxies = {name: self._proxy(name) for name in names}
        tpm = ()
        if self.env.get("HCLSIM_TPM") == "1":            # the vTPM always runs in its worker, as in OpenHCL
            from hclsim.hcl.vmgs import TPM_NVRAM, TPM_PPI, DeviceFiles
            self.proxies["tpm"] = self._proxy("tpm", stores=DeviceFiles(self._open_vmgs(), (TPM_PPI, TPM_NVRAM)))
            tpm = (self.proxies["tpm"],)
        bus = vtl0_bus(len(present), console_sink=self._console_output, on_power_off=self._power_off,
                       replace={n: p for n, p in self.proxies.items() if n != "tpm"}, extra=tpm)
        bus.on_error = lambda _name, text: self.log.warn(text)        # the host's one line per error
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
        for proxy in self.proxies.values():
            proxy.close()

    # ---- requests from the control process (diag) ---------------------------------------
    def rpc_pause(self, _req) -> bytes:
        self._require_loop().pause()
        self.log.info("VM paused")
        return b""

    def rpc_resume(self, _req) -> bytes:
        self._require_loop().resume()
        self.log.info("VM resumed")
        return b""

    def rpc_inspect(self, req) -> bytes:
        from hclsim.hcl import inspect_tree
        return inspect_tree.inspect(self.inspect_tree(), req.path, req.depth).SerializeToString()

    def rpc_update(self, req) -> bytes:
        from hclsim.hcl import inspect_tree
        return inspect_tree.update(self.inspect_tree(), req.path, req.value).SerializeToString()

    def _require_loop(self):
        if self.loop is None:
            raise vp.VpError("the VM is not running yet")
        return self.loop

    def inspect_tree(self) -> dict:
        """`vm`: the partition's VPs (where each runs, its VTL, its exits), the sidecar nodes,
        the devices on the bus with their regions and counters, the memory layout."""
        from hclsim.hcl import inspect_tree as it
        loop = self.loop
        if loop is None:
            return {"state": "starting"}
        vps = {}
        for cpu in sorted(loop.stats):
            st = loop.stats[cpu]
            vps[str(cpu)] = {
                "cpu": cpu, "on": loop.where(cpu), "vtl": 0, "exits": it.counter(st.exits),
                "remote_exits": it.counter(st.remote_exits),
                "exit_kinds": {f"{kind:#x}": n for kind, n in sorted(st.exit_kinds.items())},
                "moved_ms": round(st.moved_ms, 3) if st.moved_ms is not None else "",
                "force_exit_sidecar": it.Leaf(False, update=lambda text, cpu=cpu: loop.force_exit_sidecar(
                    cpu, it.parse_bool(text))),
            }
        nodes = {str(i): {"base_cpu": base, "cpu_count": count}
                 for i, (_dev, base, count, _shmem) in enumerate(loop.sidecars)}
        devices = {}
        for space, name, region, start, size in loop.bus.regions():
            devices.setdefault(name, {"regions": {}})["regions"][region] = {
                "space": space, "start": it.hex_(start), "size": it.hex_(size)}
        for name, dev in loop.bus.devices.items():
            if name in self.proxies:
                devices.setdefault(name, {})["worker"] = {
                    "host": f"underhill-{name}", "restarts": it.counter(dev.restarts),
                    "failed_accesses": it.counter(dev.failed_accesses), "requests": it.counter(dev.requests),
                    "restored": dev.restored, "state": it.Lazy(lambda d=dev: _device_state(d)),
                    "store_requests": it.counter(dev.store_requests),
                    "access_errors": it.counter(loop.bus.error_counts.get(name, 0))}
                continue
            if name in loop.bus.error_counts:
                devices.setdefault(name, {})["access_errors"] = it.counter(loop.bus.error_counts[name])
            for attr in ("writes", "reads", "accesses"):
                v = getattr(dev, attr, None)
                if isinstance(v, int):
                    devices.setdefault(name, {})[attr] = it.counter(v)
                elif isinstance(v, (list, dict)):
                    devices.setdefault(name, {})[attr] = it.counter(len(v))
        def convert_cpu(text: str) -> str:                # the VP on that CPU goes to a Linux CPU
            cpu = int(text, 0)
            loop.force_exit_sidecar(cpu, True)
            return str(cpu)
        convert = it.Leaf("", update=convert_cpu)
        return {"state": "paused" if loop.paused else ("stopping" if loop.stopping.is_set() else "running"),
                "vp_count": len(loop.stats), "vps": vps,
                "sidecar": {"nodes": nodes, "hotplug": not loop.no_hotplug, "convert": convert},
                "devices": devices, "memory": it.Lazy(guest_ram.memory_layout),
                **({"vmgs": it.Lazy(self._vmgs_files)} if getattr(self, "vmgs", None) is not None else {})}

    def _vmgs_files(self) -> dict:
        from hclsim.hcl import vmgs
        return {"sequence": self.vmgs.sequence, "capacity": self.vmgs.capacity_blocks * vmgs.BLOCK,
                "files": {vmgs.FILE_NAMES.get(i, str(i)): n for i, n in sorted(self.vmgs.files().items())}}


def _device_state(proxy) -> dict:
    """The device's saved state as its worker has it now (a Save RPC): field name -> value."""
    import json
    blob = json.loads(proxy.rpc("save").state)
    return {k: (v if isinstance(v, (int, str, bool)) else str(v)) for k, v in blob.get("fields", {}).items()}
