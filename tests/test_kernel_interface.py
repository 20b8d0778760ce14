"""The kernel interface of a running VM, asked by a client written from defs/kabi.py: every bad
request is answered with an errno (or EINVAL for a malformed message), the kernel keeps serving,
and the VM still powers off."""
import os
import socket
import struct
import tempfile

import pytest

from hclsim.config import BootConfig
from hclsim.defs import kabi
from hclsim.kernel_stub.userspace import Userspace
from hclsim.machine import Machine


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.seq = 0

    def raw(self, data: bytes):
        self.sock.send(data)
        msg, anc, _f, _a = self.sock.recvmsg(kabi.MAX_MESSAGE, socket.CMSG_SPACE(16))
        for level, kind, payload in anc:
            if kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]):
                    os.close(fd)
        return kabi.decode_reply(msg)

    def call(self, op, *values):
        self.seq += 1
        seq, err, out = self.raw(kabi.encode_request(self.seq, op, values))
        assert seq == self.seq
        return err, out


@pytest.fixture(scope="module")
def vm():
    # Runs while we ask; the sidecar CPUs stay offline (RUN_VP on one must fail).
    machine = Machine(BootConfig(cpus=4, vtl0_iterations=2_000_000, host_bootargs="OPENHCL_NO_SIDECAR_HOTPLUG=1"))
    result = machine.run_to_handoff()
    run_dir = tempfile.mkdtemp(prefix="hclsim-test-vm-")
    us = Userspace(result.linux, result.handoff, machine.initrd.data, run_dir)
    us.start()
    import time
    deadline = time.monotonic() + 30
    while not any(e.name == "vtl0" for e in us.events) and time.monotonic() < deadline and not us.finished.is_set():
        time.sleep(0.02)
    assert any(e.name == "vtl0" for e in us.events), us.kmsg.text()
    yield us
    us.shutdown()
    machine.close()


def client(us) -> Client:
    return Client(us.server.path)


def test_an_empty_packet_ends_the_connection_only(vm):
    c = client(vm)
    c.sock.send(b"")                  # on SOCK_SEQPACKET this reads as the end of the connection
    assert c.sock.recv(100) == b""
    assert client(vm).call(kabi.Op.STAT, "/proc")[0] == 0


@pytest.mark.parametrize("raw", [b"\x00", kabi.REQUEST.pack(1, kabi.Op.OPEN, 3) + b"s\xff\xff\xff\xff",
                                 kabi.REQUEST.pack(1, kabi.Op.OPEN, 1) + b"?", b"x" * 9000])
def test_malformed_messages_get_einval(vm, raw):
    c = client(vm)
    _seq, err, _ = c.raw(raw)
    assert err == kabi.EINVAL


def test_unknown_operation_and_wrong_arguments(vm):
    c = client(vm)
    assert c.call(999)[0] == kabi.ENOSYS
    assert c.call(kabi.Op.OPEN, 1, 2, 3)[0] == kabi.EINVAL            # a path must be a string
    assert c.call(kabi.Op.OPEN, "/proc/cmdline")[0] == kabi.EINVAL     # too few values
    assert c.call(kabi.Op.READ, 12345, 10)[0] == kabi.EBADF
    assert c.call(kabi.Op.CLOSE, 12345)[0] == kabi.EBADF
    assert c.call(kabi.Op.READ, 0, -1)[0] in (kabi.EINVAL, kabi.EBADF)


def test_paths(vm):
    c = client(vm)
    assert c.call(kabi.Op.OPEN, "relative", kabi.O_RDONLY, 0)[0] == kabi.ENOENT
    assert c.call(kabi.Op.OPEN, "/proc/no-such", kabi.O_RDONLY, 0)[0] == kabi.ENOENT
    assert c.call(kabi.Op.OPEN, "/proc/cmdline", kabi.O_WRONLY, 0)[0] == kabi.EACCES   # read-only file
    assert c.call(kabi.Op.OPEN, "/proc/cmdline/x", kabi.O_RDONLY, 0)[0] == kabi.ENOTDIR
    assert c.call(kabi.Op.OPEN, "/proc\0", kabi.O_RDONLY, 0)[0] == kabi.EINVAL
    assert c.call(kabi.Op.OPEN, "/" + "a" * 5000, kabi.O_RDONLY, 0)[0] == kabi.ENAMETOOLONG
    assert c.call(kabi.Op.MOUNT, "x", "/tmp", "nosuchfs", 0, "")[0] == kabi.ENODEV
    assert c.call(kabi.Op.MOUNT, "proc", "/proc", "proc", 0, "")[0] == kabi.EBUSY
    assert c.call(kabi.Op.FINIT_MODULE, "/etc/underhill-build-info.json", "")[0] == kabi.ENOEXEC
    err, (fd, host) = c.call(kabi.Op.OPEN, "/proc/cmdline", kabi.O_RDONLY, 0)
    assert err == 0 and host == 0
    err, (data,) = c.call(kabi.Op.READ, fd, 4096)
    assert data.rstrip(b"\n") == vm.handoff.cmdline_bytes
    err, (names,) = c.call(kabi.Op.LISTDIR, "/sys/devices/system/cpu")
    assert {"cpu0", "cpu3", "online", "present"} <= set(names)


def test_cpus_and_mshv(vm):
    c = client(vm)
    assert c.call(kabi.Op.OPEN, "/sys/devices/system/cpu/cpu99/online", kabi.O_WRONLY, 0)[0] == kabi.ENOENT
    err, (mshv, _h) = c.call(kabi.Op.OPEN, "/dev/mshv", kabi.O_RDWR, 0)
    assert err == 0
    err, (vtl, _out) = c.call(kabi.Op.IOCTL, mshv, kabi.MSHV_CREATE_VTL, b"")
    assert err == 0
    assert c.call(kabi.Op.IOCTL, vtl, 0x1234, b"")[0] == kabi.ENOTTY
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_RETURN_TO_LOWER_VTL, struct.pack("<I", 99))[0] == kabi.EINVAL
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_RETURN_TO_LOWER_VTL, b"")[0] == kabi.EFAULT
    assert 3 not in vm.linux.cpus.online          # RUN_VP on a CPU the sidecar holds
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_RETURN_TO_LOWER_VTL, struct.pack("<I", 3))[0] == kabi.EINVAL
    assert "RUN_VP on CPU 3, which is offline" in vm.kmsg.text()
    bad = struct.pack("<I", 0) + kabi.REGISTER_ASSOC.pack(0xDEAD, 0, 0)
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_GET_VP_REGISTERS, bad)[0] == kabi.EINVAL
    assert c.call(kabi.Op.IOCTL, vtl, kabi.MSHV_VTL_GET_VP_REGISTERS, b"\0\0\0\0xyz")[0] == kabi.EINVAL
    assert c.call(kabi.Op.MMAP, vtl, 123, 4096)[0] == kabi.EINVAL
    assert c.call(kabi.Op.MMAP, vtl, (kabi.MMAP_RUN_PAGE | 99) * 4096, 4096)[0] == kabi.EINVAL


def test_the_vm_keeps_running(vm):
    assert vm.init_proc.returncode is None
    assert vm.panic is None
    assert "BUG" not in vm.kmsg.text()
