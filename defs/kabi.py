"""The kernel interface the Linux stand-in (kernel_stub/) offers the paravisor's userspace
(hcl/), declared once: how a process reaches the kernel, the request and reply messages, the
operations, errno values, and the mshv_vtl / sidecar ioctls with the run page layout
(openhcl/hcl/src/ioctl.rs and protocol.rs; shared/design/openhcl-userspace.md section 3).

A userspace process is a real OS process. It reaches "its kernel" through a SOCK_SEQPACKET Unix
socket: every process inherits KERNEL_FD, a descriptor of the VM's run folder, and connects to
`/proc/self/fd/<KERNEL_FD>/<KERNEL_SOCKET>` (no environment variable: the environment is the
kernel command line's, as Linux gives init). Each thread holds its own connection, so one
connection carries one request at a time, like a system call. The kernel knows the caller from
SO_PEERCRED. Host file descriptors (rootfs files, /dev/null, /dev/ttyprintk, memory to map)
travel as SCM_RIGHTS with the reply.

Messages: a header, then typed values (int, bytes, str, list of str), each a tag byte and its
data. A reply is (seq, errno, values); errno 0 is success.
"""
import enum
import errno as _errno
import struct

KERNEL_FD = 1023                 # inherited by every userspace process (above what programs open)
KERNEL_SOCKET = "kernel.sock"
MAX_MESSAGE = 256 * 1024         # the largest request or reply; a read returns at most MAX_READ
MAX_READ = 64 * 1024

# How a rootfs program runs (our binfmt: the machine's Python interpreter runs the file):
#   python -I -c BINFMT_LOADER <host path of the file> <argv0> <args...>
# so the program sees the argv it was given (argv0 as run: "/underhill-init"), not host paths.
BINFMT_LOADER = ("import sys; path = sys.argv[1]; sys.argv = sys.argv[2:]; "
                 "exec(compile(open(path, 'rb').read(), path, 'exec'), {'__name__': '__main__', '__file__': path})")


def binfmt_argv(interpreter: str, host_path: str, argv: list) -> list:
    return [interpreter, "-I", "-c", BINFMT_LOADER, host_path, *argv]


REQUEST = struct.Struct("<IHH")  # seq, op, value count
REPLY = struct.Struct("<IiH")    # seq, errno (0 = success), value count
_INT, _BYTES, _STR, _STRS = b"i", b"b", b"s", b"l"
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")


class Op(enum.IntEnum):
    HELLO = 1          # (argv: strs) -> (pid)           the process tells its argv; comm is read from /proc
    OPEN = 2           # (path, flags, mode) -> (fd, host)   host = 1: the reply carries a host fd (SCM_RIGHTS)
    READ = 3           # (fd, count) -> (data)
    WRITE = 4          # (fd, data) -> (count)
    CLOSE = 5          # (fd) -> ()
    IOCTL = 6          # (fd, request, arg: bytes) -> (result, out: bytes)
    MMAP = 7           # (fd, offset, length) -> (offset in the passed host fd)  + host fd
    MOUNT = 8          # (source, target, fstype, flags, data) -> ()
    STAT = 9           # (path) -> (kind, mode, size)
    LISTDIR = 10       # (path) -> (names: strs)
    MKDIR = 11         # (path, mode) -> ()
    FINIT_MODULE = 12  # (path, params) -> ()
    POLL = 13          # (fd, timeout_ms) -> (ready: 0/1)
    RESOLVE = 14       # (path) -> (host path)   where a rootfs file lives on the host (exec)
    READLINK = 15      # (path) -> (target)
    EXITED = 16        # (pid, wait status) -> ()   a parent reaped a child (the process table's exit status)
    VSOCK_LISTEN = 17  # (port) -> () + host fd   a vsock listener (kernel_stub/vsock.py): accepted
                       #   connections arrive on it as descriptors, each with a u32 port
    STACKS = 18        # (text) -> ()   the caller's Python stacks, folded, for the profiler
                       #   (kernel_stub/profiling.py); "" registers it for SIGPROF sampling


# O_* flags as Linux numbers them (the ones the programs use).
O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
O_ACCMODE = 3
O_CREAT, O_EXCL, O_TRUNC, O_APPEND = 0o100, 0o200, 0o1000, 0o2000
O_NONBLOCK, O_DIRECTORY, O_CLOEXEC = 0o4000, 0o200000, 0o2000000

# mount(2) flags (MS_*).
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_RELATIME = 1 << 21
MOUNT_FLAG_NAMES = ((MS_RDONLY, "ro"), (MS_NOSUID, "nosuid"), (MS_NODEV, "nodev"), (MS_NOEXEC, "noexec"),
                    (MS_RELATIME, "relatime"))

# STAT kinds.
KIND_FILE, KIND_DIR, KIND_SYMLINK, KIND_CHARDEV, KIND_BLOCKDEV = 1, 2, 3, 4, 5
KIND_NAMES = {KIND_FILE: "file", KIND_DIR: "dir", KIND_SYMLINK: "symlink", KIND_CHARDEV: "chardev",
              KIND_BLOCKDEV: "blockdev"}

# errno values are the host's (Linux x86_64: the same numbers).
EPERM, ENOENT, EINTR, EIO, EBADF, EAGAIN, ENOMEM, EACCES, EFAULT, EBUSY, EEXIST, ENOTDIR, EISDIR, EINVAL, \
    ENOSPC, EROFS, ENOSYS, ELOOP, ENOTTY, ENODEV, ENOEXEC, EPIPE, ERANGE, ENXIO, ENAMETOOLONG = (
        _errno.EPERM, _errno.ENOENT, _errno.EINTR, _errno.EIO, _errno.EBADF, _errno.EAGAIN, _errno.ENOMEM,
        _errno.EACCES, _errno.EFAULT, _errno.EBUSY, _errno.EEXIST, _errno.ENOTDIR, _errno.EISDIR, _errno.EINVAL,
        _errno.ENOSPC, _errno.EROFS, _errno.ENOSYS, _errno.ELOOP, _errno.ENOTTY, _errno.ENODEV, _errno.ENOEXEC,
        _errno.EPIPE, _errno.ERANGE, _errno.ENXIO, _errno.ENAMETOOLONG)
EADDRINUSE = _errno.EADDRINUSE


# ---- ioctls: Linux's _IOC encoding --------------------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, magic: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (magic << 8) | nr


def IO(magic, nr):
    return _ioc(_IOC_NONE, magic, nr, 0)


def IOW(magic, nr, size):
    return _ioc(_IOC_WRITE, magic, nr, size)


def IOR(magic, nr, size):
    return _ioc(_IOC_READ, magic, nr, size)


def IOWR(magic, nr, size):
    return _ioc(_IOC_READ | _IOC_WRITE, magic, nr, size)


# /dev/random: RNDADDENTROPY = _IOW('R', 3, int[2]); the argument is {entropy_count, buf_size, buf[]}.
RNDADDENTROPY = IOW(ord("R"), 3, 8)
RND_POOL_INFO = struct.Struct("<ii")

MSHV_IOCTL = 0xB8
MSHV_CHECK_EXTENSION = IOW(MSHV_IOCTL, 0x00, 4)
MSHV_CREATE_VTL = IOR(MSHV_IOCTL, 0x1D, 1)
MSHV_VTL_RETURN_TO_LOWER_VTL = IO(MSHV_IOCTL, 0x27)   # "run VP": 0 = exit message in the run page, EINTR = cancelled
MSHV_VTL_SET_VP_REGISTERS = IOW(MSHV_IOCTL, 0x06, 16)
MSHV_VTL_GET_VP_REGISTERS = IOWR(MSHV_IOCTL, 0x05, 16)
MSHV_VTL_ADD_VTL0_MEMORY = IOW(MSHV_IOCTL, 0x21, 24)
MSHV_HCLSIM_DOORBELL = IOW(MSHV_IOCTL, 0xE0, 4)     # hclsim's own: serve this CPU's RUN_VPs by doorbell
MSHV_CAP_REGISTER_PAGE = 1
MSHV_CAP_VTL_RETURN_ACTION = 2
MSHV_CAP_DR6_SHARED = 3

# mshv_vtl ioctls carry the CPU they act on first (our kernel has no "current CPU" of a thread
# that is not pinned: the VM worker names it, as its thread's affinity does on the real one).
VP_ARG = struct.Struct("<I")
REGISTER_ASSOC = struct.Struct("<I12xQQ")   # HvRegisterAssoc: name, value (128 bit)

# mmap page offsets of the mshv_vtl fd: run page n, register page (1 << 16) | n.
MMAP_RUN_PAGE = 0
MMAP_REGISTER_PAGE = 1 << 16
MMAP_DOORBELL_PAGE = 4 << 16   # hclsim's own: the doorbell kick page
PAGE_SIZE = 4096

# The sidecar device /dev/mshv_vtl_sidecar<N>.
MSHV_SIDECAR_START = IOW(MSHV_IOCTL, 0xF0, 4)
MSHV_SIDECAR_STOP = IOW(MSHV_IOCTL, 0xF1, 4)
MSHV_SIDECAR_RUN = IOW(MSHV_IOCTL, 0xF2, 4)
MSHV_SIDECAR_INFO = IOR(MSHV_IOCTL, 0xF3, 16)
SIDECAR_INFO = struct.Struct("<IIQ")           # base_cpu, cpu_count, per_cpu_shmem

# The sidecar command page (sidecar/layout.py command_page, checked against it by tests/test_kabi.py):
# what the VM worker writes and reads in the pages it maps from the sidecar device.
SIDECAR_CMD_COMMAND = 0x000          # u32
SIDECAR_CMD_HAS_ERROR = 0x004        # u8
SIDECAR_CMD_CPU_CONTEXT = 0x010      # 16 GPRs (RUN_CONTEXT_GPRS order), then FXSAVE
SIDECAR_CMD_INTERCEPT_MESSAGE = 0x410
SIDECAR_CMD_ERROR = 0x510            # u8 len, then the text
SIDECAR_CMD_REQUEST_DATA = 0x610
SIDECAR_SHMEM_PAGES_PER_VP = 2       # the command page, then the register page
SIDECAR_COMMAND_RUN_VP, SIDECAR_COMMAND_GET_VP_REGISTERS, SIDECAR_COMMAND_SET_VP_REGISTERS = 1, 2, 3

IOCTL_NAMES = {v: k for k, v in list(globals().items()) if k.startswith(("MSHV_", "RND")) and isinstance(v, int)
               and v > 0xFF}


# ---- the run page (struct hcl_run, <= 4096 bytes) ------------------------------------------
RUN_CANCEL = 0                 # u32: set to cancel a run; the VMM clears it before each run
RUN_VTL_RET_ACTION_SIZE = 4
RUN_FLAGS = 8                  # u32, bit 0 HALTED
RUN_SCAN_PROXY_IRR = 12
RUN_OFFLOAD_FLAGS = 13
RUN_MODE = 15
RUN_EXIT_MESSAGE = 16          # 256-byte HvMessage
RUN_CONTEXT = 272              # 16 GPRs (canonical order, CR2 in the RSP slot), then FXSAVE
RUN_VTL_RET_ACTIONS = 1296
RUN_PROXY_IRR = 1552
RUN_TARGET_VTL = 1584
RUN_PROXY_IRR_BLOCKED = 1588
RUN_PROXY_IRR_EXIT = 1620
RUN_PAGE_END = 1652
RUN_FLAG_HALTED = 1
# hclsim's doorbell, past the end of struct hcl_run: RUN_VP without a system call. After
# MSHV_HCLSIM_DOORBELL(cpu) the VMM rings by writing the next request number to RUN_DOORBELL
# (and FUTEX_WAKE on it); the kernel answers by writing the errno (0: an intercept message is in
# the run page; EINTR: cancelled) to RUN_DOORBELL_ERRNO, then that number to RUN_DOORBELL_ACK
# (and FUTEX_WAKE). Each word has one writer, so no update is lost; each side sleeps on the
# other's word as a futex. RUN_DOORBELL_CLOSED = 1: the kernel is gone.
RUN_DOORBELL = 1652            # u32, the VMM's request number
RUN_DOORBELL_ACK = 1656        # u32, the request the kernel answered last
RUN_DOORBELL_ERRNO = 1660      # u32, its errno
RUN_DOORBELL_CLOSED = 1664     # u32
# The kick page (mmap page offset MMAP_DOORBELL_PAGE): a counter the VMM bumps (and FUTEX_WAKEs)
# after every ring, so the kernel's one dispatcher sleeps on one word for all CPUs.
DOORBELL_KICK = 0              # u32
# The context's GPR slots, in x86 canonical encoding order; RSP's slot carries CR2 (RSP is in the
# register page).
RUN_CONTEXT_GPRS = ("rax", "rcx", "rdx", "rbx", "cr2", "rbp", "rsi", "rdi",
                    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# ---- the register page (HvX64RegisterPage) -----------------------------------------------
REGPAGE_VERSION = 0            # u16
REGPAGE_IS_VALID = 2           # u8
REGPAGE_VTL = 3
REGPAGE_DIRTY = 4              # u32: which classes the VMM changed (bit per class)
REGPAGE_GP = 8                 # 16 u64, canonical order (RSP in its real slot here)
REGPAGE_RIP = 136
REGPAGE_RFLAGS = 144
REGPAGE_CR0 = 352
REGPAGE_CR3 = 360
REGPAGE_CR4 = 368
REGPAGE_EFER = 384
DIRTY_GP, DIRTY_IP, DIRTY_XMM, DIRTY_SEGMENT, DIRTY_FLAGS = (1 << i for i in range(5))
REGPAGE_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


# ---- message encoding ----------------------------------------------------------------------
class KabiError(ValueError):
    """A malformed kernel-interface message."""


def encode(values) -> bytes:
    out = []
    for v in values:
        if isinstance(v, bool) or isinstance(v, int):
            out.append(_INT + _I64.pack(int(v)))
        elif isinstance(v, (bytes, bytearray, memoryview)):
            v = bytes(v)
            out.append(_BYTES + _U32.pack(len(v)) + v)
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogateescape")
            out.append(_STR + _U32.pack(len(raw)) + raw)
        elif isinstance(v, (list, tuple)):
            raws = [s.encode("utf-8", "surrogateescape") for s in v]
            out.append(_STRS + _U32.pack(len(raws)) + b"".join(_U32.pack(len(r)) + r for r in raws))
        else:
            raise TypeError(f"cannot send {type(v).__name__}")
    return b"".join(out)


def decode(buf, pos: int, count: int) -> list:
    """count values from buf at pos; KabiError on anything malformed (never an IndexError)."""
    values = []
    n = len(buf)
    try:
        for _ in range(count):
            tag = bytes(buf[pos:pos + 1])
            pos += 1
            if tag == _INT:
                values.append(_I64.unpack_from(buf, pos)[0])
                pos += 8
                continue
            (length,) = _U32.unpack_from(buf, pos)
            pos += 4
            if tag in (_BYTES, _STR):
                if pos + length > n:
                    raise KabiError("value runs past the message")
                raw = bytes(buf[pos:pos + length])
                pos += length
                values.append(raw if tag == _BYTES else raw.decode("utf-8", "surrogateescape"))
            elif tag == _STRS:
                items = []
                for _ in range(length):
                    (size,) = _U32.unpack_from(buf, pos)
                    pos += 4
                    if pos + size > n:
                        raise KabiError("string runs past the message")
                    items.append(bytes(buf[pos:pos + size]).decode("utf-8", "surrogateescape"))
                    pos += size
                values.append(items)
            else:
                raise KabiError(f"unknown value tag {tag!r}")
    except struct.error as exc:
        raise KabiError(f"truncated message: {exc}") from None
    if pos != n:
        raise KabiError(f"{n - pos} bytes after the last value")
    return values


def encode_request(seq: int, op: int, values) -> bytes:
    return REQUEST.pack(seq, op, len(values)) + encode(values)


def decode_request(buf) -> tuple[int, int, list]:
    if len(buf) < REQUEST.size:
        raise KabiError(f"request of {len(buf)} bytes is shorter than its header")
    seq, op, count = REQUEST.unpack_from(buf)
    return seq, op, decode(buf, REQUEST.size, count)


def encode_reply(seq: int, err: int, values=()) -> bytes:
    return REPLY.pack(seq, err, len(values)) + encode(values)


def decode_reply(buf) -> tuple[int, int, list]:
    if len(buf) < REPLY.size:
        raise KabiError(f"reply of {len(buf)} bytes is shorter than its header")
    seq, err, count = REPLY.unpack_from(buf)
    return seq, err, decode(buf, REPLY.size, count)


# ---- the host channel (/dev/hclsim_host) ---------------------------------------------------
# What the real VM worker tells the host over VMBus (the GET's notifications, the serial port's
# host backend), here one write(2) per message: a type byte, then its data.
HOST_CONSOLE = 1          # u32 VP index, then the bytes VTL0 wrote to its COM1 (one line or less)
HOST_VTL0_STARTED = 2     # START_VTL0_COMPLETED: every VP runs VTL0
HOST_POWER_OFF = 3        # the guest powered the VM off
HOST_MESSAGE_NAMES = {HOST_CONSOLE: "console", HOST_VTL0_STARTED: "vtl0-started", HOST_POWER_OFF: "power-off"}
