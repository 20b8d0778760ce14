"""16550 UART: the register model the boot shim (COM3) and the VTL0 guest (COM1) talk to, as a
device on a bus (devices/bus.py).

The register logic is one pure-Python function over a register file (register_access: any
indexable of ints, a list here, an int64 array in the native path). This module imports neither
numpy nor numba, so a light process (the VM worker) can have a UART: `Uart16550(native=False)`
runs register_access in Python. The default native device (the host's bus) keeps its state in
an int64 buffer that an @cfunc port handler (the engine's port hook calls it: no GIL, no Python)
runs the same function over, compiled by numba's njit: devices/uart16550_native.py, imported only
then. Output bytes collect in a ring; flush() (after every engine run) and a full ring pass them
to the sink. There is no input: RBR reads 0 and LSR never reports data ready.
"""
from hclsim.defs.platform import UART_PORT_COUNT, Region
from hclsim.devices.saved_state import Field, Schema

# Register file slots (int64 each) of one UART.
R_IER, R_IIR, R_LCR, R_MCR, R_LSR, R_MSR, R_SCR, R_DLL, R_DLM, R_FCR = range(1, 11)
UART_REGS = 16

LCR_DLAB = 0x80
LSR_THRE_TEMT = 0x60  # transmitter always empty: writes complete at once
MSR_IDLE = 0xB0       # DCD, DSR, CTS asserted

# The device's state (int64 slots): the register file, then the ring's length and capacity; the
# native device's buffer has the ring's bytes after them.
S_LEN, S_CAP = UART_REGS, UART_REGS + 1
STATE_HEADER = UART_REGS + 2
RING_CAPACITY = 1 << 16     # bytes; a boot shim log line costs one flush, not one Python call a byte
REGISTER_NAMES = ("ier", "iir", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr")
SAVED_STATE = Schema("hclsim.devices.uart16550", tuple(
    [Field(i + 1, name, int) for i, name in enumerate(REGISTER_NAMES)] + [Field(11, "pending", bytes)]))


def new_registers() -> list[int]:
    """A register file at reset (a list; uart16550_native.new_registers is the int64 array)."""
    regs = [0] * UART_REGS
    regs[R_LSR] = LSR_THRE_TEMT
    regs[R_MSR] = MSR_IDLE
    regs[R_IIR] = 1
    return regs


def register_access(regs, out, out_len, capacity, offset, is_write, value):
    """One access to register `offset` (0-7). Returns (read value, new out_len).

    A THR write appends to out[out_len]; the caller drains `out` when out_len reaches capacity.
    The only source of the register logic: uart16550_native.uart_access is this, under njit.
    """
    dlab = (regs[R_LCR] & LCR_DLAB) != 0
    if is_write:
        value &= 0xFF
        if offset == 0:
            if dlab:
                regs[R_DLL] = value
            elif out_len < capacity:
                out[out_len] = value
                out_len += 1
        elif offset == 1:
            if dlab:
                regs[R_DLM] = value
            else:
                regs[R_IER] = value & 0x0F
        elif offset == 2:
            regs[R_FCR] = value
        elif offset == 3:
            regs[R_LCR] = value
        elif offset == 4:
            regs[R_MCR] = value & 0x1F
        elif offset == 7:
            regs[R_SCR] = value
        return 0, out_len
    if offset == 0:
        return (regs[R_DLL] if dlab else 0), out_len
    if offset == 1:
        return (regs[R_DLM] if dlab else regs[R_IER]), out_len
    if offset == 2:
        return (0xC1 if (regs[R_FCR] & 1) else 0x01), out_len
    if offset == 3:
        return regs[R_LCR], out_len
    if offset == 4:
        return regs[R_MCR], out_len
    if offset == 5:
        return regs[R_LSR], out_len
    if offset == 6:
        return regs[R_MSR], out_len
    return regs[R_SCR], out_len


def baud(regs) -> int:
    divisor = int(regs[R_DLL]) | (int(regs[R_DLM]) << 8)
    return 115200 // divisor if divisor else 0


class Uart16550:
    """One 16550 at `port` (8 ports); what the guest transmits goes to sink(name, bytes).

    native=True (the default): the engine's native port handler serves it (devices/bus.py
    attach), which needs numba (uart16550_native). native=False: pure Python, every byte written
    goes to the sink at once (the VP loop's COM1)."""
    saved_state = SAVED_STATE

    def __init__(self, name: str, port: int, sink=None, native: bool = True):
        self.name, self.port, self.sink = name, port, sink
        self.pio_regions = (Region("registers", port, UART_PORT_COUNT),)
        self._native = native
        if native:
            from hclsim.devices import uart16550_native
            uart16550_native.attach(self)   # sets state, regs, _ring and _access_fn
        else:
            self.state = new_registers() + [0, RING_CAPACITY]   # S_LEN, S_CAP after the registers
            self.regs = self.state                              # register_access uses slots 1..10 only
            self._ring = bytearray(RING_CAPACITY)
            self._access_fn = register_access

    def native_pio(self):
        if not self._native:
            return None
        from hclsim.devices import uart16550_native
        return uart16550_native.native_pio.address, self.state.ctypes.data

    def _access(self, port: int, is_write: bool, value: int) -> int:
        if is_write and port == self.port and not self.regs[R_LCR] & LCR_DLAB and self.state[S_LEN] >= RING_CAPACITY:
            self.flush()
        result, n = self._access_fn(self.regs, self._ring, self.state[S_LEN], RING_CAPACITY, port - self.port,
                                    is_write, value)
        self.state[S_LEN] = n
        return int(result)

    def pio_read(self, port: int, size: int) -> int:
        return self._access(port, False, 0)

    def pio_write(self, port: int, size: int, value: int) -> None:
        self._access(port, True, value)
        if not self._native:
            self.flush()   # no engine run to wait for: the VP loop's COM1 shows each byte as it comes

    def flush(self) -> None:
        n = int(self.state[S_LEN])
        if n:
            data = bytes(self._ring[:n])
            self.state[S_LEN] = 0
            if self.sink is not None:
                self.sink(self.name, data)

    def save(self) -> dict:
        values = {name: int(self.regs[i + 1]) for i, name in enumerate(REGISTER_NAMES)}
        values["pending"] = bytes(self._ring[:int(self.state[S_LEN])])
        return values

    def restore(self, values: dict) -> None:
        for i, name in enumerate(REGISTER_NAMES):
            self.regs[i + 1] = values[name]
        pending = values["pending"][:RING_CAPACITY]
        memoryview(self._ring)[:len(pending)] = pending
        self.state[S_LEN] = len(pending)


def __getattr__(name: str):
    """The numba names this module had (uart_access, native_pio) now live in uart16550_native:
    importing them from here still works, and loads numba then."""
    if name in ("uart_access", "native_pio"):
        from hclsim.devices import uart16550_native
        return getattr(uart16550_native, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
