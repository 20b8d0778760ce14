"""The Linux kernel image the boot shim hands off to: a vmlinux ELF, or a bzImage whose compressed
payload is a vmlinux ELF (the shim jumps to the vmlinux entry, never to the bzImage's own code).

Also holds the compressed-stream decoder shared with boot/initrd.py: both use the compressors
Linux's lib/decompress.c recognises, detected by magic the same way.
"""
import bz2
import lzma
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import lz4.frame
import zstandard

from hclsim import HclsimError
from hclsim.boot.layout import BOOT_FLAG_MAGIC, HDRS_MAGIC, SETUP_HEADER_OFFSET, SetupHeader, from_bytes

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
    except (zlib.error, lzma.LZMAError, OSError, EOFError, RuntimeError, ValueError, MemoryError,
            zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
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
    # A power of two (boot loaders and the decompressor round the load address with a mask);
    # CONFIG_PHYSICAL_ALIGN is 2..16 MiB on x86_64, and no image can need more than it spans.
    if alignment & (alignment - 1):
        raise KernelError(f"{what}: bzImage kernel_alignment {alignment:#x} is not a power of two")
    if alignment > KERNEL_IMAGE_SIZE:
        raise KernelError(f"{what}: bzImage kernel_alignment {alignment:#x} is larger than an x86_64 kernel "
                          f"image can be (KERNEL_IMAGE_SIZE, 1 GiB)")
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

# ELF64 as the x86_64 boot path reads it (elf(5)): header, program headers, PT_LOAD segments.
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
EM_X86_64 = 62
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_INTERP = 1, 3
PF_X, PF_W, PF_R = 1, 2, 4
# Where an x86_64 vmlinux is linked: __START_KERNEL_map and up (the kernel half of the address
# space starts at 0xffff800000000000; user programs live below 0x800000000000).
KERNEL_HALF = 0xFFFF800000000000
# arch/x86/include/asm/page_64_types.h: the kernel image (_text to _end) is at most 1 GiB with
# KASLR (512 MiB without); vmlinux.lds.S asserts it, so no real kernel spans more.
KERNEL_IMAGE_SIZE = 1 << 30
_MACHINES = {0: "NONE", 2: "SPARC", 3: "386", 8: "MIPS", 20: "PPC", 21: "PPC64", 22: "S390", 40: "ARM",
             42: "SH", 43: "SPARCV9", 50: "IA_64", 62: "X86_64", 183: "AARCH64", 243: "RISCV", 258: "LOONGARCH"}
_TYPES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}


def _machine_name(machine: int) -> str:
    return _MACHINES.get(machine, f"e_machine {machine:#x}")


def _flags(flags: int) -> str:
    return "".join(c for bit, c in ((PF_R, "R"), (PF_W, "W"), (PF_X, "E")) if flags & bit) or "none"


def _parse_vmlinux(raw: bytes, what: str) -> tuple[tuple, int, str | None]:
    """(segments, entry offset, banner) of an x86_64 vmlinux, segments placed by p_paddr.

    Every header field the placement depends on is checked here (not left to a general ELF
    library, which reads past bad tables or warns), so bad input is one KernelError line."""
    if len(raw) < 64 or raw[:4] != ELF_MAGIC:
        problem = "truncated ELF header" if raw[:4] == ELF_MAGIC else "not an ELF file"
        raise KernelError(f"{what}: {problem} ({len(raw)} bytes)")
    ident, e_type, machine, _version, entry, phoff, _shoff, _flags_, _ehsize, phentsize, phnum, *_ = \
        _EHDR.unpack_from(raw)
    elf_class = {1: "ELF32", 2: "ELF64"}.get(ident[4], f"ELF class {ident[4]}")
    if machine != EM_X86_64 or ident[4] != 2:
        raise KernelError(f"{what}: wrong machine: {_machine_name(machine)} {elf_class}, need x86_64 ELF64")
    if ident[5] != 1:
        raise KernelError(f"{what}: not a little-endian ELF (EI_DATA {ident[5]}), need x86_64 ELF64")
    if e_type not in (ET_EXEC, ET_DYN):
        raise KernelError(f"{what}: ELF type {_TYPES.get(e_type, hex(e_type))} is not an executable")
    if phnum == 0:
        raise KernelError(f"{what}: no PT_LOAD segments (no program headers)")
    if phentsize != _PHDR.size:
        raise KernelError(f"{what}: malformed ELF: e_phentsize {phentsize}, ELF64 program headers are {_PHDR.size} bytes")
    if phoff + phnum * phentsize > len(raw):
        raise KernelError(f"{what}: truncated: program headers end at {phoff + phnum * phentsize:#x}, "
                          f"file has {len(raw):#x}")
    loads = []
    for i in range(phnum):
        p_type, flags, offset, vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(raw, phoff + i * phentsize)
        if p_type == PT_INTERP:
            interp = raw[offset:offset + min(filesz, 256)].split(b"\0")[0].decode("ascii", "replace") \
                if offset < len(raw) else "?"
            raise KernelError(f"{what}: not a kernel: a dynamically linked program (PT_INTERP {interp!r})")
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise KernelError(f"{what}: malformed ELF: PT_LOAD at {paddr:#x} has p_filesz {filesz:#x} larger "
                              f"than p_memsz {memsz:#x}")
        if offset + filesz > len(raw):
            raise KernelError(f"{what}: truncated: PT_LOAD at {paddr:#x} needs file bytes up to "
                              f"{offset + filesz:#x}, file has {len(raw):#x}")
        for name, addr in (("physical", paddr), ("virtual", vaddr)):
            if addr + memsz > 1 << 64:
                raise KernelError(f"{what}: malformed ELF: PT_LOAD at {name} {addr:#x} + {memsz:#x} bytes wraps "
                                  f"past the top of the address space")
        loads.append((paddr, vaddr, memsz, raw[offset:offset + filesz], flags))
    if not loads:
        raise KernelError(f"{what}: no PT_LOAD segments")
    loads.sort()
    for (pa, _, memsz, _, _), (next_pa, _, _, _, _) in zip(loads, loads[1:]):
        if pa + memsz > next_pa:
            raise KernelError(f"{what}: PT_LOAD segments overlap at physical {next_pa:#x}")
    base = loads[0][0]
    span = max(pa + memsz for pa, _, memsz, _, _ in loads) - base
    if span > KERNEL_IMAGE_SIZE:
        raise KernelError(f"{what}: PT_LOAD segments span {span:#x} bytes from physical {base:#x}, more than an "
                          f"x86_64 kernel image can (KERNEL_IMAGE_SIZE, 1 GiB)")
    found = _entry_physical(entry, loads)
    if found is None:
        raise KernelError(f"{what}: entry point {entry:#x} is outside every PT_LOAD segment")
    entry_pa, (_, vaddr, _, _, flags) = found
    if not flags & PF_X:
        raise KernelError(f"{what}: entry point {entry:#x} is in a segment that is not executable "
                          f"(p_flags {_flags(flags)})")
    if vaddr < KERNEL_HALF:
        raise KernelError(f"{what}: not a kernel: its entry code is linked at {vaddr:#x}, in user space "
                          f"(an x86_64 vmlinux is linked at {KERNEL_HALF:#x} and above)")
    segments = tuple(KernelSegment(pa - base, bytes(data), memsz) for pa, _va, memsz, data, _ in loads)
    return segments, entry_pa - base, _find_banner(loads)


def _entry_physical(entry: int, loads):
    """(physical entry, its segment): vmlinux's e_entry is already physical (phys_startup_64);
    other linkers give a virtual one."""
    for seg in loads:
        pa, _va, memsz = seg[:3]
        if pa <= entry < pa + memsz:
            return entry, seg
    for seg in loads:
        pa, va, memsz = seg[:3]
        if va <= entry < va + memsz:
            return pa + (entry - va), seg
    return None


def _find_banner(loads) -> str | None:
    # Since 6.1 a vmlinux holds two banners: a weak placeholder from init/version.c ("... # SMP")
    # and the linked one from init/version-timestamp.c with the build number ("#1 SMP"), which is
    # what Linux prints. Prefer a banner with a build number.
    found = [m.group() for seg in loads for m in _BANNER.finditer(seg[3])]
    best = next((b for b in found if re.search(rb"#\d", b)), found[0] if found else None)
    return best.decode("ascii", "replace").strip() if best else None


def describe(image: KernelImage) -> str:
    """One line for logs and the CLI."""
    what = image.format if not image.compression else f"{image.format} ({image.compression})"
    return (f"{image.path}: {what}, {len(image.segments)} segments, span {image.span:#x}, "
            f"entry +{image.entry_offset:#x}, {image.version or 'unknown version'}")

