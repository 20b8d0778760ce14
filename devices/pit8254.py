"""The PC's Intel 8254 programmable interval timer and system control port B, as one device on a
bus (devices/bus.py), counting in virtual time (devices/virtual_clock.py): no host time anywhere.

Ports: 0x40-0x42 the counters of channels 0-2, 0x43 the control word (write only); 0x61 port B
(NMI status and control): bit 0 channel 2's gate, bit 1 speaker data, bits 2-3 the parity/IOCHK
check disables (stored), bit 4 the refresh toggle (flips every 15.085 us of virtual time), bit 5
channel 2's output, bits 6-7 (IOCHK, SERR) read 0. All 8-bit. The input clock is 1.193182 MHz.

Channel 0's OUT drives ISA IRQ 0; channels 1 (refresh) and 2 (speaker, gated by port B) have no
interrupt. Every channel has modes 0 (interrupt on terminal count), 1 (hardware one-shot: gate
triggered), 2 (rate generator), 3 (square wave), 4 (software strobe), 5 (hardware strobe); modes
6 and 7 are 2 and 3. Access lobyte, hibyte, lobyte then hibyte (a read and a write flip-flop),
binary or BCD; the counter latch command (RW = 00) and the read-back command (0xC0 | ~COUNT << 5
| ~STATUS << 4 | CNT2 CNT1 CNT0 << 1) latching count and/or status (status first). Gate: modes 0
and 4 pause while it is low; modes 2 and 3 stop with OUT high and reload on its rising edge;
modes 1 and 5 start on its rising edge. A count written while a channel counts restarts it at once
(the datasheet defers it to the end of the period in modes 2 and 3; Linux always writes the
control word first). At power-up no channel is programmed and every OUT is high (the constructor
drives IRQ 0's line high: an edge an 8259 initialization discards): nothing fires until the guest
programs channel 0, and programming it for mode 2, 3 or 4 makes no edge.

What Linux relies on: the i8253 clockevent's periodic mode (0x34: channel 0, lohi, mode 2, then
LATCH = 1193182 / HZ) and oneshot mode (0x38: mode 4, each event the delta lo then hi); its
shutdown (0x30, then 0, 0: mode 0 with 65536, so one more edge 55 ms later, as on hardware); the TSC calibration (arch/x86/kernel/tsc.c): quick_pit_calibrate and pit_calibrate_tsc set
port B's gate bit and clear speaker data, program channel 2 for mode 0 (0xB0) with 0xFFFF or
CAL_LATCH, then read the live counter's bytes from 0x42 (pit_expect_msb) or poll port B bit 5 until
the terminal count; the i8253 clocksource's latch-and-read of channel 0 (0x00, then two reads).

The run loop's side:
    Pit8254(clock: VirtualClock, irq: Callable[[bool], None] | None = None, name: str = "pit")
        irq(level) is channel 0's OUT as IRQ 0's line (e.g. lambda level: pic.set_irq(0, level)).
    update() -> None
        brings channel 0 up to clock.now_ns(): one rising edge on irq for however many terminal
        counts passed since the last update (a periodic timer that fell behind fires once, as an
        8259's edge latch would see it), then the line at OUT's present level.
    next_event_ns() -> int | None
        the virtual time of channel 0's next rising edge not yet given to irq (it may be in the
        past if update() is overdue); None if channel 0 will not fire. The run loop stops the
        guest there (clock.source_at) and calls update().
    output(channel) -> bool; counter(channel) -> int: OUT and the live count now.
Every port access updates first, so the guest never sees a stale state. The saved state holds
times relative to clock.now_ns() at save; restore re-bases them on the clock's now (restore the
instruction count first).
"""
from collections.abc import Callable

from hclsim.defs.platform import PIT_CONTROL_PORT, PIT_PORT, SYSTEM_CONTROL_PORT_B, Region
from hclsim.devices.bus import IoError
from hclsim.devices.saved_state import Field, Schema
from hclsim.devices.virtual_clock import NS_PER_SECOND, VirtualClock

PIT_HZ = 1_193_182
# The control word: SC1 SC0 RW1 RW0 M2 M1 M0 BCD
CW_SC_SHIFT, CW_RW_SHIFT, CW_MODE_SHIFT = 6, 4, 1
CW_BCD = 0x01
SC_READ_BACK = 3
RW_LATCH, RW_LSB, RW_MSB, RW_LSB_MSB = 0, 1, 2, 3
READ_BACK_NOT_COUNT = 0x20    # 0: latch the counts of the selected channels
READ_BACK_NOT_STATUS = 0x10   # 0: latch their status
READ_BACK_CHANNELS = 0x0E     # CNT2 CNT1 CNT0 in bits 3-1
STATUS_OUTPUT = 0x80
STATUS_NULL_COUNT = 0x40
# Port B
PORT_B_TIMER2_GATE = 0x01
PORT_B_SPEAKER_DATA = 0x02
PORT_B_PARITY_CHECK_DISABLE = 0x04
PORT_B_IOCHK_DISABLE = 0x08
PORT_B_WRITABLE = 0x0F
PORT_B_REFRESH = 0x10
PORT_B_TIMER2_OUT = 0x20
REFRESH_TOGGLE_NS = 15_085

CHANNEL_FIELDS = ("mode", "rw", "bcd", "count", "gate", "armed", "counting", "started", "base_ticks",
                  "start_age_ns", "frozen", "out_static", "write_hi", "write_lsb", "read_hi", "latched",
                  "latch_hi", "status_latched", "null_count", "last_ticks")
SAVED_STATE = Schema("hclsim.devices.pit8254", tuple(
    [Field(1 + 32 * ch + i, f"ch{ch}_{name}", int) for ch in range(3) for i, name in enumerate(CHANNEL_FIELDS)] +
    [Field(100, "port_b", int), Field(101, "irq_level", int)]))


def _bcd_to_int(value: int) -> int:
    return sum(((value >> (4 * i)) & 0xF) * 10 ** i for i in range(4))


def _int_to_bcd(value: int) -> int:
    return sum(((value // 10 ** i) % 10) << (4 * i) for i in range(4))


class Channel:
    """One counter. Time is in input clock ticks: elapsed(t) = base_ticks + ticks since start_ns."""

    def __init__(self, index: int):
        self.index = index
        self.mode, self.rw, self.bcd = 0, RW_LSB_MSB, 0
        self.count = 0x10000          # the initial count in ticks (0 written is 2^16, or 10^4 in BCD)
        self.gate = index != 2        # channels 0 and 1 have their gates tied high
        self.armed = False            # a count is loaded (else the counter is frozen, OUT static)
        self.counting = False         # the counting element runs now
        self.started = False          # modes 1 and 5: triggered since the count was loaded
        self.base_ticks, self.start_ns = 0, 0
        self.frozen = 0               # the counter while not armed
        self.out_static = True        # OUT while not armed (high at power-up)
        self.write_hi = self.write_lsb = self.read_hi = 0
        self.latched = self.status_latched = -1
        self.latch_hi = 0
        self.null_count = 1
        self.last_ticks = 0           # channel 0: the elapsed ticks the last update() saw

    # ---- the counting element ---------------------------------------------------------------
    def elapsed(self, now: int) -> int:
        if not self.counting:
            return self.base_ticks
        return self.base_ticks + (now - self.start_ns) * PIT_HZ // NS_PER_SECOND

    def _restart(self, now: int, counting: bool) -> None:
        self.base_ticks, self.start_ns, self.counting = 0, now, counting

    def _modulus(self) -> int:
        return 10_000 if self.bcd else 0x10000

    def counter(self, now: int) -> int:
        if not self.armed or (self.mode in (1, 5) and not self.started):
            return self.frozen
        d, n = self.elapsed(now), self.count
        if self.mode == 2:
            value = n - d % n
        elif self.mode == 3:
            value = n - (2 * d) % n
        else:
            value = n - d
        value %= self._modulus()
        return _int_to_bcd(value) if self.bcd else value

    def output(self, now: int) -> bool:
        if not self.armed:
            return self.out_static
        if self.mode in (1, 5) and not self.started:
            return True
        d, n = self.elapsed(now), self.count
        if self.mode in (0, 1):
            return d >= n
        if self.mode in (2, 3):
            if not self.gate:
                return True
            return d % n != n - 1 if self.mode == 2 else d % n < (n + 1) // 2
        return d != n                                    # modes 4 and 5: low for the tick at 0

    def edges(self, ticks: int) -> int:
        """How many rising edges of OUT the counting sequence has made by `ticks`."""
        if not self.armed or (self.mode in (1, 5) and not self.started):
            return 0
        n = self.count
        if self.mode in (2, 3):
            return ticks // n
        return int(ticks >= (n if self.mode in (0, 1) else n + 1))

    def next_edge_ticks(self, ticks: int) -> int | None:
        if not self.counting or (self.mode in (1, 5) and not self.started):
            return None
        n = self.count
        if self.mode in (2, 3):
            return (ticks // n + 1) * n
        edge = n if self.mode in (0, 1) else n + 1
        return edge if ticks < edge else None

    def ticks_to_ns(self, ticks: int) -> int:
        """The first virtual time at which elapsed() reaches ticks (counting)."""
        return self.start_ns + -(-(ticks - self.base_ticks) * NS_PER_SECOND // PIT_HZ)

    # ---- programming ------------------------------------------------------------------------
    def control(self, now: int, rw: int, mode: int, bcd: int) -> None:
        self.frozen = self.counter(now)
        self.rw, self.mode, self.bcd = rw, mode if mode < 6 else mode - 4, bcd
        self.armed = self.counting = self.started = False
        self.out_static = self.mode != 0                 # mode 0: OUT low; the others: high
        self.write_hi = self.read_hi = 0
        self.latched = self.status_latched = -1
        self.null_count = 1

    def load(self, now: int, raw: int) -> None:
        count = _bcd_to_int(raw) if self.bcd else raw
        self.count = count or self._modulus()
        self.armed, self.null_count = True, 0
        if self.mode in (1, 5):
            self.started = self.counting = False          # armed: the gate's rising edge starts it
        else:
            self._restart(now, self.gate)

    def set_gate(self, now: int, gate: bool) -> None:
        if gate == self.gate:
            return
        if self.armed and self.mode in (0, 4):           # pause and resume
            self.base_ticks, self.start_ns = self.elapsed(now), now
            self.counting = gate
        elif self.armed and self.mode in (2, 3):         # stop; the rising edge reloads
            if gate:
                self._restart(now, True)
            else:
                self.base_ticks, self.counting = self.elapsed(now), False
        elif self.armed and gate:                        # modes 1, 5: the rising edge triggers
            self.started = True
            self._restart(now, True)
        self.gate = gate

    # ---- the data port ----------------------------------------------------------------------
    def latch(self, now: int) -> None:
        if self.latched < 0:
            self.latched, self.latch_hi = self.counter(now), 0

    def status(self, now: int) -> int:
        return (STATUS_OUTPUT if self.output(now) else 0) | (STATUS_NULL_COUNT if self.null_count else 0) | \
            (self.rw << CW_RW_SHIFT) | (self.mode << CW_MODE_SHIFT) | self.bcd

    def read(self, now: int) -> int:
        if self.status_latched >= 0:
            value, self.status_latched = self.status_latched, -1
            return value
        value = self.latched if self.latched >= 0 else self.counter(now)
        if self.rw == RW_LSB:
            hi, done = False, True
        elif self.rw == RW_MSB:
            hi, done = True, True
        else:
            hi = bool(self.latch_hi if self.latched >= 0 else self.read_hi)
            done = hi
            if self.latched >= 0:
                self.latch_hi ^= 1
            else:
                self.read_hi ^= 1
        if self.latched >= 0 and done:
            self.latched = -1
        return (value >> 8) & 0xFF if hi else value & 0xFF

    def write(self, now: int, value: int) -> None:
        if self.rw == RW_LSB:
            self.load(now, value)
        elif self.rw == RW_MSB:
            self.load(now, value << 8)
        elif not self.write_hi:
            self.write_lsb, self.write_hi = value, 1
            self.null_count = 1
            if self.mode == 0 and self.armed:            # mode 0: the first byte stops the count
                self.frozen, self.armed, self.counting, self.out_static = self.counter(now), False, False, False
        else:
            self.write_hi = 0
            self.load(now, self.write_lsb | (value << 8))

    def save(self, now: int) -> dict:
        values = {name: int(getattr(self, name)) for name in CHANNEL_FIELDS if name != "start_age_ns"}
        values["start_age_ns"] = now - self.start_ns
        return values

    def restore(self, now: int, values: dict) -> None:
        for name in CHANNEL_FIELDS:
            if name != "start_age_ns":
                setattr(self, name, int(values[name]))
        self.start_ns = now - int(values["start_age_ns"])
        self.gate, self.armed, self.counting, self.started = (bool(self.gate), bool(self.armed),
                                                              bool(self.counting), bool(self.started))
        self.out_static = bool(self.out_static)
        self.count = self.count or 0x10000


class Pit8254:
    saved_state = SAVED_STATE

    def __init__(self, clock: VirtualClock, irq: Callable[[bool], None] | None = None, name: str = "pit"):
        self.name, self.clock, self.irq = name, clock, irq
        self.pio_regions = (Region("counters", PIT_PORT, 4), Region("port_b", SYSTEM_CONTROL_PORT_B, 1))
        self.channels = [Channel(i) for i in range(3)]
        self.port_b = 0
        self.irq_level = True               # channel 0's OUT at power-up: IRQ 0's line high
        if irq is not None:
            irq(True)

    # ---- channel 0 and IRQ 0 ----------------------------------------------------------------
    def _set_line(self, level: bool) -> None:
        if level != self.irq_level:
            self.irq_level = level
            if self.irq is not None:
                self.irq(level)

    def update(self) -> None:
        now = self.clock.now_ns()
        ch = self.channels[0]
        ticks = ch.elapsed(now)
        fired = ch.edges(ticks) - ch.edges(ch.last_ticks)
        ch.last_ticks = ticks
        if fired > 0:
            self._set_line(False)
            self._set_line(True)
        self._set_line(ch.output(now))

    def _reprogrammed(self, now: int) -> None:
        """Channel 0 changed: what it did so far is delivered, its edges count from here."""
        ch = self.channels[0]
        ch.last_ticks = ch.elapsed(now)
        self._set_line(ch.output(now))

    def next_event_ns(self) -> int | None:
        ch = self.channels[0]
        edge = ch.next_edge_ticks(ch.last_ticks)
        return None if edge is None else ch.ticks_to_ns(edge)

    def output(self, channel: int) -> bool:
        return self.channels[channel].output(self.clock.now_ns())

    def counter(self, channel: int) -> int:
        return self.channels[channel].counter(self.clock.now_ns())

    # ---- the bus ----------------------------------------------------------------------------
    def pio_read(self, port: int, size: int):
        if size != 1:
            return IoError(f"the 8254's ports are 8-bit, not {size}-byte")
        self.update()
        now = self.clock.now_ns()
        if port == SYSTEM_CONTROL_PORT_B:
            refresh = PORT_B_REFRESH if (now // REFRESH_TOGGLE_NS) & 1 else 0
            out2 = PORT_B_TIMER2_OUT if self.channels[2].output(now) else 0
            return (self.port_b & PORT_B_WRITABLE) | refresh | out2
        if port == PIT_CONTROL_PORT:
            return 0xFF                                  # the control word is write-only
        return self.channels[port - PIT_PORT].read(now)

    def pio_write(self, port: int, size: int, value: int):
        if size != 1:
            return IoError(f"the 8254's ports are 8-bit, not {size}-byte")
        self.update()
        now = self.clock.now_ns()
        value &= 0xFF
        if port == SYSTEM_CONTROL_PORT_B:
            self.port_b = value & PORT_B_WRITABLE
            self.channels[2].set_gate(now, bool(value & PORT_B_TIMER2_GATE))
            return None
        if port == PIT_CONTROL_PORT:
            self._control(now, value)
        else:
            self.channels[port - PIT_PORT].write(now, value)
            if port == PIT_PORT:
                self._reprogrammed(now)
        return None

    def _control(self, now: int, value: int) -> None:
        sc, rw = value >> CW_SC_SHIFT, (value >> CW_RW_SHIFT) & 3
        if sc == SC_READ_BACK:
            for ch in self.channels:
                if not value & (1 << (ch.index + 1)):
                    continue
                if not value & READ_BACK_NOT_COUNT:
                    ch.latch(now)
                if not value & READ_BACK_NOT_STATUS and ch.status_latched < 0:
                    ch.status_latched = ch.status(now)
            return
        ch = self.channels[sc]
        if rw == RW_LATCH:
            ch.latch(now)
            return
        ch.control(now, rw, (value >> CW_MODE_SHIFT) & 7, value & CW_BCD)
        if sc == 0:
            self._reprogrammed(now)

    # ---- saved state ------------------------------------------------------------------------
    def save(self) -> dict:
        now = self.clock.now_ns()
        values = {f"ch{ch.index}_{k}": v for ch in self.channels for k, v in ch.save(now).items()}
        values.update(port_b=self.port_b, irq_level=int(self.irq_level))
        return values

    def restore(self, values: dict) -> None:
        now = self.clock.now_ns()
        for ch in self.channels:
            ch.restore(now, {k: values[f"ch{ch.index}_{k}"] for k in CHANNEL_FIELDS})
        self.port_b = values["port_b"] & PORT_B_WRITABLE
        self.irq_level = bool(values["irq_level"])
