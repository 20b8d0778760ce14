"""underhill_init's steps (shared/design/openhcl-userspace.md section 1) and what the control
process sets up for its worker host (section 2), checked in a real boot: the processes as the
host sees them (/proc/PID/limits, /proc/PID/fd, their parents), and the kernel stand-in's
interface as a client written from defs/kabi.py reads it (/dev/kmsg, /proc/mounts,
/sys/firmware/fdt).

The host here offers 300 bytes of entropy in the device tree (the boot shim refuses more than
256 from its host, so the DT the kernel got is given the longer property: what a host
offering more would hand init), and a setup script leaves an orphan behind."""
import dataclasses
import os
import resource
import shutil
import socket
import struct
import tempfile
import time

import pytest

from hclsim.config import BootConfig
from hclsim.defs import kabi
from hclsim.hcl import underhill_init
from hclsim.kernel_stub.userspace import Userspace
from hclsim.machine import Machine

ENTROPY = bytes((7 * i + 3) & 0xFF for i in range(300))
ORPHAN_SECONDS = 6
# sh runs sleep in the background and exits at once: sleep is orphaned while init is running.
SETUP_SCRIPT = f"sleep {ORPHAN_SECONDS} </dev/null >/dev/null 2>&1 &"


def _with_entropy(dtb: bytes, data: bytes) -> bytes:
    import libfdt
    fdt = libfdt.Fdt(bytearray(dtb))
    fdt.resize(len(dtb) + len(data) + 1024)
    fdt.setprop(fdt.path_offset("/openhcl/entropy"), "reg", data)
    fdt.pack()
    return bytes(fdt.as_bytearray())


@pytest.fixture(scope="module")
def booted():
    machine = Machine(BootConfig(cpus=2, vtl0_iterations=2_000_000,
                                 host_bootargs=f'-- --setup-script="{SETUP_SCRIPT}"'))
    result = machine.run_to_handoff()
    handoff = dataclasses.replace(result.handoff, dtb=_with_entropy(result.handoff.dtb, ENTROPY))
    run_dir = tempfile.mkdtemp(prefix="hclsim-test-init-")
    us = Userspace(result.linux, handoff, machine.initrd.data, run_dir)
    # PID 1 inherits a low RLIMIT_NOFILE from the machine process: init has to raise it. (Not
    # below 1024: the kernel's descriptor is 1023 in every process.)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = kabi.KERNEL_FD + 1 if hard == resource.RLIM_INFINITY else min(hard, kabi.KERNEL_FD + 1)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        us.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    us.inherited_nofile = (low, hard)
    deadline = time.monotonic() + 60
    while not any(e.name == "vtl0" for e in us.events) and time.monotonic() < deadline and not us.finished.is_set():
        time.sleep(0.02)
    assert any(e.name == "vtl0" for e in us.events), us.kmsg.text()
    yield us
    us.shutdown()
    machine.close()
    shutil.rmtree(run_dir, ignore_errors=True)


class Client:
    def __init__(self, us):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(30)
        self.sock.connect(us.server.path)
        self.seq = 0

    def call(self, op, *values):
        self.seq += 1
        self.sock.send(kabi.encode_request(self.seq, op, values))
        seq, err, out = kabi.decode_reply(self.sock.recv(kabi.MAX_MESSAGE))
        assert seq == self.seq
        return err, out

    def read_file(self, path: str, flags: int = kabi.O_RDONLY) -> bytes:
        err, (fd, host) = self.call(kabi.Op.OPEN, path, flags, 0)
        assert err == 0 and host == 0, (path, err)
        chunks = []
        while True:
            err, out = self.call(kabi.Op.READ, fd, kabi.MAX_READ)
            assert err == 0, (path, err)
            if not out[0]:
                return b"".join(chunks)
            chunks.append(out[0])

    def kmsg(self) -> list[tuple[int, int, int, str]]:
        """Every record of the ring as /dev/kmsg gives it: (facility, level, seq, text)."""
        err, (fd, _host) = self.call(kabi.Op.OPEN, "/dev/kmsg", kabi.O_RDONLY | kabi.O_NONBLOCK, 0)
        assert err == 0
        out = []
        while True:
            err, values = self.call(kabi.Op.READ, fd, kabi.MAX_READ)
            if err == kabi.EAGAIN:
                return out
            assert err == 0
            head, _, text = values[0].decode().rstrip("\n").partition(";")
            prio, seq = (int(x) for x in head.split(",")[:2])
            out.append((prio >> 3, prio & 7, seq, text))


def _pid(us, comm: str) -> int:
    return next(p.pid for p in us.server.processes.values() if p.comm == comm)


def _host_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


# ---- reap every child (first: the orphan lives ORPHAN_SECONDS from the boot) ------------
def test_an_orphan_is_reparented_to_init_and_reaped(booted):
    """The setup script's background sleep outlives its shell: Linux gives an orphan to init, so
    underhill_init (a child subreaper here) becomes its parent and reaps it when it exits: it is
    gone from the host's /proc, never left a zombie, while the VM keeps running."""
    init = booted.init_proc.pid
    orphans = [int(e) for e in os.listdir("/proc") if e.isdigit() and _comm(int(e)) == "sleep"
               and (_host_stat(int(e)) or ["", "0"])[1] == str(init)]
    assert len(orphans) == 1, "the setup script's sleep is not init's child"
    pid = orphans[0]
    start = _host_stat(pid)[19]                 # its starttime: the same process, not a new one
    deadline = time.monotonic() + ORPHAN_SECONDS + 15
    while time.monotonic() < deadline:
        st = _host_stat(pid)
        if st is None or st[19] != start:
            break                              # reaped
        time.sleep(0.05)
    else:
        raise AssertionError(f"the orphan is still there: state {_host_stat(pid)[0]} (a zombie nobody reaps)")
    assert booted.init_proc.returncode is None and booted.panic is None


# ---- RLIMIT_NOFILE -------------------------------------------------------------------------
def _nofile(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def test_rlimit_nofile_is_raised_for_the_paravisor(booted):
    low, hard = booted.inherited_nofile
    want = underhill_init.NOFILE if hard == resource.RLIM_INFINITY or hard >= underhill_init.NOFILE else hard
    assert want > low                            # so the figures below show init's raise
    for comm in ("underhill-init", "openvmm_hcl", "underhill-vm"):
        assert _nofile(_pid(booted, comm)) == (want, want), comm
    if want < underhill_init.NOFILE:             # this host's hard limit is below 0x100000
        assert f"RLIMIT_NOFILE {underhill_init.NOFILE:#x} is beyond this host's hard limit; using {hard}" \
            in booted.kmsg.text()


# ---- host entropy ---------------------------------------------------------------------------
def test_host_entropy_over_256_bytes_is_cut_to_256(booted):
    assert Client(booted).read_file("/proc/device-tree/openhcl/entropy/reg") == ENTROPY   # what init read
    init = _pid(booted, "underhill-init")
    fed = [i for i in booted.devices.random.inputs if i.pid == init]
    assert len(fed) == 1
    assert fed[0].how == "ioctl" and fed[0].data == ENTROPY[:256] and fed[0].requested_bits == 256 * 8
    kmsg = booted.kmsg.text()
    assert "underhill_init: Truncating host entropy from 300 to 256 bytes" in kmsg
    assert "underhill_init: added 256 bytes of host entropy" in kmsg


# ---- logging before any mount, the mounts -------------------------------------------------
def test_init_logs_to_kmsg_with_facility_2_before_any_mount(booted):
    records = Client(booted).kmsg()
    init = [r for r in records if r[3].startswith("underhill_init: ")]
    assert init and all(fac == 2 for fac, _l, _s, _t in init)
    assert all(fac == 3 for fac, _l, _s, t in records if t.startswith("openvmm_hcl: "))
    mounts = [r for r in records if r[0] == 0 and r[3].startswith("mounted ")]
    assert [r[3] for r in mounts] == ["mounted proc (proc) on /proc", "mounted sysfs (sysfs) on /sys",
                                      "mounted devtmpfs (dev) on /dev", "mounted devpts (devpts) on /dev/pts"]
    first = init[0]
    assert first[3].startswith("underhill_init: Initial process: crate_name=underhill_init")
    assert first[1] == 5                                   # info is NOTICE
    assert first[2] < mounts[0][2]                         # logged before the first mount
    summary = next(r for r in init if r[3] == "underhill_init: mounted /proc, /sys, /dev, /dev/pts")
    assert summary[2] > mounts[-1][2]


def test_the_mount_flags_in_proc_mounts(booted):
    lines = Client(booted).read_file("/proc/mounts").decode().splitlines()
    assert lines == ["rootfs / rootfs rw 0 0",
                     "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0",
                     "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0",
                     "dev /dev devtmpfs rw,nosuid,noexec,relatime 0 0",        # no nodev: the device nodes
                     "devpts /dev/pts devpts rw,nosuid,noexec,relatime 0 0"]


# ---- the control process -------------------------------------------------------------------
def test_control_logs_the_boot_loader_times_from_sys_firmware_fdt(booted):
    import libfdt
    dtb = Client(booted).read_file("/sys/firmware/fdt")
    fdt = libfdt.Fdt(dtb)
    want = []
    for name in ("reftime_boot_start", "reftime_boot_end", "reftime_sidecar_start", "reftime_sidecar_end"):
        raw = bytes(fdt.getprop(0, name))
        want.append(f"{name}={struct.unpack('>Q', raw)[0]}")
    line = "openvmm_hcl: boot loader times: " + ", ".join(want)
    records = [r for r in Client(booted).kmsg() if r[3].startswith("openvmm_hcl: boot loader times: ")]
    assert [r[3] for r in records] == [line]
    assert records[0][0] == 3


def test_the_vm_host_has_stdio_on_dev_null_and_its_socket_on_fd_3(booted):
    """/proc/PID/fd of the real underhill-vm: stdin and stdout the host's /dev/null, fd 3 a
    SOCK_SEQPACKET Unix socket (the mesh channel to openvmm_hcl); argv [argv0, "vm"]."""
    vm, control = _pid(booted, "underhill-vm"), _pid(booted, "openvmm_hcl")
    assert int(_host_stat(vm)[1]) == control
    null = os.stat("/dev/null").st_rdev
    for fd in (0, 1):
        assert os.readlink(f"/proc/{vm}/fd/{fd}") == "/dev/null"
        assert os.stat(f"/proc/{vm}/fd/{fd}").st_rdev == null
    link = os.readlink(f"/proc/{vm}/fd/3")
    assert link.startswith("socket:["), link
    inode = link[len("socket:["):-1]
    with open("/proc/net/unix") as f:
        types = {cols[6]: cols[4] for cols in (line.split() for line in list(f)[1:]) if len(cols) >= 7}
    assert types.get(inode) == "0005"                     # SOCK_SEQPACKET
    with open(f"/proc/{vm}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[-3:-1] == [b"/bin/openvmm_hcl", b"vm"]
