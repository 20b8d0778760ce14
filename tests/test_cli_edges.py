"""The edges a firmware developer meets at the `hclsim` command (issue 9): bad input refused in
one line before any work, faults as reports (text, JSON, files), closed pipes, Ctrl-C at any
moment, names instead of codes, why something is off, the sidecar's tables, progress lines."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hclsim.boot.layout import MEMORY_VTL_TYPE

from .asmutil import build_elf, com3_print

HCLSIM = [sys.executable, "-m", "hclsim"]


def hclsim(*args, env=None, timeout=180, **kw):
    return subprocess.run([*HCLSIM, *args], capture_output=True, text=True, env=env, timeout=timeout, **kw)


def one_error_line(proc, status=1) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hclsim: error: "), proc.stderr
    return lines[0]


def refused_before_booting(proc, status=1) -> str:
    """One error line, and nothing booted: the guest's serial output never reached stdout."""
    line = one_error_line(proc, status)
    assert "[INFO]" not in proc.stdout and proc.stdout.strip() == "", proc.stdout
    return line


def faulting_shim(tmp_path) -> Path:
    body = com3_print("[INFO] about to fault\n") + "    movabs $0x7f0000000000, %rax\nbad_load:\n    mov (%rax), %rbx\n"
    return build_elf(".globl _start\n.text\n_start:\n" + body, tmp_path)


# ---- output and cache folders ----------------------------------------------------------------

@pytest.mark.parametrize("where", ["proc", "proc-root", "existing-file", "under-file", "report-is-a-folder"])
def test_unwritable_out_folder_is_refused_before_booting(tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = {"proc": "/proc/hclsim-out", "proc-root": "/proc", "existing-file": str(afile),
           "under-file": str(afile / "out"), "report-is-a-folder": str(tmp_path / "o")}[where]
    if where == "report-is-a-folder":
        (tmp_path / "o" / "report.json").mkdir(parents=True)
    line = refused_before_booting(hclsim("boot", "--out", out))
    assert line.startswith(f"hclsim: error: --out {out}: ")


def test_out_check_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new" / "sub"
    afile = tmp_path / "afile"
    afile.write_text("x")
    env = dict(os.environ, HCLSIM_CACHE=str(afile))     # refused after the --out check
    refused_before_booting(hclsim("boot", "--out", str(out), env=env))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["proc", "a-file", "under-a-file"])
@pytest.mark.parametrize("command", [["boot"], ["firmware", "build"], ["sidecar", "info"]])
def test_unusable_cache_folder_is_refused_before_booting(tmp_path, where, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cache = {"proc": "/proc/hclsim-cache", "a-file": str(afile), "under-a-file": str(afile / "cache")}[where]
    line = refused_before_booting(hclsim(*command, env=dict(os.environ, HCLSIM_CACHE=cache)))
    assert f"cache folder {cache}" in line and "HCLSIM_CACHE" in line


# ---- sizes and times ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (["--memory", "1T"], "unknown unit 'T'"),
    (["--memory", "1X"], "unknown unit 'X'"),
    (["--memory", "12Q"], "unknown unit 'Q'"),
    (["--memory=-1G"], "invalid size"),
    (["--memory", "1.5G"], "invalid size"),
    (["--vtl2-size", "64Z"], "unknown unit 'Z'"),
    (["--memory", "0"], "positive multiple of 2 MiB"),
    (["--memory", "3M"], "multiple of 2 MiB"),
    (["--memory", "64M"], "cannot hold VTL2"),
    (["--memory", "190M"], "cannot hold VTL2"),
    (["--vtl2-size", "2G"], "cannot hold VTL2"),
    (["--memory", "2G", "--vtl2-size", "1984M"], "cannot hold VTL2"),
    (["--memory", "100000G"], "more than the guest can address"),
    (["--memory", "0x7fffffffffe00000"], "more than the guest can address"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout=-1"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "soon"], "--timeout"),
])
def test_bad_sizes_and_times_are_refused_before_booting(args, says):
    line = refused_before_booting(hclsim("boot", *args))
    assert says in line


def test_guest_ram_the_host_cannot_map_is_refused_before_booting():
    env = dict(os.environ, HCLSIM_GUEST_RAM="private")   # an anonymous mapping, held to RAM + swap
    line = refused_before_booting(hclsim("boot", "--memory", "60000G", env=env))
    assert "cannot be mapped on this host" in line


def test_ram_too_small_for_the_vtl2_the_images_need_is_refused_not_grown():
    """--vtl2-size is a minimum the images may grow; --memory is never grown behind the report."""
    line = one_error_line(hclsim("boot", "--vtl2-size", "0", "--memory", "130M"))
    assert "cannot hold VTL2: the images need" in line and "--memory 130 MiB" in line


def test_vtl2_grown_to_fit_says_so(tmp_path):
    proc = hclsim("boot", "--quiet", "--vtl2-size", "0", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"VTL2: +\d+ MiB at 128 MiB .*grown from --vtl2-size 0 bytes to fit the images", proc.stdout)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["config"]["memory"] == 1 << 30 and report["memory"][0]["base"] == "0x8000000"


# ---- option errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["boot", "--cpuz", "3"], ["boot", "--cpus", "abc"], ["boot", "--cpus"], ["boot", "--isolation", "foo"],
    ["boot", "--cmdline-policy", "x"], [], ["bogus"], ["sidecar"], ["sidecar", "explode"], ["firmware"],
    ["firmware", "build", "--image", "nope"], ["step", "--cpus", "x"], ["boot", "extra"],
])
def test_option_errors_are_one_line_and_status_1(args):
    line = one_error_line(hclsim(*args))
    assert "--help" in line           # where to look
    assert "usage:" not in line


def test_help_still_works():
    proc = hclsim("boot", "--help")
    assert proc.returncode == 0 and "usage: hclsim boot" in proc.stdout and "-s" in proc.stdout


def test_static_cmdline_linux_takes_is_taken_and_a_nul_is_refused():
    """Linux refuses no byte of its command line but the NUL that ends it (argv cannot carry one)."""
    proc = hclsim("boot", "--static-cmdline", "OPENHCL_X=é", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "OPENHCL_X=é" in json.loads(proc.stdout)["handoff"]["cmdline"]
    from hclsim.config import BootConfig, ConfigError
    for field in ("static_cmdline", "host_bootargs"):
        with pytest.raises(ConfigError, match="NUL byte"):
            BootConfig(**{field: "a\0b"}).validated()


# ---- sidecar arguments -----------------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (["set-regs", "3", "rax=zz"], "'zz' is not a number"),
    (["set-regs", "3", "rax"], "NAME=VALUE"),
    (["set-regs", "3", "foo=1"], "NAME=VALUE"),
    (["set-regs", "3", "rax=0x1" + "0" * 17], "64 bits"),
    (["translate", "3", "zz"], "invalid address 'zz'"),
    (["translate", "zz", "0x1000"], "invalid CPU 'zz'"),
    (["get-regs", "3", "foo"], "unknown register 'foo'"),
    (["get-regs", "x", "rip"], "invalid CPU 'x'"),
    (["get-regs", "99", "rip"], "not a sidecar CPU"),
    (["run-vp", "8"], "not a sidecar CPU"),
    (["online", "3", "12"], "not a sidecar CPU"),
])
def test_sidecar_argument_errors_are_one_line_before_booting(args, says):
    line = refused_before_booting(hclsim("sidecar", "--cpus", "8", *args))
    assert says in line


# ---- closed pipes --------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["boot", "--cpus", "8"],
    ["boot", "--cpus", "512", "--numa-nodes", "2", "--json", "--until", "handoff"],
    ["step", "--cpus", "2", "-x", "break shim_main", "-x", "continue", "-x", "info registers", "-x", "stepi 20",
     "-x", "quit"],
])
def test_closed_pipe_ends_quietly(args):
    proc = subprocess.Popen([*HCLSIM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()
    proc.stdout.close()                          # what `| head -1` does
    _, err = proc.communicate(timeout=180)
    assert proc.returncode in (0, 141), err      # 0 if it was all written already
    assert err.decode() == "", err.decode()


def test_closed_pipe_in_a_shell_pipeline():
    cmd = " ".join([*HCLSIM, "boot"]) + " | head -1; echo status=${PIPESTATUS[0]}"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180)
    assert done.stdout.startswith("[INFO]") and "status=141" in done.stdout
    assert done.stderr == ""


# ---- Ctrl-C ----------------------------------------------------------------------------------

def _interrupt(when):
    """Start `hclsim boot --cpus 1024`, SIGINT it at when (seconds, or the first stdout line
    containing the text), return (status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "hclsim", "boot", "--cpus", "1024"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if isinstance(when, float):
            time.sleep(when)
        else:
            for line in proc.stdout:
                if when in line:
                    break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("when", [0.15, 0.4, 0.8, "openhcl boot shim", "calling sidecar_entry"],
                         ids=["imports", "more-imports", "building", "shim-running", "sidecar-bring-up"])
def test_ctrl_c_at_any_moment_is_one_line_and_130(when):
    status, err = _interrupt(when)
    assert status == 130, (status, err)
    assert err.strip() == "hclsim: interrupted", err


# ---- guest faults: text, JSON, files --------------------------------------------------------

def test_fault_with_json_prints_the_fault_as_json(tmp_path):
    proc = hclsim("boot", "--shim", str(faulting_shim(tmp_path)), "--json")
    assert one_error_line(proc, 2).startswith("hclsim: error: guest fault: #PF at RIP 0x")
    report = json.loads(proc.stdout)
    assert report["status"] == "fault" and report["error"].startswith("guest fault: #PF")
    fault = report["fault"]
    assert fault["rip"] == fault["registers"]["rip"] and fault["registers"]["rax"] == "0x7f0000000000"
    assert fault["page_walk"]["address"] == "0x7f0000000000" and fault["page_walk"]["steps"][0]["level"] == "PML4E"
    current = [c for c in fault["code"] if c["current"]]
    assert len(current) == 1 and current[0]["symbol"] == "shim:bad_load" and current[0]["instruction"].startswith("mov")
    assert fault["serial_tail"] == ["[INFO] about to fault"]


def test_fault_with_out_saves_the_whole_report(tmp_path):
    out = tmp_path / "out"
    proc = hclsim("boot", "--shim", str(faulting_shim(tmp_path)), "--out", str(out))
    assert proc.returncode == 2
    text = (out / "fault.txt").read_text()
    report = json.loads((out / "report.json").read_text())
    fault = report["fault"]
    assert fault["summary"] == text.splitlines()[0] == report["error"]
    assert set(fault["registers"]) >= {"rax", "rip", "rsp", "cr0", "cr3", "efer"}
    assert fault["page_walk"]["steps"] and fault["code"] and fault["serial_tail"] == ["[INFO] about to fault"]
    assert report["config"]["shim"] == str(faulting_shim(tmp_path))
    assert f"wrote {out}/report.json, {out}/serial.log, {out}/fault.txt" in proc.stderr


# ---- names, not codes ------------------------------------------------------------------------

def test_report_names_hypercalls_memory_and_e820_types(hclsim_boot):
    run = hclsim_boot(cpus=4)
    report = run.report
    calls = report["hypercalls"]
    assert calls and all(c["call"].startswith("HvCall") and c["status"].startswith("HV_STATUS_") for c in calls)
    assert {"call": "HvCallEnableVpVtl", "status": "HV_STATUS_SUCCESS"}.items() <= next(
        c for c in calls if c["call"] == "HvCallEnableVpVtl").items()
    assert [e["type"] for e in report["handoff"]["e820"]] == [e["type"] for e in run.e820]
    assert set(e["type"] for e in run.e820) == {"ram", "reserved"}
    assert [e["type"] for e in run.boot_params["e820_table"]] == [e["type"] for e in run.e820]
    names = [kind for _, _, kind in report["device_tree"]["openhcl_memory"]]
    assert set(names) <= set(MEMORY_VTL_TYPE) and "VTL2_RAM" in names and "SIDECAR_NODE" in names
    assert [m["type"] for m in run.openhcl_memory] == names
    assert all(s["type"] == "dtb" for s in report["handoff"]["setup_data"])
    assert run.golden_report()["hypercalls"] == calls


def test_console_sizes_and_e820_names(tmp_path):
    out = tmp_path / "o"
    proc = hclsim("boot", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^  VTL2: +64 MiB at 128 MiB ", proc.stdout, re.M)
    assert re.search(r"^  memory: +1 GiB", proc.stdout, re.M)
    assert re.search(r"^    \[0x0008000000, 0x0008200000\) reserved +2 MiB$", proc.stdout, re.M)
    assert re.search(r"^    \[0x[0-9a-f]+, 0x[0-9a-f]+\) ram +\S+ \w+$", proc.stdout, re.M)
    files = [out / n for n in ("report.json", "serial.log", "linux.dtb", "boot_params.bin", "shim.log")]
    assert all(f.exists() for f in files)
    assert "  wrote " + ", ".join(str(f) for f in files) in proc.stdout


# ---- why something is off ----------------------------------------------------------------------

@pytest.mark.parametrize("args,sidecar,others", [
    (["--isolation", "vbs"], "off: isolated VM (--isolation vbs)", ["console:  ttynull: Linux gets no serial console: "
                                                                      "in an isolated VM (--isolation vbs)"]),
    (["--isolation", "snp"], "off: isolated VM (--isolation snp)",
     ["serial:   COM3 silent: the shim writes no serial output in a hardware-isolated VM (--isolation snp)"]),
    (["--no-sidecar"], "off: no sidecar image (--no-sidecar)", []),
    (["--static-cmdline", "OPENHCL_SIDECAR=off"], "off: the command line says OPENHCL_SIDECAR=off (from --static-cmdline)", []),
    (["--host-bootargs", "OPENHCL_SIDECAR=off"], "off: the command line says OPENHCL_SIDECAR=off (from --host-bootargs)", []),
    (["--cpus", "2", "--numa-nodes", "2"], "off: every node would hold one CPU (2 CPUs on 2 NUMA nodes)", []),
    (["--no-com3"], None, ["console:  ttynull: Linux gets no serial console: the host offers no COM3 (--no-com3)"]),
])
def test_the_console_says_why_something_is_off(args, sidecar, others):
    proc = hclsim("boot", "--quiet", *args)
    assert proc.returncode == 0, proc.stderr
    if sidecar:
        assert f"  sidecar:  {sidecar}" in proc.stdout
    for line in others:
        assert "  " + line in proc.stdout


# ---- hclsim sidecar ------------------------------------------------------------------------

def test_sidecar_prints_tables_not_python_reprs():
    for args in (["info"], ["get-regs", "3", "rip", "cr3"], ["run-vp", "2"], ["online", "5"], ["--isolation", "vbs", "info"]):
        proc = hclsim("sidecar", "--cpus", "8", *args)
        assert proc.returncode == 0, proc.stderr
        assert not re.search(r"\['|\{'|\[\d+(, \d+)*\]|\{\d+:", proc.stdout), proc.stdout
    info = hclsim("sidecar", "--cpus", "8", "info").stdout
    assert re.search(r"^node +CPUs +control page +shared memory +status$", info, re.M)
    assert re.search(r"^1-7 +0 +IDLE$", info, re.M) and "64 KiB at 0x" in info


def test_set_regs_reads_the_value_back():
    proc = hclsim("sidecar", "--cpus", "8", "set-regs", "3", "rax=0x55", "rbx=7")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^  rax +0x55 +0x55$", proc.stdout, re.M) and re.search(r"^  rbx +0x7 +0x7$", proc.stdout, re.M)
    data = json.loads(hclsim("sidecar", "--cpus", "8", "set-regs", "3", "rdi=0x99", "--json").stdout)
    assert data["registers"]["rdi"] == {"set": "0x99", "read_back": "0x99"} and data["all_read_back"]


def test_translate_explains_its_result():
    ok = hclsim("sidecar", "--cpus", "8", "translate", "3", "0x201000")
    assert "GVA 0x201000 maps to GPA 0x201000" in ok.stdout and "HvTranslateGvaSuccess" in ok.stdout
    assert re.search(r"PML4E +0x1000 +0x[0-9a-f]+ +present", ok.stdout)
    bad = json.loads(hclsim("sidecar", "--cpus", "8", "--json", "translate", "3", "0x7000000000").stdout)
    assert bad["result"] == "HvTranslateGvaPageNotPresent" and bad["result_code"] == 1 and "gpa" not in bad
    assert "is not present" in bad["explanation"] and bad["page_walk"]["steps"][-1]["state"] == "not present"


def test_linux_cpu_registers_go_through_the_linux_path():
    regs = json.loads(hclsim("sidecar", "--cpus", "8", "--json", "get-regs", "0", "rip", "cr3").stdout)
    assert regs["path"] == "linux" and regs["registers"]["rip"] == "0x200000"
    snp = json.loads(hclsim("sidecar", "--cpus", "4", "--isolation", "snp", "get-regs", "2", "rdi", "--json").stdout)
    assert snp["path"] == "linux" and snp["registers"]["rdi"] == "0x2"
    back = json.loads(hclsim("sidecar", "--cpus", "8", "set-regs", "0", "r12=0x1234", "--json").stdout)
    assert back["path"] == "linux" and back["all_read_back"]
    tr = json.loads(hclsim("sidecar", "--cpus", "8", "translate", "0", "0x201000", "--write", "--json").stdout)
    assert tr["path"] == "linux" and tr["gpa"] == "0x201000" and tr["access"] == "write"


@pytest.mark.parametrize("args", [
    ["--json", "get-regs", "3", "rip"], ["get-regs", "3", "--json", "rip"], ["get-regs", "3", "rip", "--json"],
    ["get-regs", "--json", "3", "rip"],
])
def test_sidecar_output_options_anywhere_on_the_line(args):
    proc = hclsim("sidecar", "--cpus", "8", *args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["registers"] == {"rip": "0x200000"}


def test_sidecar_out_and_quiet_after_the_action(tmp_path):
    out = tmp_path / "sc"
    proc = hclsim("sidecar", "info", "--cpus", "8", "--quiet", "--out", str(out))
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads((out / "sidecar.json").read_text())["idle_cpus"] == 7
    assert json.loads((out / "report.json").read_text())["status"] == "handoff"
    assert f"{out}/sidecar.json" in proc.stdout and f"{out}/shim.log" in proc.stdout


# ---- shorthands, firmware paths, --version ---------------------------------------------------

def test_gdb_shorthands_like_qemu():
    from hclsim.cli import build_parser
    args = build_parser().parse_args(["boot", "-s", "-S"])
    assert (args.gdb, args.wait_gdb) == ("127.0.0.1:1234", True)
    args = build_parser().parse_args(["boot", "-sS", "--cpus", "2"])
    assert (args.gdb, args.wait_gdb) == ("127.0.0.1:1234", True)
    args = build_parser().parse_args(["boot", "--gdb", "127.0.0.1:4444", "--wait-gdb"])
    assert (args.gdb, args.wait_gdb) == ("127.0.0.1:4444", True)
    assert "-s" in one_error_line(hclsim("boot", "-S"))


def test_gdb_shorthand_serves_gdb(tmp_path):
    """`-s -S`: listening on 127.0.0.1:1234, waiting at the shim's first instruction."""
    import socket
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 1234)) == 0:
            pytest.skip("something already listens on 127.0.0.1:1234")
    proc = subprocess.Popen([*HCLSIM, "boot", "-s", "-S", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stderr.readline()
        assert "listening on 127.0.0.1:1234" in line and "waiting for gdb" in line, line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130


def test_firmware_build_prints_every_image_path():
    one = hclsim("firmware", "build")
    assert one.returncode == 0 and one.stdout.strip().endswith("/shim.elf")
    side = hclsim("firmware", "build", "--image", "sidecar")
    assert side.returncode == 0 and side.stdout.strip().endswith("/sidecar.elf") and os.path.exists(side.stdout.strip())
    every = hclsim("firmware", "build", "--all")
    rows = dict(line.split(" ", 1) for line in every.stdout.strip().splitlines())
    assert list(rows) == ["shim", "sidecar", "vtl0", "kernel", "init"] and rows["shim"] == one.stdout.strip()
    assert all(os.path.exists(p) for p in rows.values())
    two = hclsim("firmware", "build", "--image", "vtl0", "--image", "sidecar")
    assert [line.split()[0] for line in two.stdout.splitlines()] == ["vtl0", "sidecar"]


def test_version_answers_without_importing_the_engine():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hclsim", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("hclsim ")
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"numpy", "numba", "unicorn", "capstone", "lief", "elftools", "libfdt"}, imported
    assert not any(m.startswith("hclsim.") and m != "hclsim.cli" for m in
                   (line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line))


# ---- progress ----------------------------------------------------------------------------------

def test_progress_lines_after_a_second_between_serial_lines(capsys):
    from hclsim import cli
    console = cli.Console(echo=True, progress=True)
    with console.phase("booting 4 vCPUs"):
        console.serial("COM3", b"[INFO] first line\n[INFO] half")
        time.sleep(1.3)                       # mid-line: no progress line yet
        err = capsys.readouterr().err
        assert err == ""
        console.serial("COM3", b" line\n")
        time.sleep(0.5)
    out, err = capsys.readouterr()
    assert out == " line\n"
    lines = err.splitlines()
    assert lines[0].startswith("hclsim: booting 4 vCPUs: 1 s so far (last serial line: [INFO] half line)")
    assert re.fullmatch(r"hclsim: booting 4 vCPUs: done in \d+\.\d s", lines[-1])
    quiet = cli.Console(echo=False, progress=False)
    with quiet.phase("booting 4 vCPUs"):
        time.sleep(1.2)
    assert capsys.readouterr() == ("", "")


def test_no_progress_line_for_a_short_run():
    proc = hclsim("boot", "--cpus", "2")
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.slow
def test_a_2048_vcpu_boot_shows_progress_on_stderr_only():
    proc = hclsim("boot", "--cpus", "2048", "--numa-nodes", "4", "--until", "handoff")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^hclsim: booting 2048 vCPUs: \d+ s so far", proc.stderr, re.M), proc.stderr
    assert "so far" not in proc.stdout and "hclsim: booting" not in proc.stdout
    for flag in ("--quiet", "--json"):
        quiet = hclsim("boot", "--cpus", "2048", "--numa-nodes", "4", "--until", "handoff", flag)
        assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_regression_kit_never_grows_ram_either(hclsim_machine):
    from hclsim.config import ConfigError
    with pytest.raises(ConfigError, match="cannot hold VTL2: the images need"):
        hclsim_machine(vtl2_size=0, memory=130 << 20)


def test_out_replaces_an_earlier_runs_files(tmp_path):
    out = tmp_path / "o"
    assert hclsim("boot", "--quiet", "--out", str(out)).returncode == 0
    assert (out / "linux.dtb").exists()
    assert hclsim("boot", "--quiet", "--shim", str(faulting_shim(tmp_path)), "--out", str(out)).returncode == 2
    assert sorted(p.name for p in out.iterdir()) == ["fault.txt", "report.json", "serial.log"]
    assert hclsim("boot", "--quiet", "--out", str(out)).returncode == 0
    assert not (out / "fault.txt").exists() and (out / "linux.dtb").exists()
