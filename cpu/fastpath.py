"""Native (numba @cfunc) exit hooks: port I/O to the devices that offer a native handler, CPUID,
and instruction counting per translated block.

Each engine owns one FastPathState: an int64 header (slots H_*) followed by the CPUID table, in
one numpy buffer whose address is the hooks' user_data, and the block-count cache in a mapping of
its own (H_BT_ADDR). The header holds the native port table (devices/bus.py fills it: base,
length, handler, device state per row); I/O to any other port, or an access a native handler
declines (a full output ring), goes through the slow-I/O function pointer into Python and so to
the device bus.
"""

import mmap

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic
from llvmlite import ir
from unicorn import x86_const as x86

from hclsim.cpu import native
from hclsim.cpu.cpuid import cpuid_lookup
from hclsim.cpu.insnlen import count_instructions, insn_length
from hclsim.cpu.pagetable import walk

# Header slots.
(H_TOTAL, H_FN_SLOW_IO, H_FN_REG_READ, H_FN_REG_WRITE, H_FN_UC_STOP, H_ICOUNT, H_BLOCKS,
 H_IO_FAST, H_IO_SLOW, H_CPUID_EXITS, H_APIC_ID, H_CPUID_OFF, H_CPUID_ROWS, H_BT_ADDR, H_BT_SIZE,
 H_RAM_ADDR, H_RAM_SIZE, H_NPIO_COUNT, H_BT_MISSES, H_PAGING, H_LAST_BLOCK) = range(21)
# H_LAST_BLOCK: end of the previous block; H_NPIO_COUNT: rows used in the native port table.
# The block-count cache: H_BT_PROBES, slots examined by lookups (at most BLOCK_TABLE_WAYS each; a
# per-run counter like H_BT_MISSES); H_BT_EVICTIONS, entries it dropped to make room since it was
# last emptied, and H_BT_ENTRIES, slots in use (both kept across reset() with the table itself).
H_BT_EVICTIONS, H_BT_PROBES = 22, 23
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
H_BT_ENTRIES = H_NPIO + NPIO_COLUMNS * NPIO_MAX
# Virtual time for a guest with its own timekeeping (hclsim/real_linux.py): H_DEADLINE, the
# instruction count at which the block hook ends the run (0: none), H_DEADLINE_HIT set when it
# did; H_TSC_IDLE, the time a halted guest skipped, which RDTSC adds to the count
# (cpu/virtual_tsc.py), H_TSC_READS counts those reads. H_SKIP_SYNC, when not 0, is the address
# of Unicorn's skip_sync_pc_on_exit byte, which the block hook sets (cpu/uc_internals.py).
# H_PENDING, H_PENDING_SIZE: the block a trap stopped the run before (H_MSR_TRAP below).
(H_DEADLINE, H_DEADLINE_HIT, H_SKIP_SYNC, H_TSC_IDLE, H_PENDING, H_PENDING_SIZE,
 H_TSC_READS) = range(H_BT_ENTRIES + 1, H_BT_ENTRIES + 8)
# The block-count cache's front: FRONT_SIZE direct-mapped (key, count) pairs (64 KiB, within a
# core's L2) looked at before the 8-way table, whose lines a kernel's working set spreads over
# megabytes. A front entry is never stale: whatever invalidates the table clears it.
H_FRONT_ADDR = H_TSC_READS + 1
# H_MSR_TRAP on: a block holding RDMSR or WRMSR ends the run before it runs (H_PENDING names
# it), so the host can hook those instructions and serve synthetic MSRs (hclsim/real_linux_hv.py);
# the block is marked ARMED in the cache then, and runs on.
H_MSR_TRAP = H_FRONT_ADDR + 1
# The block being run: its start, and what the hook added to H_ICOUNT for it (a whole block is
# counted as it starts; cpu/block_clock.py gives back what a stop inside it did not run).
# H_RUN_START: H_ICOUNT where the current straight-line run began, the last block no other block
# fell into. Unicorn ends translations in straight-line code where its buffers fill, which
# differs with what it generates (hooks, exit checks); those run starts do not, so virtual time
# stops runs (the deadline) only there and reads the count there (RDTSC, devices).
H_BLOCK_START, H_BLOCK_COUNT, H_RUN_START = H_MSR_TRAP + 1, H_MSR_TRAP + 2, H_MSR_TRAP + 3
HEADER_SLOTS = H_RUN_START + 1
FRONT_SIZE = 1 << 12

# The block-count cache: BLOCK_TABLE_SIZE slots of (key, count), key = (VA + 1) ^ (size << 48),
# 0 = empty, count -1 = stale (invalidate_blocks). Set-associative: a key's bucket is the
# BLOCK_TABLE_WAYS consecutive slots (128 bytes) picked by a hash of the key, so a lookup examines
# at most that many slots, hit or miss, however many blocks the guest has run, and a miss costs
# one decode. A bucket is kept newest first: an insert goes to way 0 and the ways before the slot
# it takes move down one (the slot: the first empty or stale one, else the last, whose entry, the
# bucket's oldest, is evicted). FIFO per bucket: deterministic (the same run gives the same counts
# and misses), nothing written on a hit; an evicted block is decoded again when it next runs.
#
# Size: engines are per process, not per vCPU (every VP is a context on the machine's one engine,
# cpu/pool.py keeps at most MAX_IDLE_PER_SIZE idle ones per RAM size; only the engine-per-VP
# benchmark baseline, Machine.use_engine_per_vp, makes more), and the table is a private
# anonymous mapping without huge pages, committed a 4 KiB page at a time as blocks land in it
# and released by forget_blocks. So 1 << 19 slots (8 MiB when full) cost an engine that runs a
# few hundred blocks (a sidecar AP's, a firmware boot's ~1000) what the 1 << 15 slots before did,
# and hold a Linux boot's hundreds of thousands: at 200k distinct blocks ~1% of the keys land in a
# bucket already holding 8 (~27% with 1 << 18 slots), and only those miss again (cyclic code that
# large, the worst case for FIFO: benches/bench_blocks.py).
#
# The key is the block's virtual address and size, not CR3: reading CR3 is a register call per
# block on the hot path. So two address spaces running different code at the same VA, in blocks
# of the same size, share one cached count (wrong for one of them, deterministically); Unicorn's
# own translations are keyed by physical address and stay right.
BLOCK_TABLE_SIZE = 1 << 19
BLOCK_TABLE_WAYS = 8
_BT_HASH = np.int64(-0x61C8864680B583EB)   # 0x9E3779B97F4A7C15 as int64 (Fibonacci hashing)


_MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """value (0 .. 2^64) as the int64 numba's arithmetic wraps it to."""
    return value - (1 << 64) if value >= 1 << 63 else value


@intrinsic
def _int_to_voidptr(typingctx, value):
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return sig, codegen


class FastPathState:
    """The numpy buffer behind one engine's native hooks."""

    def __init__(self, cpuid_table: np.ndarray, ram_address: int, ram_size: int, slow_io_address: int):
        buckets = BLOCK_TABLE_SIZE // BLOCK_TABLE_WAYS
        if buckets < 1 or buckets & (buckets - 1) or buckets * BLOCK_TABLE_WAYS != BLOCK_TABLE_SIZE:
            raise ValueError("BLOCK_TABLE_SIZE must be a power-of-two number of BLOCK_TABLE_WAYS buckets")
        rows = cpuid_table.shape[0]
        cpuid_off = HEADER_SLOTS
        total_slots = cpuid_off + rows * 6
        self.buf = np.zeros(total_slots, np.int64)
        h = self.buf
        # Page-aligned, so a bucket is two cache lines; zero until written, pages committed on use.
        self._block_map = mmap.mmap(-1, BLOCK_TABLE_SIZE * 16, flags=mmap.MAP_PRIVATE)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._block_map.madvise(mmap.MADV_NOHUGEPAGE)   # a 2 MiB page for a few blocks: no
        self.block_table = np.frombuffer(self._block_map, np.int64).reshape(BLOCK_TABLE_SIZE, 2)
        h[H_TOTAL] = total_slots
        h[H_FN_SLOW_IO] = slow_io_address
        h[H_FN_REG_READ] = native.UC_REG_READ
        h[H_FN_REG_WRITE] = native.UC_REG_WRITE
        h[H_FN_UC_STOP] = native.UC_EMU_STOP
        h[H_CPUID_OFF], h[H_CPUID_ROWS] = cpuid_off, rows
        h[H_BT_ADDR], h[H_BT_SIZE] = self.block_table.ctypes.data, BLOCK_TABLE_SIZE
        self.front = np.zeros((FRONT_SIZE, 2), np.int64)
        h[H_FRONT_ADDR] = self.front.ctypes.data
        h[H_RAM_ADDR], h[H_RAM_SIZE] = ram_address, ram_size
        self.cpuid_table = h[cpuid_off:total_slots].reshape(rows, 6)
        self.cpuid_table[:] = cpuid_table
        self.native_pio = h[H_NPIO:H_NPIO + NPIO_COLUMNS * NPIO_MAX].reshape(NPIO_MAX, NPIO_COLUMNS)

    def reset(self, cpuid_table: np.ndarray) -> None:
        """Counters and CPUID as new, no native port handlers; the block-count cache is kept."""
        h = self.buf
        h[H_ICOUNT:H_CPUID_EXITS + 1] = 0
        h[H_MSR_FAST] = h[H_HC_FAST] = 0
        h[H_BT_MISSES] = h[H_BT_PROBES] = 0
        h[H_DEADLINE:H_TSC_READS + 1] = 0      # H_SKIP_SYNC too: set by whoever wants it
        h[H_MSR_TRAP] = 0
        h[H_LAST_BLOCK] = h[H_BLOCK_START] = h[H_BLOCK_COUNT] = h[H_RUN_START] = 0
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

    def arm_block(self, address: int, size: int) -> bool:
        """Mark the cached block at (address, size) as having its trapped instructions hooked;
        False if it is not in the cache (it will be decoded, and stop once more, when it next
        runs)."""
        key = _int64(((address + 1) ^ (size << 48)) & _MASK64)      # as _block_value computes it
        table = self.block_table
        buckets = int(self.buf[H_BT_SIZE]) // BLOCK_TABLE_WAYS
        base = ((_int64((key * int(_BT_HASH)) & _MASK64) >> 40) & (buckets - 1)) * BLOCK_TABLE_WAYS
        front = (_int64((key * int(_BT_HASH)) & _MASK64) >> 52) & (FRONT_SIZE - 1)
        if self.front[front, 0] == key:
            self.front[front, 1] |= ARMED
        for slot in range(base, base + BLOCK_TABLE_WAYS):
            if table[slot, 0] == key and table[slot, 1] >= 0:
                table[slot, 1] |= ARMED
                return True
        return False

    def forget_blocks(self) -> None:
        """Empty the block-count cache (all its translations are gone too)."""
        self.front[:] = 0
        if self.buf[H_BT_ENTRIES]:
            self._block_map.madvise(mmap.MADV_DONTNEED)   # private anonymous: zero again, pages released
        self.buf[H_BT_ENTRIES] = self.buf[H_BT_EVICTIONS] = 0

    @property
    def holds_every_block(self) -> bool:
        """Whether every block counted since the cache was emptied is still in it (none evicted);
        only then does block_table name every block Unicorn may still hold a translation of."""
        return self.buf[H_BT_EVICTIONS] == 0

    def block_cache_stats(self) -> dict:
        """The block-count cache: slots, ways, entries in use, evictions since it was emptied,
        and this run's misses and slots examined by lookups (at most ways per lookup)."""
        h = self.buf
        return {"slots": int(h[H_BT_SIZE]), "ways": BLOCK_TABLE_WAYS,
                "entries": int(h[H_BT_ENTRIES]), "evictions": int(h[H_BT_EVICTIONS]),
                "lookups": int(h[H_BLOCKS]), "misses": int(h[H_BT_MISSES]), "probes": int(h[H_BT_PROBES])}

    @property
    def address(self) -> int:
        return self.buf.ctypes.data

    def invalidate_blocks(self, start: int, end: int) -> None:
        """Forget cached instruction counts of blocks starting in [start, end) (code rewritten)."""
        self.front[:] = 0
        if self.buf[H_BT_ENTRIES]:
            _invalidate(self.block_table, start & _VA_MASK, end & _VA_MASK)

    def counters(self) -> dict:
        h = self.buf
        return {"instructions": int(h[H_ICOUNT]), "blocks": int(h[H_BLOCKS]),
                "io_fast_exits": int(h[H_IO_FAST]), "io_slow_exits": int(h[H_IO_SLOW]),
                "cpuid_exits": int(h[H_CPUID_EXITS]), "block_count_misses": int(h[H_BT_MISSES]),
                "msr_fast_exits": int(h[H_MSR_FAST]), "hypercalls_fast": int(h[H_HC_FAST])}


_VA_MASK = (1 << 48) - 1


@njit(cache=True)
def _invalidate(table, start, end):
    # A key is (address + 1) ^ (size << 48): its low 48 bits are the block address's, + 1.
    # Marked stale with a count of -1, the key kept: recounted in place when the block runs
    # again, or the bucket's first choice for the next insert.
    for i in range(table.shape[0]):
        key = table[i, 0]
        address = ((key & _VA_MASK) - 1) & _VA_MASK
        if key != 0 and start <= address < end:
            table[i, 1] = -1


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
MSR_FLAG = np.int64(1) << 35  # the block holds an RDMSR or WRMSR
ARMED = np.int64(1) << 34     # ... and the host has hooked them (FastPathState.arm_block)


@njit(cache=True)
def block_count(uc, h, address, size):
    """Instructions in the block at (address, size): cached, decoded on a miss.

    Unicorn runs each iteration of a REP string instruction as its own one-instruction block;
    like the CPU's instructions-retired counter, the iterations count as one instruction. The
    first iteration runs as the last instruction of the block before, so an iteration block that
    ends where the previous block ended is a repeat.
    """
    return _retired(h, _block_value(uc, h, address, size), address, size)


@njit(cache=True)
def _retired(h, value, address, size):
    end = np.int64(address) + size
    repeat = (value & REP_FLAG) != 0 and h[H_LAST_BLOCK] == end
    h[H_LAST_BLOCK] = end
    return 0 if repeat else value & 0xFFFFFFFF


@njit(cache=True)
def _block_value(uc, h, address, size):
    key = np.int64(address + 1) ^ (np.int64(size) << 48)
    front = carray(_int_to_voidptr(h[H_FRONT_ADDR]), FRONT_SIZE * 2, np.int64)
    fi = 2 * (((key * _BT_HASH) >> 52) & (FRONT_SIZE - 1))
    if front[fi] == key:
        return front[fi + 1]
    value = _table_value(uc, h, key, address, size)
    front[fi], front[fi + 1] = key, value
    return value


@njit(cache=True)
def _table_value(uc, h, key, address, size):
    t = carray(_int_to_voidptr(h[H_BT_ADDR]), h[H_BT_SIZE] * 2, np.int64)
    buckets = h[H_BT_SIZE] // BLOCK_TABLE_WAYS
    base = (((key * _BT_HASH) >> 40) & (buckets - 1)) * (2 * BLOCK_TABLE_WAYS)
    way = 0
    while way < BLOCK_TABLE_WAYS:
        if t[base + 2 * way] == key:
            break
        way += 1
    h[H_BT_PROBES] += min(way + 1, BLOCK_TABLE_WAYS)
    if way < BLOCK_TABLE_WAYS and t[base + 2 * way + 1] >= 0:
        return t[base + 2 * way + 1]
    h[H_BT_MISSES] += 1
    n = _decode_block(uc, h, address, size)
    if way < BLOCK_TABLE_WAYS:         # stale: recounted in place
        t[base + 2 * way + 1] = n
        return n
    # Insert newest first at way 0: the ways before the one taken (the first empty or stale
    # one, else the last, whose entry is evicted) move down one.
    victim = 0
    while victim < BLOCK_TABLE_WAYS - 1 and t[base + 2 * victim] != 0 and t[base + 2 * victim + 1] >= 0:
        victim += 1
    if t[base + 2 * victim] == 0:
        h[H_BT_ENTRIES] += 1
    elif t[base + 2 * victim + 1] >= 0:
        h[H_BT_EVICTIONS] += 1
    for w in range(victim, 0, -1):
        t[base + 2 * w] = t[base + 2 * w - 2]
        t[base + 2 * w + 1] = t[base + 2 * w - 1]
    t[base] = key
    t[base + 1] = n
    return n


@njit(cache=True)
def _decode_block(uc, h, address, size):
    """The block's instruction count (REP_FLAG for a lone REP instruction), from its bytes."""
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
    if got > 0:
        n |= special_instructions(code, got)
    return n


@njit(cache=True)
def special_instructions(code, end):
    """MSR_FLAG if an instruction in code[:end] is RDMSR (0F 32) or WRMSR (0F 30)."""
    flags = np.int64(0)
    pos = 0
    while pos < end:
        if code[pos] == 0x0F and pos + 1 < end and (code[pos + 1] == 0x32 or code[pos + 1] == 0x30):
            flags |= MSR_FLAG
        length = insn_length(code, pos, end)
        if length <= 0:
            break
        pos += length
    return flags


@cfunc(types.void(types.voidptr, types.uint64, types.uint32, types.voidptr), cache=True)
def hook_block(uc, address, size, ud):
    h = _header(ud)
    if h[H_SKIP_SYNC] != 0:
        carray(_int_to_voidptr(h[H_SKIP_SYNC]), 1, np.uint8)[0] = 1
    value = _block_value(uc, h, address, size)
    if h[H_MSR_TRAP] != 0 and (value & MSR_FLAG) != 0 and (value & ARMED) == 0:
        # The block touches an MSR whose instructions have no hook yet: the run ends before the
        # block runs (RIP written back to the block's start), the host adds them and goes on.
        h[H_PENDING], h[H_PENDING_SIZE] = address, size
        rip = np.zeros(1, np.int64)
        rip[0] = address
        native.call_reg_access(h[H_FN_REG_WRITE], uc, x86.UC_X86_REG_RIP, rip.ctypes.data)
        native.call_uc_stop(h[H_FN_UC_STOP], uc)
        return
    if np.int64(address) != h[H_LAST_BLOCK]:       # a run starts: the deadline is looked at
        h[H_RUN_START] = h[H_ICOUNT]
        if h[H_DEADLINE] != 0 and h[H_ICOUNT] >= h[H_DEADLINE]:
            h[H_DEADLINE_HIT] = 1                  # ends before the block runs, not counted
            h[H_DEADLINE] = 0
            native.call_uc_stop(h[H_FN_UC_STOP], uc)
            return
    h[H_BLOCKS] += 1
    n = _retired(h, value, address, size)
    h[H_ICOUNT] += n
    h[H_BLOCK_START] = address
    h[H_BLOCK_COUNT] = n
