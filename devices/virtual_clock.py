"""Virtual time for the legacy platform devices (devices/pit8254.py, devices/cmos_rtc.py): a clock
derived from the guest's progress, never from the host's clock, so two runs of the same guest see
the same times and give the same serial output and instruction counts.

    clock = VirtualClock(lambda: engine.instructions_retired)          # 1 GHz: 1 instruction = 1 ns
    clock = VirtualClock(source, hz=2_000_000_000)                     # 2 GHz: 2 instructions = 1 ns

VirtualClock(source: Callable[[], int], hz: int = DEFAULT_HZ)
    source() is a non-decreasing count of guest work units (the engine passes the instructions
    retired); hz is how many units make one virtual second (the virtual CPU's frequency).
now_ns() -> int
    source() * 10**9 // hz: virtual nanoseconds since the source's zero.
source_at(ns: int) -> int
    the first source count at which now_ns() >= ns (what a run loop stops the guest at).
units_until(ns: int) -> int
    source_at(ns) - source(), at least 0: how many units the guest may run before virtual time ns.
A device turns now_ns() into its own ticks with exact integer arithmetic (no floats), so the
same source count always gives the same device state.
"""
from collections.abc import Callable

NS_PER_SECOND = 1_000_000_000
DEFAULT_HZ = 1_000_000_000      # a 1 GHz virtual CPU: one instruction retired is one nanosecond


class VirtualClock:
    def __init__(self, source: Callable[[], int], hz: int = DEFAULT_HZ):
        if hz <= 0:
            raise ValueError(f"a virtual clock's rate must be positive, not {hz}")
        self.source, self.hz = source, int(hz)

    def now_ns(self) -> int:
        return int(self.source()) * NS_PER_SECOND // self.hz

    def source_at(self, ns: int) -> int:
        # n * NS // hz >= ns  <=>  n * NS >= ns * hz  <=>  n >= ceil(ns * hz / NS)
        return -(-int(ns) * self.hz // NS_PER_SECOND)

    def units_until(self, ns: int) -> int:
        return max(0, self.source_at(ns) - int(self.source()))

    def __repr__(self) -> str:
        return f"VirtualClock(hz={self.hz}, now_ns={self.now_ns()})"
