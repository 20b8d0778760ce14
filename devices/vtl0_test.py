"""The VTL0 test guest's devices (boot/firmware/vtl0, defs/platform.py), on the bus the VP loop
completes VTL0's intercepts with: its console (a 16550 at COM1, handled in Python: VTL0's port
I/O reaches the host as intercepts, never the engine's port hook), the test port, the MMIO test
range, the workload's loop port and the power-off port that ends the run. Each records what the
guest did, for tests and reports.

Pure Python (no numpy, numba, unicorn or capstone, here or in what it imports): the VM worker, a
process that must start in tens of milliseconds, runs these devices.
"""
import threading

from hclsim.defs.platform import (COM1_PORT, VTL0_CHECKSUM_BASIS, VTL0_CHECKSUM_PRIME, VTL0_LOOP_PORT,
                                  VTL0_MMIO_BASE, VTL0_MMIO_READ_PATTERN, VTL0_MMIO_SIZE, VTL0_POWER_PORT,
                                  VTL0_TEST_PORT, VTL0_TEST_PORT_VALUE, Region)
from hclsim.devices.bus import Bus, IoError
from hclsim.devices.saved_state import Field, Schema
from hclsim.devices.uart16550 import Uart16550


def loop_checksum(iterations: int) -> int:
    """The record's checksum after the guest's loop of `iterations` (the Python model of step 10:
    FNV-1a, 64-bit, over the 32-bit iteration numbers)."""
    x = VTL0_CHECKSUM_BASIS
    for i in range(iterations):
        x = ((x ^ i) * VTL0_CHECKSUM_PRIME) & 0xFFFFFFFFFFFFFFFF
    return x


class TestPort:
    """Port VTL0_TEST_PORT: a 32-bit register that reads VTL0_TEST_PORT_VALUE and logs writes."""
    name = "test_port"
    saved_state = Schema("hclsim.devices.vtl0_test.TestPort", (Field(1, "writes", str, ""),))

    def __init__(self):
        self.pio_regions = (Region("register", VTL0_TEST_PORT, 4),)
        self.writes: list[tuple[int, int]] = []

    def pio_read(self, port: int, size: int) -> int:
        return VTL0_TEST_PORT_VALUE

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.writes.append((port, value))

    def save(self) -> dict:
        return {"writes": ",".join(f"{p:x}:{v:x}" for p, v in self.writes)}

    def restore(self, values: dict) -> None:
        pairs = [w.split(":") for w in values["writes"].split(",") if w]
        self.writes = [(int(p, 16), int(v, 16)) for p, v in pairs]


class MmioTestRange:
    """VTL0_MMIO_SIZE bytes at VTL0_MMIO_BASE: a read of `size` bytes at offset o returns
    (VTL0_MMIO_READ_PATTERN | o) cut to size; writes are logged as (gpa, size, value)."""
    name = "mmio_test"
    saved_state = Schema("hclsim.devices.vtl0_test.MmioTestRange", (Field(1, "writes", str, ""),))

    def __init__(self):
        self.mmio_regions = (Region("registers", VTL0_MMIO_BASE, VTL0_MMIO_SIZE),)
        self.writes: list[tuple[int, int, int]] = []
        self.accesses: list[tuple[str, int, int, int]] = []   # ("read" | "write", gpa, size, value)

    def mmio_read(self, gpa: int, size: int) -> int:
        value = (VTL0_MMIO_READ_PATTERN | (gpa - VTL0_MMIO_BASE)) & ((1 << (8 * size)) - 1)
        self.accesses.append(("read", gpa, size, value))
        return value

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        self.writes.append((gpa, size, value))
        self.accesses.append(("write", gpa, size, value))

    def save(self) -> dict:
        return {"writes": ",".join(f"{g:x}:{s}:{v:x}" for g, s, v in self.writes)}

    def restore(self, values: dict) -> None:
        triples = [w.split(":") for w in values["writes"].split(",") if w]
        self.writes = [(int(g, 16), int(s), int(v, 16)) for g, s, v in triples]


class LoopPort:
    """Port VTL0_LOOP_PORT: the workload loop's 32-bit OUTs (every VP's). `writes` counts them,
    `last` is the last value written (what a read returns too)."""
    name = "loop_port"
    saved_state = Schema("hclsim.devices.vtl0_test.LoopPort", (Field(1, "writes", int, 0), Field(2, "last", int, 0)))

    def __init__(self):
        self.pio_regions = (Region("register", VTL0_LOOP_PORT, 4),)
        self.writes, self.last = 0, 0

    def pio_read(self, port: int, size: int) -> int:
        return self.last

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.writes += 1
        self.last = value

    def save(self) -> dict:
        return {"writes": self.writes, "last": self.last}

    def restore(self, values: dict) -> None:
        self.writes, self.last = values["writes"], values["last"]


class PowerOff:
    """Port VTL0_POWER_PORT: a VP writes its index (32-bit OUT) once it has finished. `reported`
    is the set of VPs that did; `powered_off` is true once all vp_count VPs have, and then
    on_power_off() is called, once (from the thread that completed the last write). A VP index
    out of range is an IoError; a VP reporting again changes nothing. vp_count None: the VM's
    size is not known here (a VP loop running single VPs): reports are kept, it never powers off.
    Reads return how many VPs have reported."""
    name = "power_off"
    saved_state = Schema("hclsim.devices.vtl0_test.PowerOff",
                         (Field(1, "reported", str, ""), Field(2, "fired", int, 0)))

    def __init__(self, vp_count: int | None, on_power_off=None):
        if vp_count is not None and vp_count < 1:
            raise ValueError(f"power-off device for {vp_count} VPs")
        self.pio_regions = (Region("register", VTL0_POWER_PORT, 4),)
        self.vp_count, self.on_power_off = vp_count, on_power_off
        self.reported: set[int] = set()
        self._fired = False
        self._lock = threading.Lock()

    @property
    def powered_off(self) -> bool:
        return self.vp_count is not None and len(self.reported) == self.vp_count

    def pio_read(self, port: int, size: int) -> int:
        return len(self.reported)

    def pio_write(self, port: int, size: int, value: int):
        if self.vp_count is not None and value >= self.vp_count:
            return IoError(f"power-off from VP {value}: the VM has {self.vp_count} VPs")
        with self._lock:
            self.reported.add(value)
            fire = self.powered_off and not self._fired
            self._fired = self._fired or fire
        if fire and self.on_power_off is not None:
            self.on_power_off()
        return None

    def save(self) -> dict:
        return {"reported": ",".join(str(vp) for vp in sorted(self.reported)), "fired": int(self._fired)}

    def restore(self, values: dict) -> None:
        self.reported = {int(vp) for vp in values["reported"].split(",") if vp}
        self._fired = bool(values["fired"])


def vtl0_bus(vp_count: int | None, console_sink=None, on_power_off=None, replace: dict | None = None,
             extra: tuple = ()) -> Bus:
    """The VP loop's bus with the VTL0 test guest's devices for a VM of vp_count VPs (None: not
    known, see PowerOff); console_sink(name, bytes) sees COM1, on_power_off() the power-off.
    replace: {name: device} put on the bus instead of those (a device worker's proxy); extra:
    more devices (the vTPM's proxy)."""
    replace = replace or {}
    bus = Bus("vtl0")
    bus.add(Uart16550("COM1", COM1_PORT, sink=console_sink, native=False))
    for name, make in WORKER_DEVICES.items():
        bus.add(replace.get(name) or make())
    bus.add(PowerOff(vp_count, on_power_off))
    for device in extra:
        bus.add(device)
    return bus


# The devices that can run in a device worker (devices/device_worker.py): plain state, no calls
# back into the VM (COM1 feeds the console, power-off stops the VM: those stay in the VM worker).
WORKER_DEVICES = {"test_port": TestPort, "mmio_test": MmioTestRange, "loop_port": LoopPort}


class TestDevices:
    """The VTL0 test guest's devices on their bus (vtl0_bus), and what the guest did with them.
    vp_count: the VM's VPs, for the power-off device (None, the default: in-process VP loops
    that run single VPs)."""

    def __init__(self, vp_count: int | None = None, on_power_off=None):
        self.com1 = bytearray()
        self.bus = vtl0_bus(vp_count, console_sink=lambda name, data: self.com1.extend(data),
                            on_power_off=on_power_off)
        self._port, self._mmio = self.bus.devices["test_port"], self.bus.devices["mmio_test"]
        self.loop: LoopPort = self.bus.devices["loop_port"]
        self.power: PowerOff = self.bus.devices["power_off"]

    def finished(self, vp: int) -> bool:
        """Whether VP vp has written the power-off port (its last intercept: the VP loop's runners
        ask, sidecar/vp_loop.py)."""
        return vp in self.power.reported

    @property
    def port_writes(self) -> list[tuple[int, int]]:
        return self._port.writes

    @property
    def mmio_writes(self) -> list[tuple[int, int]]:
        """(gpa, value) of every store to the MMIO test range."""
        return [(gpa, value) for gpa, _size, value in self._mmio.writes]

    @property
    def mmio_accesses(self) -> list[tuple[str, int, int, int]]:
        return self._mmio.accesses
