"""The paravisor's userspace as real processes (issue 10): `hclsim boot` runs the shim, the
kernel stand-in, underhill_init, openvmm_hcl, underhill-vm and the VTL0 workload on every vCPU
to power off; names, the process tree, kmsg, the consoles, resets after a panic, and no process
outliving the VM, checked with the host's /proc."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from hclsim.config import BootConfig
from hclsim.system import run_system

HCLSIM = [sys.executable, "-m", "hclsim"]
NAMES = ("underhill-init", "openvmm_hcl", "underhill-vm")


def descendants(pid: int) -> dict[int, str]:
    """pid's living descendants (host /proc): pid -> comm."""
    parent, comm = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/comm") as f:
                comm[int(entry)] = f.read().strip()
        except OSError:
            continue
        if ") Z" in stat:                     # a zombie has exited
            continue
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in out:
                out[child] = comm.get(child, "?")
                todo.append(child)
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def leftovers(pid: int) -> dict[int, str]:
    """What is left of the VM's processes below pid on the host, zombies included: pid -> state."""
    procs = {}
    for entry in os.listdir("/proc"):
        st = _stat(int(entry)) if entry.isdigit() else None
        if st is not None:
            procs[int(entry)] = st
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, st in procs.items():
            if int(st[1]) == p and child not in out:
                try:
                    with open(f"/proc/{child}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    continue
                todo.append(child)
                if comm in NAMES or comm.startswith("underhill-"):
                    out[child] = f"{comm} {st[0]}"
    return out


def _same_process(pid: int, start: str) -> bool:
    """pid is still the process that started at start (its /proc/PID/stat starttime), zombie or not."""
    st = _stat(pid)
    return st is not None and st[19] == start


def _all_named(procs: dict):
    return procs if set(NAMES) <= set(procs.values()) else None


def wait_for(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_boot_runs_the_whole_system_to_power_off(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([*HCLSIM, "boot", "--cpus", "4", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "the VM powered off after" in proc.stdout
    for label in ("boot shim entry", "kernel handoff", "PID 1 started", "worker started (underhill-vm)",
                  "VTL0 running", "power off"):
        assert label in proc.stdout, label
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "power-off"
    procs = report["system"]["processes"]
    assert [p["comm"] for p in procs] == list(NAMES)
    assert procs[1]["ppid"] == procs[0]["pid"] and procs[2]["ppid"] == procs[1]["pid"]
    assert procs[0]["argv"] == ["/underhill-init"]
    assert procs[1]["argv"] == ["/bin/openvmm_hcl", "--pid", "/run/underhill.pid"]
    assert procs[2]["argv"] == ["/bin/openvmm_hcl", "vm"]
    # All three were running at power off; the host's teardown killed each (init is the kernel's
    # child; the others were reaped by it once their parents were gone).
    assert [p["exit_status"] for p in procs] == ["killed by signal 9 at power off"] * 3
    events = [e["event"] for e in report["system"]["timeline"]]
    assert events.index("handoff") < events.index("pid1") < events.index("worker") < events.index("vtl0") \
        < events.index("power-off")
    worker = next(e for e in report["system"]["timeline"] if e["event"] == "worker")
    assert worker["detail"].startswith(f"underhill-vm (pid {procs[2]['pid']}, parent {procs[1]['pid']})")
    assert not leftovers(os.getpid())
    kmsg = (out / "kmsg.log").read_text()
    for line in ("Linux version", "Command line: ", "BIOS-e820: [mem ", "Run /underhill-init as init process",
                 "underhill_init: Initial process: crate_name=underhill_init", "openvmm_hcl: VMM process",
                 "underhill-vm: VM started: 4 VPs"):
        assert line in kmsg, line
    assert kmsg.index("Run /underhill-init") < kmsg.index("underhill_init: Initial process")
    com1 = (out / "com1.log").read_text()
    for vp in range(4):
        assert f"hello from VTL0 vp {vp}\n" in com1 and f"vp {vp} done\n" in com1
    assert "kmsg.log" in proc.stdout and "com1.log" in proc.stdout


def test_consoles_repeat_run_after_run():
    config = BootConfig(cpus=3, vtl0_iterations=20)
    first, second = run_system(config), run_system(config)
    assert first.status == second.status == "power-off"
    assert first.consoles == second.consoles and len(first.consoles) == 3
    assert [p["comm"] for p in first.process_tree] == [p["comm"] for p in second.process_tree] == list(NAMES)


def test_until_handoff_keeps_the_firmware_only_boot():
    proc = subprocess.run([*HCLSIM, "boot", "--until", "handoff", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "handoff"


def test_processes_carry_their_names_and_die_with_the_machine(tmp_path):
    """comm as ps shows it, then kill -9 of the machine process: nothing outlives it."""
    machine = subprocess.Popen([*HCLSIM, "boot", "--cpus", "2", "--keep-running", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        procs = wait_for(lambda: _all_named(descendants(machine.pid)),
                         what="the three processes")
        for pid, comm in procs.items():
            if comm in NAMES:
                with open(f"/proc/{pid}/comm") as f:
                    assert f.read().strip() == comm
        if shutil.which("ps"):
            ps = subprocess.run(["ps", "-o", "comm=", "-p", ",".join(map(str, procs))], capture_output=True,
                                text=True)
            assert set(NAMES) <= set(ps.stdout.split()), ps.stdout
    finally:
        machine.kill()
        machine.wait()
    wait_for(lambda: not any(_alive(p) for p in procs), timeout=10, what="the VM's processes to die")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return ") Z" not in f.read()
    except OSError:
        return False


def test_ctrl_c_shuts_everything_down():
    machine = subprocess.Popen([*HCLSIM, "boot", "--cpus", "2", "--keep-running"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    procs = wait_for(lambda: _all_named(descendants(machine.pid)),
                     what="the three processes")
    machine.send_signal(signal.SIGINT)
    _out, err = machine.communicate(timeout=30)
    assert machine.returncode == 130, err
    assert "Traceback" not in err
    wait_for(lambda: not any(_alive(p) for p in procs), timeout=10, what="the VM's processes to die")


@pytest.mark.parametrize("victim", NAMES)
def test_a_killed_process_panics_the_kernel_and_the_vm_resets(victim):
    """kill -9 of any of the three: init exits (directly, or because its child did), the kernel
    panics "Attempted to kill init!", and with panic=-1 the host resets the VM, which boots again
    from the shim and then runs to power off. The killed VM's processes are all gone (none left
    running, none left a zombie) before the next boot's, and nothing is left after the run."""
    killed, gone, errors = [], [], []

    def killer():
        try:
            tree = wait_for(lambda: _all_named(descendants(os.getpid())), what="the three processes")
            starts = {p: _stat(p)[19] for p, c in tree.items() if c in NAMES}
            pid = next(p for p, c in tree.items() if c == victim)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            wait_for(lambda: not any(_same_process(p, st) for p, st in starts.items()), timeout=20,
                     what="the killed VM's processes to be gone")
            gone.append(sorted(starts))
        except Exception as exc:        # reported by the test's thread
            errors.append(exc)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    events = []
    outcome = run_system(BootConfig(cpus=2, vtl0_iterations=5000), on_event=lambda n, t_, d: events.append((n, d)),
                         timeout=60)
    t.join(30)
    assert not errors, errors
    assert killed and gone
    assert not leftovers(os.getpid())
    # The second boot's processes were running at power off, new ones (not the killed boot's).
    assert [p["comm"] for p in outcome.process_tree] == list(NAMES)
    assert not {p["pid"] for p in outcome.process_tree} & set(gone[0])
    assert [p["exit_status"] for p in outcome.process_tree] == ["killed by signal 9 at power off"] * 3
    names = [n for n, _ in events]
    assert names.index("panic") < names.index("reset") < names.index("power-off")
    panic = next(d for n, d in events if n == "panic")
    # init's wait status: killed by SIGKILL itself; 255 when its child was killed; the control
    # process's failure (exit 1) when the worker was.
    assert panic == "Attempted to kill init! exitcode=" + {"underhill-init": "0x00000009", "openvmm_hcl": "0x0000ff00",
                                                           "underhill-vm": "0x00000100"}[victim]
    assert outcome.status == "power-off" and outcome.resets == 1 and outcome.boots == 2


def test_a_failing_worker_gives_every_process_its_real_exit_status(tmp_path):
    """The VM worker fails (a device worker that does not exist): openvmm_hcl exits 1, init exits
    1, the kernel panics, four times. report.json's processes (the last boot's) carry the
    statuses their reapers got: none is null, none says the teardown killed it."""
    out = tmp_path / "out"
    proc = subprocess.run([*HCLSIM, "boot", "--cpus", "2", "--out", str(out), "--host-bootargs",
                           "HCLSIM_DEVICE_WORKERS=nosuch"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "reset 3 times" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    procs = report["system"]["processes"]
    assert [p["comm"] for p in procs] == list(NAMES)
    assert procs[0]["exit_status"] == "exit 1" and procs[1]["exit_status"] == "exit 1"
    # underhill-vm: its host ends after the failure (exit 0), unless openvmm_hcl exited first,
    # which kills it (PR_SET_PDEATHSIG): either way, what its reaper got.
    assert procs[2]["exit_status"] in ("exit 0", "killed by signal 9"), procs[2]
    assert "Attempted to kill init! exitcode=0x00000100" in (out / "kmsg.log").read_text()
    assert not leftovers(os.getpid())


def test_no_init_program_panics_and_gives_up_after_the_resets(tmp_path):
    proc = subprocess.run([*HCLSIM, "boot", "--cpus", "2", "--host-bootargs", "rdinit=/no/such/init"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("hclsim: error:")]
    assert len(err) == 1 and "No working init found" in err[0] and "reset 3 times" in err[0], proc.stderr
    assert "Failed to execute /no/such/init (error -2)" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_failing_setup_script_is_fatal_for_init(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([*HCLSIM, "boot", "--cpus", "2", "--out", str(out), "--host-bootargs",
                           "-- --setup-script=false"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    kmsg = (out / "kmsg.log").read_text()
    assert "underhill_init: fatal: setup script failed" in kmsg
    assert "Attempted to kill init! exitcode=0x00000100" in kmsg


def test_setup_script_output_becomes_the_environment(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([*HCLSIM, "boot", "--cpus", "2", "--out", str(out), "--host-bootargs",
                           "-- --setup-script=\"echo OPENHCL_FROM_SCRIPT=a=b; echo noise\""],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kmsg = (out / "kmsg.log").read_text()
    assert "setting env var OPENHCL_FROM_SCRIPT=a=b" in kmsg
    assert "noise" not in kmsg.split("setting env var")[1].split("\n")[0]


def test_an_initrd_without_underhill_init_panics(tmp_path):
    from hclsim.boot.initrd import build_initrd
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("nothing to run here\n")
    initrd = tmp_path / "initrd.cpio.gz"
    initrd.write_bytes(build_initrd(tree))
    proc = subprocess.run([*HCLSIM, "boot", "--cpus", "2", "--initrd", str(initrd)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Failed to execute /underhill-init (error -2)" in proc.stdout
    assert "No working init found" in proc.stderr


def test_host_entropy_is_credited_only_outside_a_confidential_vm(tmp_path):
    plain = run_system(BootConfig(cpus=2, vtl0_iterations=5))
    assert "underhill_init: added 64 bytes of host entropy" in plain.kmsg
    assert "random: crng init done" in plain.kmsg
    cvm = run_system(BootConfig(cpus=2, vtl0_iterations=5, isolation="vbs"))
    assert "not credited: confidential VM" in cvm.kmsg
    assert "random: crng init done" not in cvm.kmsg


def test_wait_for_start_launches_no_worker():
    outcome = run_system(BootConfig(cpus=2, host_bootargs="OPENHCL_WAIT_FOR_START=1"), timeout=4)
    assert outcome.status == "timeout"
    assert [p["comm"] for p in outcome.process_tree] == ["underhill-init", "openvmm_hcl"]
    assert "waiting for a diag Start request" in outcome.kmsg


def test_modules_load_before_the_worker_with_wait_for_modules():
    outcome = run_system(BootConfig(cpus=1, vtl0_iterations=5, host_bootargs="OPENHCL_WAIT_FOR_MODULES=1"))
    kmsg = outcome.kmsg
    assert kmsg.index("loaded module hv_storvsc") < kmsg.index("underhill_init: running /bin/openvmm_hcl")
    assert "hv_storvsc: loaded (storvsc_vcpus_per_sub_channel=2048" in kmsg   # parameters from the command line


def test_the_twelve_writes_in_order():
    outcome = run_system(BootConfig(cpus=1, vtl0_iterations=5))
    assert "underhill_init: mounted /proc, /sys, /dev, /dev/pts" in outcome.kmsg
    assert outcome.kmsg.index("mounted devpts (devpts) on /dev/pts") < outcome.kmsg.index("host entropy")
    uio = "/sys/bus/vmbus/drivers/uio_hv_generic/new_id"
    paths = [p for p, _v in outcome.writes]
    assert paths[:12] == ["/proc/sys/kernel/threads-max", "/proc/sys/kernel/kptr_restrict",
                          "/sys/kernel/mm/transparent_hugepage/enabled", uio, uio, uio,
                          "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/core_pipe_limit",
                          "/proc/sys/vm/panic_on_oom", "/proc/sys/vm/min_free_kbytes",
                          "/proc/sys/vm/watermark_scale_factor", "/proc/sys/vm/watermark_boost_factor"], paths
    assert dict(outcome.writes)["/proc/sys/kernel/core_pattern"] == "|/bin/underhill-crash %p %i %s %e"


def test_sidecar_vps_move_to_linux_cpus_unless_hotplug_is_off():
    moved = run_system(BootConfig(cpus=4, vtl0_iterations=5))
    assert sorted(moved.boot.linux.cpus.online) == [0, 1, 2, 3]
    assert "3 sidecar VPs moved to Linux CPUs after their first exit" in moved.kmsg
    kept = run_system(BootConfig(cpus=4, vtl0_iterations=5, host_bootargs="OPENHCL_NO_SIDECAR_HOTPLUG=1"))
    assert kept.status == "power-off" and sorted(kept.boot.linux.cpus.online) == [0]
    assert kept.consoles == moved.consoles           # the same guest output either way


def test_every_exit_kind_is_completed_by_the_worker():
    """Each VP's record after the run: CPUID, the test port, MMIO, the MSR, the intercepted
    HvCallPostMessage (answered HV_STATUS_INVALID_CONNECTION_ID: no VMBus connection is open) and
    the loop, on the Linux CPU and on the CPUs that started on the sidecar."""
    from hclsim.defs.platform import VTL0_HYPERCALL_STATUS, VTL0_TEST_PORT_VALUE
    from hclsim.devices.vtl0_test import loop_checksum
    outcome = run_system(BootConfig(cpus=3, vtl0_iterations=9))
    assert len(outcome.vtl0_records) == 3
    for vp, rec in enumerate(outcome.vtl0_records):
        assert rec["done"] == 1 and rec["vp_index"] == vp
        assert rec["hypercall_status"] == VTL0_HYPERCALL_STATUS
        assert rec["iterations"] == 9 and rec["checksum"] == loop_checksum(9)
        assert rec["in_value"] == VTL0_TEST_PORT_VALUE and rec["mmio_value"] == 0xF00D0000 | 64 * vp


def test_run_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path, monkeypatch):
    import tempfile
    from hclsim import system
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "hclsim-vm-dead"
    dead.mkdir()
    (dead / "owner.pid").write_text(str(2 ** 22 + 12345))           # beyond pid_max: no such process
    (dead / "vsock.sock").write_text("")
    live = tmp_path / "hclsim-vm-live"
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    foreign = tmp_path / "hclsim-vm-foreign"                         # no owner file: not ours to judge
    foreign.mkdir()
    system.remove_stale_run_folders()
    assert not dead.exists() and live.exists() and foreign.exists()
