"""The legacy PC devices (8259A PICs, 8254 PIT and port B, MC146818 CMOS RTC, the 16550's
interrupts), programmed the way Linux's drivers program them, on a bus, in virtual time: the clock
is a plain instruction counter the test advances (the engine's instructions retired)."""
import calendar

import numpy as np

from hclsim.devices import uart16550 as uart_mod
from hclsim.devices import uart16550_native
from hclsim.devices.bus import Bus
from hclsim.devices.cmos_rtc import RTC_DEFAULT_EPOCH, CmosRtc
from hclsim.devices.pic8259 import Pic8259
from hclsim.devices.pit8254 import PIT_HZ, Pit8254
from hclsim.devices.uart16550 import Uart16550
from hclsim.devices.virtual_clock import VirtualClock

NS = 1_000_000_000
HZ = 250                                       # Debian's CONFIG_HZ
PIT_LATCH = (PIT_HZ + HZ // 2) // HZ           # the i8253 clockevent's periodic count


class Instructions:
    """The engine's instructions-retired counter: what the virtual clock is derived from."""

    def __init__(self):
        self.retired = 0

    def run(self, n: int) -> None:
        self.retired += n


class Platform:
    """A bus with the PICs, the PIT, the RTC and COM1 wired as on a PC (IRQ 0, 8, 4)."""

    def __init__(self, epoch: int = RTC_DEFAULT_EPOCH):
        self.cpu = Instructions()
        self.clock = VirtualClock(lambda: self.cpu.retired)
        self.bus = Bus("legacy")
        self.out = bytearray()
        self.pic = self.bus.add(Pic8259())
        self.pit = self.bus.add(Pit8254(self.clock, irq=lambda level: self.pic.set_irq(0, level)))
        self.rtc = self.bus.add(CmosRtc(self.clock, epoch, irq=lambda level: self.pic.set_irq(8, level)))
        self.uart = self.bus.add(Uart16550("COM1", 0x3F8, sink=lambda name, data: self.out.extend(data),
                                           native=False, irq=lambda level: self.pic.set_irq(4, level)))

    def outb(self, port: int, value: int) -> None:
        self.bus.pio_write(port, 1, value)

    def inb(self, port: int) -> int:
        return self.bus.pio_read(port, 1)

    def run_to(self, ns: int) -> None:
        """Run the guest until virtual time ns, as the run loop stops it at a device's event."""
        self.cpu.run(self.clock.units_until(ns))
        self.pit.update()
        self.rtc.update()

    def cmos_read(self, reg: int) -> int:
        self.outb(0x70, reg)
        return self.inb(0x71)

    def cmos_write(self, reg: int, value: int) -> None:
        self.outb(0x70, reg)
        self.outb(0x71, value)

    def pic_isr(self, cmd: int) -> int:
        self.outb(cmd, 0x0B)
        value = self.inb(cmd)
        self.outb(cmd, 0x0A)
        return value

    def init_8259a(self, auto_eoi: bool = False) -> None:
        """arch/x86/kernel/i8259.c: probe_8259A, then init_8259A, then the cached masks back."""
        self.outb(0xA1, 0xFF)
        self.outb(0x21, 0xFB)
        assert self.inb(0x21) == 0xFB                # else Linux uses the NULL legacy PIC
        self.outb(0x21, 0xFF)
        self.outb(0xA1, 0xFF)
        for cmd, data, base, icw3 in ((0x20, 0x21, 0x30, 0x04), (0xA0, 0xA1, 0x38, 0x02)):
            self.outb(cmd, 0x11)                       # ICW1: edge, cascade, ICW4
            self.outb(data, base)                      # ICW2: ISA_IRQ_VECTOR(0) / (8)
            self.outb(data, icw3)                      # ICW3: slave on IR2 / cascade id 2
            self.outb(data, 0x03 if auto_eoi and cmd == 0x20 else 0x01)   # ICW4: 8086 (auto-EOI)
        self.outb(0x21, 0xFB)                          # cached_master_mask: the cascade open
        self.outb(0xA1, 0xFF)

    def unmask(self, irq: int) -> None:
        port = 0x21 if irq < 8 else 0xA1
        self.outb(port, self.inb(port) & ~(1 << (irq & 7)))

    def mask_and_ack(self, irq: int) -> None:
        """mask_and_ack_8259A: the line masked, then specific EOIs (the slave's, then IR2's)."""
        port = 0x21 if irq < 8 else 0xA1
        self.inb(port)
        self.outb(port, self.inb(port) | (1 << (irq & 7)))
        if irq >= 8:
            self.outb(0xA0, 0x60 + (irq & 7))
            self.outb(0x20, 0x62)
        else:
            self.outb(0x20, 0x60 + irq)


# ---- 8259A ---------------------------------------------------------------------------------
def test_pic_init_8259a_and_the_cascade_like_linux():
    p = Platform()
    p.init_8259a()
    assert (p.inb(0x21), p.inb(0xA1)) == (0xFB, 0xFF)
    assert p.inb(0x20) == 0x00                        # the PIT's power-up edge was discarded
    p.pic.raise_irq(1)
    assert not p.pic.has_interrupt()                  # latched in IRR, masked
    assert p.inb(0x20) == 0x02                        # OCW3 left IRR selected
    p.unmask(1)
    assert p.pic.has_interrupt() and p.pic.pending_vector() == 0x31
    assert p.pic.acknowledge() == 0x31 and not p.pic.has_interrupt()
    assert p.pic_isr(0x20) == 0x02 and p.inb(0x20) == 0x00   # IRR -> ISR
    p.mask_and_ack(1)
    assert p.pic_isr(0x20) == 0x00
    p.unmask(1)
    assert not p.pic.has_interrupt()                  # the line stayed high: no new edge
    p.pic.lower_irq(1)
    p.pic.raise_irq(1)
    assert p.pic.acknowledge() == 0x31
    p.mask_and_ack(1)
    # IRQ 8 (the RTC) through the slave and the master's IR2
    p.unmask(8)
    p.pic.raise_irq(8)
    assert p.pic.has_interrupt() and p.pic.acknowledge() == 0x38
    assert (p.pic_isr(0x20), p.pic_isr(0xA0)) == (0x04, 0x01)
    p.mask_and_ack(8)
    assert (p.pic_isr(0x20), p.pic_isr(0xA0)) == (0x00, 0x00) and not p.pic.has_interrupt()


def test_pic_fixed_priority_nesting_and_non_specific_eoi():
    p = Platform()
    p.init_8259a()
    p.outb(0x21, 0x00)
    p.pic.raise_irq(3)
    assert p.pic.acknowledge() == 0x33
    p.pic.raise_irq(5)
    assert not p.pic.has_interrupt()                  # below IR3 in service
    p.pic.raise_irq(1)
    assert p.pic.acknowledge() == 0x31                # above it: nests
    assert p.pic_isr(0x20) == 0x0A
    p.outb(0x20, 0x20)                                # non-specific EOI: the highest, IR1
    assert p.pic_isr(0x20) == 0x08 and not p.pic.has_interrupt()
    p.outb(0x20, 0x20)
    assert p.pic.acknowledge() == 0x35


def test_pic_edge_level_vanishing_requests_and_the_elcr():
    p = Platform()
    p.init_8259a()
    p.outb(0x21, 0x00)
    p.outb(0xA1, 0x00)
    p.pic.raise_irq(4)
    p.pic.lower_irq(4)                                # gone before INTA: no request left
    assert p.inb(0x20) == 0x00 and not p.pic.has_interrupt()
    p.outb(0x4D0, 0xFF)
    p.outb(0x4D1, 0xFF)
    assert (p.inb(0x4D0), p.inb(0x4D1)) == (0xF8, 0xDE)      # IRQ 0-2, 8, 13 stay edge
    assert p.bus.pio_read(0x4D0, 2) == 0xDEF8
    p.bus.pio_write(0x4D0, 2, 0x0800)                 # IRQ 11 level-triggered only
    p.pic.raise_irq(11)
    for _ in range(2):                                # a level request comes back after each EOI
        assert p.pic.acknowledge() == 0x3B
        assert not p.pic.has_interrupt()
        p.outb(0xA0, 0x63)
        p.outb(0x20, 0x62)
    p.pic.lower_irq(11)
    assert not p.pic.has_interrupt()


def test_pic_spurious_irq7_when_the_request_vanished_before_inta():
    p = Platform()
    p.init_8259a()
    p.outb(0x21, 0x00)
    p.outb(0xA1, 0x00)
    for line in (4, 10):
        p.pic.raise_irq(line)
        assert p.pic.has_interrupt()                 # INTR seen...
        p.pic.lower_irq(line)                        # ...the device drops it before INTA
        assert p.pic.acknowledge() == 0x37           # IR7's vector, nothing in service
        assert p.pic_isr(0x20) == 0x00 and p.pic_isr(0xA0) == 0x00


def test_pic_auto_eoi_rotation_poll_and_special_mask():
    p = Platform()
    p.init_8259a(auto_eoi=True)
    p.outb(0x21, 0x00)
    p.pic.raise_irq(1)
    assert p.pic.acknowledge() == 0x31 and p.pic_isr(0x20) == 0x00   # auto-EOI: never in service
    p.pic.raise_irq(3)
    assert p.pic.acknowledge() == 0x33
    p.pic.lower_irq(1)
    p.pic.lower_irq(3)
    p.init_8259a()
    p.outb(0x21, 0x00)
    p.outb(0x20, 0xC3)                                # set priority: IR3 lowest, IR4 highest
    p.pic.raise_irq(1)
    p.pic.raise_irq(5)
    assert p.pic.acknowledge() == 0x35
    p.outb(0x20, 0xA0)                                # rotate on non-specific EOI: IR5 lowest now
    assert p.pic.acknowledge() == 0x31
    p.outb(0x20, 0xE1)                                # rotate on specific EOI of IR1
    p.outb(0x20, 0xC7)                                # back to IR0 highest
    p.outb(0x20, 0x40)                                # OCW2 no-op
    p.outb(0x20, 0x0C)                                # OCW3 poll
    assert p.inb(0x20) == 0x00                        # nothing requested
    p.pic.raise_irq(6)
    p.outb(0x20, 0x0C)
    assert p.inb(0x20) == 0x86 and p.pic_isr(0x20) == 0x40    # the poll acknowledged IR6
    p.pic.raise_irq(7)
    assert not p.pic.has_interrupt()                  # below IR6 in service
    p.outb(0x21, 0x40)                                # mask IR6, then special mask mode
    p.outb(0x20, 0x68)
    assert p.pic.acknowledge() == 0x37
    p.outb(0x20, 0x48)                                # special mask mode off
    p.outb(0x20, 0x20)
    p.outb(0x20, 0x20)
    assert p.pic_isr(0x20) == 0x00


def test_pic_saved_state_round_trip():
    p = Platform()
    p.init_8259a()
    p.outb(0x21, 0x00)
    p.outb(0xA1, 0x00)
    p.pic.raise_irq(1)
    p.pic.raise_irq(9)
    assert p.pic.acknowledge() == 0x31
    blob = p.pic.saved_state.encode(p.pic.save())
    other = Pic8259()
    seen = []
    other.intr = seen.append
    other.restore(other.saved_state.decode(blob))
    assert other.save() == p.pic.save() and seen == []   # INTR low: IR2 is below IR1 in service
    for pic in (p.pic, other):
        pic.pio_write(0x20, 1, 0x20)
        assert pic.acknowledge() == 0x39
    assert seen == [True, False]


# ---- 8254 and port B -----------------------------------------------------------------------
def _ns_of_ticks(ticks: int) -> int:
    return -(-ticks * NS // PIT_HZ)


def test_pit_periodic_mode2_like_the_i8253_clockevent():
    p = Platform()
    p.init_8259a()
    p.unmask(0)
    p.cpu.run(1000)
    p.outb(0x43, 0x34)                                # pit_set_periodic
    p.outb(0x40, PIT_LATCH & 0xFF)
    p.outb(0x40, PIT_LATCH >> 8)
    assert PIT_LATCH == 4773 and not p.pic.has_interrupt()   # programming mode 2 makes no edge
    first = p.pit.next_event_ns()
    assert first == 1000 + _ns_of_ticks(PIT_LATCH)
    p.run_to(first - 1)
    assert not p.pic.has_interrupt()
    p.run_to(first)
    assert p.pic.acknowledge() == 0x30
    p.mask_and_ack(0)
    p.unmask(0)
    assert p.pit.next_event_ns() == 1000 + _ns_of_ticks(2 * PIT_LATCH)
    p.outb(0x43, 0x00)                                # the clocksource's latch and read
    p.cpu.run(5000)
    count = p.inb(0x40) | (p.inb(0x40) << 8)
    assert count == PIT_LATCH - ((p.clock.now_ns() - 5000 - 1000) * PIT_HZ // NS) % PIT_LATCH
    p.cpu.run(10 * 4_000_000)                          # ten periods behind: one interrupt
    p.pit.update()
    assert p.pic.acknowledge() == 0x30 and not p.pic.has_interrupt()
    p.mask_and_ack(0)
    p.unmask(0)
    assert not p.pic.has_interrupt()
    assert p.clock.now_ns() < p.pit.next_event_ns() <= p.clock.now_ns() + 4_000_228


def test_pit_oneshot_mode4_and_mode0_terminal_count():
    p = Platform()
    p.init_8259a()
    p.unmask(0)
    p.outb(0x43, 0x38)                                # pit_set_oneshot: mode 4
    delta = 1193
    p.outb(0x40, delta & 0xFF)                        # pit_next_event
    p.outb(0x40, delta >> 8)
    event = p.pit.next_event_ns()
    assert event == _ns_of_ticks(delta + 1)          # the strobe's rising edge
    p.run_to(event - 1)
    assert not p.pic.has_interrupt()
    p.run_to(event)
    assert p.pic.acknowledge() == 0x30 and p.pit.next_event_ns() is None
    p.mask_and_ack(0)
    p.unmask(0)
    p.outb(0x40, 100)
    p.outb(0x40, 0)
    assert p.pit.next_event_ns() == event + _ns_of_ticks(101)
    p.outb(0x43, 0x30)                                # pit_shutdown: mode 0, OUT low
    assert not p.pit.output(0) and p.pit.next_event_ns() is None
    p.run_to(event + NS)
    assert not p.pic.has_interrupt()                  # no count: nothing fires
    p.outb(0x40, 0x10)
    p.outb(0x40, 0x00)                                # mode 0, 16 ticks
    start = p.clock.now_ns()
    assert p.pit.next_event_ns() == start + _ns_of_ticks(16)
    p.run_to(start + _ns_of_ticks(16))
    assert p.pit.output(0) and p.pic.acknowledge() == 0x30
    p.run_to(start + NS)
    assert p.pit.next_event_ns() is None and p.pit.output(0)   # OUT stays high after terminal count
    assert p.pit.counter(0) == (16 - PIT_HZ) % 0x10000                 # and counts on, wrapping


def test_pit_tsc_calibration_on_channel2_through_port_b():
    """tsc.c: pit_calibrate_tsc polls port B bit 5; quick_pit_calibrate reads the MSB live."""
    p = Platform()
    p.init_8259a()
    p.unmask(0)
    p.outb(0x61, (p.inb(0x61) & ~0x02) | 0x01)        # gate high, speaker off
    latch, loops = PIT_HZ // 100, 0                   # CAL_LATCH: 10 ms
    p.outb(0x43, 0xB0)
    p.outb(0x42, latch & 0xFF)
    p.outb(0x42, latch >> 8)
    t1 = p.clock.now_ns()
    while (p.inb(0x61) & 0x20) == 0:
        p.cpu.run(997)                                # one turn of the loop (get_cycles and all)
        loops += 1
    elapsed = p.clock.now_ns() - t1
    assert loops >= 1000                              # CAL_PIT_LOOPS: else "SMI" and a retry
    assert 0 <= elapsed - latch * NS // PIT_HZ < 997
    assert p.inb(0x61) & 0x20 and not p.pic.has_interrupt()  # channel 2 has no IRQ
    # quick_pit_calibrate: 0xFFFF, then pit_expect_msb(0xff - i): the MSB drops every 256 ticks
    p.outb(0x43, 0xB0)
    p.outb(0x42, 0xFF)
    p.outb(0x42, 0xFF)
    start = p.clock.now_ns()

    def verify_msb(value: int) -> bool:
        p.inb(0x42)
        return p.inb(0x42) == value
    changes = []
    for i in range(8):
        count = 0
        while count < 50000 and verify_msb(0xFF - i):
            p.cpu.run(100)
            count += 1
        assert count > 5
        changes.append(p.clock.now_ns() - start)
    steps = [b - a for a, b in zip(changes, changes[1:])]
    assert all(abs(s - 256 * NS // PIT_HZ) <= 100 for s in steps)
    p.outb(0x61, p.inb(0x61) & ~0x01)                 # gate low: mode 0 pauses
    frozen = p.pit.counter(2)
    p.cpu.run(NS // 10)
    assert p.pit.counter(2) == frozen


def test_pit_latch_read_back_status_square_wave_and_refresh():
    p = Platform()
    p.outb(0x61, 0x01)
    p.outb(0x43, 0xB6)                                # channel 2, lohi, mode 3 (the speaker)
    assert p.pit.channels[2].status(0) & 0x40         # null count until the count is written
    p.outb(0x42, 1000 & 0xFF)
    p.outb(0x42, 1000 >> 8)
    p.cpu.run(_ns_of_ticks(100))
    assert p.inb(0x61) & 0x20                         # first half of the period: high
    p.outb(0x43, 0x80)                                # counter latch, channel 2
    latched = p.pit.counter(2)
    assert latched == 1000 - 200
    p.cpu.run(_ns_of_ticks(500))
    assert p.inb(0x42) | (p.inb(0x42) << 8) == latched
    assert not p.inb(0x61) & 0x20                     # second half: low
    p.outb(0x43, 0xC8)                                # read-back: count and status of channel 2
    assert p.inb(0x42) == 0x36                        # OUT low, lohi, mode 3, binary
    assert p.inb(0x42) | (p.inb(0x42) << 8) == 1000 - (2 * 600) % 1000
    p.outb(0x43, 0xE8)                                # read-back: status only
    assert p.inb(0x42) == 0x36 and p.inb(0x42) | (p.inb(0x42) << 8) == p.pit.counter(2)
    p.outb(0x61, 0x00)                                # gate low: mode 3 stops with OUT high
    assert p.inb(0x61) & 0x21 == 0x20
    p.outb(0x43, 0x94)                                # channel 2, lobyte only, mode 2
    p.outb(0x42, 50)
    assert p.pit.counter(2) == 50                     # gate still low: not counting
    p.outb(0x61, 0x01)
    p.cpu.run(_ns_of_ticks(49))
    assert not p.pit.output(2)                        # count 1: the rate generator's low tick
    p.cpu.run(_ns_of_ticks(1))
    assert p.pit.output(2) and p.pit.counter(2) == 50
    p.outb(0x43, 0xB1)                                # BCD: 1000 counts as 0x1000
    p.outb(0x42, 0x00)
    p.outb(0x42, 0x10)
    p.cpu.run(_ns_of_ticks(10))
    assert p.pit.counter(2) == 0x0990
    toggles = set()
    for _ in range(6):
        toggles.add(p.inb(0x61) & 0x10)
        p.cpu.run(15_085)
    assert toggles == {0x00, 0x10}                    # the refresh bit flips every 15.085 us


def test_pit_saved_state_round_trip():
    p = Platform()
    p.outb(0x43, 0x34)
    p.outb(0x40, PIT_LATCH & 0xFF)
    p.outb(0x40, PIT_LATCH >> 8)
    p.outb(0x61, 0x03)
    p.cpu.run(1_234_567)
    p.outb(0x43, 0x00)
    assert p.inb(0x40) is not None                    # the latch half read
    blob = p.pit.saved_state.encode(p.pit.save())
    other = Pit8254(p.clock)
    other.restore(other.saved_state.decode(blob))
    assert other.save() == p.pit.save() and other.next_event_ns() == p.pit.next_event_ns()
    assert other.pio_read(0x40, 1) == p.inb(0x40) and other.pio_read(0x61, 1) == p.inb(0x61)


# ---- MC146818 ------------------------------------------------------------------------------
def _bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


def mc146818_get_time(p: Platform) -> int:
    """drivers/rtc/rtc-mc146818-lib.c as mach_get_cmos_time runs it; the seconds since 1970."""
    for _ in range(100):
        seconds = p.cmos_read(0x00)
        if p.cmos_read(0x0A) & 0x80:
            p.cpu.run(100_000)                        # udelay(100)
            continue
        if seconds != p.cmos_read(0x00):
            continue
        fields = [seconds] + [p.cmos_read(r) for r in (0x02, 0x04, 0x07, 0x08, 0x09)]
        ctrl = p.cmos_read(0x0B)
        if p.cmos_read(0x0A) & 0x80:
            p.cpu.run(100_000)
            continue
        if seconds != p.cmos_read(0x00):
            continue
        if not ctrl & 0x04:
            fields = [_bcd(f) for f in fields]
        sec, minute, hour, mday, mon, year = fields
        year += 2000 if year <= 69 else 1900
        return calendar.timegm((year, mon, mday, hour, minute, sec))
    raise AssertionError("the RTC's UIP never cleared")


def test_rtc_mach_get_cmos_time_waits_out_uip():
    p = Platform()
    assert mc146818_get_time(p) == RTC_DEFAULT_EPOCH == calendar.timegm((2026, 1, 1, 0, 0, 0))
    assert [p.cmos_read(r) for r in (0x06, 0x32, 0x0A, 0x0B, 0x0D)] == [0x05, 0x20, 0x26, 0x02, 0x80]
    p.cpu.run(3_725 * NS + NS - 100_000)              # inside the UIP window before 01:02:06
    assert p.cmos_read(0x0A) & 0x80
    before = p.clock.now_ns()
    assert mc146818_get_time(p) == RTC_DEFAULT_EPOCH + 3_726
    assert p.clock.now_ns() > before and not p.cmos_read(0x0A) & 0x80
    assert [p.cmos_read(r) for r in (0x04, 0x02, 0x00)] == [0x01, 0x02, 0x06]


def test_rtc_mc146818_set_time_binary_and_12_hour_modes():
    p = Platform()
    p.cpu.run(NS // 4)
    save_control, save_freq = p.cmos_read(0x0B), p.cmos_read(0x0A)
    p.cmos_write(0x0B, save_control | 0x80)           # SET
    p.cmos_write(0x0A, save_freq | 0x70)              # RTC_DIV_RESET2
    for reg, value in ((0x09, 0x27), (0x08, 0x02), (0x07, 0x31), (0x04, 0x23), (0x02, 0x59), (0x00, 0x58)):
        p.cmos_write(reg, value)                      # 31 February is cut to the 28th
    p.cpu.run(3 * NS)
    assert not p.cmos_read(0x0A) & 0x80               # halted: no updates, no UIP
    p.cmos_write(0x0B, save_control)
    p.cmos_write(0x0A, save_freq)
    set_at = p.clock.now_ns()
    assert p.rtc.now_unix() == calendar.timegm((2027, 2, 28, 23, 59, 58))
    p.run_to(set_at + NS // 2 - 1)
    assert p.cmos_read(0x00) == 0x58
    p.run_to(set_at + NS // 2 + NS)                    # first update 500 ms after the reset
    assert p.rtc.now_unix() == calendar.timegm((2027, 3, 1, 0, 0, 0))
    assert [p.cmos_read(r) for r in (0x07, 0x08, 0x06)] == [0x01, 0x03, 0x02]   # a Monday
    p.cpu.run(13 * 3600 * NS)                         # 13:00:00
    p.cmos_write(0x0B, 0x04)                          # binary, 12-hour
    assert [p.cmos_read(r) for r in (0x04, 0x02, 0x09, 0x32)] == [0x81, 0, 27, 20]
    p.cmos_write(0x04, 0x8B)                          # 11 PM
    assert p.rtc.now_unix() == calendar.timegm((2027, 3, 1, 23, 0, 0))
    p.cmos_write(0x32, 21)
    assert p.rtc.now_unix() == calendar.timegm((2127, 3, 1, 23, 0, 0))


def test_rtc_update_alarm_and_periodic_interrupts_on_irq8():
    p = Platform()
    p.init_8259a()
    p.unmask(8)
    p.cmos_write(0x0A, 0x26)                          # rtc-cmos probe: 1024 Hz
    p.cmos_write(0x0B, p.cmos_read(0x0B) & ~0x70)     # cmos_irq_disable
    p.cmos_read(0x0C)
    assert p.cmos_read(0x0D) & 0x40 == 0 and p.cmos_read(0x0B) & 0x02   # accessible, 24-hour
    assert p.rtc.next_event_ns() is None
    p.cmos_write(0x0B, p.cmos_read(0x0B) | 0x10)      # UIE
    assert p.rtc.next_event_ns() == NS
    p.run_to(NS - 1)
    assert not p.pic.has_interrupt()
    p.run_to(NS)
    assert p.pic.acknowledge() == 0x38
    assert p.rtc.next_event_ns() is None              # the line is up until C is read
    assert p.cmos_read(0x0C) == 0xD0 and p.cmos_read(0x0C) == 0x00   # IRQF, UF; PF runs unasked
    p.mask_and_ack(8)
    p.unmask(8)
    p.cmos_write(0x0B, 0x02 | 0x20)                   # AIE at 00:00:05
    for reg in (0x01, 0x03, 0x05):
        p.cmos_write(reg, 0x05 if reg == 0x01 else 0x00)
    for second in range(2, 6):
        p.run_to(p.rtc.next_event_ns())
        assert p.rtc.irq_level == (second == 5)
    assert p.pic.acknowledge() == 0x38
    assert p.cmos_read(0x0C) == 0xF0                  # IRQF, AF, UF (and PF)
    p.mask_and_ack(8)
    p.unmask(8)
    p.cmos_write(0x0B, 0x02 | 0x40)                   # PIE at 1024 Hz
    start = p.clock.now_ns()
    event = p.rtc.next_event_ns()
    assert 0 < event - start <= 976_563
    p.run_to(event)
    assert p.pic.acknowledge() == 0x38 and p.cmos_read(0x0C) & 0xC0 == 0xC0
    p.cmos_write(0x0B, 0x02)
    p.cpu.run(NS)
    assert p.cmos_read(0x0C) == 0x50 and not p.rtc.irq_level   # PF, UF without enables: no IRQ


def test_rtc_nvram_nmi_bit_and_memory_size():
    p = Platform()
    p.cmos_write(0x40, 0xA5)
    p.outb(0x70, 0x80 | 0x40)                          # NMI disabled, same register
    assert p.rtc.nmi_disabled and p.inb(0x71) == 0xA5 and p.inb(0x70) == 0xFF
    p.cmos_write(0x0D, 0x00)
    p.cmos_write(0x0C, 0xFF)
    assert p.cmos_read(0x0D) == 0x80 and p.cmos_read(0x0C) == 0x00   # read-only
    p.rtc.set_memory_size(3 << 30, 1 << 30)
    assert (p.cmos_read(0x15), p.cmos_read(0x16)) == (0x80, 0x02)     # 640 KiB
    assert (p.cmos_read(0x17), p.cmos_read(0x18), p.cmos_read(0x30), p.cmos_read(0x31)) == (0xFF,) * 4
    assert p.cmos_read(0x34) | (p.cmos_read(0x35) << 8) == ((3 << 30) - (16 << 20)) >> 16
    assert p.cmos_read(0x5B) | (p.cmos_read(0x5C) << 8) | (p.cmos_read(0x5D) << 16) == (1 << 30) >> 16
    assert (p.cmos_read(0x2E) << 8) | p.cmos_read(0x2F) == sum(p.cmos_read(r) for r in range(0x10, 0x2E))


def test_rtc_saved_state_round_trip():
    p = Platform()
    p.cmos_write(0x0B, 0x12)
    p.cmos_write(0x40, 0x11)
    p.cpu.run(7 * NS + 123_456)
    blob = p.rtc.saved_state.encode(p.rtc.save())
    other = CmosRtc(p.clock, epoch=0)
    other.restore(other.saved_state.decode(blob))
    assert other.save() == p.rtc.save() and other.next_event_ns() == p.rtc.next_event_ns()
    assert other.now_unix() == RTC_DEFAULT_EPOCH + 7


# ---- 16550 interrupts ----------------------------------------------------------------------
def serial8250_startup(p: Platform, base: int = 0x3F8) -> tuple[int, int]:
    """autoconfig's checks, then serial8250_do_startup's THRE test; returns (iir1, iir)."""
    p.outb(base + 1, 0)
    assert p.inb(base + 1) & 0x0F == 0
    p.outb(base + 1, 0x0F)
    assert p.inb(base + 1) & 0x0F == 0x0F
    p.outb(base + 1, 0)
    p.outb(base + 2, 0x01)
    assert p.inb(base + 2) >> 6 == 3                  # a 16550A
    p.outb(base + 2, 0x07)                            # serial8250_clear_fifos
    p.outb(base + 2, 0x00)
    for off in (5, 0, 2, 6):                          # serial8250_clear_interrupts
        p.inb(base + off)
    p.outb(base + 3, 0x03)
    p.outb(base + 4, 0x0B)                            # DTR, RTS, OUT2: port->irq is set
    p.outb(base + 1, 0x02)
    iir1 = p.inb(base + 2)
    p.outb(base + 1, 0x00)
    p.outb(base + 1, 0x02)
    iir = p.inb(base + 2)
    p.outb(base + 1, 0x00)
    return iir1, iir


def test_uart_thre_interrupts_drive_the_8250_transmitter():
    p = Platform()
    p.init_8259a()
    iir1, iir = serial8250_startup(p)
    assert iir1 & 0x0F == 0x02 and iir & 0x0F == 0x02    # reasserted: no UART_BUG_THRE
    assert not p.pic.has_interrupt()
    p.unmask(4)
    p.outb(0x3FA, 0x81)                               # FIFOs on (the termios FCR)
    text = bytes(range(32, 127)) + b"\r\n"
    pending, interrupts = bytearray(text), 0
    p.outb(0x3F9, 0x02)                               # start_tx: IER.THRI
    assert p.uart.irq_line and p.pic.has_interrupt()
    while p.pic.has_interrupt():
        assert p.pic.acknowledge() == 0x34
        interrupts += 1
        p.mask_and_ack(4)
        while not (iir := p.inb(0x3FA)) & 0x01:       # serial8250_interrupt's loop
            assert iir == 0xC2
            if p.inb(0x3FD) & 0x20 and p.inb(0x3F9) & 0x02:
                for _ in range(16):                   # serial8250_tx_chars: tx_loadsz
                    if not pending:
                        break
                    p.outb(0x3F8, pending.pop(0))
                if not pending:
                    p.outb(0x3F9, 0x00)               # __stop_tx
        p.unmask(4)
    assert bytes(p.out) == text and interrupts == 1 and not p.uart.irq_line
    p.outb(0x3FC, 0x03)                               # OUT2 off: the line is gated
    p.outb(0x3F9, 0x02)
    assert p.inb(0x3FA) == 0xC2 and not p.uart.irq_line
    p.outb(0x3FA, 0x00)
    p.outb(0x3F9, 0x0F)
    assert p.inb(0x3FA) == 0x01                       # THRE was consumed; no other source here


def test_uart_native_path_runs_the_same_interrupt_logic():
    script = [(3, 1, 0x03), (4, 1, 0x0B), (1, 1, 0x02), (2, 0, 0), (2, 0, 0), (0, 1, 65), (2, 0, 0),
              (1, 1, 0), (1, 1, 0x02), (5, 0, 0), (6, 0, 0), (2, 1, 0xC7), (2, 0, 0), (1, 1, 0)]
    results = []
    for fn, regs, out in ((uart16550_native.uart_access, uart16550_native.new_registers(), np.zeros(4, np.uint8)),
                          (uart_mod.register_access, uart_mod.new_registers(), bytearray(4))):
        n, trace = 0, []
        for off, write, value in script:
            v, n = fn(regs, out, n, 4, off, bool(write), value)
            trace.append((int(v), int(regs[uart_mod.R_LINE])))
        results.append((trace, [int(r) for r in regs]))
    assert results[0] == results[1]
    assert [t[0] for t in results[0][0]][3:5] == [0x02, 0x01]            # THRE, then consumed
    lines = []
    native = Uart16550("COM1", 0x3F8, native=True, irq=lines.append)
    for off, write, value in script[:3]:
        native.pio_write(0x3F8 + off, 1, value)
    assert lines == [True]                            # through Python: at the access
    native._access_fn(native.regs, native._ring, native.state[uart_mod.S_LEN], uart_mod.RING_CAPACITY,
                      2, False, 0)                    # as the native handler would: no Python
    assert lines == [True]
    native.flush()
    assert lines == [True, False]                     # reported after the engine run
    blob = native.saved_state.encode(native.save())
    pure = Uart16550("COM1", 0x3F8, native=False)
    pure.restore(pure.saved_state.decode(blob))
    assert pure.save() == native.save()


# ---- determinism ---------------------------------------------------------------------------
def _boot_like_sequence() -> tuple:
    """The devices as a guest's boot uses them, the run loop stopping at their events."""
    p = Platform()
    p.init_8259a()
    for irq in (0, 4, 8):
        p.unmask(irq)
    serial8250_startup(p)
    p.outb(0x43, 0x34)
    p.outb(0x40, PIT_LATCH & 0xFF)
    p.outb(0x40, PIT_LATCH >> 8)
    p.cmos_write(0x0B, 0x12)                          # update interrupts
    log, message = [], bytearray(b"hello from a deterministic guest\n" * 3)
    p.outb(0x3F9, 0x02)
    while p.clock.now_ns() < 3 * NS:
        events = [e for e in (p.pit.next_event_ns(), p.rtc.next_event_ns()) if e is not None]
        p.run_to(min(events + [p.clock.now_ns() + 700_001]))
        while p.pic.has_interrupt():
            vector = p.pic.acknowledge()
            log.append((p.cpu.retired, vector))
            irq = vector - 0x30
            p.mask_and_ack(irq)
            if irq == 8:
                log.append(("rtc", p.cmos_read(0x0C), mc146818_get_time(p)))
            elif irq == 4:
                while not p.inb(0x3FA) & 0x01:
                    for _ in range(16):
                        if message:
                            p.outb(0x3F8, message.pop(0))
                    if not message:
                        p.outb(0x3F9, 0x00)
            p.unmask(irq)
            p.cpu.run(2_500)                          # the handler's own instructions
    return log, bytes(p.out), p.bus.save()


def test_the_same_sequence_twice_gives_the_same_results():
    first, second = _boot_like_sequence(), _boot_like_sequence()
    assert first == second
    log, out, _ = first
    ticks = [v for v in log if isinstance(v[0], int) and v[1] == 0x30]
    assert abs(len(ticks) - 3 * HZ) <= 1 and out == b"hello from a deterministic guest\n" * 3
    assert [v[1:] for v in log if v[0] == "rtc"] == [(0xD0, RTC_DEFAULT_EPOCH + s) for s in (1, 2, 3)]
