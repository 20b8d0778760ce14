"""The VMGS store (hcl/vmgs.py): its layout, crash safety and the errors of a disk that is not one."""
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from hclsim.hcl import vmgs


def _disk(tmp_path, name="d.vmgs", size=vmgs.DEFAULT_CAPACITY):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path, os.open(path, os.O_RDWR)


def test_a_blank_disk_is_formatted_as_vmgs_version_3(tmp_path):
    path, fd = _disk(tmp_path)
    assert vmgs.check_file(str(path)) == "blank"
    store = vmgs.Vmgs(fd)
    assert store.formatted_now and store.files() == {}
    raw = open(path, "rb").read(3 * vmgs.BLOCK)
    sig, version, checksum, seq, size, table, table_size = struct.unpack_from("<8sIIIIII", raw)
    assert (sig, version, seq, size, table, table_size) == (b"GUESTRTS", 0x30000, 1, 168, 2, 1)
    assert checksum == __import__("zlib").crc32(raw[:12] + bytes(4) + raw[16:168])
    assert raw[vmgs.BLOCK:2 * vmgs.BLOCK] == bytes(vmgs.BLOCK)          # slot 1 unused yet
    assert struct.unpack_from("<IIQ", raw, 2 * vmgs.BLOCK) == (2, 1, 4096)   # entry 0: the table
    assert vmgs.check_file(str(path)) == "0 files"
    os.close(fd)


def test_files_are_kept_across_opens_and_rewrites(tmp_path):
    path, fd = _disk(tmp_path)
    store = vmgs.Vmgs(fd)
    store.write_file(vmgs.TPM_NVRAM, b"nv" * 3000)
    store.write_file(vmgs.TPM_PPI, bytes(28))
    store.write_file(vmgs.TPM_NVRAM, b"second")
    os.close(fd)
    fd = os.open(path, os.O_RDWR)
    again = vmgs.Vmgs(fd)
    assert not again.formatted_now
    assert again.read_file(vmgs.TPM_NVRAM) == b"second" and again.read_file(vmgs.TPM_PPI) == bytes(28)
    assert again.read_file(vmgs.BIOS_NVRAM) is None
    assert again.files() == {vmgs.TPM_PPI: 28, vmgs.TPM_NVRAM: 6}
    assert again.sequence == 4 and again.slot == 1                    # format, then three writes
    os.close(fd)


class _Crash(Exception):
    pass


@settings(max_examples=40, deadline=None)
@given(writes=st.lists(st.tuples(st.sampled_from([vmgs.TPM_PPI, vmgs.TPM_NVRAM, 5]),
                                 st.binary(max_size=9000)), min_size=1, max_size=6),
       crash_at=st.integers(0, 20))
def test_a_crash_in_any_write_leaves_the_old_files_or_the_new(tmp_path_factory, writes, crash_at):
    tmp = tmp_path_factory.mktemp("crash")
    path, fd = _disk(tmp, size=256 * 1024)
    store = vmgs.Vmgs(fd)
    model, calls = {}, [0]
    real = os.pwrite

    def pwrite(f, data, off):
        calls[0] += 1
        if calls[0] == crash_at:
            real(f, data[:len(data) // 2], off)                   # torn: half of it reached the disk
            raise _Crash()
        return real(f, data, off)
    vmgs.os.pwrite = pwrite
    before = dict(model)
    try:
        for file_id, data in writes:
            before = dict(model)
            model[file_id] = data                                   # what it is once the write is done
            store.write_file(file_id, data)
        before = dict(model)
    except _Crash:
        pass
    finally:
        vmgs.os.pwrite = real
    os.close(fd)
    fd = os.open(path, os.O_RDWR)
    again = vmgs.Vmgs(fd)
    got = {i: again.read_file(i) for i in (vmgs.TPM_PPI, vmgs.TPM_NVRAM, 5)}
    want_old = {i: before.get(i) for i in got}
    want_new = {i: model.get(i) for i in got}
    assert got in (want_old, want_new)
    os.close(fd)


def test_what_is_not_a_vmgs_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "junk.vmgs"
    path.write_bytes(b"not a vmgs at all" * 1000)
    with pytest.raises(vmgs.VmgsError, match="not a VMGS: header 0: signature"):
        vmgs.check_file(str(path))
    fd = os.open(path, os.O_RDWR)
    with pytest.raises(vmgs.VmgsError):
        vmgs.Vmgs(fd)
    os.close(fd)
    assert path.read_bytes() == b"not a vmgs at all" * 1000
    # A header whose checksum does not match its bytes (a torn write of the only header).
    path2, fd = _disk(tmp_path, "torn.vmgs")
    vmgs.Vmgs(fd)
    raw = bytearray(os.pread(fd, 168, 0))
    raw[100] ^= 1                                                  # in the reserved key area
    os.pwrite(fd, bytes(raw), 0)
    with pytest.raises(vmgs.VmgsError, match="checksum"):
        vmgs.Vmgs(fd)
    os.close(fd)


def test_a_full_disk_and_bad_file_ids_are_errors(tmp_path):
    _path, fd = _disk(tmp_path, size=8 * vmgs.BLOCK)
    store = vmgs.Vmgs(fd)
    with pytest.raises(vmgs.VmgsError, match="the VMGS is full"):
        store.write_file(vmgs.TPM_NVRAM, bytes(6 * vmgs.BLOCK))
    assert store.read_file(vmgs.TPM_NVRAM) is None                 # nothing half-written is visible
    store.write_file(vmgs.TPM_NVRAM, bytes(3 * vmgs.BLOCK))
    for bad in (0, 64, -1):
        with pytest.raises(vmgs.VmgsError, match="no VMGS file"):
            store.read_file(bad)
    os.close(fd)


def test_hclsim_vmgs_shows_a_state_folders_store_and_reads_its_files(tmp_path):
    import json
    import subprocess
    import sys
    folder = tmp_path / "vm"
    folder.mkdir()
    path, fd = _disk(folder, "hclsim.vmgs")

    def hclsim(*args):
        return subprocess.run([sys.executable, "-m", "hclsim", "vmgs", *map(str, args)], capture_output=True,
                              timeout=60)
    assert hclsim(folder).stdout.decode().strip() == f"{path}: blank (never formatted)"
    store = vmgs.Vmgs(fd)
    store.write_file(vmgs.TPM_NVRAM, b"\x00nv\xff" * 500)
    store.write_file(vmgs.TPM_PPI, bytes(28))
    os.close(fd)
    text = hclsim(folder).stdout.decode().splitlines()
    assert text[0] == f"{path}: VMGS 3.0, 4096 KiB, active header 0 (sequence 3), 2 files"
    assert text[1].split()[:4] == ["TPM_PPI", "(", "2)", "28"] and text[2].split()[0] == "TPM_NVRAM"
    summary = json.loads(hclsim(path, "--json").stdout)
    assert summary["files"]["3"] == {"name": "TPM_NVRAM", "bytes": 2000, "block": summary["files"]["3"]["block"]}
    assert hclsim(folder, "--read", 3).stdout == b"\x00nv\xff" * 500
    hclsim(folder, "--read", 2, "--out", tmp_path / "ppi.bin")
    assert (tmp_path / "ppi.bin").read_bytes() == bytes(28)
    missing = hclsim(folder, "--read", 1)
    assert missing.returncode == 1 and missing.stderr.decode().strip().endswith("file 1 (BIOS_NVRAM) was never written")
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 9000)
    bad = hclsim(junk)
    assert bad.returncode == 1 and bad.stderr.decode().count("\n") == 1 and "not a VMGS" in bad.stderr.decode()
