"""Path operations of the stand-in kernel: one namespace, the rootfs (the unpacked initrd, real
host files under the run folder) with the pseudo file systems mounted on it, the device nodes
of both, and the modules loaded with finit_module.
"""
import io
import os
import posixpath
import stat as st
import threading
import time
from dataclasses import dataclass

from hclsim.defs import kabi
from hclsim.kernel_stub.vfs import CharDevice, Dir, KernelError, Mount, MountTable, Symlink

MAX_LINKS = 40          # Linux's MAXSYMLINKS
_OPEN_FLAGS = (kabi.O_ACCMODE | kabi.O_CREAT | kabi.O_EXCL | kabi.O_TRUNC | kabi.O_APPEND | kabi.O_NONBLOCK
               | kabi.O_DIRECTORY)


@dataclass
class Module:
    name: str
    size: int
    params: str
    loaded_at: float


def check_path(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise KernelError(kabi.EINVAL if "\0" in path else kabi.ENOENT, f"not an absolute path: {path!r}")
    if len(path) >= 4096:
        raise KernelError(kabi.ENAMETOOLONG)
    return posixpath.normpath(path).replace("//", "/")


class Namespace:
    def __init__(self, rootfs, filesystems: dict, devices, log):
        """filesystems: fstype -> () -> the root Dir of a new mount of it."""
        self.rootfs, self.filesystems, self.devices, self.log = rootfs, filesystems, devices, log
        self.mounts = MountTable()
        self.modules: list[Module] = []
        self._lock = threading.Lock()

    # ---- lookup ------------------------------------------------------------------------
    def _pseudo(self, path: str, follow: bool = True):
        """The node of a path inside a mounted pseudo file system, or None if it is the rootfs's.
        Symlinks are followed on the way (/proc/device-tree -> /sys/firmware/devicetree/base) and,
        if follow, at the end."""
        for _ in range(MAX_LINKS):
            mount, parts = self.mounts.find(path)
            if mount is None:
                return None
            node, base = mount.root, [p for p in mount.target.split("/") if p]
            for i, name in enumerate(parts):
                if not isinstance(node, Dir):
                    raise KernelError(kabi.ENOTDIR)
                child = node.children().get(name)
                if child is None:
                    raise KernelError(kabi.ENOENT)
                last = i == len(parts) - 1
                if isinstance(child, Symlink) and (follow or not last):
                    here = "/" + "/".join(base + parts[:i])
                    rest = parts[i + 1:]
                    path = check_path(posixpath.join(here, child.target, *rest))
                    break
                node = child
            else:
                return node
        raise KernelError(kabi.ELOOP)

    def _rootfs_kind(self, path: str):
        try:
            return self.rootfs.lookup(path)
        except Exception as exc:          # RootfsError carries the errno (ELOOP, ENOTDIR)
            raise KernelError(getattr(exc, "errno", None) or kabi.ENOENT, str(exc)) from None

    def _device_node(self, path: str) -> CharDevice:
        dev = self.rootfs.device(path)
        node = self.devices.by_number(dev.major, dev.minor)
        if node is None:
            raise KernelError(kabi.ENXIO, f"no driver for device {dev.major}:{dev.minor}")
        return node

    # ---- operations ----------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int, caller):
        """A File of a pseudo file or device, or a host fd (int) of a rootfs file."""
        path = check_path(path)
        if flags & ~(_OPEN_FLAGS | kabi.O_CLOEXEC):
            raise KernelError(kabi.EINVAL, f"unsupported open flags {flags:#o}")
        node = self._pseudo(path)
        if node is not None:
            if flags & kabi.O_DIRECTORY and not isinstance(node, Dir):
                raise KernelError(kabi.ENOTDIR)
            f = node.open(flags, caller)
            f.nonblock = bool(flags & kabi.O_NONBLOCK)
            return f
        kind = self._rootfs_kind(path)
        if kind in ("chardev", "blockdev"):
            f = self._device_node(path).open(flags, caller)
            f.nonblock = bool(flags & kabi.O_NONBLOCK)
            return f
        if kind is None and not flags & kabi.O_CREAT:
            raise KernelError(kabi.ENOENT, f"{path}: no such file")
        if kind == "dir" and flags & kabi.O_ACCMODE != kabi.O_RDONLY:
            raise KernelError(kabi.EISDIR)
        host = self.rootfs.resolve(path)
        try:
            return os.open(host, (flags & _OPEN_FLAGS) | os.O_CLOEXEC | os.O_NOFOLLOW, mode & 0o7777)
        except OSError as exc:
            raise KernelError(exc.errno, f"{path}: {exc.strerror}") from None

    def stat(self, path: str) -> tuple[int, int, int]:
        path = check_path(path)
        node = self._pseudo(path)
        if node is not None:
            return node.kind, node.mode, node.size()
        kind = self._rootfs_kind(path)
        if kind is None:
            raise KernelError(kabi.ENOENT)
        if kind in ("chardev", "blockdev"):
            dev = self.rootfs.device(path)
            return (kabi.KIND_CHARDEV if kind == "chardev" else kabi.KIND_BLOCKDEV), dev.mode, 0
        s = os.stat(self.rootfs.resolve(path))
        kinds = {"dir": kabi.KIND_DIR, "file": kabi.KIND_FILE, "symlink": kabi.KIND_SYMLINK}
        return kinds.get(kind, kabi.KIND_FILE), st.S_IMODE(s.st_mode), s.st_size

    def listdir(self, path: str) -> list[str]:
        path = check_path(path)
        node = self._pseudo(path)
        if node is not None:
            if not isinstance(node, Dir):
                raise KernelError(kabi.ENOTDIR)
            return sorted(node.children())
        if self._rootfs_kind(path) != "dir":
            raise KernelError(kabi.ENOTDIR if self._rootfs_kind(path) else kabi.ENOENT)
        return sorted(self.rootfs.listdir(path))

    def readlink(self, path: str) -> str:
        path = check_path(path)
        node = self._pseudo(path, follow=False)
        if node is not None:
            if not isinstance(node, Symlink):
                raise KernelError(kabi.EINVAL)
            return node.target
        host = self.rootfs.resolve(path, follow_last=False)
        try:
            return os.readlink(host)
        except OSError as exc:
            raise KernelError(exc.errno) from None

    def mkdir_all(self, path: str, mode: int) -> None:
        """create_dir_all: every missing directory of path (rootfs only; existing ones are fine)."""
        path = check_path(path)
        node = self._pseudo(path)
        if node is not None:
            if not isinstance(node, Dir):
                raise KernelError(kabi.EEXIST)
            return
        kind = self._rootfs_kind(path)
        if kind == "dir":
            return
        if kind is not None:
            raise KernelError(kabi.EEXIST, f"{path} exists and is not a directory")
        parent = posixpath.dirname(path)
        if parent != path:
            self.mkdir_all(parent, mode)
        try:
            os.mkdir(self.rootfs.resolve(path), mode & 0o7777)
        except FileExistsError:
            pass
        except OSError as exc:
            raise KernelError(exc.errno) from None

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        target = check_path(target)
        make = self.filesystems.get(fstype)
        if make is None:
            raise KernelError(kabi.ENODEV, f"unknown file system type {fstype!r}")
        node = self._pseudo(target)
        if node is None and self._rootfs_kind(target) != "dir":
            raise KernelError(kabi.ENOENT if self._rootfs_kind(target) is None else kabi.ENOTDIR)
        if node is not None and not isinstance(node, Dir):
            raise KernelError(kabi.ENOTDIR)
        with self._lock:
            self.mounts.add(Mount(source, target, fstype, flags, make(), data))
        self.log(f"mounted {fstype} ({source}) on {target}", 7)

    def host_path(self, path: str) -> str:
        """The host file of a rootfs program (symlinks followed inside the root), to exec it."""
        path = check_path(path)
        if self._pseudo(path) is not None:
            raise KernelError(kabi.EACCES, f"{path} is not on the rootfs")
        if self._rootfs_kind(path) is None:
            raise KernelError(kabi.ENOENT, f"{path}: no such file")
        try:
            host = self.rootfs.resolve(path)
        except Exception as exc:          # RootfsError (ELOOP, ENOTDIR)
            raise KernelError(getattr(exc, "errno", None) or kabi.ENOENT, str(exc)) from None
        if not host.is_file():
            raise KernelError(kabi.EACCES, f"{path} is not a regular file")
        if not os.access(host, os.X_OK):
            raise KernelError(kabi.EACCES, f"{path} is not executable")
        return str(host)

    def finit_module(self, path: str, params: str, caller) -> None:
        """Load a module file: an ELF relocatable object with a .modinfo naming it."""
        path = check_path(path)
        if self._rootfs_kind(path) != "file":
            raise KernelError(kabi.ENOENT)
        data = open(self.rootfs.resolve(path), "rb").read()
        name = module_name(data)
        if name is None:
            raise KernelError(kabi.ENOEXEC, f"{path}: not a kernel module")
        with self._lock:
            if any(m.name == name for m in self.modules):
                raise KernelError(kabi.EEXIST, f"module {name} is already loaded")
            self.modules.append(Module(name, len(data), params, time.monotonic()))
        self.log(f"{name}: loaded" + (f" ({params})" if params else ""), 6)


def module_name(data: bytes) -> str | None:
    """The name= of an ELF64 relocatable object's .modinfo, or None if it is not a module."""
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[16] != 1:       # ET_REL
        return None
    try:
        from elftools.elf.elffile import ELFFile
        elf = ELFFile(io.BytesIO(data))
        sec = elf.get_section_by_name(".modinfo")
        if sec is None:
            return None
        for item in sec.data().split(b"\0"):
            if item.startswith(b"name="):
                return item[5:].decode("ascii", "replace") or None
    except Exception:              # pyelftools raises many kinds on a corrupt file
        return None
    return None
