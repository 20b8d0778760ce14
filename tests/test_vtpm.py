"""The vTPM's registers over a real swtpm: the I/O-port command protocol maps the buffers, the
CRB START flow runs the guest's command from guest memory and writes the response there; bad
widths, undefined registers, a command outside RAM and a response that does not fit are errors."""
import hashlib
import struct

import pytest

from hclsim.devices import swtpm, vtpm
from hclsim.devices.bus import Bus

pytestmark = pytest.mark.skipif(swtpm.swtpm_binary() is None, reason="swtpm is not installed (.ci/run installs it)")
BUF = 0x10000


class Ram:
    def __init__(self, size=0x20000):
        self.b = bytearray(size)

    def read(self, gpa, n):
        if gpa + n > len(self.b):
            raise ValueError(f"{n} bytes at {gpa:#x} are not RAM")
        return bytes(self.b[gpa:gpa + n])

    def write(self, gpa, data):
        if gpa + len(data) > len(self.b):
            raise ValueError(f"{len(data)} bytes at {gpa:#x} are not RAM")
        self.b[gpa:gpa + len(data)] = data


@pytest.fixture
def tpm(tmp_path):
    engine = swtpm.Swtpm(str(tmp_path / "tpm"))
    dev = vtpm.Vtpm(engine)
    dev.guest_memory = Ram()
    bus = Bus("vtl0")
    bus.add(dev)
    bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_MAP_SHARED_MEMORY)
    bus.pio_write(vtpm.DATA_PORT, 4, BUF)
    yield bus, dev
    engine.close()


def _run(bus, dev, command: bytes) -> bytes:
    dev.guest_memory.write(BUF, command)
    bus.mmio_write(vtpm.CRB_BASE + vtpm.START, 4, 1)
    assert bus.mmio_read(vtpm.CRB_BASE + vtpm.START, 4) == 0
    head = dev.guest_memory.read(BUF + 4096, 10)
    return dev.guest_memory.read(BUF + 4096, struct.unpack_from(">I", head, 2)[0])


def test_the_io_protocol_and_a_measured_boot_through_the_crb(tpm):
    bus, dev = tpm
    bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_ESTABLISHED)
    assert bus.pio_read(vtpm.DATA_PORT, 4) == BUF
    bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_GET_TCG_PROTOCOL_VERSION)
    assert bus.pio_read(vtpm.DATA_PORT, 4) == 1
    assert bus.mmio_read(vtpm.CRB_BASE + vtpm.CRB_INTF_ID, 4) == 0x4011
    assert bus.mmio_read(vtpm.CRB_BASE + vtpm.LOC_STATE, 4) == 0x81
    bus.mmio_write(vtpm.CRB_BASE + vtpm.LOC_CTRL, 4, 1)                 # request locality 0
    assert bus.mmio_read(vtpm.CRB_BASE + vtpm.LOC_STATE, 4) == 0x83
    assert swtpm.response_code(_run(bus, dev, swtpm.startup_clear())) == 0
    log = [hashlib.sha256(b"console=ttyS0").digest(), hashlib.sha256(b"a blob").digest()]
    for d in log:
        assert swtpm.response_code(_run(bus, dev, swtpm.pcr_extend_sha256(9, d))) == 0
    pcr = bytes(32)
    for d in log:                                                     # the event log, replayed
        pcr = hashlib.sha256(pcr + d).digest()
    assert swtpm.pcr_read_digest(_run(bus, dev, swtpm.pcr_read_sha256(9))) == pcr
    r = _run(bus, dev, swtpm.get_random(8))
    assert swtpm.response_code(r) == 0 and len(r) == 20
    assert dev.commands == 5 and not bus.errors


def test_bad_accesses_are_errors_the_guest_sees_as_all_ones(tpm):
    bus, dev = tpm
    assert bus.pio_read(vtpm.DATA_PORT, 2) == 0xFFFF                    # a 2-byte data port read
    assert bus.pio_read(vtpm.CONTROL_PORT, 4) == 0xFFFFFFFF             # the control port is write-only
    assert bus.mmio_read(vtpm.CRB_BASE + vtpm.START, 8) == 0xFFFFFFFFFFFFFFFF   # 8 bytes only at 0x30/0x5C/0x68
    bus.mmio_write(vtpm.CRB_BASE + vtpm.START + 1, 1, 1)               # not 4-aligned
    n = len(bus.errors)
    bus.mmio_write(vtpm.CRB_BASE + vtpm.COMMAND_PA_LO, 4, 0x1FFF0)     # the command buffer runs out of RAM
    bus.mmio_write(vtpm.CRB_BASE + vtpm.START, 4, 1)
    assert len(bus.errors) == n + 1 and "not RAM" in bus.errors[-1][3]
    assert bus.mmio_read(vtpm.CRB_BASE + vtpm.START, 4) == 0
    bus.mmio_write(vtpm.CRB_BASE + vtpm.COMMAND_PA_LO, 4, BUF)
    bus.mmio_write(vtpm.CRB_BASE + vtpm.RESPONSE_SIZE, 4, 12)          # too small for GetRandom(16)
    dev.guest_memory.write(BUF, swtpm.startup_clear())
    bus.mmio_write(vtpm.CRB_BASE + vtpm.START, 4, 1)
    dev.guest_memory.write(BUF, swtpm.get_random(16))
    bus.mmio_write(vtpm.CRB_BASE + vtpm.START, 4, 1)
    assert "does not fit" in bus.errors[-1][3]


def test_the_register_state_survives_save_and_restore(tpm):
    bus, dev = tpm
    bus.mmio_write(vtpm.CRB_BASE + vtpm.LOC_CTRL, 4, 1)
    state = dev.saved_state.encode(dev.save())
    other = vtpm.Vtpm(None)
    other.restore(other.saved_state.decode(state))
    assert other.regs == dev.regs and other.requested and other.io_command == dev.io_command


# ---- state: the VMGS files TPM_NVRAM and TPM_PPI, the volatile state in the saved state ----------
NV_INDEX = 0x01500016


_OPEN: list = []                   # (proxy, engine) of _worker, closed after each test whatever happened


@pytest.fixture(autouse=True)
def _close_workers():
    yield
    while _OPEN:
        proxy, engine = _OPEN.pop()
        proxy.close()
        engine.close()


def _worker(tmp_path, name, stores, saved=None):
    """The vTPM served by a DeviceServer (as in its worker) behind a proxy on a bus, with the
    VM's stores at the proxy: (bus, proxy, ram, engine, device)."""
    import socket
    import threading
    from hclsim.devices.device_worker import DeviceServer, ProxyDevice, restore_bytes
    engine = swtpm.Swtpm(str(tmp_path / name))
    dev = vtpm.Vtpm(engine)
    if saved is not None:
        restore_bytes(dev, saved)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    threading.Thread(target=DeviceServer(dev, theirs).serve, daemon=True).start()
    ram = Ram()
    proxy = ProxyDevice("tpm", ours, relaunch=lambda: (_ for _ in ()).throw(OSError("no restarts here")),
                        guest_memory=ram, stores=stores)
    _OPEN.append((proxy, engine))
    bus = Bus("vtl0")
    bus.add(proxy)
    bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_MAP_SHARED_MEMORY)
    bus.pio_write(vtpm.DATA_PORT, 4, BUF)
    return bus, proxy, ram, engine, dev


def _cmd(bus, ram, command: bytes) -> bytes:
    ram.write(BUF, command)
    bus.mmio_write(vtpm.CRB_BASE + vtpm.START, 4, 1)
    head = ram.read(BUF + 4096, 10)
    return ram.read(BUF + 4096, struct.unpack_from(">I", head, 2)[0])


def _vmgs(tmp_path):
    import os
    from hclsim.hcl import vmgs
    path = tmp_path / "vm.vmgs"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(vmgs.DEFAULT_CAPACITY)
    return vmgs.Vmgs(os.open(path, os.O_RDWR))


def test_nv_state_goes_to_the_vmgs_and_seeds_the_next_boots_engine(tmp_path):
    from hclsim.hcl import vmgs
    store = _vmgs(tmp_path)
    bus, proxy, ram, engine, dev = _worker(tmp_path, "boot1", vmgs.DeviceFiles(store, (vmgs.TPM_PPI, vmgs.TPM_NVRAM)))
    assert swtpm.response_code(_cmd(bus, ram, swtpm.startup_clear())) == 0
    persisted = dev.nv_persists                                       # Startup commits NV (its orderly state)
    assert swtpm.response_code(_cmd(bus, ram, swtpm.pcr_extend_sha256(8, bytes(32)))) == 0
    assert dev.nv_persists == persisted                              # PCRs are volatile: nothing written
    assert swtpm.response_code(_cmd(bus, ram, swtpm.nv_define_space(NV_INDEX, 8))) == 0
    assert swtpm.response_code(_cmd(bus, ram, swtpm.nv_write(NV_INDEX, b"boot0001"))) == 0
    assert dev.nv_persists >= persisted + 2 and proxy.store_requests >= 3
    assert store.read_file(vmgs.TPM_NVRAM) == engine.get_state(swtpm.BLOB_PERMANENT)
    bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_PPI_SET_OPERATION)   # a PPI request for the next boot
    bus.pio_write(vtpm.DATA_PORT, 4, 23)
    assert store.read_file(vmgs.TPM_PPI) == struct.pack("<7I", 23, 0, 0, 0, 0, 0, 0)
    proxy.close()
    engine.close()
    # The next boot: a new engine (its own fresh NV) takes the VM's NV from the VMGS.
    again = _vmgs(tmp_path)
    bus, proxy, ram, engine, dev = _worker(tmp_path, "boot2", vmgs.DeviceFiles(again, (vmgs.TPM_PPI, vmgs.TPM_NVRAM)))
    assert swtpm.response_code(_cmd(bus, ram, swtpm.startup_clear())) == 0
    r = _cmd(bus, ram, swtpm.nv_read(NV_INDEX, 8))
    assert swtpm.response_code(r) == 0 and swtpm.nv_read_data(r) == b"boot0001"
    assert swtpm.pcr_read_digest(_cmd(bus, ram, swtpm.pcr_read_sha256(8))) == bytes(32)   # PCRs start over
    bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_PPI_GET_PENDING_OPERATION)
    assert bus.pio_read(vtpm.DATA_PORT, 4) == 23
    proxy.close()
    engine.close()


def test_a_restored_worker_carries_on_with_the_same_pcrs_and_a_reset_starts_over(tmp_path):
    from hclsim.devices.device_worker import state_bytes
    from hclsim.hcl import vmgs
    stores = vmgs.DeviceFiles(None, (vmgs.TPM_PPI, vmgs.TPM_NVRAM))   # no VMGS: ephemeral, in the VM worker
    bus, proxy, ram, engine, dev = _worker(tmp_path, "first", stores)
    _cmd(bus, ram, swtpm.startup_clear())
    _cmd(bus, ram, swtpm.pcr_extend_sha256(8, hashlib.sha256(b"x").digest()))
    pcr = swtpm.pcr_read_digest(_cmd(bus, ram, swtpm.pcr_read_sha256(8)))
    saved = state_bytes(dev)                                          # what its worker committed
    proxy.close()
    engine.close()
    bus, proxy, ram, engine, dev = _worker(tmp_path, "restarted", stores, saved=saved)
    assert swtpm.pcr_read_digest(_cmd(bus, ram, swtpm.pcr_read_sha256(8))) == pcr == \
        hashlib.sha256(bytes(32) + hashlib.sha256(b"x").digest()).digest()
    proxy.rpc("reset")                                                # a VM reset: the engine needs Startup
    bus.pio_write(vtpm.CONTROL_PORT, 4, vtpm.IO_MAP_SHARED_MEMORY)
    bus.pio_write(vtpm.DATA_PORT, 4, BUF)
    assert swtpm.response_code(_cmd(bus, ram, swtpm.pcr_read_sha256(8))) == swtpm.TPM_RC_INITIALIZE
    assert swtpm.response_code(_cmd(bus, ram, swtpm.startup_clear())) == 0
    assert swtpm.pcr_read_digest(_cmd(bus, ram, swtpm.pcr_read_sha256(8))) == bytes(32)
    proxy.close()
    engine.close()


def test_a_store_the_device_may_not_use_is_an_error_the_guest_sees(tmp_path):
    from hclsim.hcl import vmgs
    bus, proxy, ram, engine, dev = _worker(tmp_path, "nostore", vmgs.DeviceFiles(None, ()))
    assert "is not this device's" in bus.errors[-1][3]                 # the first access could not seed it
    n = len(bus.errors)
    assert bus.mmio_read(vtpm.CRB_BASE + vtpm.START, 4) == 0xFFFFFFFF   # nor can any later one
    assert len(bus.errors) == n + 1 and dev.commands == 0
    proxy.close()
    engine.close()
