"""The system calls the paravisor's programs make to their kernel (hclsim's Linux stand-in), the
way libc wraps them: open/read/write/ioctl/mmap/mount/finit_module on the simulated /proc, /sys
and /dev (and on the rootfs, whose files are real host files handed over as descriptors).

Each thread has its own connection to the kernel (defs/kabi.py): a request at a time, like a
system call. Errors are OSError with the errno the kernel answered. This module must stay cheap
to import (the programs start in tens of milliseconds): the standard library and defs only.
"""
import array
import ctypes
import mmap
import os
import signal
import socket
import threading
import weakref

from hclsim.defs import kabi

_local = threading.local()
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1


class KernelGone(OSError):
    """The kernel's socket closed: the VM is going away."""


def run_dir() -> str:
    return os.readlink(f"/proc/self/fd/{kabi.KERNEL_FD}")


def root_dir() -> str:
    return os.path.join(run_dir(), "root")


_connections = weakref.WeakSet()         # every live thread's connection (kernel_fds); a thread's goes with it


def _connection() -> socket.socket:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.connect(f"/proc/self/fd/{kabi.KERNEL_FD}/{kabi.KERNEL_SOCKET}")
        _local.conn, _local.seq = conn, 0
        _connections.add(conn)
    return conn


def kernel_fds() -> list[int]:
    """The descriptors of this process's open connections to the kernel (one per thread)."""
    return [c.fileno() for c in list(_connections) if c.fileno() >= 0]


def syscall(op: int, *values, want_fd: bool = False):
    """One request; returns the reply's values (and the passed host fd if want_fd)."""
    conn = _connection()
    _local.seq = seq = (_local.seq + 1) & 0xFFFFFFFF
    try:
        conn.sendall(kabi.encode_request(seq, op, values))
        fds = array.array("i")
        msg, anc, _flags, _addr = conn.recvmsg(kabi.MAX_MESSAGE, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise KernelGone(exc.errno, "the kernel has gone away") from None
    if not msg:
        raise KernelGone(kabi.EPIPE, "the kernel has gone away")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % 4])
    rseq, err, out = kabi.decode_reply(msg)
    if err:
        for fd in fds:
            os.close(fd)
        raise OSError(err, os.strerror(err))
    if want_fd:
        return out, (fds[0] if fds else None)
    for fd in fds:
        os.close(fd)
    return out


class File:
    """An open file: a kernel file (kfd) or a real host descriptor (host_fd)."""
    __slots__ = ("kfd", "host_fd", "path")

    def __init__(self, kfd, host_fd, path):
        self.kfd, self.host_fd, self.path = kfd, host_fd, path

    def fileno(self) -> int:
        if self.host_fd is None:
            raise OSError(kabi.EBADF, f"{self.path} is a kernel file, not a host descriptor")
        return self.host_fd

    def read(self, count: int = kabi.MAX_READ) -> bytes:
        if self.host_fd is not None:
            return os.read(self.host_fd, count)
        return syscall(kabi.Op.READ, self.kfd, min(count, kabi.MAX_READ))[0]

    def read_all(self) -> bytes:
        chunks = []
        while True:
            chunk = self.read(kabi.MAX_READ)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def write(self, data: bytes) -> int:
        if self.host_fd is not None:
            return os.write(self.host_fd, data)
        return syscall(kabi.Op.WRITE, self.kfd, bytes(data))[0]

    def ioctl(self, request: int, arg: bytes = b"") -> tuple[int, bytes]:
        result, out = syscall(kabi.Op.IOCTL, self.kfd, request, bytes(arg))
        return result, out

    def ioctl_file(self, request: int, arg: bytes = b"", path: str = "") -> "File":
        """An ioctl that returns a new file (MSHV_CREATE_VTL)."""
        result, _out = self.ioctl(request, arg)
        return File(result, None, path or f"{self.path}:{request:#x}")

    def mmap(self, offset: int, length: int) -> mmap.mmap:
        (host_offset,), fd = syscall(kabi.Op.MMAP, self.kfd, offset, length, want_fd=True)
        try:
            return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=host_offset)
        finally:
            os.close(fd)

    def poll(self, timeout: float | None) -> bool:
        ms = -1 if timeout is None else int(timeout * 1000)
        return bool(syscall(kabi.Op.POLL, self.kfd, ms)[0])

    def close(self) -> None:
        if self.host_fd is not None:
            os.close(self.host_fd)
            self.host_fd = None
        elif self.kfd is not None:
            try:
                syscall(kabi.Op.CLOSE, self.kfd)
            except KernelGone:
                pass
            self.kfd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_file(path: str, flags: int = kabi.O_RDONLY, mode: int = 0o644) -> File:
    (kfd, host), fd = syscall(kabi.Op.OPEN, path, flags, mode, want_fd=True)
    return File(None, fd, path) if host else File(kfd, None, path)


def read_file(path: str) -> bytes:
    with open_file(path) as f:
        return f.read_all()


def write_file(path: str, data, flags: int = kabi.O_WRONLY) -> None:
    """One write(2) of data (sysfs and procfs take a store whole)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    with open_file(path, flags) as f:
        f.write(raw)


def mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    syscall(kabi.Op.MOUNT, source, target, fstype, flags, data)


def mkdir_all(path: str, mode: int = 0o755) -> None:
    syscall(kabi.Op.MKDIR, path, mode)


def listdir(path: str) -> list[str]:
    return syscall(kabi.Op.LISTDIR, path)[0]


def stat_kind(path: str) -> int | None:
    try:
        return syscall(kabi.Op.STAT, path)[0]
    except FileNotFoundError:
        return None


def finit_module(path: str, params: str) -> None:
    syscall(kabi.Op.FINIT_MODULE, path, params)


def host_path(path: str) -> str:
    """Where the rootfs file path lives on the host (to run it)."""
    return syscall(kabi.Op.RESOLVE, path)[0]


def exited(pid: int, status: int) -> None:
    """Tell the kernel a child was reaped (its exit status goes into the process table)."""
    try:
        syscall(kabi.Op.EXITED, pid, status)
    except OSError:
        pass


# ---- the process itself --------------------------------------------------------------------
def set_comm(name: str) -> None:
    """prctl(PR_SET_NAME): what ps and /proc/PID/comm show (the kernel keeps 15 bytes)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def start_process(comm: str, argv: list[str]) -> None:
    """What every program does first: take its name, die with its parent (no process outlives
    the VM), and introduce itself to the kernel with its argv."""
    set_comm(comm)
    parent = os.getppid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:   # the parent died before the prctl (re-parented to init or a subreaper): follow it
        os._exit(1)
    syscall(kabi.Op.HELLO, list(argv))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPROF, _report_stacks)
        syscall(kabi.Op.STACKS, "")          # sample me: the profiler may send SIGPROF now


def folded_stacks(interrupted=None) -> str:
    """Every thread's Python stack, one line each: 'thread;outermost;...;innermost' (frames as
    'function (file:line)'), as flame graph tools fold them. interrupted: this thread's frame
    where a signal handler interrupted it (the handler's own frames are left out)."""
    import sys
    import traceback
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    lines = []
    for ident, frame in sys._current_frames().items():
        if ident == me and interrupted is not None:
            frame = interrupted
        if frame is None:
            continue
        stack = traceback.extract_stack(frame)
        lines.append(";".join([names.get(ident, f"thread-{ident}")] +
                              [f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})" for f in stack]))
    return "\n".join(lines)


def _report_stacks(_signum, frame) -> None:
    """SIGPROF: tell the kernel where every thread is. A connection of its own: the main thread
    may be inside a system call on its usual one."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            conn.connect(f"/proc/self/fd/{kabi.KERNEL_FD}/{kabi.KERNEL_SOCKET}")
            conn.sendall(kabi.encode_request(1, kabi.Op.STACKS, [folded_stacks(frame)[:1 << 20]]))
            conn.recv(kabi.MAX_MESSAGE)
        finally:
            conn.close()
    except OSError:
        pass                                  # the kernel is going away


def wait_status_code(status: int) -> int:
    """The exit code a wait status means (255 when a signal killed the process, as init says)."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255


def spawn(path: str, argv: list[str], env: dict, *, stdio=(None, None, None), fds: dict | None = None,
          setsid: bool = False) -> int:
    """fork + exec of the rootfs program path (our binfmt: the machine's Python runs the file),
    with stdio (host fds, None = inherit) on 0-2 and fds (child fd -> parent fd) dup'ed into
    place. The kernel's descriptor is inherited. Returns the pid."""
    import sys
    target = host_path(path)
    actions = [(os.POSIX_SPAWN_DUP2, src, dst) for dst, src in enumerate(stdio) if src is not None]
    actions += [(os.POSIX_SPAWN_DUP2, src, dst) for dst, src in (fds or {}).items()]
    os.set_inheritable(kabi.KERNEL_FD, True)
    return _on_spawner(lambda: os.posix_spawn(sys.executable, kabi.binfmt_argv(sys.executable, target, argv), env,
                                              file_actions=actions, setsid=setsid))


_spawner = None


def _on_spawner(fn):
    """Run fn (a posix_spawn) on a thread that lives as long as the process: the child's
    PR_SET_PDEATHSIG fires when the *thread* that created it ends, and a diag call's thread
    ends as soon as it has answered."""
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return fn()
    import queue
    with _SPAWN_LOCK:
        if _spawner is None:
            jobs: queue.Queue = queue.Queue()

            def serve():
                while True:
                    job, box, done = jobs.get()
                    try:
                        box.append((True, job()))
                    except BaseException as exc:      # handed back to the caller
                        box.append((False, exc))
                    done.set()
            threading.Thread(target=serve, name="spawner", daemon=True).start()
            _spawner = jobs
    box, done = [], threading.Event()
    _spawner.put((fn, box, done))
    done.wait()
    ok, value = box[0]
    if not ok:
        raise value
    return value


_SPAWN_LOCK = threading.Lock()


class VsockListener:
    """A listening vsock socket (the kernel's VSOCK_LISTEN): accept() returns a connected stream
    socket, the host client's own."""

    def __init__(self, port: int):
        _out, fd = syscall(kabi.Op.VSOCK_LISTEN, port, want_fd=True)
        self.port = port
        self.sock = socket.socket(fileno=fd)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> socket.socket:
        fds = array.array("i")
        msg, anc, _flags, _addr = self.sock.recvmsg(4, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % 4])
        if not fds:
            raise OSError(kabi.EPIPE, "the vsock listener closed")
        for extra in fds[1:]:
            os.close(extra)
        return socket.socket(fileno=fds[0])

    def close(self) -> None:
        self.sock.close()
