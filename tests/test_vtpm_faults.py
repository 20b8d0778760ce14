"""The vTPM when things break under it (issue 12's bad input): its worker killed in the middle of
a command, swtpm exiting in the middle of one, swtpm missing. The device runs as in its worker:
a process of its own serving the real vTPM on a real swtpm over the device worker protocol,
its saved state committed after every write; the proxy restarts it when it goes."""
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from hclsim.devices import swtpm, vtpm
from hclsim.devices.bus import Bus
from hclsim.devices.device_worker import ProxyDevice
from hclsim.hcl import vmgs

pytestmark = pytest.mark.skipif(swtpm.swtpm_binary() is None, reason="swtpm is not installed (.ci/run installs it)")
BUF = 0x10000
# The worker's process: the device host's serving loop without the kernel (its state in a file).
CHILD = r"""
import os, socket, sys
from hclsim.devices import swtpm, vtpm
from hclsim.devices.device_worker import DeviceServer, restore_bytes
fd, state, engine_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
engine = swtpm.Swtpm(f"{engine_dir}-{os.getpid()}", terminate=True)
open(f"{state}.swtpm", "w").write(str(engine.proc.pid))
dev = vtpm.Vtpm(engine)
blob = open(state, "rb").read() if os.path.exists(state) else None
if blob:
    restore_bytes(dev, blob)
def commit(b):
    with open(state + ".new", "wb") as f:
        f.write(b)
    os.replace(state + ".new", state)
fatal = DeviceServer(dev, socket.socket(fileno=fd), commit=commit, restored=blob is not None).serve()
sys.exit(f"worker: {fatal}" if fatal else 0)
"""


class Ram:
    def __init__(self, size=0x20000):
        self.b = bytearray(size)

    def read(self, gpa, n):
        return bytes(self.b[gpa:gpa + n])

    def write(self, gpa, data):
        self.b[gpa:gpa + len(data)] = data


class Worker:
    """The vTPM's worker processes, one at a time, with a proxy on a bus in front of them."""

    def __init__(self, tmp_path):
        self.tmp, self.procs, self.logs = tmp_path, [], []
        fd = os.open(tmp_path / "vm.vmgs", os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, vmgs.DEFAULT_CAPACITY)
        self.stores = vmgs.DeviceFiles(vmgs.Vmgs(fd), (vmgs.TPM_PPI, vmgs.TPM_NVRAM))
        self.ram = Ram()
        self.proxy = ProxyDevice("tpm", self._spawn(), relaunch=self._spawn, log=self.logs.append,
                                 guest_memory=self.ram, stores=self.stores)
        self.bus = Bus("vtl0")
        self.bus.add(self.proxy)
        self.map()

    def _spawn(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno()), str(self.tmp / "state"),
                                 str(self.tmp / "swtpm")], pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE)
        theirs.close()
        self.procs.append(proc)
        return ours

    def map(self):
        self.bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_MAP_SHARED_MEMORY)
        self.bus.pio_write(vtpm.DATA_PORT, 4, BUF)

    def start(self, command: bytes) -> None:
        self.ram.write(BUF, command)
        self.bus.mmio_write(vtpm.CRB_BASE + vtpm.START, 4, 1)

    def run(self, command: bytes) -> bytes:
        self.ram.write(BUF + 4096, bytes(10))
        self.start(command)
        size = struct.unpack_from(">I", self.ram.read(BUF + 4096, 10), 2)[0]
        return self.ram.read(BUF + 4096, size)

    def swtpm_pid(self) -> int:
        return int((self.tmp / "state.swtpm").read_text())

    def close(self):
        self.proxy.close()
        for p in self.procs:
            p.wait(10)
            p.stderr.close()


def create_primary_rsa2048() -> bytes:
    """TPM2_CreatePrimary of a 2048-bit RSA storage key: ~25 ms of prime search in swtpm, a
    command long enough to kill something in the middle of."""
    public = struct.pack(">HHIH", 0x0001, swtpm.TPM_ALG_SHA256, 0x00030072, 0)       # RSA, restricted decrypt
    public += struct.pack(">HHHHHI", 0x0006, 128, 0x0043, 0x0010, 2048, 0) + struct.pack(">H", 0)  # AES-128-CFB
    body = struct.pack(">I", swtpm.TPM_RH_OWNER) + swtpm._password_session() + struct.pack(">HHH", 4, 0, 0)
    body += struct.pack(">H", len(public)) + public + struct.pack(">HI", 0, 0)
    return swtpm.command(0x131, body, swtpm.TPM_ST_SESSIONS)


def _pcr8(w) -> bytes:
    return swtpm.pcr_read_digest(w.run(swtpm.pcr_read_sha256(8)))


def _restarted(w) -> None:
    """Until the proxy has its new worker (the failed access completes before the restart)."""
    deadline = time.monotonic() + 10
    while w.proxy.restarts < 1 and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_during(w, command: bytes, victim) -> None:
    """START command; 5 ms later, victim() kills something; the access must fail as an I/O error."""
    errors = len(w.bus.errors)
    threading.Timer(0.005, victim).start()
    w.start(command)
    assert len(w.bus.errors) == errors + 1, "the command finished before the kill"


def test_a_worker_killed_in_the_middle_of_a_command(tmp_path):
    w = Worker(tmp_path)
    try:
        assert swtpm.response_code(w.run(swtpm.startup_clear())) == 0
        w.run(swtpm.pcr_extend_sha256(8, bytes(range(32))))
        w.run(swtpm.nv_define_space(0x01500016, 8))
        w.run(swtpm.nv_write(0x01500016, b"kept-nv!"))
        pcr = _pcr8(w)
        first = w.procs[-1]
        _kill_during(w, create_primary_rsa2048(), lambda: os.kill(first.pid, signal.SIGKILL))
        assert "lost" in w.bus.errors[-1][3]                       # the guest's command: an I/O error
        _restarted(w)
        assert any("restarting it from its last saved state" in line for line in w.logs)
        assert w.proxy.restarts == 1 and w.proxy.restored
        # The guest carries on: the same PCRs, the same NV, no second TPM2_Startup needed.
        assert _pcr8(w) == pcr
        r = w.run(swtpm.nv_read(0x01500016, 8))
        assert swtpm.response_code(r) == 0 and swtpm.nv_read_data(r) == b"kept-nv!"
        assert swtpm.response_code(w.run(create_primary_rsa2048())) == 0
    finally:
        w.close()


def test_swtpm_exiting_in_the_middle_of_a_command(tmp_path):
    w = Worker(tmp_path)
    try:
        w.run(swtpm.startup_clear())
        w.run(swtpm.pcr_extend_sha256(8, bytes(32)))
        pcr = _pcr8(w)
        engine = w.swtpm_pid()
        _kill_during(w, create_primary_rsa2048(), lambda: os.kill(engine, signal.SIGKILL))
        assert "TPM command failed: swtpm is gone" in w.bus.errors[-1][3]
        # The worker ends once its engine is gone (it cannot start another: it may not exec),
        # and comes back on a new swtpm with the device's state.
        _restarted(w)
        assert w.proxy.restarts == 1
        assert b"the TPM engine failed: swtpm is gone" in w.procs[0].stderr.read()
        assert _pcr8(w) == pcr and w.swtpm_pid() != engine
    finally:
        w.close()


def test_without_swtpm_the_tpm_is_refused_before_anything_boots(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    env = dict(os.environ, PATH=str(bare))
    done = subprocess.run([sys.executable, "-m", "hclsim", "boot", "--tpm"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "--tpm: swtpm, the vTPM's TPM 2.0 engine, is not installed" in done.stderr
    with pytest.raises(swtpm.SwtpmError, match="swtpm is not installed"):
        old = os.environ["PATH"]
        os.environ["PATH"] = str(bare)
        try:
            swtpm.Swtpm(str(tmp_path / "s"))
        finally:
            os.environ["PATH"] = old
