"""The stand-in kernel's character devices and devtmpfs.

Devices are found by name (devtmpfs, /dev) or by number (a device node of the rootfs, such as
the initramfs's /dev/kmsg, c 1 11). The numbers are Linux's: mem major 1 (null 3, zero 5,
random 8, urandom 9, kmsg 11), TTYAUX major 5 (console 1, ttyprintk 3). Other drivers (mshv,
mshv_vtl, the sidecar devices) register their own CharDevice.

/dev/null and /dev/ttyprintk hand the process a real host descriptor (File.host_fd): the host's
/dev/null, and the write end of a pipe a kernel thread reads, logging each line to kmsg as
ttyprintk does (`[U] line`, KERN_INFO). host_fd belongs to the File: the system call server
passes a dup of it and then closes the File (ttyprintk's thread ends only when every copy of
the write end is closed: the kernel's and the processes').

/dev/console is 5:1 and, as the rootfs's /dev/console -> ttyprintk link has it, goes to
ttyprintk (Linux routes it to the preferred console's tty; OpenHCL's console output is kmsg).
"""
import errno
import os
import select
import threading
from dataclasses import dataclass

from hclsim.defs import kabi
from hclsim.kernel_stub.vfs import CharDevice, Dir, File, KernelError

MEM_MAJOR, TTYAUX_MAJOR = 1, 5
POOL_BITS = 256                                       # the input pool: entropy_avail is at most 256
RNDGETENTCNT = kabi.IOR(ord("R"), 0x00, 4)
RNDADDTOENTCNT = kabi.IOW(ord("R"), 0x01, 4)
RNDZAPENTCNT = kabi.IO(ord("R"), 0x04)
RNDCLEARPOOL = kabi.IO(ord("R"), 0x06)
RNDRESEEDCRNG = kabi.IO(ord("R"), 0x07)
TPK_STR_SIZE = 508                                    # ttyprintk cuts longer lines, ending the piece with '\'
TPK_LEVEL = 6                                         # CONFIG_TTY_PRINTK_LEVEL (KERN_INFO)


class _HostFdFile(File):
    """A File whose host_fd the process gets; close() (or dropping it) closes the kernel's copy."""

    def close(self) -> None:
        fd, self.host_fd = self.host_fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass


# ---- host disks (the VMGS disk) ------------------------------------------------------------
BLOCK_EXT_MAJOR = 259                                  # Linux's extended block major (NVMe namespaces use it)


class BlockDevice(CharDevice):
    kind = kabi.KIND_BLOCKDEV


class HostDiskFile(_HostFdFile):
    """A disk the host offers (the VM's VMGS disk, a file of its state folder): the process
    gets the host file itself and does its own pread/pwrite, as on a block device."""

    def __init__(self, path: str, flags: int):
        acc = os.O_RDONLY if flags & kabi.O_ACCMODE == kabi.O_RDONLY else os.O_RDWR
        try:
            self.host_fd = os.open(path, acc | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(exc.errno or kabi.EIO, f"the host's disk {path}: {exc.strerror}") from None


# ---- /dev/null, /dev/zero -------------------------------------------------------------------
class NullFile(_HostFdFile):
    def __init__(self, flags: int):
        acc = {kabi.O_RDONLY: os.O_RDONLY, kabi.O_WRONLY: os.O_WRONLY}.get(flags & kabi.O_ACCMODE, os.O_RDWR)
        self.host_fd = os.open(os.devnull, acc | os.O_CLOEXEC)

    def read(self, count, nonblock=False):
        return b""

    def write(self, data):
        return len(data)


class ZeroFile(File):
    def read(self, count, nonblock=False):
        return bytes(count)

    def write(self, data):
        return len(data)


# ---- /dev/random, /dev/urandom ----------------------------------------------------------------
@dataclass(frozen=True)
class EntropyInput:
    pid: int
    data: bytes
    requested_bits: int        # what the caller asked to credit (0 for a plain write)
    credited_bits: int         # what entropy_avail grew by (capped at the pool size)
    how: str                   # "ioctl" (RNDADDENTROPY / RNDADDTOENTCNT) or "write"


class Random:
    """The input pool: what was mixed in, by whom, and the bits credited (entropy_avail).

    entropy_avail starts at initial_bits (0 here, so a host's credit shows; a VM with RDRAND
    starts ready on Linux). Reads never block: the CRNG is taken to be ready, as it is there."""

    def __init__(self, kmsg=None, initial_bits: int = 0):
        self.kmsg = kmsg
        self.entropy_avail = max(0, min(POOL_BITS, initial_bits))
        self.inputs: list[EntropyInput] = []
        self._lock = threading.Lock()

    def add(self, data: bytes, bits: int, pid: int, how: str) -> int:
        with self._lock:
            before = self.entropy_avail
            self.entropy_avail = min(POOL_BITS, before + bits)
            credited = self.entropy_avail - before
            self.inputs.append(EntropyInput(pid, bytes(data), bits, credited, how))
        if before < POOL_BITS <= self.entropy_avail and self.kmsg is not None:
            self.kmsg.log("random: crng init done", level=5)
        return credited

    def open(self, flags, caller) -> "RandomFile":
        return RandomFile(self, caller)


class RandomFile(File):
    def __init__(self, pool: Random, caller):
        self.pool, self.pid = pool, getattr(caller, "pid", 0)

    def read(self, count, nonblock=False):
        return os.urandom(count)

    def write(self, data):
        self.pool.add(data, 0, self.pid, "write")     # mixed in, never credited
        return len(data)

    def ioctl(self, request, arg):
        """random_ioctl: the argument is the memory the process passed (all of it: for
        RNDADDENTROPY, 8 bytes of rand_pool_info and buf_size more). Memory it did not pass
        is unmapped: EFAULT, as copying from it is on Linux."""
        if request == RNDGETENTCNT:
            return 0, self.pool.entropy_avail.to_bytes(4, "little", signed=True)
        if request in (RNDADDTOENTCNT, kabi.RNDADDENTROPY):
            if len(arg) < 4:
                raise KernelError(kabi.EFAULT)
            bits = int.from_bytes(arg[:4], "little", signed=True)
            if bits < 0:
                raise KernelError(kabi.EINVAL, f"negative entropy count {bits}")
            data = b""
            if request == kabi.RNDADDENTROPY:
                if len(arg) < kabi.RND_POOL_INFO.size:
                    raise KernelError(kabi.EFAULT)
                size = int.from_bytes(arg[4:8], "little", signed=True)
                if size < 0 or len(arg) < kabi.RND_POOL_INFO.size + size:
                    raise KernelError(kabi.EFAULT, f"buf_size {size}: {len(arg) - 8} bytes follow the header")
                data = bytes(arg[8:8 + size])
            self.pool.add(data, bits, self.pid, "ioctl")
            return 0, b""
        if request in (RNDZAPENTCNT, RNDCLEARPOOL, RNDRESEEDCRNG):   # no longer have any effect
            return 0, b""
        raise KernelError(kabi.EINVAL, f"unknown random ioctl {request:#x}")  # random_ioctl's default


# ---- /dev/ttyprintk ----------------------------------------------------------------------------
class TtyPrintk:
    """The one ttyprintk port: a line buffer shared by every opener (as the driver's static
    tpk_buffer), flushed to kmsg on CR, LF, when full, and at the last close."""

    def __init__(self, kmsg):
        self.kmsg = kmsg
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._stopped = False

    def _flush(self) -> None:
        if self._buf:
            self.kmsg.log(b"[U] " + bytes(self._buf), level=TPK_LEVEL)
            self._buf.clear()

    def feed(self, data: bytes) -> int:
        """tpk_printk: one write's bytes."""
        with self._lock:
            i = 0
            while i < len(data):
                if len(self._buf) >= TPK_STR_SIZE:
                    self._buf += b"\\"
                    self._flush()
                c = data[i]
                if c == 0x0D:
                    self._flush()
                    if data[i + 1:i + 2] == b"\n":
                        i += 1
                elif c == 0x0A:
                    self._flush()
                else:
                    self._buf.append(c)
                i += 1
        return len(data)

    def open(self, flags, caller) -> "TtyPrintkFile":
        if self._stopped:
            raise KernelError(kabi.ENODEV, "the kernel is shutting down")
        r, w = os.pipe2(os.O_CLOEXEC)
        if flags & kabi.O_NONBLOCK:
            os.set_blocking(w, False)
        t = threading.Thread(target=self._reader, args=(r,), daemon=True,
                             name=f"ttyprintk-{getattr(caller, 'pid', 0)}")
        with self._lock:
            self._threads.add(t)
        t.start()
        return TtyPrintkFile(self, w)

    def _reader(self, r: int) -> None:
        try:
            draining = False
            while True:
                if not draining and self._stop_r in {fd for fd, _ in _poll((r, self._stop_r))}:
                    os.set_blocking(r, False)      # shutting down: take what is written already, then end
                    draining = True
                try:
                    data = os.read(r, 4096)
                except BlockingIOError:
                    break
                if not data:                       # every copy of the write end is closed
                    break
                self.feed(data)
        finally:
            os.close(r)
            with self._lock:
                self._threads.discard(threading.current_thread())
                if not self._threads:       # the port's last close: flush a line without its newline
                    self._flush()

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        os.write(self._stop_w, b"x")
        for t in self.threads():
            t.join(timeout)
        with self._lock:
            self._flush()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)


def _poll(fds):
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    while True:
        try:
            return p.poll()
        except InterruptedError:
            continue


class TtyPrintkFile(_HostFdFile):
    def __init__(self, port: TtyPrintk, w: int):
        self.port, self.host_fd = port, w

    def write(self, data):
        return self.port.feed(bytes(data))


# ---- the registry and devtmpfs ------------------------------------------------------------------
class _DevDir(Dir):
    """devtmpfs's root: every registered device by name, plus what was added (pts)."""

    def __init__(self, devices: "Devices"):
        super().__init__({"pts": Dir()})
        self._devices = devices

    def children(self) -> dict:
        with self._devices._lock:
            return {**self._devices._by_name, **self._children}


class Devices:
    """The character devices of the kernel: null, zero, random, urandom, kmsg, ttyprintk and
    console, and whatever other drivers register."""

    def __init__(self, kmsg, random: Random | None = None):
        self.kmsg = kmsg
        self.random = random if random is not None else Random(kmsg)
        self.ttyprintk = TtyPrintk(kmsg)
        self._lock = threading.Lock()
        self._by_name: dict[str, CharDevice] = {}
        self._by_number: dict[tuple[int, int], CharDevice] = {}
        self._tree = None
        for name, major, minor, open_fn, mode in (
                ("null", MEM_MAJOR, 3, lambda flags, caller: NullFile(flags), 0o666),
                ("zero", MEM_MAJOR, 5, lambda flags, caller: ZeroFile(), 0o666),
                ("random", MEM_MAJOR, 8, self.random.open, 0o666),
                ("urandom", MEM_MAJOR, 9, self.random.open, 0o666),
                ("kmsg", MEM_MAJOR, 11, kmsg.open, 0o644),
                ("console", TTYAUX_MAJOR, 1, self.ttyprintk.open, 0o600),
                ("ttyprintk", TTYAUX_MAJOR, 3, self.ttyprintk.open, 0o600)):
            self.register(CharDevice(name, major, minor, open_fn, mode))

    def register(self, dev: CharDevice) -> CharDevice:
        """Add a driver's device; EBUSY if its name or number is taken."""
        with self._lock:
            if dev.name in self._by_name or (dev.major, dev.minor) in self._by_number:
                raise KernelError(kabi.EBUSY, f"device {dev.name} ({dev.major}:{dev.minor}) is already registered")
            self._by_name[dev.name] = dev
            self._by_number[(dev.major, dev.minor)] = dev
        return dev

    def unregister(self, name: str) -> None:
        with self._lock:
            dev = self._by_name.pop(name)
            del self._by_number[(dev.major, dev.minor)]

    def by_name(self, name: str) -> CharDevice:
        with self._lock:
            dev = self._by_name.get(name)
        if dev is None:
            raise KernelError(kabi.ENOENT, f"no device {name}")
        return dev

    def by_number(self, major: int, minor: int) -> CharDevice:
        """The device a node c major:minor opens; ENXIO without a driver (chrdev_open)."""
        with self._lock:
            dev = self._by_number.get((major, minor))
        if dev is None:
            raise KernelError(errno.ENXIO, f"no driver for character device {major}:{minor}")
        return dev

    def tree(self) -> Dir:
        """devtmpfs: one tree however often it is mounted (one superblock, as on Linux)."""
        if self._tree is None:
            self._tree = _DevDir(self)
        return self._tree

    def shutdown(self) -> None:
        """Stop every kernel thread of the devices (ttyprintk's readers)."""
        self.ttyprintk.shutdown()
