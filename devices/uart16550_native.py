"""The 16550's native path (numba): the register function compiled from uart16550.register_access
(one source; `uart_access.py_func` is that pure-Python twin), the @cfunc port handler the
engine's port hook calls (no GIL, no Python) and the state buffer a native Uart16550 keeps.
Imported by uart16550.Uart16550(native=True) only, so a light process never loads numba.
(numba's cache does not see changes to a function of another file: after editing
uart16550.register_access, touch this file so the cached handler is compiled again.)
The native handler runs the interrupt logic too (THRE latch, IIR, the line in R_LINE) but calls
no one: the Python device reports the line at its next flush() or update_irq().
"""
import numpy as np
from numba import carray, cfunc, njit, types

from hclsim.devices.uart16550 import (LCR_DLAB, R_LCR, RING_CAPACITY, S_CAP, S_LEN, STATE_HEADER, UART_REGS,
                                      register_access)
from hclsim.devices.uart16550 import new_registers as _new_registers

uart_access = njit(cache=True)(register_access)


def new_registers() -> np.ndarray:
    """A register file at reset as the int64 array the native path works on."""
    return np.array(_new_registers(), np.int64)


def new_state(capacity: int = RING_CAPACITY) -> np.ndarray:
    """A device's state buffer (int64): registers, ring length and capacity, then the ring."""
    state = np.zeros(STATE_HEADER + capacity // 8, np.int64)
    state[:UART_REGS] = new_registers()
    state[S_CAP] = capacity
    return state


def attach(uart) -> None:
    """Give a Uart16550 its native state: the buffer native_pio runs over and the njit access."""
    uart.state = new_state()
    uart.regs = uart.state[:UART_REGS]
    uart._ring = uart.state.view(np.uint8)[STATE_HEADER * 8:]
    uart._access_fn = uart_access


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
