"""The PC's two cascaded Intel 8259A programmable interrupt controllers and the ELCR, as one device
on a bus (devices/bus.py).

Ports: master 0x20 (command: ICW1, OCW2, OCW3; read IRR/ISR/poll) and 0x21 (data: ICW2-ICW4, OCW1
= IMR), slave 0xA0/0xA1 likewise, the slave's INT wired to the master's IR2; the edge/level
control registers (ELCR) at 0x4D0 (IRQ 0-7) and 0x4D1 (IRQ 8-15), IRQ 0, 1, 2, 8 and 13 always
edge (the PIIX masks). All ports are 8-bit (the ELCR also takes a 16-bit access at 0x4D0).

What Linux (arch/x86/kernel/i8259.c) relies on: the IMR reads back what was written (probe_8259A
writes 0xFB to 0x21 and reads it back, else it uses the NULL PIC); init_8259A's sequence ICW1 0x11,
ICW2 the vector base (0x30 and 0x38), ICW3 (0x04 on the master: a slave on IR2; 0x02 on the slave:
its cascade id), ICW4 0x01 (8086 mode; 0x03 with auto-EOI); mask_and_ack_8259A's specific EOIs
(0x60 + line to the slave's 0xA0, then 0x62 to the master); OCW3 0x0B / 0x0A to read ISR / IRR
(i8259A_irq_real, the spurious check). The ICW1 resets the chip as the datasheet says: IMR, ISR,
IRR edge latches, priority rotation, special mask and the register select cleared.

The model (the datasheet's, with Bochs's reading of edge triggering): an edge-triggered line sets
its IRR bit on a rising edge and the bit stays while the line is high; lowering the line clears it
(a request that vanished before INTA), and so does the INTA cycle, so a line must fall and rise to
request again. A level-triggered line (ELCR bit, or LTIM in ICW1) requests while it is high. A
request is delivered when it is unmasked and of higher priority than every in-service line
(fixed priority IR0 highest, rotated by the rotate commands; special mask mode and special fully
nested mode as the datasheet). INTA with no request left returns IR7's vector without setting ISR
(spurious IRQ 7; on the slave, spurious IRQ 15 with the master's IR2 in service).

The CPU side:
    Pic8259(name: str = "pic", intr: Callable[[bool], None] | None = None)
        intr(level) is called whenever the INTR output to the CPU changes (optional).
    set_irq(line: int, level: bool) -> None; raise_irq(line: int); lower_irq(line: int)
        ISA IRQ lines 0-15 (8-15 the slave's IR0-IR7); 2 is the cascade and is refused.
    has_interrupt() -> bool
        INTR: an unmasked request of higher priority than the lines in service.
    acknowledge() -> int
        the INTA cycle: the vector (ICW2 base + line), IRR -> ISR (unless auto-EOI), the cascade
        through the slave; the spurious vector (base + 7) if no request is left.
    pending_vector() -> int | None: the vector acknowledge() would return now (no side effect).
    saved_state / save() / restore(values): devices/saved_state.py.
"""
from collections.abc import Callable

from hclsim.defs.platform import PIC_ELCR_PORT, PIC_MASTER_PORT, PIC_SLAVE_PORT, Region
from hclsim.devices.bus import IoError
from hclsim.devices.saved_state import Field, Schema

PIC_CASCADE_IR = 2            # the master's input the slave's INT drives
PIC_SPURIOUS_IR = 7           # the level an INTA with no request answers

# ICW1 (command port, D4 = 1)
ICW1_IC4 = 0x01               # ICW4 needed
ICW1_SNGL = 0x02              # single (no ICW3)
ICW1_ADI = 0x04               # call address interval (8080 only)
ICW1_LTIM = 0x08              # level triggered mode
ICW1_INIT = 0x10
# ICW2: T7-T3 of the vector
ICW2_VECTOR_MASK = 0xF8
# ICW4
ICW4_UPM = 0x01               # 8086/8088 mode
ICW4_AEOI = 0x02              # automatic EOI
ICW4_MS = 0x04                # buffered master/slave
ICW4_BUF = 0x08               # buffered mode
ICW4_SFNM = 0x10              # special fully nested mode
# OCW2 (command port, D4 = 0, D3 = 0): R SL EOI in D7-D5, L2-L0 in D2-D0
OCW2_LEVEL_MASK = 0x07
OCW2_ROTATE_AEOI_CLEAR = 0    # 000
OCW2_EOI = 1                  # 001: non-specific EOI
OCW2_NOP = 2                  # 010
OCW2_SPECIFIC_EOI = 3         # 011
OCW2_ROTATE_AEOI_SET = 4      # 100
OCW2_ROTATE_EOI = 5           # 101: rotate on non-specific EOI
OCW2_SET_PRIORITY = 6         # 110
OCW2_ROTATE_SPECIFIC_EOI = 7  # 111
# OCW3 (command port, D4 = 0, D3 = 1)
OCW3_SELECT = 0x08
OCW3_RIS = 0x01               # with RR: read ISR (else IRR)
OCW3_RR = 0x02                # read register command
OCW3_POLL = 0x04
OCW3_SMM = 0x20               # with ESMM: set special mask mode (else reset)
OCW3_ESMM = 0x40
POLL_INTERRUPT = 0x80         # the poll word: a request, its level in W2-W0
# The ELCR: lines that must stay edge-triggered are masked (IRQ 0, 1, 2; IRQ 8, 13).
ELCR_MASTER_MASK = 0xF8
ELCR_SLAVE_MASK = 0xDE

CHIP_FIELDS = ("level", "irr", "imr", "isr", "priority_add", "base", "read_isr", "poll", "special_mask",
               "init_state", "icw4_needed", "single", "ltim", "auto_eoi", "rotate_aeoi", "sfnm", "icw3", "elcr")
SAVED_STATE = Schema("hclsim.devices.pic8259", tuple(
    Field(1 + 32 * chip + i, f"{prefix}_{name}", int)
    for chip, prefix in enumerate(("master", "slave")) for i, name in enumerate(CHIP_FIELDS)))


class _Chip:
    """One 8259A: the registers, the priority resolver and the command decoder."""

    def __init__(self, name: str, elcr_mask: int, output: Callable[[bool], None]):
        self.name, self.elcr_mask, self._output = name, elcr_mask, output
        self.is_master = name == "master"
        self.elcr = 0
        self.level = 0        # the IR input lines
        self.out = False      # INT, last reported
        self._reset(0)

    def _reset(self, ltim: int) -> None:
        """ICW1: the datasheet's initialization (the ELCR is not the 8259A's and stays)."""
        self.imr = self.isr = self.priority_add = self.base = 0
        self.read_isr = self.poll = self.special_mask = 0
        self.init_state = self.icw4_needed = self.single = 0
        self.auto_eoi = self.rotate_aeoi = self.sfnm = self.icw3 = 0
        self.ltim = ltim
        self.irr = self.level & self._level_mode()   # edge latches cleared; level lines still request

    def _level_mode(self) -> int:
        return 0xFF if self.ltim else self.elcr

    # ---- the inputs -------------------------------------------------------------------------
    def set_line(self, ir: int, level: bool) -> None:
        mask = 1 << ir
        if level:
            if not self.level & mask or self._level_mode() & mask:
                self.irr |= mask          # a rising edge (or a level request)
            self.level |= mask
        else:
            self.level &= ~mask
            self.irr &= ~mask             # the request vanished
        self.update()

    # ---- the priority resolver --------------------------------------------------------------
    def _priority(self, mask: int) -> int:
        """0 (highest) .. 7 of the highest-priority bit in mask, 8 if none."""
        if not mask:
            return 8
        p = 0
        while not mask & (1 << ((p + self.priority_add) & 7)):
            p += 1
        return p

    def pending(self) -> int:
        """The line to deliver (highest unmasked request above the in-service ones), or -1."""
        p = self._priority(self.irr & ~self.imr)
        if p == 8:
            return -1
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.sfnm and self.is_master:
            in_service &= ~(1 << PIC_CASCADE_IR)   # the slave may nest inside its own IR2
        return (p + self.priority_add) & 7 if p < self._priority(in_service) else -1

    def update(self) -> None:
        out = self.pending() >= 0
        if out != self.out:
            self.out = out
            self._output(out)

    def intack(self, ir: int) -> None:
        """The INTA cycle for level ir: ISR set (unless auto-EOI), an edge request consumed."""
        mask = 1 << ir
        if self.auto_eoi:
            if self.rotate_aeoi:
                self.priority_add = (ir + 1) & 7
        else:
            self.isr |= mask
        if not self._level_mode() & mask:
            self.irr &= ~mask
        self.update()

    def poll_read(self) -> int:
        self.poll = 0
        ir = self.pending()
        if ir < 0:
            return 0
        self.intack(ir)
        return POLL_INTERRUPT | ir

    # ---- the ports --------------------------------------------------------------------------
    def write(self, a0: int, value: int) -> None:
        if a0 == 0:
            if value & ICW1_INIT:
                self._reset((value & ICW1_LTIM) >> 3)
                self.init_state = 1
                self.icw4_needed, self.single = value & ICW1_IC4, (value & ICW1_SNGL) >> 1
                self.update()
            elif value & OCW3_SELECT:
                if value & OCW3_POLL:
                    self.poll = 1
                if value & OCW3_RR:
                    self.read_isr = value & OCW3_RIS
                if value & OCW3_ESMM:
                    self.special_mask = 1 if value & OCW3_SMM else 0
                    self.update()
            else:
                self._ocw2(value >> 5, value & OCW2_LEVEL_MASK)
            return
        if self.init_state == 0:                     # OCW1
            self.imr = value
            self.update()
        elif self.init_state == 1:                   # ICW2
            self.base = value & ICW2_VECTOR_MASK
            self.init_state = 2 if not self.single else (3 if self.icw4_needed else 0)
        elif self.init_state == 2:                   # ICW3
            self.icw3 = value
            self.init_state = 3 if self.icw4_needed else 0
        else:                                        # ICW4
            self.auto_eoi = (value & ICW4_AEOI) >> 1
            self.sfnm = (value & ICW4_SFNM) >> 4
            self.init_state = 0
            self.update()

    def _ocw2(self, command: int, level: int) -> None:
        if command in (OCW2_ROTATE_AEOI_CLEAR, OCW2_ROTATE_AEOI_SET):
            self.rotate_aeoi = 1 if command == OCW2_ROTATE_AEOI_SET else 0
        elif command in (OCW2_EOI, OCW2_ROTATE_EOI):
            p = self._priority(self.isr)
            if p != 8:
                ir = (p + self.priority_add) & 7
                self.isr &= ~(1 << ir)
                if command == OCW2_ROTATE_EOI:
                    self.priority_add = (ir + 1) & 7
        elif command in (OCW2_SPECIFIC_EOI, OCW2_ROTATE_SPECIFIC_EOI):
            self.isr &= ~(1 << level)
            if command == OCW2_ROTATE_SPECIFIC_EOI:
                self.priority_add = (level + 1) & 7
        elif command == OCW2_SET_PRIORITY:
            self.priority_add = (level + 1) & 7
        self.update()

    def read(self, a0: int) -> int:
        if self.poll:
            return self.poll_read()
        if a0 == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr

    def save(self) -> dict:
        return {name: int(getattr(self, name)) for name in CHIP_FIELDS}

    def restore(self, values: dict) -> None:
        for name in CHIP_FIELDS:
            setattr(self, name, int(values[name]))
        self.elcr &= self.elcr_mask


class Pic8259:
    saved_state = SAVED_STATE

    def __init__(self, name: str = "pic", intr: Callable[[bool], None] | None = None):
        self.name, self.intr = name, intr
        self.pio_regions = (Region("master", PIC_MASTER_PORT, 2), Region("slave", PIC_SLAVE_PORT, 2),
                            Region("elcr", PIC_ELCR_PORT, 2))
        self._intr_level = False
        self.master = _Chip("master", ELCR_MASTER_MASK, self._master_output)
        self.slave = _Chip("slave", ELCR_SLAVE_MASK, self._slave_output)

    def _master_output(self, level: bool) -> None:
        if level != self._intr_level:
            self._intr_level = level
            if self.intr is not None:
                self.intr(level)

    def _slave_output(self, level: bool) -> None:
        self.master.set_line(PIC_CASCADE_IR, level)

    # ---- the devices' side ------------------------------------------------------------------
    def set_irq(self, line: int, level: bool) -> None:
        if not 0 <= line < 16 or line == PIC_CASCADE_IR:
            raise ValueError(f"{self.name}: no ISA IRQ line {line} (0-15, 2 is the cascade)")
        chip = self.master if line < 8 else self.slave
        chip.set_line(line & 7, bool(level))

    def raise_irq(self, line: int) -> None:
        self.set_irq(line, True)

    def lower_irq(self, line: int) -> None:
        self.set_irq(line, False)

    # ---- the CPU's side ---------------------------------------------------------------------
    def has_interrupt(self) -> bool:
        return self.master.pending() >= 0

    def pending_vector(self) -> int | None:
        ir = self.master.pending()
        if ir < 0:
            return None
        if ir == PIC_CASCADE_IR:
            sub = self.slave.pending()
            return self.slave.base + (sub if sub >= 0 else PIC_SPURIOUS_IR)
        return self.master.base + ir

    def acknowledge(self) -> int:
        ir = self.master.pending()
        if ir < 0:
            return self.master.base + PIC_SPURIOUS_IR      # the request vanished: spurious IRQ 7
        if ir != PIC_CASCADE_IR:
            self.master.intack(ir)
            return self.master.base + ir
        self.master.intack(PIC_CASCADE_IR)
        sub = self.slave.pending()
        if sub < 0:
            return self.slave.base + PIC_SPURIOUS_IR       # spurious IRQ 15 (master IR2 in service)
        self.slave.intack(sub)
        if self.slave.out:
            # The slave's INT drops during INTA: a request still pending (auto-EOI) is a new
            # edge on the master's IR2, or it would wait for an unrelated change.
            self.master.set_line(PIC_CASCADE_IR, False)
            self.master.set_line(PIC_CASCADE_IR, True)
        return self.slave.base + sub

    # ---- the bus ----------------------------------------------------------------------------
    def _chip(self, port: int):
        return (self.master, port - PIC_MASTER_PORT) if port < PIC_SLAVE_PORT else (self.slave, port - PIC_SLAVE_PORT)

    def pio_read(self, port: int, size: int):
        if port >= PIC_ELCR_PORT:
            value = self.master.elcr | (self.slave.elcr << 8)
            return (value >> (8 * (port - PIC_ELCR_PORT))) & ((1 << (8 * size)) - 1)
        if size != 1:
            return IoError(f"the 8259A's ports are 8-bit, not {size}-byte")
        chip, a0 = self._chip(port)
        return chip.read(a0)

    def pio_write(self, port: int, size: int, value: int):
        if port >= PIC_ELCR_PORT:
            value <<= 8 * (port - PIC_ELCR_PORT)
            if port == PIC_ELCR_PORT:
                self._set_elcr(self.master, value & 0xFF)
            if size > 1 or port != PIC_ELCR_PORT:
                self._set_elcr(self.slave, (value >> 8) & 0xFF)
            return None
        if size != 1:
            return IoError(f"the 8259A's ports are 8-bit, not {size}-byte")
        chip, a0 = self._chip(port)
        chip.write(a0, value & 0xFF)
        return None

    @staticmethod
    def _set_elcr(chip: _Chip, value: int) -> None:
        chip.elcr = value & chip.elcr_mask
        chip.irr = (chip.irr & ~chip._level_mode()) | (chip.level & chip._level_mode())
        chip.update()

    # ---- saved state ------------------------------------------------------------------------
    def save(self) -> dict:
        return {f"{chip.name}_{k}": v for chip in (self.master, self.slave) for k, v in chip.save().items()}

    def restore(self, values: dict) -> None:
        for chip in (self.slave, self.master):
            chip.restore({k: values[f"{chip.name}_{k}"] for k in CHIP_FIELDS})
            chip.out = chip.pending() >= 0
        self._master_output(self.master.out)
