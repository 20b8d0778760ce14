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

Interrupts (NS16550A): IER enables RDA 0x01, THRE 0x02, RLS 0x04, MS 0x08; IIR reads the
highest-priority pending source: 0x06 line status (an LSR error bit), 0x04 received data, 0x02
transmitter holding register empty, 0x00 modem status (an MSR delta bit), 0x01 none, with 0xC0
while FCR has enabled the FIFOs. A byte written to THR is sent at once, so THR is empty again at
once: the THRE interrupt is pending after every THR write (it is cleared by the write and set as
the byte leaves), when IER's THRE bit goes from 0 to 1 (Linux's serial8250 startup tests that the
interrupt is reasserted so: UART_BUG_THRE), and cleared by reading IIR while it reports THRE or
by IER's THRE bit going to 0. Only THRE can be pending here (no input, no line errors, fixed
modem lines). The interrupt line is asserted while a source is pending and MCR's OUT2 (0x08) is
set, as PCs gate it: register_access keeps it in regs[R_LINE] (both paths), the Python device
calls irq(level) when it changes (at each access; a native device at flush(), after the engine
run, since its accesses do not reach Python). What Linux's 8250 driver does with it: enable
THRE in IER when the tty has data (start_tx), write up to 16 bytes from the interrupt while IIR
reports THRE, clear IER's THRE when the buffer is empty (stop_tx).
"""
from hclsim.defs.platform import UART_PORT_COUNT, Region
from hclsim.devices.saved_state import Field, Schema

# Register file slots (int64 each) of one UART. R_IIR holds the pending interrupt's id, R_THRI
# the THRE interrupt's latch, R_LINE the interrupt line (a source pending and OUT2).
R_IER, R_IIR, R_LCR, R_MCR, R_LSR, R_MSR, R_SCR, R_DLL, R_DLM, R_FCR, R_THRI, R_LINE = range(1, 13)
UART_REGS = 16

LCR_DLAB = 0x80
LSR_DR = 0x01         # data ready
LSR_ERRORS = 0x1E     # overrun, parity, framing error, break
LSR_THRE_TEMT = 0x60  # transmitter always empty: writes complete at once
MSR_IDLE = 0xB0       # DCD, DSR, CTS asserted
MSR_DELTAS = 0x0F     # DDCD TERI DDSR DCTS
IER_RDA, IER_THRE, IER_RLS, IER_MS = 0x01, 0x02, 0x04, 0x08
IER_MASK = 0x0F
IIR_MS, IIR_NONE, IIR_THRE, IIR_RDA, IIR_RLS = 0x00, 0x01, 0x02, 0x04, 0x06
IIR_FIFO_ENABLED = 0xC0
FCR_FIFO_ENABLE = 0x01
MCR_OUT2 = 0x08       # gates the interrupt line to the PIC on PCs
MCR_MASK = 0x1F

# The device's state (int64 slots): the register file, then the ring's length and capacity; the
# native device's buffer has the ring's bytes after them.
S_LEN, S_CAP = UART_REGS, UART_REGS + 1
STATE_HEADER = UART_REGS + 2
RING_CAPACITY = 1 << 16     # bytes; a boot shim log line costs one flush, not one Python call a byte
REGISTER_NAMES = ("ier", "iir", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr")
SAVED_STATE = Schema("hclsim.devices.uart16550", tuple(
    [Field(i + 1, name, int) for i, name in enumerate(REGISTER_NAMES)] + [Field(11, "pending", bytes),
                                                                         Field(12, "thre_pending", int)]))


def new_registers() -> list[int]:
    """A register file at reset (a list; uart16550_native.new_registers is the int64 array)."""
    regs = [0] * UART_REGS
    regs[R_LSR] = LSR_THRE_TEMT
    regs[R_MSR] = MSR_IDLE
    regs[R_IIR] = IIR_NONE
    return regs


def register_access(regs, out, out_len, capacity, offset, is_write, value):
    """One access to register `offset` (0-7). Returns (read value, new out_len).

    A THR write appends to out[out_len]; the caller drains `out` when out_len reaches capacity.
    After every access the pending interrupt (regs[R_IIR]) and the line (regs[R_LINE]) are
    recomputed. The only source of the register logic: uart16550_native.uart_access is this,
    under njit (so no calls to other Python functions here).
    """
    dlab = (regs[R_LCR] & LCR_DLAB) != 0
    result = 0
    if is_write:
        value &= 0xFF
        if offset == 0:
            if dlab:
                regs[R_DLL] = value
            else:
                if out_len < capacity:
                    out[out_len] = value
                    out_len += 1
                regs[R_THRI] = 1        # cleared by the write, set again as the byte leaves at once
        elif offset == 1:
            if dlab:
                regs[R_DLM] = value
            else:
                if (regs[R_IER] ^ value) & IER_THRE:
                    regs[R_THRI] = 1 if value & IER_THRE else 0   # THR is always empty
                regs[R_IER] = value & IER_MASK
        elif offset == 2:
            regs[R_FCR] = value
        elif offset == 3:
            regs[R_LCR] = value
        elif offset == 4:
            regs[R_MCR] = value & MCR_MASK
        elif offset == 7:
            regs[R_SCR] = value
    elif offset == 0:
        result = regs[R_DLL] if dlab else 0
    elif offset == 1:
        result = regs[R_DLM] if dlab else regs[R_IER]
    elif offset == 2:
        result = regs[R_IIR] | (IIR_FIFO_ENABLED if (regs[R_FCR] & FCR_FIFO_ENABLE) else 0)
        if regs[R_IIR] == IIR_THRE:
            regs[R_THRI] = 0            # reading IIR while it reports THRE clears it
    elif offset == 3:
        result = regs[R_LCR]
    elif offset == 4:
        result = regs[R_MCR]
    elif offset == 5:
        result = regs[R_LSR]
        regs[R_LSR] &= ~LSR_ERRORS
    elif offset == 6:
        result = regs[R_MSR]
        regs[R_MSR] &= ~MSR_DELTAS
    else:
        result = regs[R_SCR]
    ier = regs[R_IER]
    iid = IIR_NONE
    if (ier & IER_RLS) and (regs[R_LSR] & LSR_ERRORS):
        iid = IIR_RLS
    elif (ier & IER_RDA) and (regs[R_LSR] & LSR_DR):
        iid = IIR_RDA
    elif (ier & IER_THRE) and regs[R_THRI]:
        iid = IIR_THRE
    elif (ier & IER_MS) and (regs[R_MSR] & MSR_DELTAS):
        iid = IIR_MS
    regs[R_IIR] = iid
    regs[R_LINE] = 1 if (iid != IIR_NONE and (regs[R_MCR] & MCR_OUT2)) else 0
    return result, out_len


def baud(regs) -> int:
    divisor = int(regs[R_DLL]) | (int(regs[R_DLM]) << 8)
    return 115200 // divisor if divisor else 0


class Uart16550:
    """One 16550 at `port` (8 ports); what the guest transmits goes to sink(name, bytes).

    native=True (the default): the engine's native port handler serves it (devices/bus.py
    attach), which needs numba (uart16550_native). native=False: pure Python, every byte written
    goes to the sink at once (the VP loop's COM1).
    irq(level: bool), optional: the interrupt line (e.g. lambda level: pic.set_irq(4, level)),
    called when it changes: at the access that changed it, or, for accesses the native handler
    served, at the next flush() (update_irq() checks at any time). irq_line: its level now."""
    saved_state = SAVED_STATE

    def __init__(self, name: str, port: int, sink=None, native: bool = True, irq=None):
        self.name, self.port, self.sink, self.irq = name, port, sink, irq
        self.pio_regions = (Region("registers", port, UART_PORT_COUNT),)
        self._native = native
        self._line_reported = False
        if native:
            from hclsim.devices import uart16550_native
            uart16550_native.attach(self)   # sets state, regs, _ring and _access_fn
        else:
            self.state = new_registers() + [0, RING_CAPACITY]   # S_LEN, S_CAP after the registers
            self.regs = self.state                              # register_access uses slots 1..12 only
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
        self.update_irq()
        return int(result)

    @property
    def irq_line(self) -> bool:
        return bool(self.regs[R_LINE])

    def update_irq(self) -> None:
        """Report the interrupt line to irq() if it changed since it was last reported."""
        line = bool(self.regs[R_LINE])
        if line != self._line_reported:
            self._line_reported = line
            if self.irq is not None:
                self.irq(line)

    def pio_read(self, port: int, size: int) -> int:
        return self._access(port, False, 0)

    def pio_write(self, port: int, size: int, value: int) -> None:
        self._access(port, True, value)
        if not self._native:
            self.flush()   # no engine run to wait for: the VP loop's COM1 shows each byte as it comes

    def flush(self) -> None:
        self.update_irq()
        n = int(self.state[S_LEN])
        if n:
            data = bytes(self._ring[:n])
            self.state[S_LEN] = 0
            if self.sink is not None:
                self.sink(self.name, data)

    def save(self) -> dict:
        values = {name: int(self.regs[i + 1]) for i, name in enumerate(REGISTER_NAMES)}
        values["pending"] = bytes(self._ring[:int(self.state[S_LEN])])
        values["thre_pending"] = int(self.regs[R_THRI])
        return values

    def restore(self, values: dict) -> None:
        for i, name in enumerate(REGISTER_NAMES):
            self.regs[i + 1] = values[name]
        self.regs[R_THRI] = values["thre_pending"]
        pending = values["pending"][:RING_CAPACITY]
        memoryview(self._ring)[:len(pending)] = pending
        self.state[S_LEN] = len(pending)
        self._access_fn(self.regs, self._ring, self.state[S_LEN], RING_CAPACITY, 7, False, 0)   # IIR, line
        self.update_irq()


def __getattr__(name: str):
    """The numba names this module had (uart_access, native_pio) now live in uart16550_native:
    importing them from here still works, and loads numba then."""
    if name in ("uart_access", "native_pio"):
        from hclsim.devices import uart16550_native
        return getattr(uart16550_native, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
