"""The PC's CMOS: a Motorola MC146818 real-time clock and its 128 bytes of battery-backed RAM, as a
device on a bus (devices/bus.py), keeping time in virtual time (devices/virtual_clock.py).

Ports: 0x70 the index (bits 0-6 the register; bit 7 disables NMI: nmi_disabled; reads 0xFF, the
port is write-only) and 0x71 the data of the indexed register. 8-bit. Registers: 0x00 seconds,
0x01 seconds alarm, 0x02 minutes, 0x03 minutes alarm, 0x04 hours, 0x05 hours alarm, 0x06 day of
week (1 = Sunday), 0x07 day of month, 0x08 month, 0x09 year, 0x32 century; 0x0A register A (UIP,
DV2-0 the divider, RS3-0 the periodic rate), 0x0B register B (SET, PIE, AIE, UIE, SQWE, DM binary,
24/12, DSE), 0x0C register C (IRQF PF AF UF; read clears), 0x0D register D (VRT: 0x80, the RAM is
valid); everything else is plain NVRAM (set_memory_size fills the sizes a BIOS leaves there).

The time is the epoch given at construction (unix seconds, 2026-01-01 00:00:00 UTC by default)
plus the virtual time: deterministic. It reads in the format register B asks (BCD or binary, 12
or 24 hours) whenever it is read; writes set the clock (a day past the month's end is cut to its
last day). The divider runs while DV is 000-010; DV 11x resets it and the first update after the
reset comes 500 ms later. SET halts the updates (and clears UIE); clearing it resumes the time
from what was written, the next update at the divider's next second. UIP reads 1 during the
244 us before every update (so a poll of it ends). At every update UF is set, and AF when the
alarm bytes match (0xC0-0xFF: don't care); PF at the periodic rate (RS: 1 and 2 are 256 and
128 Hz, 3-15 are 32768 >> (RS - 1) Hz). IRQF = PF&PIE | AF&AIE | UF&UIE drives ISA IRQ 8.

What Linux relies on: mach_get_cmos_time / mc146818_get_time (mc146818_avoid_UIP: seconds, UIP
clear, the fields, register B for DM, seconds again); mc146818_set_time (SET, the divider reset
0x70 in A, the fields, then B and A restored); rtc-cmos's probe (register D bit 6 must be 0, A
written 0x26, the interrupts disabled in B, 24-hour mode required, C read to clear); its
interrupt reading C.

The run loop's side:
    CmosRtc(clock: VirtualClock, epoch: int = RTC_DEFAULT_EPOCH,
            irq: Callable[[bool], None] | None = None, name: str = "rtc")
        irq(level) is IRQ 8's line (IRQF).
    update() -> None: flags (and the line) brought up to clock.now_ns().
    next_event_ns() -> int | None: when an enabled interrupt flag is next set (None if the line is
        already asserted: only the guest reading C can change it then).
    now_unix() -> int: the clock's time now; nmi_disabled: bool.
    set_memory_size(below_4g: int, above_4g: int = 0): the BIOS's memory size bytes.
Saved state: the RAM and times relative to clock.now_ns() (restore the instruction count first).
"""
import calendar
import datetime
from collections.abc import Callable

from hclsim.defs.platform import RTC_INDEX_PORT, Region
from hclsim.devices.bus import IoError
from hclsim.devices.saved_state import Field, Schema
from hclsim.devices.virtual_clock import NS_PER_SECOND, VirtualClock

RTC_DEFAULT_EPOCH = 1_767_225_600    # 2026-01-01 00:00:00 UTC
RTC_INDEX_MASK = 0x7F
RTC_NMI_DISABLE = 0x80
RTC_RAM_SIZE = 128
# Registers
RTC_SECONDS, RTC_SECONDS_ALARM, RTC_MINUTES, RTC_MINUTES_ALARM = 0x00, 0x01, 0x02, 0x03
RTC_HOURS, RTC_HOURS_ALARM, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH = 0x04, 0x05, 0x06, 0x07
RTC_MONTH, RTC_YEAR, RTC_REG_A, RTC_REG_B, RTC_REG_C, RTC_REG_D = 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D
RTC_CENTURY = 0x32
TIME_REGISTERS = (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR,
                  RTC_CENTURY)
# Register A
REG_A_UIP = 0x80
REG_A_DV_MASK = 0x70
REG_A_DV_32KHZ = 0x20            # DV 010: the 32.768 kHz time base; 000 and 001 also run
REG_A_RS_MASK = 0x0F
REG_A_DEFAULT = 0x26             # 32.768 kHz, 1024 Hz periodic rate
# Register B
REG_B_SET, REG_B_PIE, REG_B_AIE, REG_B_UIE = 0x80, 0x40, 0x20, 0x10
REG_B_SQWE, REG_B_DM_BINARY, REG_B_24H, REG_B_DSE = 0x08, 0x04, 0x02, 0x01
REG_B_DEFAULT = REG_B_24H
# Register C (the flags line up with register B's enables)
REG_C_IRQF, REG_C_PF, REG_C_AF, REG_C_UF = 0x80, 0x40, 0x20, 0x10
REG_C_FLAGS = REG_C_PF | REG_C_AF | REG_C_UF
# Register D
REG_D_VRT = 0x80
ALARM_DONT_CARE = 0xC0
HOURS_PM = 0x80
DIVIDER_HZ = 32_768
UIP_NS = -(-8 * NS_PER_SECOND // DIVIDER_HZ)   # 244.140625 us: UIP's lead before an update
# The memory size bytes (as BIOSes fill them) and the checksum over 0x10-0x2D.
CMOS_BASE_MEMORY_KB = 0x15       # 2 bytes
CMOS_EXTENDED_MEMORY_KB = 0x17   # 2 bytes, above 1 MiB (max 0xFFFF), again at 0x30
CMOS_EXTENDED_MEMORY_KB_2 = 0x30
CMOS_CHECKSUM = 0x2E             # 2 bytes, big-endian
CMOS_MEMORY_ABOVE_16M = 0x34     # 2 bytes, in 64 KiB units, below 4 GiB
CMOS_MEMORY_ABOVE_4G = 0x5B      # 3 bytes, in 64 KiB units

SAVED_STATE = Schema("hclsim.devices.cmos_rtc", (
    Field(1, "ram", bytes), Field(2, "index", int), Field(3, "unix", int), Field(4, "divider_phase_ns", int),
    Field(5, "flags_age_ns", int), Field(6, "irq_level", int)))

_EPOCH = datetime.datetime(1970, 1, 1)
_MIN_UNIX = int((datetime.datetime(1, 1, 1) - _EPOCH).total_seconds())
_MAX_UNIX = int((datetime.datetime(9999, 12, 31, 23, 59, 59) - _EPOCH).total_seconds())


def _fields(unix: int) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(seconds=min(max(unix, _MIN_UNIX), _MAX_UNIX))


def _unix(t: datetime.datetime) -> int:
    return int((t - _EPOCH).total_seconds())


def _periodic_ticks(rs: int) -> int:
    """The periodic interrupt's period in 32.768 kHz ticks (0: none)."""
    if rs == 0:
        return 0
    return 1 << (rs + 6) if rs < 3 else 1 << (rs - 1)


class CmosRtc:
    saved_state = SAVED_STATE

    def __init__(self, clock: VirtualClock, epoch: int = RTC_DEFAULT_EPOCH,
                 irq: Callable[[bool], None] | None = None, name: str = "rtc"):
        self.name, self.clock, self.irq = name, clock, irq
        self.pio_regions = (Region("index_data", RTC_INDEX_PORT, 2),)
        self.ram = bytearray(RTC_RAM_SIZE)
        self.ram[RTC_REG_A], self.ram[RTC_REG_B], self.ram[RTC_REG_D] = REG_A_DEFAULT, REG_B_DEFAULT, REG_D_VRT
        self.index = 0
        now = clock.now_ns()
        self.div_ns = now                 # the divider's phase: updates at div_ns + k seconds
        self.offset = int(epoch)          # while the time runs: unix = offset + seconds since div_ns
        self.frozen = int(epoch)          # while it is halted (SET, divider reset)
        self.last_ns = now                # the flags are evaluated up to here
        self.irq_level = False

    # ---- the time ---------------------------------------------------------------------------
    @property
    def nmi_disabled(self) -> bool:
        return bool(self.index & RTC_NMI_DISABLE)

    def _divider_running(self) -> bool:
        return (self.ram[RTC_REG_A] & REG_A_DV_MASK) <= REG_A_DV_32KHZ

    def _time_running(self) -> bool:
        return self._divider_running() and not self.ram[RTC_REG_B] & REG_B_SET

    def _seconds(self, now: int) -> int:
        return (now - self.div_ns) // NS_PER_SECOND

    def _periods(self, now: int, ticks: int) -> int:
        return (now - self.div_ns) * DIVIDER_HZ // (NS_PER_SECOND * ticks)

    def _now_unix(self, now: int) -> int:
        return self.offset + self._seconds(now) if self._time_running() else self.frozen

    def now_unix(self) -> int:
        return self._now_unix(self.clock.now_ns())

    def _rebase(self, now: int, unix: int) -> None:
        if self._time_running():
            self.offset = unix - self._seconds(now)
        else:
            self.frozen = unix

    # ---- the flags and IRQ 8 ----------------------------------------------------------------
    def _advance(self, now: int) -> None:
        last, self.last_ns = self.last_ns, now
        if now > last and self._divider_running():
            ticks = _periodic_ticks(self.ram[RTC_REG_A] & REG_A_RS_MASK)
            if ticks and self._periods(now, ticks) > self._periods(last, ticks):
                self.ram[RTC_REG_C] |= REG_C_PF
            s0, s1 = self._seconds(last), self._seconds(now)
            if self._time_running() and s1 > s0:
                self.ram[RTC_REG_C] |= REG_C_UF
                if not self.ram[RTC_REG_C] & REG_C_AF:
                    for s in range(max(s0 + 1, s1 - 86_399), s1 + 1):   # a day holds every alarm
                        if self._alarm_matches(self.offset + s):
                            self.ram[RTC_REG_C] |= REG_C_AF
                            break
        self._sync_line()

    def _sync_line(self) -> None:
        c = self.ram[RTC_REG_C] & REG_C_FLAGS
        irqf = bool(c & self.ram[RTC_REG_B])
        self.ram[RTC_REG_C] = c | (REG_C_IRQF if irqf else 0)
        if irqf != self.irq_level:
            self.irq_level = irqf
            if self.irq is not None:
                self.irq(irqf)

    def _alarm_matches(self, unix: int) -> bool:
        t = _fields(unix)
        for reg, value in ((RTC_SECONDS_ALARM, t.second), (RTC_MINUTES_ALARM, t.minute), (RTC_HOURS_ALARM, t.hour)):
            alarm = self.ram[reg]
            if alarm & ALARM_DONT_CARE != ALARM_DONT_CARE and alarm != (self._encode_hours(value) if
                                                                      reg == RTC_HOURS_ALARM else self._encode(value)):
                return False
        return True

    def update(self) -> None:
        self._advance(self.clock.now_ns())

    def next_event_ns(self) -> int | None:
        if self.irq_level or not self._divider_running():
            return None
        b, last, events = self.ram[RTC_REG_B], self.last_ns, []
        ticks = _periodic_ticks(self.ram[RTC_REG_A] & REG_A_RS_MASK)
        if b & REG_B_PIE and ticks:
            k = self._periods(last, ticks) + 1
            events.append(self.div_ns + -(-k * ticks * NS_PER_SECOND // DIVIDER_HZ))
        if b & (REG_B_UIE | REG_B_AIE) and self._time_running():
            events.append(self.div_ns + (self._seconds(last) + 1) * NS_PER_SECOND)
        return min(events) if events else None

    # ---- the registers ----------------------------------------------------------------------
    def _binary(self) -> bool:
        return bool(self.ram[RTC_REG_B] & REG_B_DM_BINARY)

    def _encode(self, value: int) -> int:
        return value if self._binary() else ((value // 10) << 4) | (value % 10)

    def _decode(self, value: int) -> int:
        return value if self._binary() else (value >> 4) * 10 + (value & 0x0F)

    def _encode_hours(self, hour: int) -> int:
        if self.ram[RTC_REG_B] & REG_B_24H:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (HOURS_PM if hour >= 12 else 0)

    def _decode_hours(self, value: int) -> int:
        if self.ram[RTC_REG_B] & REG_B_24H:
            return self._decode(value)
        return self._decode(value & ~HOURS_PM) % 12 + (12 if value & HOURS_PM else 0)

    def _read_time(self, now: int, reg: int) -> int:
        t = _fields(self._now_unix(now))
        if reg == RTC_HOURS:
            return self._encode_hours(t.hour)
        value = {RTC_SECONDS: t.second, RTC_MINUTES: t.minute, RTC_DAY_OF_WEEK: t.isoweekday() % 7 + 1,
                 RTC_DAY_OF_MONTH: t.day, RTC_MONTH: t.month, RTC_YEAR: t.year % 100,
                 RTC_CENTURY: t.year // 100}[reg]
        return self._encode(value)

    def _write_time(self, now: int, reg: int, value: int) -> None:
        if reg == RTC_DAY_OF_WEEK:
            return                                        # derived from the date
        t = _fields(self._now_unix(now))
        f = {"year": t.year, "month": t.month, "day": t.day, "hour": t.hour, "minute": t.minute, "second": t.second}
        v = self._decode_hours(value) if reg == RTC_HOURS else self._decode(value)
        if reg == RTC_SECONDS:
            f["second"] = min(v, 59)
        elif reg == RTC_MINUTES:
            f["minute"] = min(v, 59)
        elif reg == RTC_HOURS:
            f["hour"] = min(v, 23)
        elif reg == RTC_DAY_OF_MONTH:
            f["day"] = max(v, 1)
        elif reg == RTC_MONTH:
            f["month"] = min(max(v, 1), 12)
        elif reg == RTC_YEAR:
            f["year"] = (t.year // 100) * 100 + v % 100
        else:
            f["year"] = (v % 100) * 100 + t.year % 100
        f["year"] = max(f["year"], 1)
        f["day"] = min(f["day"], calendar.monthrange(f["year"], f["month"])[1])
        self._rebase(now, _unix(datetime.datetime(**f)))

    def _write_control(self, now: int, reg: int, value: int) -> None:
        unix, divider_was = self._now_unix(now), self._divider_running()
        if reg == RTC_REG_A:
            self.ram[RTC_REG_A] = value & ~REG_A_UIP
        else:
            if value & REG_B_SET:
                value &= ~REG_B_UIE
            self.ram[RTC_REG_B] = value
        if self._divider_running() and not divider_was:
            self.div_ns = now - NS_PER_SECOND // 2        # the first update 500 ms after the reset
            self.last_ns = now
        self._rebase(now, unix)

    def _read(self, now: int, reg: int) -> int:
        if reg in TIME_REGISTERS:
            return self._read_time(now, reg)
        if reg == RTC_REG_A:
            a = self.ram[RTC_REG_A]
            if self._time_running() and (now - self.div_ns) % NS_PER_SECOND >= NS_PER_SECOND - UIP_NS:
                a |= REG_A_UIP
            return a
        if reg == RTC_REG_C:
            value = self.ram[RTC_REG_C]
            self.ram[RTC_REG_C] = 0
            self._sync_line()
            return value
        if reg == RTC_REG_D:
            return REG_D_VRT
        return self.ram[reg]

    def _write(self, now: int, reg: int, value: int) -> None:
        if reg in TIME_REGISTERS:
            self._write_time(now, reg, value)
        elif reg in (RTC_REG_A, RTC_REG_B):
            self._write_control(now, reg, value)
            self._sync_line()
        elif reg not in (RTC_REG_C, RTC_REG_D):            # C and D are read-only
            self.ram[reg] = value

    def pio_read(self, port: int, size: int):
        if size != 1:
            return IoError(f"the CMOS ports are 8-bit, not {size}-byte")
        if port == RTC_INDEX_PORT:
            return 0xFF
        now = self.clock.now_ns()
        self._advance(now)
        return self._read(now, self.index & RTC_INDEX_MASK)

    def pio_write(self, port: int, size: int, value: int):
        if size != 1:
            return IoError(f"the CMOS ports are 8-bit, not {size}-byte")
        value &= 0xFF
        if port == RTC_INDEX_PORT:
            self.index = value
            return None
        now = self.clock.now_ns()
        self._advance(now)
        self._write(now, self.index & RTC_INDEX_MASK, value)
        return None

    # ---- the BIOS's bytes -------------------------------------------------------------------
    def set_memory_size(self, below_4g: int, above_4g: int = 0) -> None:
        """The memory sizes a PC BIOS leaves in the NVRAM, and the checksum over 0x10-0x2D."""
        kib, mib = 1024, 1024 * 1024

        def put(reg: int, value: int, size: int = 2) -> None:
            for i in range(size):
                self.ram[reg + i] = (value >> (8 * i)) & 0xFF
        put(CMOS_BASE_MEMORY_KB, 640)
        extended = min(max(below_4g - mib, 0) // kib, 0xFFFF)
        put(CMOS_EXTENDED_MEMORY_KB, extended)
        put(CMOS_EXTENDED_MEMORY_KB_2, extended)
        put(CMOS_MEMORY_ABOVE_16M, min(max(below_4g - 16 * mib, 0) // (64 * kib), 0xFFFF))
        put(CMOS_MEMORY_ABOVE_4G, min(above_4g // (64 * kib), 0xFFFFFF), 3)
        checksum = sum(self.ram[0x10:CMOS_CHECKSUM]) & 0xFFFF
        self.ram[CMOS_CHECKSUM], self.ram[CMOS_CHECKSUM + 1] = checksum >> 8, checksum & 0xFF

    # ---- saved state ------------------------------------------------------------------------
    def save(self) -> dict:
        now = self.clock.now_ns()
        return {"ram": bytes(self.ram), "index": self.index, "unix": self._now_unix(now),
                "divider_phase_ns": now - self.div_ns, "flags_age_ns": now - self.last_ns,
                "irq_level": int(self.irq_level)}

    def restore(self, values: dict) -> None:
        now = self.clock.now_ns()
        ram = values["ram"][:RTC_RAM_SIZE]
        self.ram = bytearray(ram) + bytearray(RTC_RAM_SIZE - len(ram))
        self.index = values["index"] & 0xFF
        self.div_ns, self.last_ns = now - values["divider_phase_ns"], now - values["flags_age_ns"]
        self.offset = self.frozen = values["unix"]
        self._rebase(now, values["unix"])
        self.irq_level = bool(values["irq_level"])
