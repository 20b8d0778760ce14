"""Devices in device worker processes (issue 12): the same guest console in process and in a
worker, accesses completed by id, a worker killed mid-run restarted from its committed state
with nothing committed lost, and the worker's isolation."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from hclsim.config import BootConfig, ConfigError
from hclsim.diag_client import DiagClient
from hclsim.hcl.pb import inspect_service_pb2 as ipb
from hclsim.system import run_system

ALL = ("test_port", "mmio_test", "loop_port")


def test_the_guest_sees_the_same_devices_in_process_and_in_workers():
    inproc = run_system(BootConfig(cpus=2))
    workers = run_system(BootConfig(cpus=2, device_workers=ALL))
    assert workers.status == inproc.status == "power-off"
    assert workers.consoles == inproc.consoles and b"vp 1 done" in workers.consoles[1]   # each VP's console
    assert workers.vtl0_records == inproc.vtl0_records              # every step's result, MMIO included
    comms = {p["comm"] for p in workers.process_tree}
    assert {"underhill-test_", "underhill-mmio_", "underhill-loop_"} <= comms    # comm: 15 characters


def test_an_unknown_device_worker_is_one_clear_error():
    with pytest.raises(ConfigError, match="--device-worker com9: no such device for a worker"):
        BootConfig(device_workers=("com9",)).validated()
    out = subprocess.run([sys.executable, "-m", "hclsim", "boot", "--device-worker", "com9"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no such device for a worker" in out.stderr


def _kept(tmp_path, config):
    from hclsim.system import start_kept_run
    path = str(tmp_path / "vm.sock")
    return (path, *start_kept_run(config, path))


def _inspect(client, path):
    from hclsim.diag_cli import node_json
    return node_json(client.call("inspect.InspectService", "Inspect", ipb.InspectRequest(path=path, depth=0xFFFFFFFF),
                                 ipb.InspectResponse).result)


def test_a_worker_killed_mid_run_is_restarted_from_its_committed_state(tmp_path):
    iterations = 10000
    path, stop, t, box = _kept(tmp_path, BootConfig(cpus=1, vtl0_iterations=iterations, device_workers=("loop_port",)))
    try:
        client = DiagClient(path, wait=30)
        hosts = _inspect(client, "mesh/hosts")
        pid = next(int(p) for p, h in hosts.items() if h["name"] == "loop_port")
        # Wait until the loop is going, then kill the worker in the middle of it.
        for _ in range(200):
            if _inspect(client, "vm/devices/loop_port/worker")["requests"] > 2000:
                break
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        for _ in range(600):
            if box.get("outcome") is not None or _inspect(client, "vm/state") != "running":
                break
            time.sleep(0.05)
        worker = _inspect(client, "vm/devices/loop_port/worker")
        assert worker["restarts"] >= 1 and worker["restored"] is True
        state = worker["state"]                  # the device as the new worker has it
        writes = json.loads(json.dumps(state))["1"]
        failed = worker["failed_accesses"]
        # Every loop write the guest saw completed is there (one that failed may have been committed
        # just before the worker died, its answer lost with it).
        assert iterations - failed <= writes <= iterations, (writes, iterations, failed)
        assert 0 <= failed <= 2                  # at most the access in flight when it died
        new_hosts = _inspect(client, "mesh/hosts")
        assert any(h["name"] == "loop_port" and int(p) != pid and h["restarts"] >= 1 for p, h in new_hosts.items())
        client.close()
    finally:
        stop.set()
        t.join(60)
    assert "error" not in box, box.get("error")
    assert b"vp 0 done" in box["outcome"].com1
    if failed:                                   # the guest's failed access: the host's one line about it
        assert "device loop_port: 4-byte pio write at 0x444 failed: device worker loop_port lost" \
            in box["outcome"].kmsg


def test_a_worker_holds_nothing_but_its_channel_and_cannot_open_files(tmp_path):
    path, stop, t, box = _kept(tmp_path, BootConfig(cpus=1, device_workers=("test_port",)))
    try:
        client = DiagClient(path, wait=30)
        hosts = _inspect(client, "mesh/hosts")
        pid = next(int(p) for p, h in hosts.items() if h["name"] == "test_port")
        status = open(f"/proc/{pid}/status").read()
        assert "NoNewPrivs:\t1" in status
        held = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        for fd, target in held.items():          # stdio, the kernel, sockets (channel, proxy, kernel), its state
            assert (fd <= 2 or fd == 1023 or target.startswith("socket:")
                    or "/var/lib/hclsim-devices/test_port/state." in target), (fd, target)
        client.close()
    finally:
        stop.set()
        t.join(60)
    # A process that isolates itself as a worker does, then tries to open a file.
    probe = ("from hclsim.hcl.device_host import restrict\n"
             "applied = ', '.join(restrict())\n"
             "try:\n    open('/etc/hostname').read(); print('opened', applied)\n"
             "except PermissionError: print('denied', applied)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if "landlock" in out.stdout:
        assert out.stdout.startswith("denied")
    else:
        pytest.skip(f"this host kernel offers no Landlock: {out.stdout.strip()}")


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates device_worker_pb2.py")
    from pathlib import Path
    devices = Path(__file__).resolve().parent.parent / "devices"
    done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{devices}", f"--python_out={tmp_path}",
                           str(devices / "device_worker.proto")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    fresh = (tmp_path / "device_worker_pb2.py").read_text().splitlines()
    kept = (devices / "device_worker_pb2.py").read_text().splitlines()
    differ = [(a, b) for a, b in zip(fresh, kept) if a != b and not a.startswith("# Protobuf Python Version")]
    assert len(fresh) == len(kept) and not differ, differ[:3]


def test_the_proxy_completes_accesses_by_id_and_fails_them_when_the_worker_dies():
    """Both ends in this process: a worker thread that answers out of order, then vanishes."""
    import socket
    from hclsim.devices import device_worker_pb2 as pb
    from hclsim.devices.bus import Bus
    from hclsim.devices.device_worker import ProxyDevice
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.send(pb.DeviceInit(pio=[pb.Region(name="register", start=0x440, end_inclusive=0x443)], version=1)
                .SerializeToString())
    relaunched = []
    proxy = ProxyDevice("test_port", ours, relaunch=lambda: relaunched.append(1) or (_ for _ in ()).throw(
        OSError("no more workers")))
    assert proxy.pio_regions[0].start == 0x440 and proxy.pio_regions[0].size == 4
    assert pb.DeviceRequest.FromString(theirs.recv(4096)).WhichOneof("request") == "start"
    bus = Bus("t")
    bus.add(proxy)
    results = {}
    readers = [threading.Thread(target=lambda k=k: results.__setitem__(k, bus.pio_read(0x440, 4))) for k in (1, 2)]
    for r in readers:
        r.start()
    reqs = [pb.DeviceRequest.FromString(theirs.recv(4096)).pio_read for _ in range(2)]
    for req, value in zip(reversed(reqs), (0x22222222, 0x11111111)):          # answered out of order
        theirs.send(pb.DeviceResponse(read=pb.ReadResponse(id=req.id, data=value.to_bytes(4, "little")))
                    .SerializeToString())
    for r in readers:
        r.join(5)
    assert sorted(results.values()) == [0x11111111, 0x22222222]
    pending = threading.Thread(target=lambda: results.__setitem__("lost", bus.pio_read(0x440, 4)))
    pending.start()
    theirs.recv(4096)
    theirs.close()                                                           # the worker dies mid-access
    pending.join(15)
    assert results["lost"] == 0xFFFFFFFF and proxy.failed_accesses >= 1 and relaunched
    assert any("device worker test_port lost" in e[3] for e in bus.errors)


class _DmaDevice:
    """A device that copies guest memory as it is told: a write of a GPA to its port reads 16
    bytes there, writes them reversed 16 bytes on, fills the next 8 with 0xAB."""
    name = "dma"
    uses_guest_memory = True

    def __init__(self):
        from hclsim.defs.platform import Region
        from hclsim.devices.saved_state import Schema
        self.pio_regions = (Region("doorbell", 0x500, 4),)
        self.saved_state = Schema("tests.dma", ())
        self.guest_memory = None

    def pio_read(self, port, size):
        return 0

    def pio_write(self, port, size, gpa):
        data = self.guest_memory.read(gpa, 16)
        self.guest_memory.write(gpa + 16, data[::-1])
        self.guest_memory.fill(gpa + 32, 0xAB, 8)

    def save(self):
        return {}

    def restore(self, values):
        pass


class _Ram:
    def __init__(self, size):
        self.b = bytearray(size)

    def read(self, gpa, n):
        if gpa + n > len(self.b):
            raise ValueError(f"{n} bytes at {gpa:#x} are not VTL0 RAM")
        return bytes(self.b[gpa:gpa + n])

    def write(self, gpa, data):
        if gpa + len(data) > len(self.b):
            raise ValueError(f"{len(data)} bytes at {gpa:#x} are not VTL0 RAM")
        self.b[gpa:gpa + len(data)] = data


def test_a_worker_reads_and_writes_guest_memory_through_the_proxy():
    import socket
    from hclsim.devices.bus import Bus
    from hclsim.devices.device_worker import DeviceServer, ProxyDevice
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = DeviceServer(_DmaDevice(), theirs)
    threading.Thread(target=server.serve, daemon=True).start()
    ram = _Ram(0x10000)
    ram.b[0x1000:0x1010] = bytes(range(16))
    proxy = ProxyDevice("dma", ours, relaunch=lambda: (_ for _ in ()).throw(OSError("none")), guest_memory=ram)
    bus = Bus("t")
    bus.add(proxy)
    bus.pio_write(0x500, 4, 0x1000)
    assert ram.b[0x1010:0x1020] == bytes(range(16))[::-1] and ram.b[0x1020:0x1028] == b"\xab" * 8
    assert proxy.memory_requests == 3 and not bus.errors
    bus.pio_write(0x500, 4, 0xFFF8)                      # reads past the end of RAM: the access fails
    assert bus.errors and "not VTL0 RAM" in bus.errors[-1][3]
    proxy.close()


class _PciDevice:
    """A PCI function with a 64-byte configuration space (byte enables honoured)."""
    name = "pci"

    def __init__(self):
        from hclsim.devices.saved_state import Field, Schema
        self.pio_regions = ()
        self.space = bytearray(64)
        self.space[0:4] = (0x1414 | 0x00BA << 16).to_bytes(4, "little")      # vendor, device
        self.saved_state = Schema("tests.pci", (Field(1, "space", bytes, b""),))

    def pci_config_read(self, offset, byte_enable):
        return int.from_bytes(self.space[offset:offset + 4], "little")

    def pci_config_write(self, offset, value, byte_enable):
        for i in range(4):
            if byte_enable >> i & 1:
                self.space[offset + i] = value >> (8 * i) & 0xFF

    def save(self):
        return {"space": bytes(self.space)}

    def restore(self, values):
        self.space[:] = values["space"].ljust(64, b"\0")[:64]


def test_pci_config_and_the_rpcs_cross_the_boundary():
    import socket
    from hclsim.devices.device_worker import DeviceServer, ProxyDevice
    from hclsim.devices.vtl0_test import LoopPort
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dev = _PciDevice()
    threading.Thread(target=DeviceServer(dev, theirs).serve, daemon=True).start()
    proxy = ProxyDevice("pci", ours, relaunch=lambda: (_ for _ in ()).throw(OSError("none")))
    assert proxy.pci_config_read(0).wait() == 0x00BA1414
    proxy.pci_config_write(4, 0xAABBCCDD, byte_enable=0b0101).wait()             # bytes 0 and 2 only
    assert dev.space[4:8] == bytes([0xDD, 0, 0xBB, 0])
    saved = proxy.rpc("save").state
    proxy.rpc("reset")
    assert dev.space == bytes(64)                                                  # as at power on
    proxy.rpc("restore", state=saved)
    assert dev.space[0:2] == b"\x14\x14" and dev.space[4:8] == bytes([0xDD, 0, 0xBB, 0])
    proxy.rpc("stop")
    proxy.close()
    # A device that is not PCI: its configuration accesses are errors.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    threading.Thread(target=DeviceServer(LoopPort(), theirs).serve, daemon=True).start()
    proxy = ProxyDevice("loop_port", ours, relaunch=lambda: (_ for _ in ()).throw(OSError("none")))
    from hclsim.devices.bus import IoError
    assert isinstance(proxy.pci_config_read(0).wait(), IoError)
    proxy.close()


@pytest.mark.skipif(__import__("shutil").which("swtpm") is None, reason="swtpm is not installed (.ci/run installs it)")
def test_tpm_gives_the_vm_a_vtpm_in_its_own_worker(tmp_path):
    path, stop, t, box = _kept(tmp_path, BootConfig(cpus=1, tpm=True))
    try:
        client = DiagClient(path, wait=30)
        hosts = _inspect(client, "mesh/hosts")
        pid = next(int(p) for p, h in hosts.items() if h["name"] == "tpm")
        tpm = _inspect(client, "vm/devices/tpm")
        assert tpm["regions"]["control_area"]["start"] == 0xFED40000 and tpm["regions"]["control_area"]["size"] == 0x70
        assert tpm["regions"]["io"]["start"] == 0x1040 and tpm["regions"]["io"]["size"] == 9
        children = subprocess.run(["ps", "-o", "comm=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        assert "swtpm" in children                      # the engine, the worker's own child
        client.close()
    finally:
        stop.set()
        t.join(60)
    assert "error" not in box, box.get("error")
    assert any(p["comm"] == "underhill-tpm" for p in box["outcome"].process_tree)
    assert "device tpm: serving" in box["outcome"].kmsg and "guest RAM mapped" in box["outcome"].kmsg
