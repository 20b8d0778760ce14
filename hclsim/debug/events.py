"""What the debugger reports and what its hooks ask the engine for."""
from dataclasses import dataclass

from hclsim import HclsimError

# StopEvent.reason values.
START, STEP, BREAKPOINT, WATCHPOINT, EVENT = "start", "step", "breakpoint", "watchpoint", "event"
HANDOFF, IDLE, FAULT, INTERRUPTED, TIMEOUT = "handoff", "idle", "fault", "interrupted", "timeout"


class DebugError(HclsimError):
    """A debugger request that cannot be done: bad address, unknown symbol, VP that cannot run."""


@dataclass
class StopEvent:
    reason: str
    vp: int
    rip: int
    detail: str = ""
    watch_address: int | None = None
    watch_kind: str | None = None


@dataclass
class StopRequest:
    """The stop reason a debugger hook passes to engine.request_stop: the VP stands before an
    instruction the run would have gone on to execute."""
    reason: str                      # STEP, BREAKPOINT, WATCHPOINT, EVENT, INTERRUPTED, TIMEOUT
    detail: str = ""
    watch_address: int | None = None
    watch_kind: str | None = None
    temporary: object = None         # the `next` breakpoint that was hit, if that is what stopped
