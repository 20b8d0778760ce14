"""The device bus: claims, routing, results (done, error, deferred), saved state by schema."""
import threading

import pytest

from hclsim.defs.platform import Region
from hclsim.devices.bus import Bus, BusError, Deferred, IoError
from hclsim.devices.saved_state import Field, Schema, SavedStateError
from hclsim.devices.uart16550 import Uart16550


class Scratch:
    """A plain device: one MMIO register file and one port, remembering every write."""
    saved_state = Schema("tests.scratch", (Field(1, "value", int), Field(2, "tag", bytes, b"\0")))

    def __init__(self, name="scratch", mmio=0xFED40000, port=0x500, answer=None):
        self.name = name
        self.mmio_regions = (Region("control_area", mmio, 0x1000),)
        self.pio_regions = (Region("doorbell", port, 4),)
        self.value, self.tag, self.answer = 0, b"\0", answer

    def mmio_read(self, gpa, size):
        return self.answer() if self.answer else self.value + (gpa & 0xFFF)

    def mmio_write(self, gpa, size, value):
        self.value = value

    def pio_read(self, port, size):
        return IoError("the doorbell is write-only")

    def pio_write(self, port, size, value):
        self.value = value

    def save(self):
        return {"value": self.value, "tag": self.tag}

    def restore(self, values):
        self.value, self.tag = values["value"], values["tag"]


def test_overlapping_claims_are_refused_naming_both():
    bus = Bus("vm")
    bus.add(Scratch("tpm"))
    with pytest.raises(BusError, match=r"hpet/control_area 0xfed40000-0xfed40fff overlaps tpm/control_area"):
        bus.add(Scratch("hpet", port=0x600))
    with pytest.raises(BusError, match=r"com3/registers 0x500-0x507 overlaps tpm/doorbell 0x500-0x503"):
        bus.add(Uart16550("com3", 0x500))
    with pytest.raises(BusError, match="already there"):
        bus.add(Scratch("tpm", mmio=0x1000, port=0x700))
    assert [r[1] for r in bus.regions()] == ["tpm", "tpm"]   # the refused devices left nothing behind


def test_routing_unclaimed_and_errors():
    bus = Bus("vm")
    dev = bus.add(Scratch())
    bus.mmio_write(0xFED40010, 4, 0x1234)
    assert dev.value == 0x1234 and bus.mmio_read(0xFED40008, 4) == 0x123C
    assert bus.mmio_read(0xFED40008, 1) == 0x3C              # the read is cut to its size
    assert bus.pio_read(0x503, 2) == 0xFFFF and bus.errors[-1][:2] == ("scratch", "pio")
    assert bus.pio_read(0x9999, 1) == 0xFF and bus.mmio_read(0x1000, 4) == 0xFFFFFFFF
    bus.pio_write(0x9999, 1, 1)
    assert bus.unclaimed == {("pio", 0x9999): 2, ("mmio", 0x1000): 1}


def test_access_errors_are_one_line_each_then_only_counted():
    from hclsim.devices.bus import ERRORS_LOGGED
    bus = Bus("vm")
    bus.add(Scratch())
    lines = []
    bus.on_error = lambda name, text: lines.append((name, text))
    for _ in range(ERRORS_LOGGED + 30):
        assert bus.pio_read(0x500, 4) == 0xFFFFFFFF
    assert lines[0] == ("scratch", "device scratch: 4-byte pio read at 0x500 failed: the doorbell is write-only")
    assert len(lines) == ERRORS_LOGGED and lines[-1][1].endswith("(further errors of scratch are only counted)")
    assert bus.error_counts == {"scratch": ERRORS_LOGGED + 30} and len(bus.errors) == ERRORS_LOGGED + 30


def test_a_deferred_access_completes_from_another_thread():
    pending = []

    def answer():
        d = Deferred()
        pending.append(d)
        threading.Timer(0.05, d.complete, (0xAB,)).start()   # e.g. a device worker's reply
        return d
    bus = Bus("vm")
    bus.add(Scratch(answer=answer))
    assert bus.mmio_read(0xFED40000, 1) == 0xAB and pending[0].done
    failing = Deferred()
    failing.fail("device worker crashed")
    assert isinstance(failing.wait(), IoError)
    assert isinstance(Deferred().wait(0.01), IoError)        # never answered: an error, not a hang


def test_saved_state_round_trip_through_the_schema():
    bus = Bus("vm")
    dev, uart = bus.add(Scratch()), bus.add(Uart16550("COM1", 0x3F8, native=False))
    dev.value, dev.tag = 7, b"\x01\x02"
    bus.pio_write(0x3FB, 1, 0x83)          # LCR with DLAB
    bus.pio_write(0x3F8, 1, 0x01)          # divisor low: 115200 baud
    blob = bus.save()
    assert blob["scratch"] == {"package": "tests.scratch", "fields": {"1": 7, "2": "0102"}}
    other = Bus("vm")
    dev2, uart2 = other.add(Scratch()), other.add(Uart16550("COM1", 0x3F8, native=False))
    blob["scratch"]["fields"]["99"] = "from a newer hclsim"   # unknown fields are ignored
    other.restore(blob)
    assert (dev2.value, dev2.tag) == (7, b"\x01\x02")
    assert uart2.save() == uart.save()
    del blob["scratch"]["fields"]["2"]                        # missing fields take their default
    other.restore(blob)
    assert dev2.tag == b"\0"
    with pytest.raises(SavedStateError, match="tests.scratch.value"):
        Scratch.saved_state.decode({"package": "tests.scratch", "fields": {"1": "seven"}})
    with pytest.raises(SavedStateError, match="given to tests.scratch"):
        Scratch.saved_state.decode(blob["COM1"])
    with pytest.raises(BusError, match="no saved state for scratch"):
        other.restore({"COM1": blob["COM1"]})


def test_uart_python_path_matches_the_native_ring():
    out = []
    uart = Uart16550("COM1", 0x3F8, sink=lambda name, data: out.append((name, data)), native=False)
    for ch in b"hi\n":
        uart.pio_write(0x3F8, 1, ch)
    assert out == [("COM1", b"h"), ("COM1", b"i"), ("COM1", b"\n")]
    assert uart.pio_read(0x3FD, 1) == 0x60                     # LSR: transmitter empty
