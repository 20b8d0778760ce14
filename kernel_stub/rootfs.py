"""The initrd unpacked as the root file system, as Linux's init/initramfs.c populates rootfs.

Every cpio archive of the initrd (compressed or not, concatenated: boot/initrd.py splits them as
Linux does) is read with libarchive in order, into a host folder. Later entries replace earlier
ones the way the kernel's clean_path() does: a different type is removed first (a directory
only if empty), the same type is reused (a file is truncated and rewritten, a directory
re-moded, a device node keeps its numbers: mknod fails with EEXIST). Like the kernel, an entry
whose parent cannot be looked up is skipped (noted in Rootfs.warnings), parents are never made.

Host-side differences, all because hclsim runs unprivileged:
- device nodes are empty placeholder files; their kind and numbers are in Rootfs.devices;
- owners are not applied; directories keep owner rwx on the host so the tree stays writable;
- paths never leave the root: names with '..' are refused, symlinks (kept as written, absolute
  targets included) are followed by Rootfs.resolve() inside the root, never by the host.
"""
import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import libarchive
import libarchive.ffi

from hclsim import HclsimError
from hclsim.boot.initrd import InitrdError, split_archives

MAXSYMLINKS = 40  # the kernel's limit on links followed in one lookup (ELOOP past it)


class RootfsError(HclsimError):
    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class DeviceNode:
    kind: str   # "c" (character) or "b" (block)
    major: int
    minor: int
    mode: int   # permission bits


@dataclass
class Rootfs:
    """An unpacked root file system: its host folder and what the host cannot hold."""
    root: Path
    devices: dict = field(default_factory=dict)   # in-rootfs path ("/dev/kmsg") -> DeviceNode
    warnings: list = field(default_factory=list)  # entries skipped as the kernel would skip them

    def resolve(self, path, follow_last: bool = True) -> Path:
        """The host path of an in-rootfs path, symlinks followed inside the root as the kernel
        follows them (absolute targets from the root, '..' stops at the root). The last
        component need not exist; a missing or non-directory parent is ENOENT / ENOTDIR."""
        return self.root.joinpath(*self._walk(path, follow_last))

    def canonical(self, path, follow_last: bool = True) -> str:
        """The in-rootfs path with every symlink (the last one if follow_last) resolved."""
        return "/" + "/".join(self._walk(path, follow_last))

    def lookup(self, path) -> str | None:
        """"dir", "file", "symlink", "chardev" or "blockdev" (the last component not followed),
        or None if nothing is there. A symlink loop on the way raises RootfsError(ELOOP)."""
        try:
            parts = self._walk(path, follow_last=False)
        except RootfsError as exc:
            if exc.errno == errno.ELOOP:
                raise
            return None
        try:
            st = os.lstat(self.root.joinpath(*parts))
        except OSError:
            return None
        node = self.devices.get("/" + "/".join(parts))
        if node is not None:
            return "chardev" if node.kind == "c" else "blockdev"
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        return "symlink" if stat.S_ISLNK(st.st_mode) else "file"

    def device(self, path) -> DeviceNode | None:
        """The device node path names after following links (/dev/console -> /dev/ttyprintk),
        or None if it is not one."""
        try:
            return self.devices.get(self.canonical(path))
        except RootfsError as exc:
            if exc.errno == errno.ELOOP:
                raise
            return None

    def listdir(self, path) -> list[str]:
        """The names in a directory (links followed), sorted."""
        host = self.resolve(path)
        if not host.is_dir():  # the last component is not a symlink: resolve() followed it
            code = errno.ENOTDIR if host.exists() else errno.ENOENT
            raise RootfsError(f"rootfs {path}: {os.strerror(code)}", code)
        return sorted(os.listdir(host))

    def _walk(self, path, follow_last: bool) -> list[str]:
        """The components of path resolved to real directories under the root (plus the last,
        which may be a symlink when not followed, or missing)."""
        text = os.fspath(path)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        pending = _components(text)[::-1]  # a stack: next component last
        follow_last = follow_last or text.endswith("/")
        done: list[str] = []
        links = 0
        while pending:
            name = pending.pop()
            if name == "..":
                if done:
                    done.pop()
                continue
            last = not pending
            host = self.root.joinpath(*done, name)
            try:
                st = os.lstat(host)
            except FileNotFoundError:
                if last:
                    return done + [name]
                raise RootfsError(f"rootfs {text}: /{'/'.join(done + [name])} does not exist", errno.ENOENT) from None
            if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                links += 1
                if links > MAXSYMLINKS:
                    raise RootfsError(f"rootfs {text}: more than {MAXSYMLINKS} symbolic links "
                                      f"(a loop?)", errno.ELOOP)
                target = os.readlink(host)
                if not target:
                    raise RootfsError(f"rootfs {text}: empty symbolic link /{'/'.join(done + [name])}",
                                      errno.ENOENT)
                if target.startswith("/"):
                    done = []
                pending.extend(_components(target)[::-1])
                continue
            if not last and not stat.S_ISDIR(st.st_mode):
                raise RootfsError(f"rootfs {text}: /{'/'.join(done + [name])} is not a directory", errno.ENOTDIR)
            done.append(name)
        return done


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def unpack(initrd_bytes: bytes, root_dir) -> Rootfs:
    """Unpack an initrd (as the boot loader hands it over) into root_dir, Linux's way."""
    root = Path(root_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        archives = split_archives(bytes(initrd_bytes), "initrd")
    except InitrdError as exc:
        raise RootfsError(str(exc)) from None
    except OSError as exc:
        raise RootfsError(f"rootfs {root}: cannot create: {exc.strerror or exc}") from None
    fs = Rootfs(root)
    for number, archive in enumerate(archives, start=1):
        what = f"initrd archive {number}" if len(archives) > 1 else "initrd"
        _Unpacker(fs, what).run(archive)
    return fs


class _Unpacker:
    """One cpio archive into the rootfs (hard links pair up within an archive, as in Linux)."""

    def __init__(self, fs: Rootfs, what: str):
        self.fs, self.what = fs, what

    def run(self, archive: bytes) -> None:
        try:
            with libarchive.memory_reader(archive, format_name="cpio") as reader:
                for entry in reader:
                    self._entry(entry)
        except libarchive.ArchiveError as exc:
            raise RootfsError(f"{self.what}: libarchive: {getattr(exc, 'msg', None) or exc}") from None

    def _entry(self, entry) -> None:
        try:
            name = entry.pathname
        except UnicodeDecodeError:
            raise RootfsError(f"{self.what}: an entry name is not UTF-8") from None
        parts = _components(name)
        if ".." in parts:
            raise RootfsError(f"{self.what}: entry {name!r} has a '..' component (it could leave the root)",
                              errno.EPERM)
        if not parts:  # "." in `find . | cpio` archives: the root itself
            if not entry.isdir:
                self.fs.warnings.append(f"{self.what}: entry {name!r} names the root and is not a directory: skipped")
            return
        try:
            parent = self.fs._walk("/".join(parts[:-1]), follow_last=True)
        except RootfsError as exc:
            self.fs.warnings.append(f"{self.what}: entry {name!r} skipped: {exc}")
            return
        parent_host = self.fs.root.joinpath(*parent)
        if not parent_host.is_dir():
            self.fs.warnings.append(f"{self.what}: entry {name!r} skipped: /{'/'.join(parent)} is not a directory")
            return
        path, host = "/" + "/".join(parent + parts[-1:]), parent_host / parts[-1]
        perm = entry.mode & 0o7777
        hardlink = libarchive.ffi.entry_hardlink(entry._entry_p)
        if hardlink:
            self._hardlink(entry, name, os.fsdecode(hardlink), path, host)
        elif entry.isdir:
            if self._clean(path, host, stat.S_IFDIR, name):
                if not host.is_dir():
                    os.mkdir(host)
                os.chmod(host, perm | stat.S_IRWXU)
        elif entry.issym:
            if self._clean(path, host, 0, name):
                os.symlink(entry.linkpath, host)
        elif entry.ischr or entry.isblk:
            kind = "c" if entry.ischr else "b"
            if self._clean(path, host, stat.S_IFCHR if kind == "c" else stat.S_IFBLK, name):
                old = self.fs.devices.get(path)
                if old is None:  # a new node: the placeholder
                    os.close(os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                    old = DeviceNode(kind, entry.rdevmajor, entry.rdevminor, perm)
                self.fs.devices[path] = DeviceNode(old.kind, old.major, old.minor, perm)
                os.chmod(host, perm)
        elif entry.isreg:
            if self._clean(path, host, stat.S_IFREG, name):
                self._write(entry, host, perm, os.O_TRUNC)
        else:  # FIFOs and sockets: nothing in an OpenHCL rootfs needs them
            self.fs.warnings.append(f"{self.what}: entry {name!r} skipped: FIFOs and sockets are not made")

    def _hardlink(self, entry, name: str, old_name: str, path: str, host: Path) -> None:
        try:
            old = self.fs._walk(old_name, follow_last=False)
        except RootfsError as exc:
            self.fs.warnings.append(f"{self.what}: hard link {name!r} skipped: {exc}")
            return
        old_host, old_path = self.fs.root.joinpath(*old), "/" + "/".join(old)
        if not old_host.is_file() or old_host.is_symlink():
            self.fs.warnings.append(f"{self.what}: hard link {name!r} to {old_name!r} skipped: not a file or node")
            return
        if not self._clean(path, host, 0, name):
            return
        os.link(old_host, host, follow_symlinks=False)
        if old_path in self.fs.devices:
            self.fs.devices[path] = self.fs.devices[old_path]
        elif entry.isreg:  # the data is on the last link; written through to every name
            self._write(entry, host, entry.mode & 0o7777, 0)

    def _write(self, entry, host: Path, perm: int, flags: int) -> None:
        if host.exists():
            os.chmod(host, 0o600)  # a read-only file from an earlier archive is still replaced
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, 0o600)
        try:
            for block in entry.get_blocks():
                os.write(fd, block)
            os.fchmod(fd, perm)
        finally:
            os.close(fd)

    def _clean(self, path: str, host: Path, fmode: int, name: str) -> bool:
        """clean_path(): remove what is at path unless it has the type fmode. False if it
        cannot go (a non-empty directory): the entry is then skipped, as in Linux."""
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            return True
        node = self.fs.devices.get(path)
        existing = stat.S_IFMT(st.st_mode) if node is None else (stat.S_IFCHR if node.kind == "c" else stat.S_IFBLK)
        if fmode and existing == fmode:
            return True
        if existing == stat.S_IFDIR:
            try:
                os.rmdir(host)
            except OSError as exc:
                self.fs.warnings.append(f"{self.what}: entry {name!r} skipped: directory {path} "
                                        f"cannot be replaced ({exc.strerror})")
                return False
        else:
            os.unlink(host)
            self.fs.devices.pop(path, None)
        return True
