"""The initrd handed to Linux: one or more concatenated cpio newc archives, each optionally
compressed, exactly as Linux's init/initramfs.c accepts them (distribution initrds are often an
uncompressed early-microcode cpio followed by a compressed main cpio).

The file goes to the guest unchanged; loading only validates it and describes its segments.
build_initrd_from_config() writes a deterministic cpio from a gen_init_cpio config (the shipped
initrd is kernel_stub/rootfs.config); build_initrd() archives a folder the same way.
"""
import bz2
import ctypes
import gzip
import hashlib
import lzma
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import libarchive
import libarchive.ffi
import lz4.block
import zstandard
from libarchive.entry import FileType

from hclsim import HclsimError
from hclsim.boot import firmware
from hclsim.boot.kernel import CompressedStreamError, decompress_stream, detect_compression

NEWC_MAGICS = (b"070701", b"070702")  # newc, and newc with checksums ("crc")
_HEADER = 110                          # 6-byte magic + 13 eight-digit hex fields
_TRAILER = b"TRAILER!!!"
LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
COMPRESSIONS = ("none", "gzip", "xz", "zstd", "lz4", "bzip2", "lzma")
_HEX_FIELDS = re.compile(rb"[0-9A-Fa-f]{104}")
_HEX_FIELDS_ONE = re.compile(rb"[0-9A-Fa-f]{8}")
_FIELD_NAMES = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
                "rdevmajor", "rdevminor", "namesize", "check")


class InitrdError(HclsimError):
    pass


@dataclass(frozen=True)
class Initrd:
    path: str
    data: bytes            # exactly the file's bytes
    compression: tuple     # one name per concatenated segment, e.g. ("none", "zstd")
    files: int             # cpio entries in all archives (trailers not counted)


# --- loading ----------------------------------------------------------------------------------

def load_initrd(path) -> Initrd:
    """Read and validate an initrd. Raises InitrdError naming the file and the problem."""
    path = Path(path)
    what = f"initrd {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InitrdError(f"{what}: cannot read: {exc.strerror}") from None
    segments, files = [], 0
    for name, archives in _segments(data, what):
        segments.append(name)
        files += sum(_count_entries(archive, label) for label, archive in archives)
    return Initrd(str(path), data, tuple(segments), files)


def split_archives(data: bytes, what: str = "initrd") -> list[bytes]:
    """Every cpio newc archive of an initrd (decompressed), in the order Linux unpacks them.
    Raises InitrdError as load_initrd() does."""
    return [bytes(archive) for _name, archives in _segments(data, what) for _label, archive in archives]


def _segments(data: bytes, what: str):
    """(compression name, [(label, archive bytes), ...]) for each segment of an initrd."""
    if not data.strip(b"\0"):
        raise InitrdError(f"{what}: empty")
    pos = 0
    view = memoryview(data)
    while pos < len(data):
        # Like unpack_to_rootfs(): NUL padding between segments is skipped, a '0' starts an
        # uncompressed cpio, anything else must be a compressed stream.
        if data[pos] == 0:
            pos += 1
            continue
        if view[pos:pos + 6] in NEWC_MAGICS:
            label = f"{what}: cpio archive at {pos:#x}"
            end = _cpio_end(view, pos, label)
            yield "none", [(label, view[pos:end])]
            pos = end
            continue
        if view[pos:pos + 6] == b"070707":
            raise InitrdError(f"{what}: old (odc) cpio archive at {pos:#x}: Linux only accepts newc (cpio -H newc)")
        if view[pos:pos + 4] == LZ4_FRAME_MAGIC:
            raise InitrdError(f"{what}: lz4 frame-format segment at {pos:#x}: Linux only decompresses "
                              f"legacy lz4 (lz4 -l)")
        if detect_compression(data, pos) is None:
            raise InitrdError(f"{what}: unrecognised data at {pos:#x}: neither a cpio newc archive "
                              f"nor a compressed stream Linux knows")
        try:
            name, out, end = decompress_stream(data, pos)
        except CompressedStreamError as exc:
            raise InitrdError(f"{what}: segment at {pos:#x}: {exc}") from None
        yield name, _archives_in(out, f"{what}: {name} segment at {pos:#x}")
        pos = end


def _archives_in(buf: bytes, what: str) -> list:
    """The cpio archive(s) a compressed segment decompresses to."""
    view, pos, archives = memoryview(buf), 0, []
    while pos < len(buf):
        if buf[pos] == 0:
            pos += 1
            continue
        if view[pos:pos + 6] not in NEWC_MAGICS:
            raise InitrdError(f"{what}: decompressed data at {pos:#x} is not a cpio newc archive")
        end = _cpio_end(view, pos, what)
        archives.append((what, view[pos:end]))
        pos = end
    if not archives:
        raise InitrdError(f"{what}: decompresses to no cpio archive")
    return archives


def _cpio_end(view: memoryview, pos: int, what: str) -> int:
    """Offset just past the TRAILER!!! entry of the newc archive at pos.

    libarchive reads the entries but cannot say where an archive ends in a concatenation, so the
    headers are walked here: 110-byte header, name, data, each padded to 4 bytes.
    """
    n = len(view)
    while True:
        if pos + _HEADER > n:
            raise InitrdError(f"{what}: truncated (cpio header at {pos:#x} runs past the end, no {_TRAILER.decode()})")
        if view[pos:pos + 6] not in NEWC_MAGICS:
            raise InitrdError(f"{what}: bad cpio header at {pos:#x} (magic {bytes(view[pos:pos + 6])!r})")
        header = bytes(view[pos + 6:pos + _HEADER])
        if not _HEX_FIELDS.fullmatch(header):
            # Exactly 8 hex digits each (int() would take a sign, spaces or '_': a namesize of
            # -1 walks backwards for ever).
            bad = next(i for i in range(13) if not _HEX_FIELDS_ONE.fullmatch(header[8 * i:8 * i + 8]))
            raise InitrdError(f"{what}: bad cpio header at {pos:#x} (field {_FIELD_NAMES[bad]} "
                              f"{header[8 * bad:8 * bad + 8]!r} is not 8 hex digits)")
        fields = [int(header[8 * i:8 * i + 8], 16) for i in range(13)]
        filesize, namesize = fields[6], fields[11]
        name_end = pos + _HEADER + namesize
        if namesize == 0:
            raise InitrdError(f"{what}: bad cpio header at {pos:#x} (namesize 0: every entry has a name)")
        if name_end > n:
            raise InitrdError(f"{what}: truncated (entry name at {pos:#x} runs past the end)")
        data_end = _align4(name_end) + filesize
        if bytes(view[pos + _HEADER:name_end - 1]) == _TRAILER:
            return min(_align4(name_end), n)
        if data_end > n:
            name = bytes(view[pos + _HEADER:name_end - 1]).decode("utf-8", "replace")
            raise InitrdError(f"{what}: truncated (entry {name!r} needs {filesize} bytes past the end)")
        pos = _align4(data_end)


def _count_entries(archive: memoryview, what: str) -> int:
    try:
        with libarchive.memory_reader(bytes(archive), format_name="cpio") as reader:
            return sum(1 for _entry in reader)
    except libarchive.ArchiveError as exc:
        raise InitrdError(f"{what}: libarchive: {_msg(exc)}") from None


def _msg(exc) -> str:
    text = str(getattr(exc, "msg", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _align4(n: int) -> int:
    return (n + 3) & ~3


# --- building ---------------------------------------------------------------------------------

# Setters libarchive-c lacks (its linkpath setter records a *hard* link unless the entry already
# has a symlink); the newc writer stores whatever the entry holds.
_lib = libarchive.ffi.libarchive
_lib.archive_entry_set_ino64.argtypes = [ctypes.c_void_p, ctypes.c_int64]
_lib.archive_entry_set_nlink.argtypes = [ctypes.c_void_p, ctypes.c_uint]
_lib.archive_entry_copy_symlink.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


def build_initrd(root_dir, compression: str = "gzip") -> bytes:
    """A cpio newc archive of root_dir, compressed as Linux expects, byte-for-byte reproducible.

    Entries are sorted, owned by 0:0 with mtime 0, numbered 1.. as inodes; permissions are
    normalised (directories 0755, files 0755 or 0644 by their owner-execute bit) so the result
    does not depend on the checkout's umask. Symlinks are stored as symlinks. `.gitkeep` files
    (which only keep empty directories in git) are left out.
    """
    root = Path(root_dir)
    if not root.is_dir():
        raise InitrdError(f"initrd source {root}: not a directory")
    if compression not in COMPRESSIONS:
        raise InitrdError(f"initrd source {root}: unknown compression {compression!r} "
                          f"(one of {', '.join(COMPRESSIONS)})")
    def fill(archive) -> None:
        for ino, rel in enumerate(_tree(root), start=1):
            _add(archive, root / rel, rel, ino)
    return compress(_cpio(fill, f"initrd source {root}"), compression)


def _cpio(fill, what: str) -> bytes:
    """A cpio newc archive of what fill(archive) writes into it (libarchive), uncompressed."""
    out = bytearray()

    def write(chunk) -> int:
        out.extend(chunk)
        return len(chunk)

    try:
        with libarchive.custom_writer(write, "cpio_newc") as archive:
            fill(archive)
    except libarchive.ArchiveError as exc:
        raise InitrdError(f"{what}: libarchive: {_msg(exc)}") from None
    return bytes(out)


def _tree(root: Path) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            if name != ".gitkeep":
                paths.append((base / name).as_posix())
    return sorted(paths)


def _add(archive, path: Path, rel: str, ino: int) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        _write_entry(archive, rel, FileType.SYMBOLINK_LINK, 0o777, ino=ino, symlink=os.readlink(path))
    elif stat.S_ISDIR(st.st_mode):
        _write_entry(archive, rel, FileType.DIRECTORY, 0o755, ino=ino, nlink=2)
    elif stat.S_ISREG(st.st_mode):
        _write_entry(archive, rel, FileType.REGULAR_FILE, 0o755 if st.st_mode & stat.S_IXUSR else 0o644,
                     ino=ino, data=path.read_bytes())
    else:
        raise InitrdError(f"initrd source {path}: unsupported file type (only files, directories, symlinks)")


def _write_entry(archive, name: str, filetype, perm: int, *, ino: int, uid: int = 0, gid: int = 0,
                 nlink: int = 1, data: bytes = b"", symlink: str | None = None, rdev=(0, 0)) -> None:
    """One newc entry with mtime 0 and exactly the given inode, link count and owner."""
    attrs = dict(pathname=name, uid=uid, gid=gid, mtime=0, atime=0, ctime=0, filetype=filetype,
                 perm=perm, size=len(data))  # a symlink's size: the writer takes its target's
    if filetype in (FileType.CHAR_DEVICE, FileType.BLOCK_DEVICE):
        attrs.update(rdevmajor=rdev[0], rdevminor=rdev[1])
    entry = libarchive.ArchiveEntry(header_codec="utf-8", **attrs)
    _lib.archive_entry_set_ino64(entry._entry_p, ino)
    _lib.archive_entry_set_nlink(entry._entry_p, nlink)
    if symlink is not None:
        _lib.archive_entry_copy_symlink(entry._entry_p, os.fsencode(symlink))
    ffi = libarchive.ffi
    ffi.write_header(archive._pointer, entry._entry_p)
    if data:
        ffi.write_data(archive._pointer, data, len(data))
    ffi.write_finish_entry(archive._pointer)


# --- building from a gen_init_cpio config (the format of openhcl/rootfs.config) ---------------

@dataclass(frozen=True)
class ConfigEntry:
    line: int            # 1-based line number in the config
    kind: str            # "dir", "file", "slink" or "nod"
    name: str            # archive name: the config's NAME without its leading '/'
    mode: int            # permission bits (octal in the config)
    uid: int
    gid: int
    source: str = ""     # file: SOURCE as written
    target: str = ""     # slink: TARGET as written
    dev: str = ""        # nod: "c" or "b"
    major: int = 0
    minor: int = 0
    links: tuple = ()    # file: further names of the same inode (gen_init_cpio's hard links)


# Fields after the type word, as usr/gen_init_cpio.c reads them.
_CONFIG_SYNTAX = {
    "dir": "NAME MODE UID GID",
    "file": "NAME SOURCE MODE UID GID [HARDLINK...]",
    "slink": "NAME TARGET MODE UID GID",
    "nod": "NAME MODE UID GID c|b MAJOR MINOR",
}


def parse_rootfs_config(text: str, what: str = "rootfs config") -> list[ConfigEntry]:
    """The entries of a gen_init_cpio config, in order. Raises InitrdError naming the line."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            entries.append(_parse_line(number, words))
        except ValueError as exc:
            raise InitrdError(f"{what} line {number}: {exc}: {raw.strip()!r}") from None
    return entries


def _parse_line(number: int, words: list[str]) -> ConfigEntry:
    kind, args = words[0], words[1:]
    if kind not in _CONFIG_SYNTAX:
        known = "not supported here" if kind in ("pipe", "sock") else "unknown"
        raise ValueError(f"type {kind!r} {known} (one of {', '.join(_CONFIG_SYNTAX)})")
    want = sum(1 for field in _CONFIG_SYNTAX[kind].split() if not field.startswith("["))
    if len(args) != want and not (kind == "file" and len(args) > want):
        raise ValueError(f"{kind} takes {_CONFIG_SYNTAX[kind]}, got {len(args)} field(s)")
    if kind == "file":
        args = args[:5] + [args[5:]]
    name, *rest = args
    fields = {"name": _config_name(name)}
    if kind == "file":
        fields["source"], *rest = rest
        fields["links"] = tuple(_config_name(link) for link in rest.pop())
    elif kind == "slink":
        fields["target"], *rest = rest
    mode, uid, gid, *rest = rest
    fields.update(mode=_number(mode, 8, "MODE", 0o7777), uid=_number(uid, 10, "UID", 0xFFFFFFFF),
                  gid=_number(gid, 10, "GID", 0xFFFFFFFF))
    if kind == "nod":
        dev, major, minor = rest
        if dev not in ("c", "b"):
            raise ValueError(f"device type {dev!r} is neither c (character) nor b (block)")
        fields.update(dev=dev, major=_number(major, 10, "MAJOR", 0xFFFFFFFF),
                      minor=_number(minor, 10, "MINOR", 0xFFFFFFFF))
    return ConfigEntry(number, kind, **fields)


def _config_name(name: str) -> str:
    parts = name.strip("/").split("/")
    if ".." in parts:
        raise ValueError(f"name {name!r} has a '..' component")
    if not name.strip("/"):
        raise ValueError(f"name {name!r} names the root itself")
    return name.strip("/")


def _number(text: str, base: int, field: str, limit: int) -> int:
    digits = "01234567" if base == 8 else "0123456789"
    if not text or any(c not in digits for c in text) or int(text, base) > limit:
        kind = "an octal" if base == 8 else "a decimal"
        raise ValueError(f"{field} {text!r} is not {kind} number up to {limit:{'#o' if base == 8 else 'd'}}")
    return int(text, base)


def config_sources(config_path, source_dir, extra_sources=None) -> list[Path]:
    """The host file behind each `file` line of the config, in config order."""
    config = Path(config_path)
    entries = _read_config(config)
    return [_source_path(e, Path(source_dir), extra_sources or {}) for e in entries if e.kind == "file"]


def build_initrd_from_config(config_path, source_dir, compression: str = "gzip",
                             extra_sources=None) -> bytes:
    """The cpio newc archive a gen_init_cpio config describes, compressed as Linux expects.

    SOURCE paths are relative to source_dir unless extra_sources (SOURCE -> path) names them.
    Reproducible like gen_init_cpio with a fixed mtime: entries in config order, mtime 0,
    inodes 1.., uid/gid and mode from the config, a file's data on its last hard link.
    """
    config, source_dir, extra = Path(config_path), Path(source_dir), dict(extra_sources or {})
    if compression not in COMPRESSIONS:
        raise InitrdError(f"{config}: unknown compression {compression!r} (one of {', '.join(COMPRESSIONS)})")
    entries = _read_config(config)

    def fill(archive) -> None:
        for ino, e in enumerate(entries, start=1):
            owner = dict(ino=ino, uid=e.uid, gid=e.gid)
            if e.kind == "dir":
                _write_entry(archive, e.name, FileType.DIRECTORY, e.mode, nlink=2, **owner)
            elif e.kind == "slink":
                _write_entry(archive, e.name, FileType.SYMBOLINK_LINK, e.mode, symlink=e.target, **owner)
            elif e.kind == "nod":
                filetype = FileType.CHAR_DEVICE if e.dev == "c" else FileType.BLOCK_DEVICE
                _write_entry(archive, e.name, filetype, e.mode, rdev=(e.major, e.minor), **owner)
            else:
                data = _read_source(e, config, source_dir, extra)
                names = (e.name, *e.links)
                for i, name in enumerate(names):
                    last = i == len(names) - 1
                    _write_entry(archive, name, FileType.REGULAR_FILE, e.mode, nlink=len(names),
                                 data=data if last else b"", **owner)
    return compress(_cpio(fill, str(config)), compression)


def _read_config(config: Path) -> list[ConfigEntry]:
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InitrdError(f"{config}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_rootfs_config(text, str(config))


def _source_path(e: ConfigEntry, source_dir: Path, extra: dict) -> Path:
    return Path(extra[e.source]) if e.source in extra else source_dir / e.source


def _read_source(e: ConfigEntry, config: Path, source_dir: Path, extra: dict) -> bytes:
    path = _source_path(e, source_dir, extra)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InitrdError(f"{config} line {e.line}: source {e.source!r} ({path}): "
                          f"cannot read: {exc.strerror}") from None


def compress(data: bytes, compression: str) -> bytes:
    """data compressed the way Linux's tools do it (and reproducibly: no timestamps, no names)."""
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if compression == "xz":  # the kernel's xz decoder wants CRC32 (or no) checks: xz --check=crc32
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if compression == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE)
    if compression == "bzip2":
        return bz2.compress(data, 9)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=19).compress(data)
    if compression == "lz4":
        return lz4_legacy_compress(data)
    raise ValueError(f"unknown compression {compression!r}")


def lz4_legacy_compress(data: bytes) -> bytes:
    """The legacy lz4 format (`lz4 -l`), the only lz4 format Linux decompresses: magic, then
    8 MiB chunks each as u32 compressed size + raw lz4 block."""
    out = [struct.pack("<I", 0x184C2102)]
    chunk = 8 << 20
    for i in range(0, max(len(data), 1), chunk):
        block = lz4.block.compress(data[i:i + chunk], mode="high_compression", store_size=False)
        out.append(struct.pack("<I", len(block)) + block)
    return b"".join(out)



# --- the test initrd around the real /init (boot/firmware/init) --------------------------------

REAL_INIT_CONFIG = Path(__file__).resolve().parent / "firmware" / "init" / "initrd.config"


def real_init_initrd(force: bool = False) -> Path:
    """The test initrd for booting a real Linux kernel: /init (boot/firmware/init, built into
    the cache by boot/firmware.build()), /dev/console (c 5 1), /dev, /proc and /sys, as
    boot/firmware/init/initrd.config lists them; a gzip-compressed newc cpio, byte-identical
    wherever it is built (mtime 0, owner 0:0, inodes 1.. in config order, gzip mtime 0).

    Cached as <cache>/initrd/real-init-<sha256 of its bytes, 16 hex digits>.cpio.gz; the cpio is
    rebuilt from the cached ELF each call (it is a few KiB) and written only if missing.
    """
    elf = firmware.build(firmware.INIT, force=force)
    data = build_initrd_from_config(REAL_INIT_CONFIG, elf.parent, "gzip", extra_sources={"init": elf})
    out = firmware.cache_dir() / "initrd" / f"real-init-{hashlib.sha256(data).hexdigest()[:16]}.cpio.gz"
    if out.exists() and not force:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed into place: parallel test workers may race here.
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".real-init-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise firmware.CacheDirError(f"cache folder {firmware.cache_dir()} cannot be used: "
                                     f"{e.strerror or e}; point HCLSIM_CACHE at a writable folder") from None
    return out
