"""boot/initrd.py: concatenated (compressed) cpio newc initrds as Linux accepts them, the
deterministic builder and a real Debian initrd (the shipped initrd: tests/test_rootfs.py)."""
import gzip
import os
import shutil
import subprocess

import pytest

from hclsim import HclsimError

from hclsim.boot.initrd import COMPRESSIONS, InitrdError, build_initrd, compress, load_initrd

TREE_ENTRIES = 5  # bin, bin/init, etc, etc/motd, init (see `tree`)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "bin" / "init").write_text("#!/bin/sh\nexec sh\n")
    (root / "bin" / "init").chmod(0o755)
    (root / "etc" / "motd").write_bytes(os.urandom(3000))
    (root / "init").symlink_to("bin/init")
    return root


@pytest.fixture
def microcode(tmp_path):
    """An early-microcode cpio, as Debian's initramfs-tools prepends uncompressed."""
    root = tmp_path / "early"
    (root / "kernel" / "x86" / "microcode").mkdir(parents=True)
    (root / "kernel" / "x86" / "microcode" / "AuthenticAMD.bin").write_bytes(b"\x55" * 1000)
    return build_initrd(root, "none")


def _write(tmp_path, data: bytes) -> str:
    path = tmp_path / "initrd.img"
    path.write_bytes(data)
    return str(path)


def _error(path) -> str:
    with pytest.raises(InitrdError) as info:
        load_initrd(path)
    assert isinstance(info.value, HclsimError)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_single_segment(tmp_path, tree, compression):
    data = build_initrd(tree, compression)
    initrd = load_initrd(_write(tmp_path, data))
    assert initrd.data == data
    assert initrd.compression == (compression,)
    assert initrd.files == TREE_ENTRIES


def test_microcode_then_compressed(tmp_path, tree, microcode):
    # Debian pads the early cpio with NULs; Linux skips them between segments.
    data = microcode + b"\0" * (-len(microcode) % 512) + build_initrd(tree, "gzip")
    initrd = load_initrd(_write(tmp_path, data))
    assert initrd.compression == ("none", "gzip")
    assert initrd.files == 4 + TREE_ENTRIES and initrd.data == data


def test_many_segments(tmp_path, tree, microcode):
    data = microcode + build_initrd(tree, "zstd") + build_initrd(tree, "xz") + build_initrd(tree, "lz4")
    assert load_initrd(_write(tmp_path, data)).compression == ("none", "zstd", "xz", "lz4")


def test_compressed_segment_with_two_archives(tmp_path, tree, microcode):
    data = compress(microcode + build_initrd(tree, "none"), "gzip")
    initrd = load_initrd(_write(tmp_path, data))
    assert initrd.compression == ("gzip",) and initrd.files == 4 + TREE_ENTRIES


# --- bad input --------------------------------------------------------------------------------

def test_corrupt_gzip(tmp_path, tree):
    data = bytearray(build_initrd(tree, "gzip"))
    for i in range(30, 60):
        data[i] ^= 0xA5
    assert "corrupt gzip data" in _error(_write(tmp_path, bytes(data)))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz"])
def test_truncated_compressed(tmp_path, tree, compression):
    data = build_initrd(tree, compression)
    assert "truncated" in _error(_write(tmp_path, data[:len(data) // 2]))


def test_truncated_cpio(tmp_path, tree):
    data = build_initrd(tree, "none")
    assert "truncated" in _error(_write(tmp_path, data[:len(data) - 200]))


def test_missing_trailer(tmp_path, tree):
    data = build_initrd(tree, "none")
    assert "TRAILER!!!" in _error(_write(tmp_path, data[:data.index(b"070701", 200)]))


def test_compressed_non_cpio(tmp_path):
    assert "not a cpio newc archive" in _error(_write(tmp_path, gzip.compress(b"hello" * 100)))


def test_garbage(tmp_path, tree):
    assert "unrecognised data at 0x" in _error(_write(tmp_path, build_initrd(tree, "none") + b"junk"))


def test_empty(tmp_path):
    assert "empty" in _error(_write(tmp_path, b""))


def test_odc_cpio_rejected(tmp_path, tree):
    odc = subprocess.run(["cpio", "-o", "-H", "odc", "--quiet"], input=b"bin\n", cwd=tree,
                         capture_output=True, check=True).stdout if shutil.which("cpio") else b"070707" + b"0" * 80
    assert "newc" in _error(_write(tmp_path, odc))


def test_lz4_frame_rejected(tmp_path, tree):
    import lz4.frame
    data = lz4.frame.compress(build_initrd(tree, "none"))
    assert "legacy lz4" in _error(_write(tmp_path, data))


def test_missing_file(tmp_path):
    assert "cannot read" in _error(tmp_path / "nope")


# --- building ---------------------------------------------------------------------------------

def test_build_is_deterministic(tree):
    first = build_initrd(tree, "gzip")
    os.utime(tree / "etc" / "motd", (1, 123456789))
    (tree / "etc").chmod(0o700)
    assert build_initrd(tree, "gzip") == first


def test_build_rejects_unknown_compression(tree):
    with pytest.raises(InitrdError, match="unknown compression"):
        build_initrd(tree, "lzo")


# --- a real distribution initrd ---------------------------------------------------------------

def test_real_debian_initrd(real_initrd):
    initrd = load_initrd(real_initrd)
    assert initrd.data == real_initrd.read_bytes()
    assert initrd.compression and set(initrd.compression) <= set(COMPRESSIONS)
    assert initrd.compression[-1] != "none"  # the main archive is compressed
    assert initrd.files > 100                # busybox, scripts, modules
