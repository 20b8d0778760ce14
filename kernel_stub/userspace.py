"""The stand-in kernel from the handoff to userspace: the early log Linux prints, the initrd
unpacked as the root filesystem, the devices and pseudo file systems, the system-call server,
and PID 1 started as a real OS process (rdinit=, argv0 dispatch, the command line's unknown
NAME=VALUE words as its environment). PID 1 exiting panics the kernel ("Attempted to kill
init!"); the caller (hclsim/system.py) decides what a panic does (panic=-1: reset).

Every process the VM starts is in PID 1's process group and dies with it (PR_SET_PDEATHSIG
chains up to the machine process). Each process gets its real exit status in the process table:
its reaper's (its parent, or underhill_init, a child subreaper, for orphans; both report it with
EXITED), or the kernel's own: the machine process is a child subreaper while a VM runs, so the
VM's processes whose parents and init are gone are re-parented to it and reaped here (waitid).
shutdown() stops every process of the VM (SIGSTOP: none can exit or reap another in between),
notes which were still alive, kills them (SIGKILL) and waits until each is reaped: those show
"killed by signal 9 at power off" (or when else the host tore the VM down).
"""
import os
import select
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

from hclsim import HclsimError
from hclsim.defs import kabi
from hclsim.kernel_stub import cmdline as kcmdline
from hclsim.kernel_stub import devfs, kmsg as kmsg_mod, procfs, sysfs
from hclsim.kernel_stub.handoff import kernel_params
from hclsim.kernel_stub.mshv import Mshv
from hclsim.kernel_stub.namespace import Namespace
from hclsim.kernel_stub.procpid import host_state
from hclsim.kernel_stub.rootfs import RootfsError, unpack
from hclsim.kernel_stub.syscalls import SyscallServer
from hclsim.kernel_stub.vfs import CharDevice, Dir, File, KernelError

LINUX_VERSION = "6.6.0-hclsim"
HOST_DEVICE = (10, 250)          # /dev/hclsim_host (a misc device)
E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS", 5: "unusable"}


class UserspaceError(HclsimError):
    pass


@dataclass
class Event:
    name: str
    t: float                      # host seconds since the kernel took the handoff
    detail: str = ""


@dataclass
class InitProcess:
    pid: int
    returncode: int | None = None
    pidfd: int | None = None
    status: int | None = None        # its wait status, once reaped


@dataclass
class Panic:
    message: str
    exit_status: int


class HostChannel(File):
    """/dev/hclsim_host: the VM worker's messages to the host (console lines, VTL0 started,
    power off), one per write."""

    def __init__(self, on_message):
        self.on_message = on_message

    def write(self, data):
        if not data or data[0] not in kabi.HOST_MESSAGE_NAMES:
            raise KernelError(kabi.EINVAL, "unknown host message")
        self.on_message(data[0], bytes(data[1:]))
        return len(data)


class CpuControl:
    """What sysfs's cpuN/online reaches: the Linux CPUs, and onlining a sidecar CPU (under the
    CPU lock: the conversion runs the sidecar CPUs), with its VP's pages refreshed after."""

    def __init__(self, linux, mshv):
        self.linux, self.mshv = linux, mshv
        self.present = list(range(linux.partition.vp_count))

    def is_online(self, cpu: int) -> bool:
        return cpu in self.linux.cpus.online

    def online(self, cpu: int) -> None:
        if cpu in self.linux.cpus.online:
            return
        with self.mshv.lock:
            try:
                self.linux.cpus.online_cpu(cpu)
            except HclsimError as exc:
                raise KernelError(kabi.EIO, str(exc)) from None
        self.mshv.prime(cpu)


class Userspace:
    def __init__(self, linux, handoff, initrd: bytes | None, run_dir: str, *, on_console=None, on_kmsg=None,
                 on_event=None, vsock=None, symbolize=None, vmgs_path: str | None = None):
        """linux: kernel_stub.kernel.Kernel; on_console(vp, bytes): a VTL0 console line;
        on_kmsg(line): a kernel log line for the console; on_event(Event)."""
        self.linux, self.handoff, self.initrd, self.run_dir = linux, handoff, initrd, run_dir
        self.on_console, self.on_event = on_console, on_event
        self.t0 = time.monotonic()
        self.events: list[Event] = []
        self.panic: Panic | None = None
        self.powered_off = threading.Event()
        self.finished = threading.Event()          # powered off or panicked
        self.init_proc = None
        self.console: dict[int, bytearray] = {}
        self.com1 = bytearray()
        self.kmsg = kmsg_mod.Kmsg(lambda: time.monotonic() - self.t0)
        # The console Linux was given: console=ttyS2 is COM3 (the shim's serial port).
        self.console_on_com3 = any(p.name == b"console" and (p.value or b"").split(b",")[0] == b"ttyS2"
                                   for p in kernel_params(handoff.cmdline_bytes)[0])
        self.com3 = bytearray()                    # what the kernel printed on COM3
        if self.console_on_com3:
            self.kmsg.add_console(lambda record: self.com3.extend(record.dmesg()))
            if on_kmsg is not None:
                self.kmsg.add_console(on_kmsg)
        self.args = kcmdline.init_args(handoff.cmdline_bytes)
        self.mshv = self.server = self.devices = None
        self.tearing_down = False
        self.vsock = vsock                          # kernel_stub.vsock.Vsock: the VM's, across resets
        self.symbolize = symbolize                  # guest address -> "image:symbol+off" (profiling)
        self.vmgs_path = vmgs_path                  # the host's VMGS disk (/dev/vmgs), of the VM's state folder
        self._reaper = None
        self._reap_stop = threading.Event()

    def log(self, text: str, level: int = 6) -> None:
        self.kmsg.log(text, level)

    def event(self, name: str, detail: str = "") -> None:
        ev = Event(name, time.monotonic() - self.t0, detail)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    # ---- boot ----------------------------------------------------------------------------
    def early_log(self) -> None:
        h, cpus = self.handoff, self.linux.cpus
        self.log(f"Linux version {LINUX_VERSION} (hclsim) #1 SMP PREEMPT_DYNAMIC", 5)
        self.log(f"Command line: {h.cmdline}", 6)
        self.log("BIOS-provided physical RAM map:", 6)
        for e in h.e820:
            self.log(f"BIOS-e820: [mem {e.addr:#018x}-{e.end - 1:#018x}] {E820_NAMES.get(e.type, 'type ' + str(e.type))}", 6)
        n = self.linux.partition.vp_count
        self.log(f"smpboot: Allowing {n} CPUs, 0 hotplug CPUs", 6)
        self.log(f"smp: Brought up 1 node, {len(cpus.online)} CPU{'s' if len(cpus.online) != 1 else ''}", 6)
        if self.linux.sidecar is not None:
            held = self.linux.sidecar.sidecar_cpus()
            self.log(f"sidecar: {len(held)} CPUs on {len(self.linux.sidecar.nodes)} nodes, onlined on demand", 6)
        if self.args.unknown:
            self.log("Unknown kernel command line parameters \"" + " ".join(self.args.unknown)
                     + "\", will be passed to user space.", 5)
        if self.initrd:
            self.log(f"Freeing initrd memory: {len(self.initrd) // 1024}K", 6)

    def start(self) -> None:
        """Everything up to PID 1 running; UserspaceError if there is no init to run (the
        kernel panics "No working init found")."""
        self.early_log()
        root = os.path.join(self.run_dir, "root")
        os.makedirs(root, exist_ok=True)
        try:
            self.rootfs = unpack(self.initrd or b"", root)
        except RootfsError as exc:
            self._panic(f"VFS: Unable to unpack the initramfs: {exc}", 0)
            return
        self.event("rootfs", f"{len(self.initrd or b'') // 1024} KiB initrd unpacked")
        self.devices = devfs.Devices(self.kmsg)
        self.mshv = Mshv(self.linux.partition, self.linux.cpus, self.linux.sidecar, self.log)
        for node in self.mshv.device_nodes():
            self.devices.register(node)
        self.devices.register(CharDevice("hclsim_host", *HOST_DEVICE, lambda fl, c: HostChannel(self._host_message)))
        if self.vmgs_path is not None:
            self.devices.register(devfs.BlockDevice("vmgs", devfs.BLOCK_EXT_MAJOR, 0,
                                                    lambda fl, c: devfs.HostDiskFile(self.vmgs_path, fl)))
        self.cpu_control = CpuControl(self.linux, self.mshv)
        for cpu in sorted(self.linux.cpus.online):
            self.mshv.prime(cpu)
        self.sysctl = procfs.Sysctl()
        self.sysfs_state = sysfs.SysfsState(writes=self.sysctl.writes)   # one log, in the order written
        self.namespace = Namespace(self.rootfs, {
            "proc": self._procfs, "sysfs": self._sysfs, "devtmpfs": self.devices.tree, "devpts": lambda: Dir()},
            self.devices, self.log)
        self.server = SyscallServer(self.run_dir, self.namespace, self.log)
        self.server.on_hello = self._hello
        self.server.vsock = self.vsock
        self._start_init()

    def _procfs(self):
        from hclsim.kernel_stub import profiling
        root = procfs.make_procfs(cmdline=self.handoff.cmdline_bytes, dtb=self.handoff.dtb,
                                  clock=lambda: time.monotonic() - self.t0, meminfo=self._meminfo,
                                  modules=self._modules, mounts=self.namespace.mounts, cpus=self.cpu_control,
                                  sysctl=self.sysctl, random=self.devices.random)
        root.add("hclsim", profiling.proc_dir(self.linux.partition, self.linux.cpus, self.mshv.lock,
                                              self.symbolize, self.server))
        from hclsim.kernel_stub.procpid import pid_dirs
        fixed = root.children()
        return Dir(make=lambda: {**fixed, **pid_dirs(self.server)})

    def _sysfs(self):
        return sysfs.make_sysfs(dtb=self.handoff.dtb, cpus=self.cpu_control, state=self.sysfs_state)

    def _meminfo(self) -> dict:
        total = sum(e.size for e in self.handoff.e820 if e.type == 1) // 1024
        return procfs.basic_meminfo(total, total * 3 // 4)

    def _modules(self):
        return [procfs.ModuleInfo(m.name, m.size) for m in self.namespace.modules]

    def _start_init(self) -> None:
        path = self.args.rdinit
        try:
            host = self.namespace.host_path(path)
        except KernelError as exc:
            self.log(f"Failed to execute {path} (error -{exc.errno})", 3)
            self._panic("No working init found.  Try passing init= option to kernel. "
                        "See Linux Documentation/admin-guide/init.rst for guidance.", 0)
            return
        self.log(f"Run {path} as init process", 6)
        devnull = os.open(os.devnull, os.O_RDWR)
        _subreaper(True)
        try:   # PID 1 gets the kernel at KERNEL_FD and a session of its own (the VM's processes)
            pid = os.posix_spawn(sys.executable, kabi.binfmt_argv(sys.executable, host, [path, *self.args.argv]),
                                 self.args.env,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                                               (os.POSIX_SPAWN_DUP2, self.server.dir_fd, kabi.KERNEL_FD)],
                                 setsid=True)
        except BaseException:
            _subreaper(False)
            raise
        finally:
            os.close(devnull)
        from hclsim.kernel_stub.syscalls import open_pidfd
        self.init_proc = InitProcess(pid, pidfd=open_pidfd(pid))
        self.event("pid1", f"{path} (host pid {pid})")
        self._reap_wake = os.pipe()               # wakes the reaper to stop it
        self._reaper = threading.Thread(target=self._reap, name="kernel-reaper", daemon=True)
        self._reaper.start()

    # ---- reaping ---------------------------------------------------------------------------
    def _reap(self) -> None:
        """The kernel's reaper: PID 1 when it exits (the panic), then the VM's processes that
        were re-parented to this process (their parents and init gone): those in PID 1's
        process group, and the others of the table by their pidfds."""
        init = self.init_proc
        poller = select.poll()
        poller.register(self._reap_wake[0], select.POLLIN)
        watching = init.pidfd is not None
        if watching:
            poller.register(init.pidfd, select.POLLIN)     # readable once init has exited
        while not self._reap_stop.is_set():
            poller.poll(500 if init.returncode is None else 20)
            if init.returncode is None:
                try:
                    pid, status = os.waitpid(init.pid, os.WNOHANG)
                except ChildProcessError:
                    pid = 0
                if pid:
                    self._reaped(pid, status)
            self.reap_orphans()
            if watching and init.returncode is not None:
                poller.unregister(init.pidfd)
                watching = False

    def reap_orphans(self) -> bool:
        """Reap what has exited of the VM's processes that are this process's children now;
        False once none of PID 1's process group is left to reap."""
        group_left = True
        while True:
            try:
                res = os.waitid(os.P_PGID, self.init_proc.pid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                group_left = False
                break
            if res is None:
                break
            self._reaped(res.si_pid, _wait_status(res))
        p_pidfd = getattr(os, "P_PIDFD", None)
        for proc in self._vm_processes():      # the VM's processes outside the group (setsid)
            if proc.exit_status is not None or proc.pidfd is None or p_pidfd is None or proc.pid == self.init_proc.pid:
                continue
            try:
                res = os.waitid(p_pidfd, proc.pidfd, os.WEXITED | os.WNOHANG)
            except (ChildProcessError, OSError):
                continue                         # not ours: its parent reaps it
            if res is not None:
                self._reaped(proc.pid, _wait_status(res))
        return group_left

    def _reaped(self, pid: int, status: int) -> None:
        proc = self.server.processes.get(pid)
        if proc is not None and proc.exit_status is None:
            proc.exit_status = status
        if pid == self.init_proc.pid:
            self.init_proc.status = status
            self.init_proc.returncode = os.waitstatus_to_exitcode(status)
            if not self.tearing_down and self.panic is None:   # also after power off (a VM kept running)
                self._panic(f"Attempted to kill init! exitcode={status:#010x}", status)

    def _vm_processes(self) -> list:
        """The processes of the table that are the VM's: PID 1, those in its session, their
        descendants (a client of the kernel socket from elsewhere is not)."""
        init, out, pids = self.init_proc.pid, [], set()
        for pid in list(self.server.order):
            proc = self.server.processes[pid]
            if pid != os.getpid() and (pid == init or proc.sid == init or proc.ppid in pids):
                pids.add(pid)
                out.append(proc)
        return out

    def _panic(self, message: str, status: int) -> None:
        self.panic = Panic(message, status)
        self.log(f"Kernel panic - not syncing: {message}", 0)
        self.event("panic", message)
        self.finished.set()

    # ---- processes and the host channel -----------------------------------------------
    def _hello(self, proc) -> None:
        """A process introduced itself: "process" on the timeline, "worker" for the VM worker's
        host (underhill-vm)."""
        self.event("worker" if proc.comm == "underhill-vm" else "process",
                   f"{proc.comm} (pid {proc.pid}, parent {proc.ppid}): {' '.join(proc.argv)}")

    def _host_message(self, kind: int, data: bytes) -> None:
        if kind == kabi.HOST_CONSOLE and len(data) >= 4:
            vp = int.from_bytes(data[:4], "little")
            self.console.setdefault(vp, bytearray()).extend(data[4:])
            self.com1 += data[4:]
            if self.on_console is not None:
                self.on_console(vp, data[4:])
        elif kind == kabi.HOST_VTL0_STARTED:
            self.event("vtl0", "VTL0 running on every VP")
        elif kind == kabi.HOST_POWER_OFF:
            self.event("power-off", "the guest powered the VM off")
            self.powered_off.set()
            self.finished.set()

    def process_tree(self) -> list[dict]:
        """Every process that introduced itself: pid, parent, argv, comm, exit status (as its
        reaper got it; "killed by signal 9 at power off" for those the teardown killed)."""
        out = []
        if not self.server:
            return out
        vm = {p.pid for p in self._vm_processes()} if self.init_proc is not None else set()
        for pid in self.server.order:
            p = self.server.processes[pid]
            status = p.exit_status
            if status is not None:
                text = _describe(status)
                if p.killed and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                    text += f" {p.killed}"
            elif self.tearing_down and pid in vm and not _alive(p):
                text = "exited (reaped by a process that did not report its status)"
            else:
                text = None                       # running (or not one of the VM's processes)
            out.append({"pid": p.pid, "ppid": p.ppid, "argv": p.argv, "comm": p.comm, "exit_status": text})
        return out

    # ---- the end ---------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def shutdown(self) -> None:
        """Kill every process of the VM, wait until each is reaped, stop serving, remove the
        run folder."""
        self.tearing_down = True               # from here PID 1 dying is the teardown, not a panic
        self.finished.set()
        if self.init_proc is not None:
            self._kill_everything()
        if self.server is not None:
            self.server.close()
        if self.devices is not None:
            self.devices.shutdown()
        self.kmsg.shutdown()
        if self.mshv is not None:
            self.mshv.close()
        shutil.rmtree(os.path.join(self.run_dir, "root"), ignore_errors=True)


    def _kill_everything(self) -> None:
        """Stop every process of the VM (SIGSTOP to PID 1's group and to each of the table's,
        which may have left it), note the ones still alive, SIGKILL them all, and wait until
        every one is reaped (by the reaper thread: each is this process's child by then)."""
        init = self.init_proc
        reason = ("at power off" if self.powered_off.is_set() else
                  "after the kernel panic" if self.panic is not None else "when the VM was stopped")
        procs = [p for p in self._vm_processes() if p.exit_status is None]
        self._signal_all(procs, signal.SIGSTOP)
        deadline = time.monotonic() + 2
        for p in procs:                           # stopped, or already exited (a zombie) or gone
            while _state(p.pid) not in "TtZX" and time.monotonic() < deadline:
                time.sleep(0.001)
            if _state(p.pid) not in "ZX" and p.exit_status is None:
                p.killed = reason
        self._signal_all(procs, signal.SIGKILL)
        deadline = time.monotonic() + 5
        gone_since = None
        while time.monotonic() < deadline:
            self.reap_orphans()
            if init.returncode is not None and not _group_members(init.pid):
                if all(p.exit_status is not None for p in procs):
                    break
                # The rest are gone, reaped by their parents: their reports (EXITED) come within
                # milliseconds, unless the parent died before it sent one (the report says so).
                if all(p.exit_status is not None or _state(p.pid) == "X" for p in procs):
                    gone_since = gone_since or time.monotonic()
                    if time.monotonic() - gone_since > GONE_GRACE_S:
                        break
            time.sleep(0.002)
        self._reap_stop.set()
        os.write(self._reap_wake[1], b"x")
        self._reaper.join(2)
        for fd in (*self._reap_wake, init.pidfd):
            if fd is not None:
                os.close(fd)
        init.pidfd = None
        _subreaper(False)

    def _signal_all(self, procs, sig: int) -> None:
        try:
            os.killpg(self.init_proc.pid, sig)      # PID 1's process group: every process of the VM
        except (ProcessLookupError, PermissionError):
            pass
        for p in procs:                             # and those that left it (setsid)
            try:
                if p.pidfd is not None:
                    signal.pidfd_send_signal(p.pidfd, sig)
                else:
                    os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError, OSError):
                pass


PR_SET_CHILD_SUBREAPER = 36
_subreaper_lock = threading.Lock()
_subreaper_users = [0]


def _subreaper(on: bool) -> None:
    """The machine process is a child subreaper while any VM of it runs (prctl): a VM process
    whose parent and init are gone is re-parented here, not to the host's init, and reaped
    with its real status. Counted: several VMs may run in one process."""
    with _subreaper_lock:
        before = _subreaper_users[0]
        _subreaper_users[0] = max(0, before + (1 if on else -1))
        if (before == 0) != (_subreaper_users[0] == 0):
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


GONE_GRACE_S = 1.5      # how long a reaped process's report may take under load (0.25 s was too short on a
                        # busy 2-core machine); a report that never comes cost the 5 s before


def _state(pid: int) -> str:
    """The host's state letter of pid (R, S, D, T, Z, ...); "X" once it is gone."""
    return host_state(pid, gone="X")


def _group_members(pgid: int) -> list[int]:
    """The host's processes (zombies too) in process group pgid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _alive(proc) -> bool:
    if proc.pidfd is not None:
        return not select.select([proc.pidfd], [], [], 0)[0]      # readable once it has exited
    return _state(proc.pid) not in "ZX"


def _wait_status(res) -> int:
    """A waitid() result as the wait status waitpid() would have given."""
    if res.si_code == os.CLD_EXITED:
        return (res.si_status & 0xFF) << 8
    if res.si_code == os.CLD_DUMPED:
        return res.si_status | 0x80
    return res.si_status


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    if os.WIFEXITED(status):
        return f"exit {os.WEXITSTATUS(status)}"
    return f"status {status:#x}"
