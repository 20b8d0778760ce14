"""The initrd handed to Linux: one or more concatenated cpio newc archives, each optionally
compressed, exactly as Linux's init/initramfs.c accepts them (distribution initrds are often an
uncompressed early-microcode cpio followed by a compressed main cpio).

The file goes to the guest unchanged; loading only validates it and describes its segments.
build_initrd() writes the deterministic cpio the project ships as its default initrd.
"""
import bz2
import ctypes
import gzip
import lzma
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import libarchive
import libarchive.ffi
import lz4.block
import zstandard
from libarchive.entry import FileType

from hclsim import HclsimError
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
    if not data.strip(b"\0"):
        raise InitrdError(f"{what}: empty")
    segments, files, pos = [], 0, 0
    view = memoryview(data)
    while pos < len(data):
        # Like unpack_to_rootfs(): NUL padding between segments is skipped, a '0' starts an
        # uncompressed cpio, anything else must be a compressed stream.
        if data[pos] == 0:
            pos += 1
            continue
        if view[pos:pos + 6] in NEWC_MAGICS:
            end = _cpio_end(view, pos, f"{what}: cpio archive at {pos:#x}")
            files += _count_entries(view[pos:end], f"{what}: cpio archive at {pos:#x}")
            segments.append("none")
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
        files += _count_archives(out, f"{what}: {name} segment at {pos:#x}")
        segments.append(name)
        pos = end
    return Initrd(str(path), data, tuple(segments), files)


def _count_archives(buf: bytes, what: str) -> int:
    """Entries in the cpio archive(s) a compressed segment decompresses to."""
    view, pos, files, archives = memoryview(buf), 0, 0, 0
    while pos < len(buf):
        if buf[pos] == 0:
            pos += 1
            continue
        if view[pos:pos + 6] not in NEWC_MAGICS:
            raise InitrdError(f"{what}: decompressed data at {pos:#x} is not a cpio newc archive")
        end = _cpio_end(view, pos, what)
        files += _count_entries(view[pos:end], what)
        archives += 1
        pos = end
    if not archives:
        raise InitrdError(f"{what}: decompresses to no cpio archive")
    return files


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
    out = bytearray()

    def write(chunk) -> int:
        out.extend(chunk)
        return len(chunk)

    try:
        with libarchive.custom_writer(write, "cpio_newc") as archive:
            for ino, rel in enumerate(_tree(root), start=1):
                _add(archive, root / rel, rel, ino)
    except libarchive.ArchiveError as exc:
        raise InitrdError(f"initrd source {root}: libarchive: {_msg(exc)}") from None
    return compress(bytes(out), compression)


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
    attrs = dict(pathname=rel, uid=0, gid=0, mtime=0, atime=0, ctime=0)
    if stat.S_ISLNK(st.st_mode):
        attrs.update(filetype=FileType.SYMBOLINK_LINK, perm=0o777, size=0)  # writer sizes the target
        data, nlink = b"", 1
    elif stat.S_ISDIR(st.st_mode):
        attrs.update(filetype=FileType.DIRECTORY, perm=0o755, size=0)
        data, nlink = b"", 2
    elif stat.S_ISREG(st.st_mode):
        data = path.read_bytes()
        attrs.update(filetype=FileType.REGULAR_FILE, size=len(data),
                     perm=0o755 if st.st_mode & stat.S_IXUSR else 0o644)
        nlink = 1
    else:
        raise InitrdError(f"initrd source {path}: unsupported file type (only files, directories, symlinks)")
    entry = libarchive.ArchiveEntry(header_codec="utf-8", **attrs)
    _lib.archive_entry_set_ino64(entry._entry_p, ino)
    _lib.archive_entry_set_nlink(entry._entry_p, nlink)
    if stat.S_ISLNK(st.st_mode):
        _lib.archive_entry_copy_symlink(entry._entry_p, os.fsencode(os.readlink(path)))
    ffi = libarchive.ffi
    ffi.write_header(archive._pointer, entry._entry_p)
    if data:
        ffi.write_data(archive._pointer, data, len(data))
    ffi.write_finish_entry(archive._pointer)


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

