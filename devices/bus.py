"""The device bus: devices are plain objects that declare named port (PIO) and MMIO regions and
answer reads and writes; the bus owns the map, refuses overlapping claims naming both devices,
routes accesses, and saves and restores every device through its declared schema
(devices/saved_state.py).

A device (duck-typed, see devices/uart16550.py):
    name: str; pio_regions / mmio_regions: tuple of defs.platform.Region (absolute addresses)
    pio_read(port, size) / mmio_read(gpa, size) -> int | IoError | Deferred
    pio_write(port, size, value) / mmio_write(gpa, size, value) -> None | IoError | Deferred
    saved_state: Schema; save() -> dict; restore(values: dict)
    optional native_pio() -> (handler address, state address) for the engine's native port path,
    flush() (called after every engine run: e.g. a UART's buffered output).
A result is done (a value, or None for a write), an IoError, or a Deferred that is completed later
(from another thread or process: what an out-of-process device returns); the bus waits for it.
Nothing claims an access: reads float high (all ones), writes are dropped, as on a PC bus.
"""
import threading
from collections import deque
from dataclasses import dataclass

from hclsim import HclsimError
from hclsim.defs.platform import Region

DEFER_TIMEOUT = 30.0   # seconds a deferred access may take before it counts as a device error
ERRORS_LOGGED = 20     # per device: a line each for the first 20 access errors, then a count


class BusError(HclsimError):
    pass


@dataclass(frozen=True)
class IoError:
    """A device refused the access (bad register, bad size, ...)."""
    message: str


class Deferred:
    """An access the device completes later: complete(value) or fail(message), from any thread."""

    def __init__(self):
        self._done = threading.Event()
        self._value, self._error = None, None

    def complete(self, value: int = 0) -> None:
        self._value = value
        self._done.set()

    def fail(self, message: str) -> None:
        self._error = message
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = DEFER_TIMEOUT):
        """The value, or an IoError if the device failed it or did not answer in time."""
        if not self._done.wait(timeout):
            return IoError(f"no completion within {timeout:g} s")
        return IoError(self._error) if self._error is not None else self._value


@dataclass(frozen=True)
class _Claim:
    region: Region
    device: object

    def describe(self) -> str:
        r = self.region
        return f"{self.device.name}/{r.name} {r.start:#x}-{r.end - 1:#x}"


class Bus:
    def __init__(self, name: str):
        self.name = name
        self.devices: dict[str, object] = {}
        self._claims = {"pio": [], "mmio": []}
        self.unclaimed: dict[tuple[str, int], int] = {}   # (space, address) -> accesses
        # The latest errors (device, space, address, message), their count per device, and
        # on_error(device, text): one line for each of a device's first ERRORS_LOGGED errors
        # (a guest hammering a bad register must not flood the log; the count goes on).
        self.errors: deque = deque(maxlen=256)
        self.error_counts: dict[str, int] = {}
        self.on_error = None

    # ---- the map ----------------------------------------------------------------------------
    def add(self, device):
        if device.name in self.devices:
            raise BusError(f"{self.name} bus: a device named {device.name!r} is already there")
        new = [("pio", _Claim(r, device)) for r in getattr(device, "pio_regions", ())] + \
              [("mmio", _Claim(r, device)) for r in getattr(device, "mmio_regions", ())]
        for space, claim in new:
            if claim.region.size <= 0:
                raise BusError(f"{self.name} bus: {claim.describe()} is empty")
            for other in self._claims[space] + [c for s, c in new if s == space and c is not claim]:
                if claim.region.overlaps(other.region):
                    raise BusError(f"{self.name} bus: {claim.describe()} overlaps {other.describe()}")
        for space, claim in new:
            self._claims[space].append(claim)
        self.devices[device.name] = device
        return device

    def claim(self, space: str, address: int) -> _Claim | None:
        for c in self._claims[space]:
            if c.region.start <= address < c.region.end:
                return c
        return None

    def regions(self) -> list[tuple[str, str, str, int, int]]:
        """(space, device, region, start, size) of every claim, in address order."""
        return sorted(((s, c.device.name, c.region.name, c.region.start, c.region.size)
                       for s, claims in self._claims.items() for c in claims), key=lambda r: (r[0], r[3]))

    # ---- accesses ---------------------------------------------------------------------------
    def _access(self, space: str, address: int, size: int, value: int | None) -> int:
        claim = self.claim(space, address)
        if claim is None:
            key = (space, address)
            self.unclaimed[key] = self.unclaimed.get(key, 0) + 1
            return (1 << (8 * size)) - 1 if value is None else 0
        dev = claim.device
        if value is None:
            result = (dev.pio_read if space == "pio" else dev.mmio_read)(address, size)
        else:
            result = (dev.pio_write if space == "pio" else dev.mmio_write)(address, size, value)
        if isinstance(result, Deferred):
            result = result.wait()
        if isinstance(result, IoError):
            self._error(dev.name, space, address, size, value, result.message)
            return (1 << (8 * size)) - 1 if value is None else 0
        return 0 if value is not None else int(result) & ((1 << (8 * size)) - 1)

    def _error(self, name: str, space: str, address: int, size: int, value, message: str) -> None:
        self.errors.append((name, space, address, message))
        n = self.error_counts[name] = self.error_counts.get(name, 0) + 1
        if self.on_error is not None and n <= ERRORS_LOGGED:
            what = f"{size}-byte {space} {'read' if value is None else 'write'} at {address:#x}"
            more = f" (further errors of {name} are only counted)" if n == ERRORS_LOGGED else ""
            self.on_error(name, f"device {name}: {what} failed: {message or 'I/O error'}{more}")

    def pio_read(self, port: int, size: int) -> int:
        return self._access("pio", port, size, None)

    def pio_write(self, port: int, size: int, value: int) -> None:
        self._access("pio", port, size, value & ((1 << (8 * size)) - 1))

    def mmio_read(self, gpa: int, size: int) -> int:
        return self._access("mmio", gpa, size, None)

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        self._access("mmio", gpa, size, value & ((1 << (8 * size)) - 1))

    def engine_io(self, port: int, size: int, value: int, is_in: bool) -> int:
        """The engine's slow port I/O (cpu/engine.py io_handler)."""
        if is_in:
            return self.pio_read(port, size)
        self.pio_write(port, size, value)
        return 0

    def flush(self) -> None:
        for dev in self.devices.values():
            flush = getattr(dev, "flush", None)
            if flush is not None:
                flush()

    def attach(self, engine) -> None:
        """Serve engine's port I/O: native handlers in its fast path, the rest through Python."""
        rows = []
        for c in self._claims["pio"]:
            native = getattr(c.device, "native_pio", None)
            pair = native() if native is not None else None     # None: this one runs in Python
            if pair is not None:
                rows.append((c.region.start, c.region.size, *pair))
        engine.state.set_native_pio(rows)
        engine.io_handler = self.engine_io
        engine.after_run.append(self.flush)

    # ---- saved state ------------------------------------------------------------------------
    def save(self) -> dict:
        self.flush()
        return {name: dev.saved_state.encode(dev.save()) for name, dev in self.devices.items()}

    def restore(self, blobs: dict) -> None:
        missing = set(self.devices) - set(blobs)
        if missing:
            raise BusError(f"{self.name} bus: no saved state for {', '.join(sorted(missing))}")
        for name, dev in self.devices.items():
            dev.restore(dev.saved_state.decode(blobs[name]))
