"""The pytest plugin as users run it: a separate pytest process that loads it through its
pytest11 entry point, with the golden workflow, the firmware options and the example suite."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hclsim.boot import firmware

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "firmware-regression"

USER_SUITE = '''
import os

def test_output(golden):
    golden.check("out.txt", os.environ["HCLSIM_TEST_OUTPUT"])

def test_firmware_option(hclsim_machine, hclsim_boot):
    machine = hclsim_machine(cpus=2)
    print("SHIM", machine.shim_path)
    assert hclsim_boot(cpus=2).machine.shim_path == machine.shim_path
'''


def run_pytest(*args, cwd, output="a\nb\n") -> subprocess.CompletedProcess:
    env = dict(os.environ, HCLSIM_TEST_OUTPUT=output)
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def user_suite(tmp_path) -> Path:
    (tmp_path / "test_user.py").write_text(USER_SUITE)
    return tmp_path


def test_golden_missing_update_and_diff(user_suite):
    golden = user_suite / "golden" / "test_user" / "out.txt"
    missing = run_pytest("-k", "test_output", cwd=user_suite)
    assert missing.returncode == 1 and "is missing" in missing.stdout and "--hclsim-update-golden" in missing.stdout
    assert not golden.exists()

    assert run_pytest("-k", "test_output", "--hclsim-update-golden", cwd=user_suite).returncode == 0
    assert golden.read_text() == "a\nb\n"
    assert run_pytest("-k", "test_output", cwd=user_suite).returncode == 0

    changed = run_pytest("-k", "test_output", cwd=user_suite, output="a\nc\n")
    assert changed.returncode == 1
    assert "--- golden/test_user/out.txt" in changed.stdout
    assert "\n-b\n" in changed.stdout and "\n+c\n" in changed.stdout
    assert golden.read_text() == "a\nb\n"  # only --hclsim-update-golden rewrites it


def test_shim_option_reaches_every_machine(user_suite):
    shim = user_suite / "my-shim.elf"
    shim.write_bytes(firmware.build(firmware.SHIM).read_bytes())
    done = run_pytest("-s", "-v", "-k", "test_firmware_option", "--hclsim-shim", str(shim), cwd=user_suite)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SHIM {shim}" in done.stdout
    assert f"hclsim: --hclsim-shim {shim}" in done.stdout  # said in the session header


def test_missing_firmware_file_is_a_usage_error(user_suite):
    done = run_pytest("--hclsim-sidecar", "/nonexistent/sidecar.elf", cwd=user_suite)
    assert done.returncode == 4  # pytest's usage error
    assert "--hclsim-sidecar /nonexistent/sidecar.elf: no such file" in done.stderr


def test_example_suite_passes_with_the_shipped_shim_given_by_path(tmp_path):
    shim = tmp_path / "shim.elf"
    shim.write_bytes(firmware.build(firmware.SHIM).read_bytes())
    done = run_pytest(str(EXAMPLE), "--hclsim-shim", str(shim), cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 passed" in done.stdout


def test_example_suite_catches_a_changed_shim(tmp_path):
    shipped = firmware.build(firmware.SHIM).read_bytes()
    changed = tmp_path / "changed-shim.elf"
    changed.write_bytes(shipped.replace(b"openhcl boot shim", b"openhcl boot SHIM"))
    done = run_pytest(str(EXAMPLE), "-k", "test_shim_log", "--hclsim-shim", str(changed), cwd=REPO)
    assert done.returncode == 1
    assert "-[INFO] openhcl boot shim: base" in done.stdout and "+[INFO] openhcl boot SHIM: base" in done.stdout


FAULT_SUITE = '''
import os

def test_boot_faults(hclsim_boot):
    hclsim_boot(cpus=2, shim=os.environ["HCLSIM_TEST_SHIM"])

def test_machine_faults_in_run_to_handoff(hclsim_machine):
    hclsim_machine(shim=os.environ["HCLSIM_TEST_SHIM"]).run_to_handoff()

def test_expected_fault_passes(hclsim_boot):
    import pytest
    from hclsim.cpu.fault import GuestFaultError
    with pytest.raises(GuestFaultError):
        hclsim_boot(shim=os.environ["HCLSIM_TEST_SHIM"])
'''


def test_a_guest_fault_in_a_test_shows_the_whole_report(tmp_path):
    """The same report `hclsim boot` prints (and saves as fault.txt): registers, page walk,
    code around RIP, last serial lines, in the failure of the test that met the fault."""
    from .asmutil import build_elf, com3_print
    shim = build_elf(".globl _start\n.text\n_start:\n" + com3_print("[INFO] about to fault\n")
                     + "    movabs $0x7f0000000000, %rax\nbad_load:\n    mov (%rax), %rbx\n", tmp_path)
    (tmp_path / "test_faults_here.py").write_text(FAULT_SUITE)
    env = dict(os.environ, HCLSIM_TEST_SHIM=str(shim))
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 1 and "2 failed, 1 passed" in out, out + done.stderr
    assert out.count("hclsim guest fault report") == 2
    for part in ("guest fault: #PF at RIP 0x", "registers:", "page walk for 0x7f0000000000", "code:",
                 "=> 0x", "shim:bad_load", "last serial lines:", "[INFO] about to fault"):
        assert part in out, part
