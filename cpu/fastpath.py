"""Native (numba @cfunc) exit hooks: port I/O to the devices that offer a native handler, CPUID,
and instruction counting per translated block.

Each engine owns one FastPathState: an int64 header (slots H_*) followed by the CPUID table and
the block-count cache, all in one numpy buffer whose address is the hooks' user_data. The header
holds the native port table (devices/bus.py fills it: base, length, handler, device state per
row); I/O to any other port, or an access a native handler declines (a full output ring), goes
through the slow-I/O function pointer into Python and so to the device bus.
"""

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic
from llvmlite import ir
from unicorn import x86_const as x86

from hclsim.cpu import native
from hclsim.cpu.cpuid import cpuid_lookup
from hclsim.cpu.insnlen import count_instructions
from hclsim.cpu.pagetable import walk

# Header slots.
(H_TOTAL, H_FN_SLOW_IO, H_FN_REG_READ, H_FN_REG_WRITE, H_FN_UC_STOP, H_ICOUNT, H_BLOCKS,
 H_IO_FAST, H_IO_SLOW, H_CPUID_EXITS, H_APIC_ID, H_CPUID_OFF, H_CPUID_ROWS, H_BT_OFF, H_BT_SIZE,
 H_RAM_ADDR, H_RAM_SIZE, H_NPIO_COUNT, H_BT_MISSES, H_PAGING, H_LAST_BLOCK) = range(21)
# H_LAST_BLOCK: end of the previous block; H_NPIO_COUNT: rows used in the native port table.
# The native MSR path (cpu/msr_fastpath.py): the running VP, the hypervisor's APIC table, the
# count of MSR exits handled natively, and the Python site handler for the others.
H_VP_INDEX, H_APIC_TABLE, H_APIC_ROWS, H_MSR_FAST, H_FN_SLOW_SITE = range(24, 29)
# The native vmcall path (cpu/hypercall_fastpath.py): the hypervisor's native area, and the
# count of hypercalls done there.
H_HV_AREA, H_HC_FAST = 29, 30
# RUN_VP by doorbell in the engine (cpu/runvp_fastpath.py): its area, and the flag a hook sets
# when it ended the run itself with the exit answered (cleared before every run).
H_RUNVP_AREA, H_NATIVE_STOP = 31, 21
# The native port table: NPIO_MAX rows of (first port, port count, handler address, state address).
H_NPIO, NPIO_COLUMNS, NPIO_MAX = 32, 4, 8
HEADER_SLOTS = H_NPIO + NPIO_COLUMNS * NPIO_MAX

BLOCK_TABLE_SIZE = 1 << 15        # entries of (key, count); key = address + 1, 0 = empty


@intrinsic
def _int_to_voidptr(typingctx, value):
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return sig, codegen


class FastPathState:
    """The numpy buffer behind one engine's native hooks."""

    def __init__(self, cpuid_table: np.ndarray, ram_address: int, ram_size: int, slow_io_address: int):
        rows = cpuid_table.shape[0]
        cpuid_off = HEADER_SLOTS
        bt_off = cpuid_off + rows * 6
        total_slots = bt_off + BLOCK_TABLE_SIZE * 2
        self.buf = np.zeros(total_slots, np.int64)
        h = self.buf
        h[H_TOTAL] = total_slots
        h[H_FN_SLOW_IO] = slow_io_address
        h[H_FN_REG_READ] = native.UC_REG_READ
        h[H_FN_REG_WRITE] = native.UC_REG_WRITE
        h[H_FN_UC_STOP] = native.UC_EMU_STOP
        h[H_CPUID_OFF], h[H_CPUID_ROWS] = cpuid_off, rows
        h[H_BT_OFF], h[H_BT_SIZE] = bt_off, BLOCK_TABLE_SIZE
        h[H_RAM_ADDR], h[H_RAM_SIZE] = ram_address, ram_size
        self.cpuid_table = h[cpuid_off:bt_off].reshape(rows, 6)
        self.cpuid_table[:] = cpuid_table
        self.block_table = h[bt_off:total_slots].reshape(BLOCK_TABLE_SIZE, 2)
        self.native_pio = h[H_NPIO:H_NPIO + NPIO_COLUMNS * NPIO_MAX].reshape(NPIO_MAX, NPIO_COLUMNS)

    def reset(self, cpuid_table: np.ndarray) -> None:
        """Counters and CPUID as new, no native port handlers; the block-count cache is kept."""
        h = self.buf
        h[H_ICOUNT:H_CPUID_EXITS + 1] = 0
        h[H_MSR_FAST] = h[H_HC_FAST] = 0
        h[H_BT_MISSES] = 0
        h[H_LAST_BLOCK] = 0
        self.set_native_pio([])
        if cpuid_table.shape != self.cpuid_table.shape:
            raise ValueError("CPUID table shape changed")
        self.cpuid_table[:] = cpuid_table

    def set_native_pio(self, rows) -> None:
        """rows: [(first port, count, handler address, state address)], at most NPIO_MAX."""
        if len(rows) > NPIO_MAX:
            raise ValueError(f"at most {NPIO_MAX} native port ranges")
        self.native_pio[:] = 0
        for i, row in enumerate(rows):
            self.native_pio[i] = row
        self.buf[H_NPIO_COUNT] = len(rows)

    def forget_blocks(self) -> None:
        self.block_table[:] = 0

    @property
    def address(self) -> int:
        return self.buf.ctypes.data

    def invalidate_blocks(self, start: int, end: int) -> None:
        """Forget cached instruction counts of blocks starting in [start, end) (code rewritten)."""
        # A key is (address + 1) ^ (size << 48): its low 48 bits are the block address's, + 1.
        mask = (1 << 48) - 1
        addresses = ((self.block_table[:, 0] & mask) - 1) & mask
        hit = (addresses >= (start & mask)) & (addresses < (end & mask)) & (self.block_table[:, 0] != 0)
        # Open addressing: removing entries would break probe chains, so mark them stale
        # with a count of -1 (recounted on the next miss of the same key).
        self.block_table[hit, 1] = -1

    def counters(self) -> dict:
        h = self.buf
        return {"instructions": int(h[H_ICOUNT]), "blocks": int(h[H_BLOCKS]),
                "io_fast_exits": int(h[H_IO_FAST]), "io_slow_exits": int(h[H_IO_SLOW]),
                "cpuid_exits": int(h[H_CPUID_EXITS]), "block_count_misses": int(h[H_BT_MISSES]),
                "msr_fast_exits": int(h[H_MSR_FAST]), "hypercalls_fast": int(h[H_HC_FAST])}


# ---- the hooks -----------------------------------------------------------------------------

@njit(cache=True)
def _header(ud):
    h = carray(ud, HEADER_SLOTS, np.int64)
    return carray(ud, h[H_TOTAL], np.int64)


@njit(cache=True)
def io_access(uc, h, port, size, value, is_write):
    """Port I/O: a device's native handler if one claims the port and accepts the access,
    otherwise the slow path into Python. Returns the value read (0 for writes)."""
    for row in range(h[H_NPIO_COUNT]):
        r = H_NPIO + row * NPIO_COLUMNS
        offset = np.int64(port) - h[r]
        if 0 <= offset < h[r + 1]:
            result = native.call_native_pio(h[r + 2], h[r + 3], offset, np.int32(size), np.uint32(value),
                                            np.int32(1 if is_write else 0))
            if result >= 0:
                h[H_IO_FAST] += 1
                return np.uint32(result)
            break
    h[H_IO_SLOW] += 1
    return native.call_slow_io(h[H_FN_SLOW_IO], uc, np.uint32(port), np.int32(size),
                               np.uint32(value), np.int32(0 if is_write else 1))


@cfunc(types.void(types.voidptr, types.uint32, types.int32, types.uint32, types.voidptr), cache=True)
def hook_out(uc, port, size, value, ud):
    io_access(uc, _header(ud), port, size, value, True)


@cfunc(types.uint32(types.voidptr, types.uint32, types.int32, types.voidptr), cache=True)
def hook_in(uc, port, size, ud):
    return io_access(uc, _header(ud), port, size, 0, False)


@cfunc(types.int32(types.voidptr, types.voidptr), cache=True)
def hook_cpuid(uc, ud):
    h = _header(ud)
    h[H_CPUID_EXITS] += 1
    regs = np.zeros(4, np.int64)
    native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_RAX, regs[0:].ctypes.data)
    native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_RCX, regs[1:].ctypes.data)
    table = h[h[H_CPUID_OFF]:h[H_CPUID_OFF] + h[H_CPUID_ROWS] * 6].reshape(h[H_CPUID_ROWS], 6)
    eax, ebx, ecx, edx = cpuid_lookup(table, regs[0] & 0xFFFFFFFF, regs[1] & 0xFFFFFFFF, h[H_APIC_ID])
    regs[0] = eax & 0xFFFFFFFF
    regs[1] = ebx & 0xFFFFFFFF
    regs[2] = ecx & 0xFFFFFFFF
    regs[3] = edx & 0xFFFFFFFF
    native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RAX, regs[0:].ctypes.data)
    native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RBX, regs[1:].ctypes.data)
    native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RCX, regs[2:].ctypes.data)
    native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RDX, regs[3:].ctypes.data)
    return 1  # skip Unicorn's own CPUID


REP_FLAG = np.int64(1) << 32  # cached value flag: the block is one REP-prefixed instruction


@njit(cache=True)
def block_count(uc, h, address, size):
    """Instructions in the block at (address, size): cached, decoded on a miss.

    Unicorn runs each iteration of a REP string instruction as its own one-instruction block;
    like the CPU's instructions-retired counter, the iterations count as one instruction. The
    first iteration runs as the last instruction of the block before, so an iteration block that
    ends where the previous block ended is a repeat.
    """
    value = _block_value(uc, h, address, size)
    end = np.int64(address) + size
    repeat = (value & REP_FLAG) != 0 and h[H_LAST_BLOCK] == end
    h[H_LAST_BLOCK] = end
    return 0 if repeat else value & 0xFFFFFFFF


@njit(cache=True)
def _block_value(uc, h, address, size):
    table = h[h[H_BT_OFF]:h[H_BT_OFF] + h[H_BT_SIZE] * 2].reshape(h[H_BT_SIZE], 2)
    mask = h[H_BT_SIZE] - 1
    key = np.int64(address + 1) ^ (np.int64(size) << 48)
    slot = (key * np.int64(0x9E3779B97F4A7C15) >> 40) & mask
    for _ in range(h[H_BT_SIZE]):
        k = table[slot, 0]
        if k == key and table[slot, 1] >= 0:
            return table[slot, 1]
        if k == 0 or k == key:
            break
        slot = (slot + 1) & mask
    h[H_BT_MISSES] += 1
    ram = carray(_int_to_voidptr(h[H_RAM_ADDR]), h[H_RAM_SIZE], np.uint8)
    cr = np.zeros(1, np.int64)
    native.call_reg_access(h[H_FN_REG_READ], uc, x86.UC_X86_REG_CR3, cr.ctypes.data)
    # Gather the block's bytes page by page (its pages need not be physically contiguous).
    code = np.zeros(size, np.uint8)
    pos = np.int64(address)
    got = 0
    while got < size:
        chunk = min(size - got, ((pos | 0xFFF) + 1) - pos)
        pa = walk(ram, cr[0], pos) if h[H_PAGING] else pos
        if pa < 0 or pa + chunk > ram.shape[0]:
            break
        code[got:got + chunk] = ram[pa:pa + chunk]
        got += chunk
        pos += chunk
    n = count_instructions(code, 0, got) if got > 0 else 1
    if n == 1 and got > 0 and (code[0] == 0xF3 or code[0] == 0xF2):
        n |= REP_FLAG
    if table[slot, 0] == 0 or table[slot, 0] == key:
        table[slot, 0] = key
        table[slot, 1] = n
    return n


@cfunc(types.void(types.voidptr, types.uint64, types.uint32, types.voidptr), cache=True)
def hook_block(uc, address, size, ud):
    h = _header(ud)
    h[H_BLOCKS] += 1
    h[H_ICOUNT] += block_count(uc, h, address, size)
