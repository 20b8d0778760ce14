"""16550 UART: the register model the boot shim (COM3) and the VTL0 guest (COM1) talk to.

The register logic is one numba function over an int64 register file so the I/O exit can run it
inside a native hook (no GIL, no Python); `uart_access.py_func` is its pure-Python twin. Output
bytes go to a ring in the engine's fast-path state that the machine drains to the console/log.
There is no input: RBR reads 0 and LSR never reports data ready.
"""
import numpy as np
from numba import njit

# Register file slots (int64 each) of one UART.
R_IER, R_IIR, R_LCR, R_MCR, R_LSR, R_MSR, R_SCR, R_DLL, R_DLM, R_FCR = range(1, 11)
UART_REGS = 16

LCR_DLAB = 0x80
LSR_THRE_TEMT = 0x60  # transmitter always empty: writes complete at once
MSR_IDLE = 0xB0       # DCD, DSR, CTS asserted

# Ports: index in the engine's UART table.
UART_PORTS = {0x3E8: 0, 0x3F8: 1}  # COM3 (boot shim), COM1 (VTL0 guest)
UART_NAMES = ("COM3", "COM1")


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
