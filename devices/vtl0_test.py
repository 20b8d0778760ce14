"""The VTL0 test guest's devices (boot/firmware/vtl0, defs/platform.py), on the bus the VP loop
completes VTL0's intercepts with: its console (a 16550 at COM1, handled in Python: VTL0's port
I/O reaches the host as intercepts, never the engine's port hook), the test port and the MMIO
test range. Each records what the guest did, for tests and reports.
"""
from hclsim.defs.platform import (COM1_PORT, VTL0_MMIO_BASE, VTL0_MMIO_READ_PATTERN, VTL0_MMIO_SIZE,
                                  VTL0_TEST_PORT, VTL0_TEST_PORT_VALUE, Region)
from hclsim.devices.bus import Bus
from hclsim.devices.saved_state import Field, Schema
from hclsim.devices.uart16550 import Uart16550


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


def vtl0_bus(console_sink=None) -> Bus:
    """The VP loop's bus with the VTL0 test guest's devices; console_sink(name, bytes) sees COM1."""
    bus = Bus("vtl0")
    bus.add(Uart16550("COM1", COM1_PORT, sink=console_sink, native=False))
    bus.add(TestPort())
    bus.add(MmioTestRange())
    return bus


class TestDevices:
    """The VTL0 test guest's devices on their bus (vtl0_bus), and what the guest did with them."""

    def __init__(self):
        self.com1 = bytearray()
        self.bus = vtl0_bus(console_sink=lambda name, data: self.com1.extend(data))
        self._port, self._mmio = self.bus.devices["test_port"], self.bus.devices["mmio_test"]

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
