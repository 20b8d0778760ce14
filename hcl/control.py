"""openvmm_hcl: the control process and, re-run as a mesh child host, the worker hosts
(underhill_core/src/lib.rs and worker.rs; shared/design/openhcl-userspace.md section 2).

Control: options, the "VMM process" line, the boot-loader times from /sys/firmware/fdt, the pid
file, then the "vm" host running UnderhillWorker (unless it waits for a diag Start), and an event
loop over the worker's events and requests. The worker stopping or failing ends the control
process with a non-zero status (then init exits and the kernel panics).
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
        if self.state == WAITING_FOR_START:
            log.info("waiting for a diag Start request before launching the workers")
        else:
            self.launch_workers()
        return self.event_loop()

    def launch_workers(self) -> None:
        self.state = STARTING
        proc, channel = mesh.launch_host("vm", self.argv[0], dict(os.environ), self._on_message)
        self.vm = (proc, channel)
        params = pb.UnderhillWorkerParams(env={k: v for k, v in os.environ.items()
                                               if k.startswith(("OPENHCL_", "UNDERHILL_", "HCLSIM_"))})
        channel.send(launch=pb.LaunchWorker(worker_id="UnderhillWorker", params=params.SerializeToString()))
        threading.Thread(target=self._watch, args=(proc, channel), name="vm-host-wait", daemon=True).start()

    def _watch(self, pid, channel) -> None:
        _pid, status = os.waitpid(pid, 0)
        linux.exited(pid, status)
        self.events.put(("exited", status))

    def _on_message(self, channel, env: pb.Envelope) -> None:
        kind = env.WhichOneof("body")
        if kind == "event":
            self.events.put(("event", env.event.WhichOneof("event"), env.event))
        elif kind == "control":
            req = env.control.WhichOneof("request")
            if req == "flush_logs":
                channel.reply(env.id)
            else:
                channel.reply(env.id, error=f"cannot launch a {env.control.make_worker!r} host yet")
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


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


# ---- a child host (re-run as [argv0, node name]) ----------------------------------------------
def host_main(argv: list[str], invitation) -> int:
    name = invitation.node_name
    linux.start_process(f"underhill-{name}", argv)
    log = klog.Logger(klog.UNDERHILL_FACILITY, f"underhill-{name}")
    sock = socket.socket(fileno=invitation.socket_fd)
    done = threading.Event()
    workers = []

    def on_message(channel, env):
        kind = env.WhichOneof("body")
        if kind == "launch":
            factory = registered_workers().get(env.launch.worker_id)
            if factory is None:
                channel.send(event=pb.WorkerEvent(failed=f"unknown worker {env.launch.worker_id!r}"))
                return
            worker = factory(env.launch.params, channel, log)
            workers.append(worker)
            threading.Thread(target=_run_worker, args=(worker, channel, log, done), name="worker",
                             daemon=True).start()
        elif kind == "rpc" and env.rpc.WhichOneof("rpc") == "stop":
            for w in workers:
                w.stop()
            channel.reply(env.id)
    channel = mesh.Channel(sock, on_message, f"{name} host").start()
    # The host runs until its parent drops it (or its worker ends).
    while not channel.closed.wait(0.5) and not done.is_set():
        pass
    for w in workers:
        w.stop()
    return 0


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
        done.set()


def registered_workers() -> dict:
    from hclsim.hcl import worker
    return {"UnderhillWorker": worker.UnderhillWorker}
