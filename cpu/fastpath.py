"""Native (numba @cfunc) exit hooks: port I/O with the UARTs inline, CPUID, and instruction
counting per translated block.

Each engine owns one FastPathState: an int64 header (slots H_*) followed by the CPUID table,
the block-count cache and the UART output rings, all in one numpy buffer whose address is the
hooks' user_data. Anything the hooks cannot do natively (I/O to other ports, a full UART ring)
goes through the slow-I/O function pointer into Python.
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
from hclsim.devices.uart16550 import UART_REGS, new_registers, uart_access

# Header slots.
(H_TOTAL, H_FN_SLOW_IO, H_FN_REG_READ, H_FN_REG_WRITE, H_FN_UC_STOP, H_ICOUNT, H_BLOCKS,
 H_IO_FAST, H_IO_SLOW, H_CPUID_EXITS, H_APIC_ID, H_CPUID_OFF, H_CPUID_ROWS, H_BT_OFF, H_BT_SIZE,
 H_RAM_ADDR, H_RAM_SIZE, H_UART_OUT_OFF, H_UART_CAP, H_UART_LEN0, H_UART_LEN1, H_BT_MISSES,
 H_PAGING, H_LAST_BLOCK) = range(24)  # H_LAST_BLOCK: end of the previous block
# The native MSR path (cpu/msr_fastpath.py): the running VP, the hypervisor's APIC table, the
# count of MSR exits handled natively, and the Python site handler for the others.
H_VP_INDEX, H_APIC_TABLE, H_APIC_ROWS, H_MSR_FAST, H_FN_SLOW_SITE = range(24, 29)
# The native vmcall path (cpu/hypercall_fastpath.py): the hypervisor's native area, and the
# count of hypercalls done there.
H_HV_AREA, H_HC_FAST = 29, 30
H_UART_REGS = 32                  # 2 UARTs x UART_REGS slots
HEADER_SLOTS = H_UART_REGS + 2 * UART_REGS
N_UARTS = 2
UART_BASES = np.array([0x3E8, 0x3F8], np.int64)

IO_DRAIN = 2  # slow-I/O is_in value meaning "UART ring full, drain it"

BLOCK_TABLE_SIZE = 1 << 15        # entries of (key, count); key = address + 1, 0 = empty
UART_CAPACITY = 1 << 16


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
        uart_off_slots = bt_off + BLOCK_TABLE_SIZE * 2
        total_slots = uart_off_slots + (N_UARTS * UART_CAPACITY) // 8
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
        h[H_UART_OUT_OFF], h[H_UART_CAP] = uart_off_slots * 8, UART_CAPACITY
        self.cpuid_table = h[cpuid_off:bt_off].reshape(rows, 6)
        self.cpuid_table[:] = cpuid_table
        self.block_table = h[bt_off:uart_off_slots].reshape(BLOCK_TABLE_SIZE, 2)
        bytes_view = h.view(np.uint8)
        self.uart_out = [bytes_view[uart_off_slots * 8 + i * UART_CAPACITY:][:UART_CAPACITY] for i in range(N_UARTS)]
        for i in range(N_UARTS):
            self.uart_regs(i)[:] = new_registers()

    def reset(self, cpuid_table: np.ndarray) -> None:
        """Counters, devices and CPUID as new; the block-count cache is kept."""
        h = self.buf
        h[H_ICOUNT:H_CPUID_EXITS + 1] = 0
        h[H_MSR_FAST] = h[H_HC_FAST] = 0
        h[H_BT_MISSES] = 0
        h[H_LAST_BLOCK] = 0
        h[H_UART_LEN0] = h[H_UART_LEN1] = 0
        for i in range(N_UARTS):
            self.uart_regs(i)[:] = new_registers()
        if cpuid_table.shape != self.cpuid_table.shape:
            raise ValueError("CPUID table shape changed")
        self.cpuid_table[:] = cpuid_table

    def forget_blocks(self) -> None:
        self.block_table[:] = 0

    @property
    def address(self) -> int:
        return self.buf.ctypes.data

    def uart_regs(self, index: int) -> np.ndarray:
        base = H_UART_REGS + index * UART_REGS
        return self.buf[base:base + UART_REGS]

    def take_uart_output(self, index: int) -> bytes:
        n = int(self.buf[H_UART_LEN0 + index])
        data = self.uart_out[index][:n].tobytes()
        self.buf[H_UART_LEN0 + index] = 0
        return data

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
def _uart_index(port):
    for i in range(N_UARTS):
        if UART_BASES[i] <= port < UART_BASES[i] + 8:
            return i
    return -1


@njit(cache=True)
def io_access(uc, h, port, size, value, is_write):
    """Port I/O: UART registers natively, anything else through the slow path. Returns the
    value read (0 for writes)."""
    u = _uart_index(port)
    if u < 0:
        h[H_IO_SLOW] += 1
        return native.call_slow_io(h[H_FN_SLOW_IO], uc, np.uint32(port), np.int32(size),
                                   np.uint32(value), np.int32(0 if is_write else 1))
    h[H_IO_FAST] += 1
    regs = h[H_UART_REGS + u * UART_REGS:H_UART_REGS + (u + 1) * UART_REGS]
    cap = h[H_UART_CAP]
    if h[H_UART_LEN0 + u] >= cap:
        native.call_slow_io(h[H_FN_SLOW_IO], uc, np.uint32(port), np.int32(size), np.uint32(u),
                            np.int32(IO_DRAIN))
    out = h.view(np.uint8)[h[H_UART_OUT_OFF] + u * cap:h[H_UART_OUT_OFF] + (u + 1) * cap]
    result, new_len = uart_access(regs, out, h[H_UART_LEN0 + u], cap, port - UART_BASES[u],
                                  is_write, value)
    h[H_UART_LEN0 + u] = new_len
    return np.uint32(result)


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
