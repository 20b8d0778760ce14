"""16550 UART: the register model the boot shim (COM3) and the VTL0 guest (COM1) talk to, as a
device on a bus (devices/bus.py).

The register logic is one numba function over an int64 register file; the device's native port
handler (a @cfunc the engine's port hook calls, no GIL, no Python) runs it over the device's own
state buffer, and `uart_access.py_func` is its pure-Python twin. Output bytes collect in a ring in
that buffer; flush() (after every engine run) and a full ring pass them to the sink. There is no
input: RBR reads 0 and LSR never reports data ready.
"""
import numpy as np
from numba import carray, cfunc, njit, types

from hclsim.defs.platform import UART_PORT_COUNT, Region
from hclsim.devices.saved_state import Field, Schema

# Register file slots (int64 each) of one UART.
R_IER, R_IIR, R_LCR, R_MCR, R_LSR, R_MSR, R_SCR, R_DLL, R_DLM, R_FCR = range(1, 11)
UART_REGS = 16

LCR_DLAB = 0x80
LSR_THRE_TEMT = 0x60  # transmitter always empty: writes complete at once
MSR_IDLE = 0xB0       # DCD, DSR, CTS asserted

# The device's state buffer (int64): the register file, then the ring's length and capacity, then
# the ring's bytes.
S_LEN, S_CAP = UART_REGS, UART_REGS + 1
STATE_HEADER = UART_REGS + 2
RING_CAPACITY = 1 << 16     # bytes; a boot shim log line costs one flush, not one Python call a byte
REGISTER_NAMES = ("ier", "iir", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr")
SAVED_STATE = Schema("hclsim.devices.uart16550", tuple(
    [Field(i + 1, name, int) for i, name in enumerate(REGISTER_NAMES)] + [Field(11, "pending", bytes)]))


def new_registers() -> np.ndarray:
    regs = np.zeros(UART_REGS, np.int64)
    regs[R_LSR] = LSR_THRE_TEMT
    regs[R_MSR] = MSR_IDLE
    regs[R_IIR] = 1
    return regs


@njit(cache=True)
def uart_access(regs, out, out_len, capacity, offset, is_write, value):
    """One access to register `offset` (0-7). Returns (read value, new out_len).

    A THR write appends to out[out_len]; the caller drains `out` when out_len reaches capacity.
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


def baud(regs: np.ndarray) -> int:
    divisor = int(regs[R_DLL]) | (int(regs[R_DLM]) << 8)
    return 115200 // divisor if divisor else 0


@cfunc(types.int64(types.voidptr, types.int64, types.int32, types.uint32, types.int32), cache=True)
def native_pio(state, offset, size, value, is_write):
    """The engine's native handler: -1 (take the Python path) only when the ring is full."""
    head = carray(state, STATE_HEADER, np.int64)
    cap = head[S_CAP]
    full = carray(state, STATE_HEADER + cap // 8, np.int64)
    if is_write != 0 and offset == 0 and (full[R_LCR] & LCR_DLAB) == 0 and full[S_LEN] >= cap:
        return -1
    out = full.view(np.uint8)[STATE_HEADER * 8:STATE_HEADER * 8 + cap]
    result, n = uart_access(full[:UART_REGS], out, full[S_LEN], cap, offset, is_write != 0, value)
    full[S_LEN] = n
    return result


class Uart16550:
    """One 16550 at `port` (8 ports); what the guest transmits goes to sink(name, bytes)."""
    saved_state = SAVED_STATE

    def __init__(self, name: str, port: int, sink=None, native: bool = True):
        self.name, self.port, self.sink = name, port, sink
        self.pio_regions = (Region("registers", port, UART_PORT_COUNT),)
        self.state = np.zeros(STATE_HEADER + RING_CAPACITY // 8, np.int64)
        self.state[S_CAP] = RING_CAPACITY
        self.regs = self.state[:UART_REGS]
        self.regs[:] = new_registers()
        self._ring = self.state.view(np.uint8)[STATE_HEADER * 8:]
        self._native = native

    def native_pio(self):
        if not self._native:
            return None
        return native_pio.address, self.state.ctypes.data

    def _access(self, port: int, is_write: bool, value: int) -> int:
        if is_write and port == self.port and not self.regs[R_LCR] & LCR_DLAB and self.state[S_LEN] >= RING_CAPACITY:
            self.flush()
        result, n = uart_access(self.regs, self._ring, self.state[S_LEN], RING_CAPACITY, port - self.port,
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
            data = self._ring[:n].tobytes()
            self.state[S_LEN] = 0
            if self.sink is not None:
                self.sink(self.name, data)

    def save(self) -> dict:
        values = {name: int(self.regs[i + 1]) for i, name in enumerate(REGISTER_NAMES)}
        values["pending"] = self._ring[:int(self.state[S_LEN])].tobytes()
        return values

    def restore(self, values: dict) -> None:
        for i, name in enumerate(REGISTER_NAMES):
            self.regs[i + 1] = values[name]
        pending = values["pending"][:RING_CAPACITY]
        self._ring[:len(pending)] = np.frombuffer(pending, np.uint8)
        self.state[S_LEN] = len(pending)
