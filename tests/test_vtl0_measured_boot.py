"""The VTL0 test guest's measured boot on the vTPM (VP 0, `--tpm`): every event it logs on COM1
is recomputed here from its inputs (the command line from the config, the image from the built
VTL0 guest), the extends are replayed from 32 zero bytes and must give the PCR values the guest
read back; the boot counter lives in the TPM's NV state. Without a vTPM nothing of it runs.

Whole runs (run_system) go through the tpm device worker; the in-process runs (hclsim_boot to
the handoff, then the guest's VP loop on a bus with a Vtpm of the test's own) reach the paths a
worker does not: a missing device, a failing command, a TPM that was already started."""
import hashlib
import re
import shutil
import struct

import pytest

from hclsim.boot import firmware
from hclsim.boot.elfimage import load_firmware_image
from hclsim.boot.vtl0_guest import TPM_NV_INDEX, TPM_PCR_CMDLINE, TPM_PCR_IMAGE
from hclsim.config import BootConfig
from hclsim.system import run_system

needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed (.ci/run installs it)")
ITERATIONS = 3
EVENT = re.compile(r"^tpm: event pcr=(\d+) sha256=([0-9a-f]{64}) (\S+)$", re.M)
PCR = re.compile(r"^tpm: pcr (\d+) sha256=([0-9a-f]{64})$", re.M)
NV = re.compile(rf"^tpm: nv {TPM_NV_INDEX:#010x} (?:defined, boot (1)|read boot (\d+), boot (\d+))$", re.M)


def tpm_lines(com1: bytes) -> list[str]:
    return [line for line in com1.decode().splitlines() if line.startswith("tpm:")]


def image_bytes() -> bytes:
    """IMAGE_GPA .. + span as the loader leaves it: the segments, zeros between them."""
    image = load_firmware_image(firmware.build(firmware.VTL0_GUEST), "VTL0 test guest")
    out = bytearray(image.span)
    for seg in image.segments:
        out[seg.vaddr:seg.vaddr + len(seg.data)] = seg.data
    return bytes(out)


def replay(events, start: dict | None = None) -> dict:
    """PCR values after the events (pcr, digest) extended in order, from start (zeros)."""
    pcrs = dict(start or {})
    for pcr, digest in events:
        pcrs[pcr] = hashlib.sha256(pcrs.get(pcr, bytes(32)) + digest).digest()
    return pcrs


def check_measured_boot(com1: bytes, cmdline: str, start: dict | None = None) -> dict:
    """Asserts that the events are the command line's and the image's digests and that they
    replay to the PCRs the guest read; returns those PCRs."""
    text = com1.decode()
    events = [(int(p), bytes.fromhex(d), what) for p, d, what in EVENT.findall(text)]
    expected = {"cmdline": (TPM_PCR_CMDLINE, hashlib.sha256(cmdline.encode()).digest()),
                "image": (TPM_PCR_IMAGE, hashlib.sha256(image_bytes()).digest())}
    assert [(p, d) for p, d, _ in events] == [expected[what] for _, _, what in events]
    assert [what for *_, what in events] == ["cmdline", "image"]
    read = {int(p): bytes.fromhex(d) for p, d in PCR.findall(text)}
    assert read == replay([(p, d) for p, d, _ in events], start)
    return read


def nv_boot(com1: bytes) -> tuple[int, int]:
    """(the previous boot count, this boot's) from the NV line; (0, 1) when it was defined."""
    (defined, previous, boot), = NV.findall(com1.decode())
    return (0, 1) if defined else (int(previous), int(boot))


# ---- whole runs, the vTPM in its worker ----------------------------------------------------------

@needs_swtpm
def test_the_events_replay_to_the_pcrs_the_guest_read():
    config = BootConfig(cpus=1, tpm=True, vtl0_iterations=ITERATIONS)
    result = run_system(config)
    assert result.status == "power-off"
    check_measured_boot(result.com1, config.vtl0_cmdline)
    lines = tpm_lines(result.com1)
    assert lines[0] == "tpm: startup rc=0x0"
    assert "tpm: random 16 bytes nonzero" in lines
    assert nv_boot(result.com1) == (0, 1)                         # a fresh VM state: the first boot
    assert lines[-1] == "tpm: measured boot done" and not any(" error " in line for line in lines)
    text = result.com1.decode()                                   # the rest of VP 0's steps as before
    assert text.startswith("hello from VTL0 vp 0\ntpm: ") and text.endswith("tpm: measured boot done\nvp 0 done\n")
    assert result.vtl0_records[0]["done"] == 1 and result.vtl0_records[0]["iterations"] == ITERATIONS


@needs_swtpm
@pytest.mark.parametrize("cmdline", ["root=/dev/vda1 ro größe=1", "x" * 4095], ids=["utf8", "4095-bytes"])
def test_a_command_line_of_its_own_is_what_pcr8_measures(cmdline):
    result = run_system(BootConfig(cpus=1, tpm=True, vtl0_iterations=ITERATIONS, vtl0_cmdline=cmdline))
    pcrs = check_measured_boot(result.com1, cmdline)
    default = replay([(TPM_PCR_CMDLINE, hashlib.sha256(BootConfig().vtl0_cmdline.encode()).digest())])
    assert pcrs[TPM_PCR_CMDLINE] != default[TPM_PCR_CMDLINE]


@needs_swtpm
def test_only_vp0_measures_and_the_other_vps_run_as_before():
    result = run_system(BootConfig(cpus=2, tpm=True, vtl0_iterations=ITERATIONS))
    assert result.status == "power-off"
    assert result.consoles[1] == b"hello from VTL0 vp 1\nvp 1 done\n"
    check_measured_boot(result.consoles[0], BootConfig().vtl0_cmdline)


def test_without_a_vtpm_the_guest_prints_no_tpm_lines():
    result = run_system(BootConfig(cpus=1, vtl0_iterations=ITERATIONS))
    assert result.status == "power-off"
    assert result.com1 == b"hello from VTL0 vp 0\nvp 0 done\n"


@needs_swtpm
def test_the_boot_counter_is_kept_in_the_vm_state_across_runs(tmp_path):
    import os
    from hclsim.hcl import vmgs
    config = BootConfig(cpus=1, tpm=True, vtl0_iterations=ITERATIONS, state_dir=str(tmp_path / "vm"))
    first, second = run_system(config), run_system(config)
    assert nv_boot(first.com1) == (0, 1)
    assert nv_boot(second.com1) == (1, 2)
    check_measured_boot(second.com1, config.vtl0_cmdline)        # PCRs start again from zero
    assert "VMGS: formatted a blank disk" in first.kmsg and "TPM_NVRAM" in second.kmsg
    fd = os.open(tmp_path / "vm" / "hclsim.vmgs", os.O_RDONLY)
    try:
        files = vmgs.Vmgs(fd).files()                            # the TPM's NV state, as OpenHCL keeps it
    finally:
        os.close(fd)
    assert files.get(vmgs.TPM_NVRAM, 0) > 1000 and vmgs.TPM_PPI not in files   # no PPI request was made
    # Without --state a VM starts with a fresh store: a first boot again.
    assert nv_boot(run_system(config.with_(state_dir=None)).com1) == (0, 1)


@needs_swtpm
def test_the_boot_counter_survives_a_reset_of_the_vm(tmp_path):
    """underhill-vm killed after the measured boot: the kernel panics, the host resets the VM,
    and the next boot's TPM (a new worker, a new swtpm) has the NV the first one wrote."""
    import os
    import signal
    import threading
    from tests.test_userspace import descendants
    killed = []

    def on_console(_vp, line: bytes) -> None:
        if b"tpm: measured boot done" in line and not killed:
            killed.append(True)
            vm = [pid for pid, comm in descendants(os.getpid()).items() if comm == "underhill-vm"]
            threading.Thread(target=lambda: [os.kill(p, signal.SIGKILL) for p in vm], daemon=True).start()
    config = BootConfig(cpus=1, tpm=True, vtl0_iterations=20000, state_dir=str(tmp_path / "vm"))
    outcome = run_system(config, on_console=on_console, timeout=120)
    assert killed and outcome.resets == 1 and outcome.status == "power-off"
    assert nv_boot(outcome.com1) == (1, 2)                       # the boot after the reset


# ---- in process: the guest's VP loop with a device of the test's own --------------------------------

def run_guest(run, tpm=None) -> str:
    """VP 0 of the booted machine to its end, with tpm (a Vtpm) on its bus; its COM1 output."""
    from hclsim.devices.vtl0_test import TestDevices
    from hclsim.sidecar.vp_loop import vtl0_runner
    m = run.machine
    devices = TestDevices()
    if tpm is not None:
        tpm.guest_memory = m.mem
        devices.bus.add(tpm)
    results = m.vtl0_guest.results(m.mem)
    vtl0_runner(m.linux, 0, devices).run_until_halted(lambda: results[0]["done"] == 1)
    assert results[0]["iterations"] == ITERATIONS
    return bytes(devices.com1).decode()


class FailingEngine:
    """swtpm, but the commands with a code in fail answer that response code instead."""

    def __init__(self, engine, fail: dict):
        self.engine, self.fail = engine, fail

    def execute(self, command: bytes) -> bytes:
        code = struct.unpack_from(">I", command, 6)[0]
        if code in self.fail:
            return struct.pack(">HII", 0x8001, 10, self.fail[code])
        return self.engine.execute(command)

    def __getattr__(self, name):                 # the rest of the engine's interface as it is
        return getattr(self.engine, name)


@pytest.fixture
def engine(tmp_path):
    from hclsim.devices import swtpm
    e = swtpm.Swtpm(str(tmp_path / "swtpm"))
    yield e
    e.close()


@needs_swtpm                                      # BootConfig(tpm=True) asks for it, used or not
def test_a_vtpm_that_is_not_there_is_one_io_error_line(hclsim_boot):
    """The flag says vTPM but nothing answers the ports: the data port reads all ones."""
    com1 = run_guest(hclsim_boot(cpus=1, tpm=True, vtl0_iterations=ITERATIONS))
    assert com1 == ("hello from VTL0 vp 0\n"
                    "tpm: io error: data port read 0xffffffff (interface version)\n"
                    "vp 0 done\n")


@needs_swtpm
def test_a_failing_command_stops_the_measured_boot(hclsim_boot, engine):
    from hclsim.devices.swtpm import TPM_CC_PCR_EXTEND
    from hclsim.devices.vtpm import Vtpm
    com1 = run_guest(hclsim_boot(cpus=1, tpm=True, vtl0_iterations=ITERATIONS),
                     Vtpm(FailingEngine(engine, {TPM_CC_PCR_EXTEND: 0x101})))   # TPM_RC_FAILURE
    assert tpm_lines(com1.encode()) == ["tpm: startup rc=0x0", "tpm: error TPM2_PCR_Extend rc=0x101"]
    assert com1.endswith("rc=0x101\nvp 0 done\n")


@needs_swtpm
def test_a_tpm_already_started_keeps_its_pcrs_and_counts_the_next_boot(hclsim_boot, engine):
    """Two boots on one TPM that was not reset in between (a VM reset): the second Startup
    answers TPM_RC_INITIALIZE, its extends add to the first boot's, the counter goes on."""
    from hclsim.devices.vtpm import Vtpm
    cmdline = BootConfig().vtl0_cmdline
    first = run_guest(hclsim_boot(cpus=1, tpm=True, vtl0_iterations=ITERATIONS), Vtpm(engine)).encode()
    pcrs = check_measured_boot(first, cmdline)
    second = run_guest(hclsim_boot(cpus=1, tpm=True, vtl0_iterations=ITERATIONS), Vtpm(engine)).encode()
    assert tpm_lines(second)[0] == "tpm: startup rc=0x100"
    check_measured_boot(second, cmdline, start=pcrs)
    assert nv_boot(first) == (0, 1) and nv_boot(second) == (1, 2)
