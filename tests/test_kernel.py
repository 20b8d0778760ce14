"""boot/kernel.py: the stand-in vmlinux, synthetic bzImages in every compression Linux uses,
corrupt inputs, and a real Debian bzImage."""
import ctypes
import struct

import pytest
from elftools.elf.elffile import ELFFile

from hclsim import HclsimError
from hclsim.boot.initrd import compress
from hclsim.boot.kernel import (DEFAULT_ALIGNMENT, SUPPORTED_COMPRESSIONS, CompressedStreamError,
                                KernelError, decompress_stream, load_kernel)
from hclsim.boot.layout import BOOT_FLAG_MAGIC, HDRS_MAGIC, SETUP_HEADER_OFFSET, SetupHeader

PHYS_START = 0x1000000
START_KERNEL_VADDR = 0xFFFFFFFF81000000
PAYLOAD_OFFSET = 0x3C0  # where the payload sits in the protected-mode part (after "decompressor" code)


def make_bzimage(vmlinux: bytes, compression: str, *, setup_sects=4, version=0x020F,
                 alignment=0x1000000, payload=None) -> bytes:
    """A bzImage as arch/x86/boot/tools/build.c lays it out: setup sectors with the setup
    header at 0x1f1, then the protected-mode part holding the compressed vmlinux plus the
    4-byte uncompressed size that the kernel build appends (size_append)."""
    if payload is None:
        payload = compress(vmlinux, compression) + struct.pack("<I", len(vmlinux))
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    release = b"6.6.0-hclsim-standin (test) #1\0"
    setup[0x300:0x300 + len(release)] = release
    hdr = SetupHeader(
        setup_sects=setup_sects, syssize=0, boot_flag=BOOT_FLAG_MAGIC, jump=0x6AEB,
        header=HDRS_MAGIC, version=version, kernel_version=0x300 - 0x200, loadflags=0x01,
        code32_start=0x100000, kernel_alignment=alignment, relocatable_kernel=1, min_alignment=21,
        xloadflags=0x3, cmdline_size=0x7FF, payload_offset=PAYLOAD_OFFSET,
        payload_length=len(payload), pref_address=PHYS_START, init_size=0x2000000)
    setup[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + ctypes.sizeof(hdr)] = bytes(hdr)
    pm = b"\x90" * PAYLOAD_OFFSET + payload + b"\0" * 16
    return bytes(setup) + pm


@pytest.fixture(scope="module")
def vmlinux(standin_kernel) -> bytes:
    return standin_kernel.read_bytes()


def _write(tmp_path, data: bytes, name="kernel") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _error(path) -> str:
    with pytest.raises(KernelError) as info:
        load_kernel(path)
    msg = str(info.value)
    assert isinstance(info.value, HclsimError)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# --- the stand-in vmlinux ---------------------------------------------------------------------

def test_standin_is_linked_like_vmlinux(standin_kernel):
    with open(standin_kernel, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert elf["e_entry"] == PHYS_START
        assert loads[0]["p_paddr"] == PHYS_START and loads[0]["p_vaddr"] == START_KERNEL_VADDR


def test_standin_loads(standin_kernel):
    k = load_kernel(standin_kernel)
    assert (k.format, k.compression, k.setup_header) == ("elf", None, None)
    assert k.entry_offset == 0
    assert [s.offset for s in k.segments] == [0, 0x1000, 0x2000]
    assert k.segments[0].data[:1] == b"\xfa"          # cli: startup_64 is at the load base
    assert k.segments[2].data == b"" and k.segments[2].memsz == 0x1000  # .bss
    assert k.span == 0x3000 and k.alignment == DEFAULT_ALIGNMENT
    assert k.version.startswith("Linux version 6.6.0-hclsim-standin ")


def test_virtual_entry_is_converted(tmp_path, vmlinux):
    patched = bytearray(vmlinux)
    struct.pack_into("<Q", patched, 24, START_KERNEL_VADDR + 1)  # e_entry: virtual, not physical
    assert load_kernel(_write(tmp_path, bytes(patched))).entry_offset == 1


# --- bzImage ----------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", SUPPORTED_COMPRESSIONS)
def test_bzimage_each_compression(tmp_path, standin_kernel, vmlinux, compression):
    elf = load_kernel(standin_kernel)
    k = load_kernel(_write(tmp_path, make_bzimage(vmlinux, compression)))
    assert (k.format, k.compression) == ("bzimage", compression)
    assert k.segments == elf.segments and k.entry_offset == elf.entry_offset and k.span == elf.span
    assert k.version == elf.version and k.alignment == 0x1000000
    assert k.setup_header["protocol"] == "2.15"
    assert k.setup_header["kernel_version_string"] == "6.6.0-hclsim-standin (test) #1"


def test_bzimage_setup_sects_zero_means_four(tmp_path, vmlinux):
    k = load_kernel(_write(tmp_path, make_bzimage(vmlinux, "gzip", setup_sects=0)))
    assert k.setup_header["setup_size"] == 5 * 512


def test_bzimage_lz4_frame_format(tmp_path, vmlinux):
    import lz4.frame
    payload = lz4.frame.compress(vmlinux) + struct.pack("<I", len(vmlinux))
    assert load_kernel(_write(tmp_path, make_bzimage(vmlinux, "lz4", payload=payload))).compression == "lz4"


@pytest.mark.parametrize("size", [8 << 20, (8 << 20) * 2 + 12345])
def test_lz4_legacy_multiblock(size):
    # Full 8 MiB blocks continue the stream; the appended size (4 bytes) is not a block.
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    stream = compress(data, "lz4")
    name, out, end = decompress_stream(stream + struct.pack("<I", size))
    assert (name, out, end) == ("lz4", data, len(stream))


# --- bad input --------------------------------------------------------------------------------

def test_not_a_kernel(tmp_path):
    assert "not an ELF vmlinux or a bzImage" in _error(_write(tmp_path, b"hello world\n" * 100))


def test_missing_file(tmp_path):
    assert "cannot read" in _error(tmp_path / "nope")


def test_truncated_elf(tmp_path, vmlinux):
    assert "truncated" in _error(_write(tmp_path, vmlinux[:100]))


def test_truncated_segment(tmp_path, vmlinux):
    assert "truncated" in _error(_write(tmp_path, vmlinux[:0x1008]))


def test_wrong_machine(tmp_path, vmlinux):
    patched = bytearray(vmlinux)
    struct.pack_into("<H", patched, 18, 183)  # e_machine = EM_AARCH64
    assert "wrong machine: AARCH64" in _error(_write(tmp_path, bytes(patched)))


def test_no_pt_load(tmp_path, vmlinux):
    patched = bytearray(vmlinux)
    struct.pack_into("<H", patched, 56, 0)  # e_phnum = 0
    assert "no PT_LOAD segments" in _error(_write(tmp_path, bytes(patched)))


def test_entry_outside_segments(tmp_path, vmlinux):
    patched = bytearray(vmlinux)
    struct.pack_into("<Q", patched, 24, 0x5000)
    assert "outside every PT_LOAD" in _error(_write(tmp_path, bytes(patched)))


def test_bzimage_truncated_payload(tmp_path, vmlinux):
    image = make_bzimage(vmlinux, "gzip")
    assert "truncated bzImage" in _error(_write(tmp_path, image[:5 * 512 + PAYLOAD_OFFSET + 64]))


def test_bzimage_truncated_stream(tmp_path, vmlinux):
    payload = compress(vmlinux, "xz")
    msg = _error(_write(tmp_path, make_bzimage(vmlinux, "xz", payload=payload[:len(payload) // 2])))
    assert "truncated xz data" in msg


def test_bzimage_corrupt_gzip(tmp_path, vmlinux):
    payload = bytearray(compress(vmlinux, "gzip"))
    for i in range(20, 60):
        payload[i] ^= 0x5A
    assert "corrupt gzip data" in _error(_write(tmp_path, make_bzimage(vmlinux, "gzip", payload=bytes(payload))))


def test_bzimage_unsupported_compression(tmp_path, vmlinux):
    payload = b"\x89LZO\0" + b"\0" * 64
    assert "unsupported compression lzo" in _error(_write(tmp_path, make_bzimage(vmlinux, "gzip", payload=payload)))


def test_bzimage_old_protocol(tmp_path, vmlinux):
    assert "2.06 is too old" in _error(_write(tmp_path, make_bzimage(vmlinux, "gzip", version=0x0206)))


def test_bzimage_payload_not_elf(tmp_path, vmlinux):
    msg = _error(_write(tmp_path, make_bzimage(vmlinux, "gzip", payload=compress(b"\0" * 4096, "gzip"))))
    assert "not an ELF vmlinux" in msg


def test_decompress_stream_unknown():
    with pytest.raises(CompressedStreamError, match="unknown compression"):
        decompress_stream(b"plain text")


# --- a real distribution kernel ---------------------------------------------------------------

def test_real_debian_bzimage(real_kernel, real_kernel_version):
    k = load_kernel(real_kernel)
    assert k.format == "bzimage" and k.compression in SUPPORTED_COMPRESSIONS
    assert k.version.startswith(f"Linux version {real_kernel_version} ")
    assert k.setup_header["kernel_version_string"].startswith(real_kernel_version)
    assert k.alignment == k.setup_header["kernel_alignment"] == DEFAULT_ALIGNMENT
    assert k.segments[0].offset == 0 and k.entry_offset == 0  # phys_startup_64 is the first byte
    assert k.span > 16 << 20
    for a, b in zip(k.segments, k.segments[1:]):
        assert a.offset + a.memsz <= b.offset and len(a.data) <= a.memsz
