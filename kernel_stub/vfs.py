"""The stand-in kernel's file system view: the mount table over the rootfs (the unpacked
initrd, real host files) and the pseudo file systems it serves itself (proc, sysfs, devtmpfs,
devpts), with the nodes and open files those are made of.

Pseudo file systems are trees of Node objects. A Node is a directory (children()), a file whose
content is made when it is opened (GeneratedFile, like seq_file), a symlink, or a character
device (CharDevice: open() returns the driver's File). Errors are KernelError(errno), which the
system call layer turns into the errno the process sees.
"""
import os
from dataclasses import dataclass, field

from hclsim.defs import kabi


class KernelError(Exception):
    def __init__(self, errno: int, message: str = ""):
        super().__init__(message or os.strerror(errno))
        self.errno = errno


@dataclass
class Caller:
    """Who makes a request: the process (host pid) and its name."""
    pid: int
    comm: str = ""


class File:
    """An open file description. Drivers override what their device supports."""
    host_fd = None            # a real host descriptor given to the process instead (null, ttyprintk)

    def read(self, count: int, nonblock: bool = False) -> bytes:
        raise KernelError(kabi.EINVAL)

    def write(self, data: bytes) -> int:
        raise KernelError(kabi.EINVAL)

    def ioctl(self, request: int, arg: bytes) -> tuple[int, bytes]:
        raise KernelError(kabi.ENOTTY)

    def mmap(self, offset: int, length: int) -> tuple[int, int]:
        """(host fd, offset in it) of the memory to map."""
        raise KernelError(kabi.ENODEV)

    def poll(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass


class Node:
    kind = kabi.KIND_FILE
    mode = 0o444

    def open(self, flags: int, caller: Caller) -> File:
        raise KernelError(kabi.EACCES)

    def size(self) -> int:
        return 0


class Dir(Node):
    kind = kabi.KIND_DIR
    mode = 0o555

    def __init__(self, children: dict | None = None, make=None):
        self._children = children if children is not None else {}
        self._make = make      # () -> dict, for directories whose entries change (cpuN, device tree)

    def children(self) -> dict:
        return self._make() if self._make is not None else self._children

    def add(self, name: str, node: Node) -> Node:
        self._children[name] = node
        return node

    def open(self, flags, caller):
        if flags & kabi.O_ACCMODE != kabi.O_RDONLY:
            raise KernelError(kabi.EISDIR)
        raise KernelError(kabi.EISDIR, "is a directory (use LISTDIR)")


class Symlink(Node):
    kind = kabi.KIND_SYMLINK
    mode = 0o777

    def __init__(self, target: str):
        self.target = target


class GeneratedFile(Node):
    """A pseudo file: read() makes the content (bytes) when the file is opened; write, if given,
    takes each write(2) whole (as sysfs stores do) and raises KernelError to refuse it; it may
    return how many bytes it took (a short write), None for all. size: what stat reports
    when it is known (a sysfs binary attribute, a device-tree property)."""

    def __init__(self, read=None, write=None, mode: int | None = None, size: int | None = None):
        self._read, self._write, self._size = read, write, size
        self.mode = mode if mode is not None else (0o444 if write is None else 0o644) if read is not None else 0o200

    def size(self) -> int:
        if self._size is not None:
            return self._size
        return 4096 if self._read is not None else 0    # as procfs and sysfs report

    def open(self, flags, caller):
        acc = flags & kabi.O_ACCMODE
        if acc != kabi.O_RDONLY and self._write is None:
            raise KernelError(kabi.EACCES, "read-only file")
        if acc != kabi.O_WRONLY and self._read is None:
            raise KernelError(kabi.EACCES, "write-only file")
        content = self._read() if acc != kabi.O_WRONLY else b""
        return _GeneratedOpen(content, self._write if acc != kabi.O_RDONLY else None, caller)


class _GeneratedOpen(File):
    def __init__(self, content: bytes, write, caller):
        self.content, self._write, self.caller, self.pos = content, write, caller, 0

    def read(self, count, nonblock=False):
        chunk = self.content[self.pos:self.pos + count]
        self.pos += len(chunk)
        return chunk

    def write(self, data):
        if self._write is None:
            raise KernelError(kabi.EBADF)
        taken = self._write(bytes(data), self.caller)
        return len(data) if taken is None else taken


class CharDevice(Node):
    """A device node's driver: open(flags, caller) -> File."""
    kind = kabi.KIND_CHARDEV

    def __init__(self, name: str, major: int, minor: int, open_fn, mode: int = 0o600):
        self.name, self.major, self.minor, self._open, self.mode = name, major, minor, open_fn, mode

    def open(self, flags, caller):
        return self._open(flags, caller)


@dataclass
class Mount:
    source: str
    target: str
    fstype: str
    flags: int
    root: Node
    data: str = ""

    def options(self) -> str:
        opts = ["ro" if self.flags & kabi.MS_RDONLY else "rw"]
        opts += [name for bit, name in kabi.MOUNT_FLAG_NAMES[1:] if self.flags & bit]
        return ",".join(opts + ([self.data] if self.data else []))


@dataclass
class MountTable:
    """Mounted pseudo file systems by target path; everything else is the rootfs."""
    mounts: list = field(default_factory=list)

    def add(self, mount: Mount) -> None:
        if any(m.target == mount.target for m in self.mounts):
            raise KernelError(kabi.EBUSY, f"{mount.target} is already a mount point")
        self.mounts.append(mount)

    def find(self, path: str) -> tuple[Mount | None, list[str]]:
        """The mount holding an absolute, normalised path and the components below it."""
        parts = [p for p in path.split("/") if p]
        best, best_len = None, -1
        for m in self.mounts:
            mparts = [p for p in m.target.split("/") if p]
            if parts[:len(mparts)] == mparts and len(mparts) > best_len:
                best, best_len = m, len(mparts)
        return (best, parts[best_len:]) if best is not None else (None, parts)

    def proc_mounts(self) -> bytes:
        lines = ["rootfs / rootfs rw 0 0"]
        lines += [f"{m.source} {m.target} {m.fstype} {m.options()} 0 0" for m in self.mounts]
        return ("\n".join(lines) + "\n").encode()


def walk(root: Node, parts: list[str]) -> Node:
    """The node at parts below root (no symlinks inside pseudo file systems but their own)."""
    node = root
    for name in parts:
        if not isinstance(node, Dir):
            raise KernelError(kabi.ENOTDIR)
        child = node.children().get(name)
        if child is None:
            raise KernelError(kabi.ENOENT)
        node = child
    return node
