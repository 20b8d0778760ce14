"""hclsim boot --state DIR: the VM's state folder, its VMGS disk and its lock."""
import os
import subprocess
import sys

import pytest

from hclsim.hcl import vmgs
from hclsim.state_dir import StateDir, StateDirError


def test_a_new_folder_gets_a_blank_vmgs_disk_and_is_locked(tmp_path):
    state = StateDir(str(tmp_path / "vm"))
    try:
        assert os.path.getsize(state.vmgs_path) == vmgs.DEFAULT_CAPACITY and state.vmgs_state == "blank"
        with pytest.raises(StateDirError, match=f"another VM uses this state folder \\(pid {os.getpid()}\\)"):
            StateDir(str(tmp_path / "vm"))
    finally:
        state.close()
    StateDir(str(tmp_path / "vm")).close()                           # free again once the first is done


def _hclsim(*args):
    return subprocess.run([sys.executable, "-m", "hclsim", *args], capture_output=True, text=True, timeout=120)


def test_a_vmgs_that_is_not_one_stops_the_boot_before_it_starts_and_is_kept(tmp_path):
    folder = tmp_path / "vm"
    folder.mkdir()
    junk = b"\x7fELF this is somebody's file" * 100
    (folder / "hclsim.vmgs").write_bytes(junk)
    done = _hclsim("boot", "--tpm", "--cpus", "1", "--state", str(folder))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hclsim.vmgs: not a VMGS: header 0: signature" in lines[0], done.stderr
    assert (folder / "hclsim.vmgs").read_bytes() == junk


def test_state_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "f").write_text("x")
    done = _hclsim("boot", "--tpm", "--state", str(tmp_path / "f"))
    assert done.returncode == 1 and "--state" in done.stderr and "not a folder" in done.stderr
    done = _hclsim("boot", "--until", "handoff", "--state", str(tmp_path / "d"))
    assert done.returncode != 0 and "needs the whole run" in done.stderr
