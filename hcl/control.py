"""openvmm_hcl: the control process and, re-run as a mesh child host, the worker hosts
(underhill_core/src/lib.rs and worker.rs; shared/design/openhcl-userspace.md section 2).

Control: options, the "VMM process" line, the boot-loader times from /sys/firmware/fdt, the pid
file, the diag server (hcl/diag_server.py, on vsock), then the "vm" host running UnderhillWorker
(unless it waits for a diag Start), and an event loop over the worker's events and requests.
The worker stopping or failing ends the control process with a non-zero status (then init
exits and the kernel panics).
"""
import os
import queue
import socket
import struct
import sys
import threading

from hclsim.defs import kabi
from hclsim.hcl import klog, linux, mesh, options
from hclsim.hcl import mesh_pb2 as pb

CRATE = "underhill_core"
WAITING_FOR_START, STARTING, STARTED, RESTARTING = "WaitingForStart", "Starting", "Started", "Restarting"
REFTIMES = ("reftime_boot_start", "reftime_boot_end", "reftime_sidecar_start", "reftime_sidecar_end")


def main(argv: list[str]) -> int:
    try:
        invitation = mesh.take_invitation()
    except mesh.MeshError as exc:
        print(f"openvmm_hcl: {exc}", file=sys.stderr)
        return 1
    if invitation is not None:
        return host_main(argv, invitation)
    linux.start_process("openvmm_hcl", argv)
    log = klog.Logger(klog.UNDERHILL_FACILITY, "openvmm_hcl")
    try:
        return Control(argv, log).run()
    except (options.OptionsError, OSError, mesh.MeshError) as exc:
        log.error(f"fatal: {exc}")
        return 1


def boot_times(dtb: bytes) -> dict[str, int]:
    """The boot shim's reference times, from the root node of the device tree."""
    import libfdt
    fdt = libfdt.Fdt(dtb)
    times = {}
    for name in REFTIMES:
        try:
            raw = fdt.getprop(0, name)
        except libfdt.FdtException:
            continue
        if len(raw) == 8:
            times[name] = struct.unpack(">Q", bytes(raw))[0]
    return times


class Control:
    def __init__(self, argv: list[str], log: klog.Logger):
        self.argv, self.log = argv, log
        self.opts = options.parse(argv[1:], os.environ)
        self.state = WAITING_FOR_START if self.opts.wait_for_start else STARTING
        self.events: queue.Queue = queue.Queue()
        self.vm = None
        self.vm_pid = None
        self.paused = False
        self.diag = None
        self._lock = threading.Lock()
        self.profiler = None                  # (pid, Channel) of the "profiler" host, once started
        self.device_hosts: dict[str, dict] = {}   # device worker hosts by device name
        self._profile_lock = threading.Lock()
        self._profile_events: queue.Queue = queue.Queue()

    def run(self) -> int:
        log = self.log
        log.info(f"VMM process: crate_name={CRATE}, crate_revision=hclsim, version=0.1.0")
        try:
            times = boot_times(linux.read_file("/sys/firmware/fdt"))
        except OSError as exc:
            log.warn(f"cannot read the boot-loader times: {exc.strerror}")
            times = {}
        if times:
            log.info("boot loader times: " + ", ".join(f"{k}={v}" for k, v in times.items()))
        if self.opts.pid:
            linux.write_file(self.opts.pid, str(os.getpid()), kabi.O_WRONLY | kabi.O_CREAT | kabi.O_TRUNC)
        self.start_diag()
        if self.state == WAITING_FOR_START:
            log.info("waiting for a diag Start request before launching the workers")
        else:
            self.launch_workers()
        try:
            return self.event_loop()
        finally:
            if self.diag is not None:
                self.diag.shutdown()          # calls in flight are answered Cancelled

    def start_diag(self) -> None:
        """The diag server, before the workers (a Start comes through it)."""
        from hclsim.hcl import diag_server, diag_service
        from hclsim.hcl.underhill_init import confidential_filtering
        try:
            service = diag_service.DiagService(self)
            self.diag = diag_server.DiagServer(service.services(confidential_filtering(os.environ)), self.log)
        except OSError as exc:
            self.log.warn(f"diag server not started: {exc.strerror or exc}")
            return
        self.log.info(f"diag server listening on vsock ports {diag_server.CONTROL_PORT} and {diag_server.DATA_PORT}")

    def launch_workers(self, env: dict | None = None) -> None:
        self.state = STARTING
        env = dict(os.environ) if env is None else env
        proc, channel = mesh.launch_host("vm", self.argv[0], env, self._on_message)
        self.vm, self.vm_pid = (proc, channel), proc
        params = pb.UnderhillWorkerParams(env={k: v for k, v in env.items()
                                               if k.startswith(("OPENHCL_", "UNDERHILL_", "HCLSIM_"))})
        channel.send(launch=pb.LaunchWorker(worker_id="UnderhillWorker", params=params.SerializeToString()))
        _on_exit(proc, "vm", lambda status: self.events.put(("exited", status)))

    def _on_message(self, channel, env: pb.Envelope) -> None:
        kind = env.WhichOneof("body")
        if kind == "event":
            self.events.put(("event", env.event.WhichOneof("event"), env.event))
        elif kind == "control":
            req = env.control.WhichOneof("request")
            if req == "flush_logs":
                channel.reply(env.id)
            else:                             # off the reader thread: launching takes a while
                threading.Thread(target=self._make_worker, args=(channel, env.id, env.control.make_worker),
                                 name="make-worker", daemon=True).start()
        elif kind == "trace":
            self.log.log(env.trace.level, f"{env.trace.target}: {env.trace.message}")

    def event_loop(self) -> int:
        while True:
            item = self.events.get()
            if item[0] == "exited":
                self.log.error(f"vm worker failed: the underhill-vm process exited ({_status(item[1])})")
                return 1
            _, what, event = item
            if what == "started":
                self.state = STARTED
                self.log.info("VM worker started")
            elif what == "stopped":
                self.log.error("worker unexpectedly stopped")
                return 1
            elif what in ("failed", "restart_failed"):
                self.log.error(f"vm worker failed: {getattr(event, what)}")
                return 1


    # ---- what diag asks (hcl/diag_service.py) --------------------------------------------
    def require_started(self) -> None:
        if self.vm is None:
            raise self._diag_error("worker has not been started yet")

    @staticmethod
    def _diag_error(text: str):
        from hclsim.hcl.diag_server import DiagError
        return DiagError(text)

    def start(self, env: dict, unset: list[str], args: list[str]) -> None:
        with self._lock:
            if self.state != WAITING_FOR_START:
                raise self._diag_error("workers have already been started")
            full = dict(os.environ)
            full.update(env)
            for name in unset:
                full.pop(name, None)
            try:
                options.parse(args, full)
            except options.OptionsError as exc:
                raise self._diag_error(f"invalid options: {exc}") from None
            self.log.info("diag: starting the workers")
            self.launch_workers(full)

    def _vm_call(self, **rpc) -> pb.Reply:
        self.require_started()
        try:
            reply = self.vm[1].call(timeout=10, rpc=pb.WorkerRpc(**rpc))
        except mesh.MeshError as exc:
            raise self._diag_error(f"the vm worker did not answer: {exc}") from None
        if reply.error:
            raise self._diag_error(reply.error)
        return reply

    def pause(self) -> None:
        with self._lock:
            self.require_started()
            if self.paused:
                raise self._diag_error("VM is already paused")
            self._vm_call(pause=pb.Empty())
            self.paused = True

    def resume(self) -> None:
        with self._lock:
            self.require_started()
            if not self.paused:
                raise self._diag_error("VM is currently running")
            self._vm_call(resume=pb.Empty())
            self.paused = False

    def crash(self, pid: int) -> None:
        """Panic the process pid: this one, or any mesh host of mesh/hosts (the vm, the profiler,
        a device worker's host), which panics on the host's Crash request (fire and forget)."""
        if pid == os.getpid():
            threading.Timer(0.1, _panic, args=(self.log,)).start()      # after the reply is out
            return
        channel = self._host_channel(pid)
        if channel is None:
            raise self._diag_error(f"no mesh host with pid {pid}")
        try:
            channel.send(rpc=pb.WorkerRpc(crash=pb.Empty()))
        except mesh.MeshError as exc:
            raise self._diag_error(f"cannot reach the mesh host with pid {pid}: {exc}") from None

    def _host_channel(self, pid: int):
        """The mesh channel of the host pid (one that inspect's mesh/hosts lists), or None."""
        if pid <= 0:
            return None
        if self.vm is not None and pid == self.vm_pid:
            return self.vm[1]
        with self._lock:
            profiler = self.profiler
            hosts = [h for h in self.device_hosts.values() if h["pid"] == pid]
        if profiler is not None and profiler[0] == pid:
            return profiler[1]
        return hosts[0]["channel"] if hosts else None

    def profile(self, duration: int, args: list[str], conn) -> None:
        """Profile.AzureProfiler: the "profiler" host (started once, then reused) runs a
        ProfilerWorker with the data connection; its result is the call's; cancelled after
        duration + 30 s."""
        with self._profile_lock:
            if self.profiler is None:
                pid, channel = mesh.launch_host("profiler", self.argv[0], dict(os.environ), self._on_profiler_message)
                self.profiler = (pid, channel)
                _on_exit(pid, "profiler", lambda status, pid=pid: self._profiler_exited(pid, status))
            _pid, channel = self.profiler
            while not self._profile_events.empty():
                self._profile_events.get_nowait()
            params = pb.ProfilerParams(duration=duration, profiler_args=args)
            try:
                channel.send(launch=pb.LaunchWorker(worker_id="ProfilerWorker", params=params.SerializeToString()),
                             fds=(conn.fileno(),))
            except mesh.MeshError as exc:
                raise self._diag_error(f"cannot reach the profiler host: {exc}") from None
            finally:
                conn.close()                  # the host holds its own copy
            try:
                what, detail = self._profile_events.get(timeout=duration + 30)
            except queue.Empty:
                raise self._diag_error(f"the profiler did not finish within {duration + 30} s") from None
            if what != "stopped":
                raise self._diag_error(detail)

    def _on_profiler_message(self, channel, env: pb.Envelope) -> None:
        kind = env.WhichOneof("body")
        if kind == "event":
            what = env.event.WhichOneof("event")
            self._profile_events.put((what, getattr(env.event, what) if what in ("failed", "restart_failed") else ""))
        elif kind == "control":
            channel.reply(env.id, error="" if env.control.WhichOneof("request") == "flush_logs"
                          else "the profiler host cannot launch hosts")
        elif kind == "trace":
            self.log.log(env.trace.level, f"{env.trace.target}: {env.trace.message}")

    def _profiler_exited(self, pid: int, status: int) -> None:
        self.log.warn(f"the profiler host exited ({_status(status)})")
        with self._lock:
            if self.profiler is not None and self.profiler[0] == pid:
                self.profiler = None
        self._profile_events.put(("failed", f"the profiler host exited ({_status(status)})"))

    def inspect_tree(self) -> dict:
        from hclsim.hcl import inspect_tree as it
        tree = {
            "build_info": it.Lazy(_build_info),
            "control_state": it.Leaf(_STATE_NAMES.get(self.state, self.state), sensitivity=it.SAFE),
            "paused": self.paused,
            "mesh": {"hosts": self._hosts()},
            "proc": {"pid": os.getpid(), "argv": " ".join(self.argv), "threads": threading.active_count()},
            "diag": {"connections": self.diag.connections if self.diag else 0,
                     "transports": dict(self.diag.by_transport) if self.diag else {},
                     "parked_data_connections": self.diag.data.parked() if self.diag else 0},
            "kernel": it.Lazy(_kernel_tree),
            "trace": {"level": it.Leaf(_LEVEL_NAMES[self.log.max_level], update=self._set_log_level)},
        }
        if self.vm is not None:
            tree["vm"] = it.Remote(self._inspect_vm, self._update_vm)
        return tree

    def _make_worker(self, channel, env_id: int, name: str) -> None:
        """MakeWorker(name) from the VM worker: a host "name" (underhill-<name>) running the
        device worker, joined to the VM worker by a socket pair (one end in the reply). A host
        of that name already there (a hung or crashed worker) is killed first."""
        from hclsim.hcl import device_host
        if name not in device_host.DEVICES:
            channel.reply(env_id, error=f"no device {name!r} can run in a worker")
            return
        with self._lock:
            old = self.device_hosts.get(name)
        if old is not None and old["pid"] > 0:     # 0: it exited (kill(0) would signal our whole group)
            try:
                os.kill(old["pid"], 9)
            except ProcessLookupError:
                pass
        vm_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid, host = mesh.launch_host(name, self.argv[0], dict(os.environ), self._on_device_host_message)
            host.send(launch=device_host.launch(name), fds=(worker_end.fileno(),))
            with self._lock:
                restarts = old["restarts"] + 1 if old is not None else 0
                self.device_hosts[name] = {"pid": pid, "channel": host, "restarts": restarts}
            _on_exit(pid, name, lambda status, pid=pid: self._device_host_exited(name, pid, status))
            channel.reply(env_id, fds=(vm_end.fileno(),))
        except (OSError, mesh.MeshError) as exc:
            channel.reply(env_id, error=f"cannot start the {name} host: {exc}")
        finally:
            vm_end.close()
            worker_end.close()

    def _on_device_host_message(self, channel, env: pb.Envelope) -> None:
        kind = env.WhichOneof("body")
        if kind == "event" and env.event.WhichOneof("event") == "failed":
            self.log.error(f"device worker failed: {env.event.failed}")
        elif kind == "control":
            channel.reply(env.id)
        elif kind == "trace":
            self.log.log(env.trace.level, f"{env.trace.target}: {env.trace.message}")

    def _device_host_exited(self, name: str, pid: int, status: int) -> None:
        with self._lock:
            host = self.device_hosts.get(name)
            if host is not None and host["pid"] == pid:
                host["pid"] = 0                # gone; the next MakeWorker restarts it
        self.log.info(f"device worker host {name} exited ({_status(status)})")

    def _hosts(self) -> dict:
        hosts = {}
        if self.vm_pid:
            hosts[str(self.vm_pid)] = {"name": "vm", "pid": self.vm_pid}
        profiler = self.profiler
        if profiler is not None:
            hosts[str(profiler[0])] = {"name": "profiler", "pid": profiler[0]}
        with self._lock:
            for name, host in self.device_hosts.items():
                if host["pid"]:
                    hosts[str(host["pid"])] = {"name": name, "pid": host["pid"], "restarts": host["restarts"]}
        return hosts

    def _set_log_level(self, text: str) -> str:
        """What the control process logs to kmsg: error, warn, info, debug or trace."""
        level = {name: n for n, name in _LEVEL_NAMES.items()}.get(text.strip().lower())
        if level is None:
            raise ValueError(f"unknown level {text!r} (error, warn, info, debug, trace)")
        self.log.max_level = level
        self.log.info(f"log level set to {text.strip().lower()}")
        return _LEVEL_NAMES[level]

    def _inspect_vm(self, path: str, depth: int):
        from hclsim.hcl.pb import inspect_pb2
        node = inspect_pb2.Node()
        try:
            node.ParseFromString(self._vm_call(inspect=pb.InspectRequest(path=path, depth=depth)).payload)
        except Exception as exc:              # the worker's side failed: the node says so
            node.failed.field1.mesh.value = str(exc)
        return node

    def _update_vm(self, path: str, text: str):
        from hclsim.hcl.pb import inspect_pb2
        value = inspect_pb2.Value()
        value.ParseFromString(self._vm_call(update=pb.UpdateRequest(path=path, value=text)).payload)
        return value


def _on_exit(pid: int, name: str, then) -> None:
    """Reap the host pid when it exits (a thread that waits for it), tell the kernel, then(status)."""
    def wait():
        _pid, status = os.waitpid(pid, 0)
        linux.exited(pid, status)
        then(status)
    threading.Thread(target=wait, name=f"{name}-host-wait", daemon=True).start()


_LEVEL_NAMES = {klog.ERROR: "error", klog.WARN: "warn", klog.INFO: "info", klog.DEBUG: "debug", klog.TRACE: "trace"}
_STATE_NAMES = {WAITING_FOR_START: "waiting_for_start", STARTING: "starting", STARTED: "started",
                RESTARTING: "restarting"}


def _panic(log) -> None:
    log.error("panicked: explicitly requested crash (diag Crash)")
    os.abort()


def _build_info() -> dict:
    import json
    try:
        info = json.loads(linux.read_file("/etc/underhill-build-info.json"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in info.items() if isinstance(v, (str, int, bool))}


def _kernel_tree() -> dict:
    from hclsim.hcl import inspect_tree

    def text(path: str) -> str:
        try:
            return linux.read_file(path).decode("utf-8", "replace").strip()
        except OSError as exc:
            return f"<{exc.strerror}>"
    mounts = {}
    for i, line in enumerate(text("/proc/mounts").splitlines()):
        parts = line.split()
        if len(parts) >= 4:
            mounts[str(i)] = {"source": parts[0], "target": parts[1], "fstype": parts[2], "options": parts[3]}
    return {"cpus_online": text("/sys/devices/system/cpu/online"),
            "cpus_present": text("/sys/devices/system/cpu/present"),
            "cmdline": text("/proc/cmdline"), "uptime": text("/proc/uptime"), "mounts": mounts,
            "kmsg": inspect_tree.Lazy(_kmsg_tree)}


def _kmsg_tree() -> dict:
    """How many records the kernel's ring holds, and the newest ones (a reader of its own)."""
    records = []
    try:
        with linux.open_file("/dev/kmsg", kabi.O_RDONLY | kabi.O_NONBLOCK) as f:
            while True:
                try:
                    rec = f.read(kabi.MAX_READ)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == kabi.EPIPE:
                        continue
                    break
                if not rec:
                    break
                records.append(rec.split(b";", 1)[-1].split(b"\n", 1)[0].decode("utf-8", "replace"))
    except OSError:
        pass
    return {"records": len(records), "last": {str(i): line for i, line in enumerate(records[-5:])}}


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


# ---- a child host (re-run as [argv0, node name]) ----------------------------------------------
def host_main(argv: list[str], invitation) -> int:
    name = invitation.node_name
    linux.start_process(f"underhill-{name}", argv)
    from hclsim.hcl import device_host
    if name in device_host.DEVICES:             # a device host: restricted before any other thread
        device_host.prepare_host(name)
    log = klog.Logger(klog.UNDERHILL_FACILITY, f"underhill-{name}")
    sock = socket.socket(fileno=invitation.socket_fd)
    done = threading.Event()
    workers = []

    def on_message(channel, env):
        kind = env.WhichOneof("body")
        if kind == "launch":
            factory = registered_workers().get(env.launch.worker_id)
            fds = channel.take_fds(env.id)
            if factory is None:
                for fd in fds:
                    os.close(fd)
                channel.send(event=pb.WorkerEvent(failed=f"unknown worker {env.launch.worker_id!r}"))
                return
            worker = factory(env.launch.params, channel, log, fds=fds)
            workers.append(worker)
            threading.Thread(target=_run_worker, args=(worker, channel, log, done), name="worker",
                             daemon=True).start()
        elif kind == "rpc":
            _host_rpc(env, channel, workers, log)
    channel = mesh.Channel(sock, on_message, f"{name} host").start()
    # The host runs until its parent drops it (or its worker ends).
    while not channel.closed.wait(0.5) and not done.is_set():
        pass
    for w in workers:
        w.stop()
    return 0


def _host_rpc(env, channel, workers, log) -> None:
    what = env.rpc.WhichOneof("rpc")
    if what == "crash":
        log.error("panicked: explicitly requested crash (diag Crash)")
        os.abort()
    if what == "stop":
        for w in workers:
            w.stop()
        channel.reply(env.id)
        return
    worker = workers[0] if workers else None
    handler = getattr(worker, f"rpc_{what}", None) if worker is not None else None
    if handler is None:
        channel.reply(env.id, error=f"the {what} request is not handled by this host")
        return

    def run():                       # off the channel's reader thread: a handler may call back
        try:
            channel.reply(env.id, payload=handler(getattr(env.rpc, what)) or b"")
        except Exception as exc:
            channel.reply(env.id, error=str(exc))
    threading.Thread(target=run, name=f"rpc-{what}", daemon=True).start()


def _run_worker(worker, channel, log, done) -> None:
    try:
        worker.run()
        channel.send(event=pb.WorkerEvent(stopped=pb.Empty()))
    except Exception as exc:                 # the worker failed: tell the control process why
        log.error(f"worker failed: {exc}")
        try:
            channel.send(event=pb.WorkerEvent(failed=str(exc)))
        except mesh.MeshError:
            pass
    finally:
        if getattr(worker, "ends_host", True):   # the profiler's host stays for the next request
            done.set()


def registered_workers() -> dict:
    from hclsim.hcl import device_host, profiler, worker
    return {"UnderhillWorker": worker.UnderhillWorker, "ProfilerWorker": profiler.ProfilerWorker,
            "openhcl_remote_chipset_worker": device_host.RemoteChipsetDeviceWorker}
