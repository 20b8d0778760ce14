"""The `hclsim` command as a user runs it: real processes, real files, real dtc."""
import json
import os
import subprocess
import sys

import pytest

from .asmutil import build_elf, com3_print
from .tools import require


def hclsim(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "hclsim", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _one_error_line(proc, status=1):
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hclsim: error: "), proc.stderr
    return lines[0]


def test_boot_writes_outputs(tmp_path):
    out = tmp_path / "out"
    proc = hclsim("boot", "--cpus", "8", "--numa-nodes", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "[INFO]" in proc.stdout and "kernel handoff at" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "power-off"
    assert b"] Run /underhill-init as init process" in (out / "serial.log").read_bytes()   # the kernel's console
    assert len(report["cpus"]) == 8 and {c["numa_node"] for c in report["cpus"]} == {0, 1}
    assert "rdinit=/underhill-init" in report["handoff"]["cmdline"]
    assert report["handoff"]["registers"]["rdi"] == "0x0"
    assert report["counters"]["instructions"] > 0 and report["timings_ms"]["shim_to_handoff"] > 0
    assert (out / "boot_params.bin").stat().st_size == 4096
    assert (out / "serial.log").read_bytes().startswith(b"[INFO] ")
    dts = subprocess.run([require("dtc"), "-I", "dtb", "-O", "dts", str(out / "linux.dtb")], capture_output=True, text=True)
    assert dts.returncode == 0, dts.stderr
    assert 'compatible = "microsoft,openvmm";' in dts.stdout
    assert dts.stdout.count('device_type = "cpu";') == 8


def test_boot_json(tmp_path):
    proc = hclsim("boot", "--cpus", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [c["apic_id"] for c in report["cpus"]] == [0, 1]


@pytest.mark.parametrize("what,content", [
    ("kernel", b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 20),
    ("kernel", b"MZ this is not a kernel" * 100),
    ("initrd", b"\x1f\x8b\x08\x00garbage" * 10),
    ("initrd", b"070701" + b"0" * 50),
    ("shim", b"\x7fELF\x02\x01\x01\x00" + b"\xff" * 40),
])
def test_corrupt_inputs_give_one_error_line(tmp_path, what, content):
    path = tmp_path / f"bad-{what}"
    path.write_bytes(content)
    line = _one_error_line(hclsim("boot", f"--{what}", str(path)))
    assert str(path) in line


def test_missing_file_and_bad_options():
    assert "nonexistent" in _one_error_line(hclsim("boot", "--kernel", "/nonexistent/vmlinuz"))
    assert "--cpus" in _one_error_line(hclsim("boot", "--cpus", "0"))
    assert "--numa-nodes" in _one_error_line(hclsim("boot", "--cpus", "2", "--numa-nodes", "3"))


def test_guest_fault_exit_status_and_saved_data(tmp_path):
    elf = build_elf(".globl _start\n.text\n_start:\n" + com3_print("[INFO] about to fault\n") + "    ud2\n", tmp_path)
    out = tmp_path / "out"
    proc = hclsim("boot", "--shim", str(elf), "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.startswith("hclsim: error: guest fault: #UD at RIP 0x")
    assert "registers:" in proc.stderr and "last serial lines:" in proc.stderr
    assert (out / "serial.log").read_text() == "[INFO] about to fault\n"
    assert "#UD" in (out / "fault.txt").read_text()
    assert json.loads((out / "report.json").read_text())["status"] == "fault"


def test_firmware_build_prints_cached_elf():
    proc = hclsim("firmware", "build")
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    assert os.path.exists(path)
    readelf = subprocess.run(["readelf", "-S", path], capture_output=True, text=True).stdout
    assert ".debug_info" in readelf and ".symtab" in readelf


def test_missing_compiler_is_a_clear_error(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), HCLSIM_CACHE=str(tmp_path / "cache"))
    line = _one_error_line(hclsim("firmware", "build", env=env))
    assert "gcc not found" in line


def test_sidecar_commands():
    info = json.loads(hclsim("sidecar", "--cpus", "8", "--json", "info").stdout)
    assert info["idle_cpus"] == 7 and info["nodes"][0]["cpu_status"][0] == "REMOVED"
    regs = json.loads(hclsim("sidecar", "--cpus", "8", "--json", "get-regs", "3", "rip", "rdi").stdout)
    assert regs["registers"] == {"rip": "0x200000", "rdi": "0x3"}
    run = json.loads(hclsim("sidecar", "--cpus", "8", "--json", "run-vp", "2").stdout)
    assert run["done"] and run["com1"] == "hello from VTL0 vp 2\nvp 2 done\n"
    assert [i["type"] for i in run["intercepts"]][len("hello from VTL0 vp 2\n")] == "cpuid"
    online = json.loads(hclsim("sidecar", "--cpus", "8", "--json", "online", "5", "2").stdout)
    assert online["linux_cpus"] == [0, 2, 5]


def test_sidecar_command_errors():
    assert "already online" in _one_error_line(hclsim("sidecar", "--cpus", "8", "online", "0"))
    assert "not a sidecar CPU" in _one_error_line(hclsim("sidecar", "--cpus", "8", "get-regs", "42", "rip"))
    assert "not running" in _one_error_line(hclsim("sidecar", "--cpus", "8", "--isolation", "snp", "run-vp", "3"))
