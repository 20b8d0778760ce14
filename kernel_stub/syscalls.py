"""The system-call surface of the Linux stand-in: a SOCK_SEQPACKET Unix socket in the VM's run
folder (defs/kabi.py), one thread per connection (one connection per userspace thread), a
file table per process. Every request is checked; a bad one is answered with an errno, never a
crash of the kernel: malformed messages get EINVAL, unknown operations ENOSYS, unknown file
descriptors EBADF.
"""
import array
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from hclsim.defs import kabi
from hclsim.kernel_stub.vfs import Caller, File, KernelError

_PEERCRED = struct.Struct("3i")


@dataclass
class Process:
    """A userspace process as the kernel knows it (the host pid is its pid)."""
    pid: int
    ppid: int
    argv: list
    comm: str
    started: float
    files: dict = field(default_factory=dict)
    next_fd: int = 3
    exit_status: int | None = None       # the wait status its reaper got (its parent, a subreaper, the kernel)
    sid: int = 0                         # its session on the host (the VM's is PID 1's)
    pidfd: int | None = None             # a pidfd on it (signals and waitid without pid reuse)
    killed: str | None = None            # the host killed it tearing the VM down: when ("at power off")
    sampled: bool = False                # it answers SIGPROF with its stacks (STACKS)
    stacks: tuple | None = None          # (monotonic time, folded stacks) it last reported
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, f: File) -> int:
        with self.lock:
            fd = self.next_fd
            self.next_fd += 1
            self.files[fd] = f
            return fd

    def file(self, fd: int) -> File:
        f = self.files.get(fd)
        if f is None:
            raise KernelError(kabi.EBADF, f"no file descriptor {fd}")
        return f


def host_ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def host_sid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, ValueError, IndexError):
        return 0


def open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):       # gone already, or a host without pidfds
        return None


def host_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return "?"


class SyscallServer:
    """Serves the namespace (kernel_stub/namespace.py) to the processes of one VM."""

    def __init__(self, run_dir: str, namespace, log):
        self.run_dir, self.ns, self.log = run_dir, namespace, log
        self.path = os.path.join(run_dir, kabi.KERNEL_SOCKET)
        self.processes: dict[int, Process] = {}
        self.order: list[int] = []           # pids in the order they introduced themselves
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._conns: set = set()
        self._closed = False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(self.path)
        self.listener.listen(128)
        self.dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._accepter = threading.Thread(target=self._accept, name="kernel-accept", daemon=True)
        self._accepter.start()
        self.on_hello = None                 # (Process) -> None
        self.vsock = None                    # kernel_stub.vsock.Vsock, once the VM has one

    # ---- connections -------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            pid, _uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            t = threading.Thread(target=self._serve, args=(conn, pid), name=f"kernel-{pid}", daemon=True)
            with self._lock:
                self._conns.add(conn)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _process(self, pid: int) -> Process:
        with self._lock:
            proc = self.processes.get(pid)
            if proc is None:
                proc = Process(pid, host_ppid(pid), [], host_comm(pid), time.monotonic(), sid=host_sid(pid),
                               pidfd=open_pidfd(pid))
                self.processes[pid] = proc
                self.order.append(pid)
            return proc

    def _serve(self, conn: socket.socket, pid: int) -> None:
        proc = self._process(pid)
        try:
            while True:
                try:
                    msg = conn.recv(kabi.MAX_MESSAGE)
                except OSError:
                    return
                if not msg:
                    return
                fds, seq = [], 0
                try:
                    seq, op, values = kabi.decode_request(msg)
                    out, fds = self.dispatch(proc, op, values)
                    reply = kabi.encode_reply(seq, 0, out)
                except kabi.KabiError as exc:
                    self.log(f"kernel: pid {pid}: malformed request: {exc}", 4)
                    reply = kabi.encode_reply(seq, kabi.EINVAL)
                except KernelError as exc:
                    if exc.errno not in (kabi.EAGAIN, kabi.EINTR, kabi.ENOENT):
                        self.log(f"kernel: {proc.comm} ({pid}) {_op_name(msg)}: {os.strerror(exc.errno)}: {exc}", 7)
                    reply = kabi.encode_reply(seq, exc.errno)
                except (TypeError, ValueError, OverflowError) as exc:   # arguments of the wrong type or range
                    self.log(f"kernel: pid {pid}: bad arguments to {_op_name(msg)}: {exc}", 4)
                    reply = kabi.encode_reply(seq, kabi.EINVAL)
                except Exception as exc:     # a bug in a driver: an oops in kmsg, EIO to the caller, go on
                    import traceback
                    self.log(f"kernel: BUG in {_op_name(msg)} for pid {pid}: {type(exc).__name__}: {exc}", 1)
                    for line in traceback.format_exc().rstrip().splitlines()[-6:]:
                        self.log(f"kernel:   {line}", 1)
                    reply = kabi.encode_reply(seq, kabi.EIO)
                try:
                    if fds:
                        conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    else:
                        conn.send(reply)
                except OSError:
                    return
                finally:
                    for fd in fds:
                        os.close(fd)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    # ---- requests ----------------------------------------------------------------------
    def dispatch(self, proc: Process, op: int, v: list) -> tuple[list, list]:
        """(reply values, host fds to pass) for one request; KernelError for an errno."""
        caller = Caller(proc.pid, proc.comm)
        handler = self._OPS.get(op)
        if handler is None:
            raise KernelError(kabi.ENOSYS, f"unknown operation {op}")
        types = handler[1]
        if len(v) != len(types) or not all(isinstance(x, t) for x, t in zip(v, types)):
            raise KernelError(kabi.EINVAL, f"{kabi.Op(op).name} takes {len(types)} values")
        return handler[0](self, proc, caller, *v)

    def _hello(self, proc, caller, argv):
        proc.argv = list(argv)
        proc.comm = host_comm(proc.pid)
        proc.ppid = host_ppid(proc.pid)
        proc.sid = host_sid(proc.pid)
        if self.on_hello is not None:
            self.on_hello(proc)
        return [proc.pid], []

    def _open(self, proc, caller, path, flags, mode):
        f = self.ns.open(path, flags, mode, caller)
        if isinstance(f, int):                     # a rootfs file: a host descriptor
            return [-1, 1], [f]
        if f.host_fd is not None:          # the process gets the descriptor; the kernel keeps no copy
            fd = os.dup(f.host_fd)
            f.close()
            return [-1, 1], [fd]
        return [proc.install(f), 0], []

    def _read(self, proc, caller, fd, count):
        if count < 0:
            raise KernelError(kabi.EINVAL)
        f = proc.file(fd)
        return [f.read(min(count, kabi.MAX_READ), getattr(f, "nonblock", False))], []

    def _write(self, proc, caller, fd, data):
        return [proc.file(fd).write(data)], []

    def _close(self, proc, caller, fd):
        with proc.lock:
            f = proc.files.pop(fd, None)
        if f is None:
            raise KernelError(kabi.EBADF)
        f.close()
        return [], []

    def _ioctl(self, proc, caller, fd, request, arg):
        result, out = proc.file(fd).ioctl(request, arg)
        if isinstance(result, File):               # MSHV_CREATE_VTL and the like: a new file
            result = proc.install(result)
        return [result, out], []

    def _mmap(self, proc, caller, fd, offset, length):
        if offset < 0 or length <= 0 or offset % kabi.PAGE_SIZE:
            raise KernelError(kabi.EINVAL)
        host_fd, host_offset = proc.file(fd).mmap(offset, length)
        return [host_offset], [os.dup(host_fd)]

    def _mount(self, proc, caller, source, target, fstype, flags, data):
        self.ns.mount(source, target, fstype, flags, data)
        return [], []

    def _stat(self, proc, caller, path):
        return list(self.ns.stat(path)), []

    def _listdir(self, proc, caller, path):
        return [self.ns.listdir(path)], []

    def _mkdir(self, proc, caller, path, mode):
        self.ns.mkdir_all(path, mode)
        return [], []

    def _finit_module(self, proc, caller, path, params):
        self.ns.finit_module(path, params, caller)
        return [], []

    def _poll(self, proc, caller, fd, timeout_ms):
        return [int(proc.file(fd).poll(None if timeout_ms < 0 else timeout_ms / 1000))], []

    def _resolve(self, proc, caller, path):
        return [self.ns.host_path(path)], []

    def _readlink(self, proc, caller, path):
        return [self.ns.readlink(path)], []

    def _vsock_listen(self, proc, caller, port):
        if self.vsock is None:
            raise KernelError(kabi.ENODEV, "this VM has no vsock")
        return [], [self.vsock.listen(port)]

    def _stacks(self, proc, caller, text):
        if len(text) > 1 << 20:
            raise KernelError(kabi.EINVAL, "a stack report over 1 MiB")
        proc.sampled = True
        if text:
            proc.stacks = (time.monotonic(), text)
        return [], []

    def _exited(self, proc, caller, pid, status):
        """Its parent reaped pid, or an ancestor did: a subreaper (underhill_init) that an orphan
        was re-parented to. The first report counts."""
        with self._lock:
            child = self.processes.get(pid)
            if child is not None and child.exit_status is None and self.is_ancestor(proc.pid, child):
                child.exit_status = status
        return [], []

    def is_ancestor(self, pid: int, proc: Process) -> bool:
        """pid is proc's parent, or its parent's, ... as the table knows them."""
        seen = set()
        while proc is not None and proc.pid not in seen:
            if proc.ppid == pid:
                return True
            seen.add(proc.pid)
            proc = self.processes.get(proc.ppid)
        return False

    _OPS = {kabi.Op.HELLO: (_hello, (list,)), kabi.Op.OPEN: (_open, (str, int, int)),
            kabi.Op.READ: (_read, (int, int)), kabi.Op.WRITE: (_write, (int, bytes)), kabi.Op.CLOSE: (_close, (int,)),
            kabi.Op.IOCTL: (_ioctl, (int, int, bytes)), kabi.Op.MMAP: (_mmap, (int, int, int)),
            kabi.Op.MOUNT: (_mount, (str, str, str, int, str)), kabi.Op.STAT: (_stat, (str,)),
            kabi.Op.LISTDIR: (_listdir, (str,)), kabi.Op.MKDIR: (_mkdir, (str, int)),
            kabi.Op.FINIT_MODULE: (_finit_module, (str, str)), kabi.Op.POLL: (_poll, (int, int)),
            kabi.Op.RESOLVE: (_resolve, (str,)), kabi.Op.READLINK: (_readlink, (str,)),
            kabi.Op.EXITED: (_exited, (int, int)), kabi.Op.VSOCK_LISTEN: (_vsock_listen, (int,)),
            kabi.Op.STACKS: (_stacks, (str,))}

    # ---- the end -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop serving: close the listener and every connection, join the threads."""
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accepter.join(2)
        for t in threads:
            t.join(2)
        for proc in self.processes.values():
            for f in list(proc.files.values()):
                try:
                    f.close()
                except Exception:       # a driver's close failing must not stop the others
                    pass
            proc.files.clear()
            if proc.pidfd is not None:
                os.close(proc.pidfd)
                proc.pidfd = None
        os.close(self.dir_fd)
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _op_name(msg: bytes) -> str:
    try:
        return kabi.Op(kabi.REQUEST.unpack_from(msg)[1]).name
    except (ValueError, struct.error):
        return "?"
