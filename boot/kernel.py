"""The Linux kernel image the boot shim hands off to: a vmlinux ELF, or a bzImage whose compressed
payload is a vmlinux ELF (the shim jumps to the vmlinux entry, never to the bzImage's own code).

Also holds the compressed-stream decoder shared with boot/initrd.py: both use the compressors
Linux's lib/decompress.c recognises, detected by magic the same way.
"""
import bz2
import io
import lzma
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import lief
import lz4.block
import lz4.frame
import zstandard

from hclsim import HclsimError
from hclsim.boot.layout import BOOT_FLAG_MAGIC, HDRS_MAGIC, SETUP_HEADER_OFFSET, SetupHeader, from_bytes

lief.logging.disable()  # bad input becomes a KernelError line, not lief's stderr chatter

ELF_MAGIC = b"\x7fELF"
DEFAULT_ALIGNMENT = 2 * 1024 * 1024  # Linux's CONFIG_PHYSICAL_ALIGN default on x86_64
MIN_PROTOCOL = 0x208                 # payload_offset/payload_length appear in boot protocol 2.08


class KernelError(HclsimError):
    pass


@dataclass(frozen=True)
class KernelSegment:
    offset: int   # relative to the kernel load base = p_paddr - lowest p_paddr
    data: bytes   # file bytes (p_filesz); the rest up to memsz is zero
    memsz: int


@dataclass(frozen=True)
class KernelImage:
    path: str
    format: str                 # "elf" or "bzimage"
    segments: tuple             # KernelSegment, sorted by offset
    entry_offset: int           # relative to the load base
    span: int                   # bytes from the base to the end of the highest memsz
    alignment: int              # physical alignment the kernel needs for its base
    version: str | None         # "Linux version ..." banner, if found
    compression: str | None     # bzImage payload compression
    setup_header: dict | None   # bzImage setup header facts (see _header_info)


# --- compressed streams -----------------------------------------------------------------------

class CompressedStreamError(ValueError):
    """A compressed stream is corrupt or truncated; the loaders turn it into their own error."""


# Magics as lib/decompress.c's decompress_method() checks them (plus the modern lz4 frame).
_MAGICS = (
    (b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"), (b"\x04\x22\x4d\x18", "lz4"), (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"), (b"\x89\x4c\x5a", "lzo"),
)
SUPPORTED_COMPRESSIONS = ("gzip", "xz", "zstd", "lz4", "bzip2", "lzma")

_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20  # every legacy block but the last decompresses to exactly 8 MiB
_LZ4_LEGACY_BOUND = _LZ4_LEGACY_BLOCK + _LZ4_LEGACY_BLOCK // 255 + 16  # LZ4_compressBound


def detect_compression(data, offset: int = 0) -> str | None:
    """The compressor whose magic starts data[offset:], or None."""
    head = bytes(data[offset:offset + 6])
    return next((name for magic, name in _MAGICS if head.startswith(magic)), None)


def decompress_stream(data, offset: int = 0) -> tuple[str, bytes, int]:
    """Decompress the single stream at data[offset:]: (compression, output, end offset).

    Bytes after the stream are left alone (the caller decides what they are: the bzImage's
    appended size, or the next initrd segment). Raises CompressedStreamError.
    """
    name = detect_compression(data, offset)
    if name is None:
        raise CompressedStreamError("unknown compression (no known magic)")
    if name not in SUPPORTED_COMPRESSIONS:
        raise CompressedStreamError(f"unsupported compression {name}")
    buf = memoryview(data)[offset:]
    try:
        if name == "lz4" and bytes(buf[:4]) == struct.pack("<I", _LZ4_LEGACY_MAGIC):
            out, used = _lz4_legacy(buf)
            return name, out, offset + used
        dec = {
            "gzip": lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS),
            "xz": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
            "lzma": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE),
            "bzip2": bz2.BZ2Decompressor,
            "lz4": lz4.frame.LZ4FrameDecompressor,
            # Kernel payloads use zstd -22 --ultra: allow windows beyond the default limit.
            "zstd": lambda: zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj(),
        }[name]()
        out = dec.decompress(bytes(buf))
        if not dec.eof:
            raise CompressedStreamError(f"truncated {name} data (the stream ends early)")
        return name, out, offset + len(buf) - len(dec.unused_data)
    except CompressedStreamError:
        raise
    except (zlib.error, lzma.LZMAError, OSError, EOFError, RuntimeError, ValueError,
            zstandard.ZstdError) as exc:
        raise CompressedStreamError(f"corrupt {name} data: {_one_line(exc)}") from None


def _lz4_legacy(buf) -> tuple[bytes, int]:
    """The legacy lz4 format (`lz4 -l`) Linux uses: magic, then (u32 size, block) pairs.

    The format has no end marker; like lib/decompress_unlz4.c, a block shorter than 8 MiB ends the
    stream, as does a 'size' that cannot be a block (e.g. the bzImage's appended length, or the
    next initrd segment's magic) or the end of the data. Another magic starts a new concatenated legacy stream.
    """
    out, pos, n = [], 4, len(buf)
    while n - pos >= 4:
        size = struct.unpack_from("<I", buf, pos)[0]
        if size == _LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if size > _LZ4_LEGACY_BOUND or size == 0:
            break
        if pos + 4 + size > n:
            if out and n - pos == 4:  # the bzImage's appended size after a full last block
                break
            raise CompressedStreamError("truncated lz4 data (a block runs past the end)")
        block = lz4.block.decompress(bytes(buf[pos + 4:pos + 4 + size]), uncompressed_size=_LZ4_LEGACY_BLOCK)
        out.append(block)
        pos += 4 + size
        if len(block) < _LZ4_LEGACY_BLOCK:
            break
    if not out:
        raise CompressedStreamError("truncated lz4 data (no blocks)")
    return b"".join(out), pos


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- loading ----------------------------------------------------------------------------------

def load_kernel(path) -> KernelImage:
    """Read a vmlinux ELF or a bzImage. Raises KernelError naming the file and the problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KernelError(f"kernel {path}: cannot read: {exc.strerror}") from None
    if raw[:4] == b"\x7fELF":
        segments, entry, version = _parse_vmlinux(raw, f"kernel {path}")
        return _image(path, "elf", segments, entry, DEFAULT_ALIGNMENT, version, None, None)
    if _looks_like_bzimage(raw):
        return _load_bzimage(path, raw)
    raise KernelError(f"kernel {path}: not an ELF vmlinux or a bzImage "
                      f"(no ELF magic, no 0xAA55/'HdrS' setup header)")


def _image(path, fmt, segments, entry, alignment, version, compression, header) -> KernelImage:
    return KernelImage(str(path), fmt, segments, entry, max(s.offset + s.memsz for s in segments),
                       alignment, version, compression, header)


def _looks_like_bzimage(raw: bytes) -> bool:
    if len(raw) < SETUP_HEADER_OFFSET + 0x11 + 4:  # up to and including the "HdrS" field
        return False
    boot_flag, _jump, header = struct.unpack_from("<HHI", raw, SETUP_HEADER_OFFSET + 0xD)
    return boot_flag == BOOT_FLAG_MAGIC and header == HDRS_MAGIC


def _load_bzimage(path: Path, raw: bytes) -> KernelImage:
    what = f"kernel {path}"
    try:
        hdr = from_bytes(SetupHeader, raw, SETUP_HEADER_OFFSET)
    except ValueError:
        raise KernelError(f"{what}: truncated bzImage setup header ({len(raw)} bytes)") from None
    if hdr.version < MIN_PROTOCOL:
        raise KernelError(f"{what}: boot protocol {hdr.version >> 8}.{hdr.version & 0xFF:02d} "
                          f"is too old (need 2.08+ for the payload fields)")
    setup_size = ((hdr.setup_sects or 4) + 1) * 512  # setup_sects 0 means 4 (boot protocol)
    start = setup_size + hdr.payload_offset
    if hdr.payload_length == 0:
        raise KernelError(f"{what}: bzImage has no payload (payload_length is 0)")
    if start + hdr.payload_length > len(raw):
        raise KernelError(f"{what}: truncated bzImage: payload [{start:#x}, +{hdr.payload_length:#x}) "
                          f"is beyond the end of the file ({len(raw):#x} bytes)")
    payload = raw[start:start + hdr.payload_length]
    try:
        compression, vmlinux, _end = decompress_stream(payload)
    except CompressedStreamError as exc:
        raise KernelError(f"{what}: bzImage payload: {exc}") from None
    if vmlinux[:4] != b"\x7fELF":
        raise KernelError(f"{what}: the decompressed bzImage payload is not an ELF vmlinux")
    segments, entry, version = _parse_vmlinux(vmlinux, f"{what} (decompressed {compression} payload)")
    alignment = hdr.kernel_alignment or DEFAULT_ALIGNMENT
    return _image(path, "bzimage", segments, entry, alignment, version, compression,
                  _header_info(hdr, raw, setup_size))


def _header_info(hdr: SetupHeader, raw: bytes, setup_size: int) -> dict:
    info = {name: getattr(hdr, name) for name, _type in SetupHeader._fields_}
    info["protocol"] = f"{hdr.version >> 8}.{hdr.version & 0xFF:02d}"
    info["setup_size"] = setup_size
    # kernel_version points (minus 0x200) at a NUL-terminated release string in the setup code.
    text = None
    if hdr.kernel_version:
        at = hdr.kernel_version + 0x200
        end = raw.find(b"\0", at, at + 512)
        if at < len(raw) and end > at:
            text = raw[at:end].decode("ascii", "replace")
    info["kernel_version_string"] = text
    return info


_BANNER = re.compile(rb"Linux version \d[^\n\0]*")


def _parse_vmlinux(raw: bytes, what: str) -> tuple[tuple, int, str | None]:
    """(segments, entry offset, banner) of an x86_64 vmlinux, segments placed by p_paddr (lief)."""
    if len(raw) < 64 or raw[:4] != ELF_MAGIC:
        problem = "truncated ELF header" if raw[:4] == ELF_MAGIC else "not an ELF file"
        raise KernelError(f"{what}: {problem} ({len(raw)} bytes)")
    if raw[4] == 2:  # ELF64: lief reads past a short program header table without complaint
        phoff, = struct.unpack_from("<Q", raw, 32)
        phentsize, phnum = struct.unpack_from("<HH", raw, 54)
        if phoff + phnum * phentsize > len(raw):
            raise KernelError(f"{what}: truncated: program headers end at {phoff + phnum * phentsize:#x}, "
                              f"file has {len(raw):#x}")
    elf = lief.ELF.parse(io.BytesIO(raw))
    if elf is None:
        raise KernelError(f"{what}: malformed ELF (lief could not parse it)")
    hdr = elf.header
    if hdr.identity_class != lief.ELF.Header.CLASS.ELF64 or hdr.machine_type != lief.ELF.ARCH.X86_64:
        raise KernelError(f"{what}: wrong machine: {hdr.machine_type.__name__} {hdr.identity_class.__name__}, "
                          f"need x86_64 ELF64")
    if hdr.file_type not in (lief.ELF.Header.FILE_TYPE.EXEC, lief.ELF.Header.FILE_TYPE.DYN):
        raise KernelError(f"{what}: ELF type {hdr.file_type.__name__} is not an executable")
    loads = []
    for seg in elf.segments:
        if seg.type != lief.ELF.Segment.TYPE.LOAD or seg.virtual_size == 0:
            continue
        filesz = seg.physical_size
        if seg.file_offset + filesz > len(raw) or filesz > seg.virtual_size:
            raise KernelError(f"{what}: truncated: PT_LOAD at {seg.physical_address:#x} needs file bytes "
                              f"up to {seg.file_offset + filesz:#x}, file has {len(raw):#x}")
        data = raw[seg.file_offset:seg.file_offset + filesz]
        loads.append((seg.physical_address, seg.virtual_address, seg.virtual_size, data))
    entry = elf.entrypoint
    if not loads:
        raise KernelError(f"{what}: no PT_LOAD segments")
    loads.sort()
    for (pa, _, memsz, _), (next_pa, _, _, _) in zip(loads, loads[1:]):
        if pa + memsz > next_pa:
            raise KernelError(f"{what}: PT_LOAD segments overlap at physical {next_pa:#x}")
    base = loads[0][0]
    entry_pa = _entry_physical(entry, loads)
    if entry_pa is None:
        raise KernelError(f"{what}: entry point {entry:#x} is outside every PT_LOAD segment")
    segments = tuple(KernelSegment(pa - base, bytes(data), memsz) for pa, _va, memsz, data in loads)
    return segments, entry_pa - base, _find_banner(loads)


def _entry_physical(entry: int, loads) -> int | None:
    # vmlinux's e_entry is already physical (phys_startup_64); other linkers give a virtual one.
    for pa, _va, memsz, _ in loads:
        if pa <= entry < pa + memsz:
            return entry
    for pa, va, memsz, _ in loads:
        if va <= entry < va + memsz:
            return pa + (entry - va)
    return None


def _find_banner(loads) -> str | None:
    # Since 6.1 a vmlinux holds two banners: a weak placeholder from init/version.c ("... # SMP")
    # and the linked one from init/version-timestamp.c with the build number ("#1 SMP"), which is
    # what Linux prints. Prefer a banner with a build number.
    found = [m.group() for *_, data in loads for m in _BANNER.finditer(data)]
    best = next((b for b in found if re.search(rb"#\d", b)), found[0] if found else None)
    return best.decode("ascii", "replace").strip() if best else None


def describe(image: KernelImage) -> str:
    """One line for logs and the CLI."""
    what = image.format if not image.compression else f"{image.format} ({image.compression})"
    return (f"{image.path}: {what}, {len(image.segments)} segments, span {image.span:#x}, "
            f"entry +{image.entry_offset:#x}, {image.version or 'unknown version'}")

