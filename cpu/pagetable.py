"""4-level x86-64 page-table walk over guest RAM (numba), with a pure-Python twin for tests.

walk() returns the guest physical address for a virtual address, or a negative code naming the
level where the walk failed (WALK_NOT_PRESENT_* / WALK_OUTSIDE_RAM), like a #PF would.
"""
import numpy as np
from numba import njit

PTE_P = 1
PTE_RW = 2
PTE_US = 4
PTE_A = 0x20
PTE_D = 0x40
PTE_PS = 0x80
PTE_NX = 1 << 63
ADDR_MASK = 0x000FFFFFFFFFF000

WALK_OUTSIDE_RAM = -1
WALK_NOT_PRESENT_PML4 = -4
WALK_NOT_PRESENT_PDPT = -3
WALK_NOT_PRESENT_PD = -2
WALK_NOT_PRESENT_PT = -5
WALK_NON_CANONICAL = -6

LEVEL_NAMES = {WALK_OUTSIDE_RAM: "page table outside guest RAM", WALK_NOT_PRESENT_PML4: "PML4E not present",
               WALK_NOT_PRESENT_PDPT: "PDPTE not present", WALK_NOT_PRESENT_PD: "PDE not present",
               WALK_NOT_PRESENT_PT: "PTE not present", WALK_NON_CANONICAL: "non-canonical address"}

_ADDR_MASK_I = np.int64(ADDR_MASK)


@njit(cache=True)
def _entry(ram, table, index):
    off = table + index * 8
    if off < 0 or off + 8 > ram.shape[0]:
        return np.int64(-1)
    v = np.int64(0)
    for i in range(8):
        v |= np.int64(ram[off + i]) << (8 * i)
    return v


@njit(cache=True)
def walk(ram, cr3, va):
    """GPA for va under cr3 (4-level paging), or a negative WALK_* code."""
    va = np.int64(va)
    top = va >> 47
    if top != 0 and top != -1:
        return WALK_NON_CANONICAL
    table = np.int64(cr3) & _ADDR_MASK_I
    shifts = (39, 30, 21, 12)
    fails = (WALK_NOT_PRESENT_PML4, WALK_NOT_PRESENT_PDPT, WALK_NOT_PRESENT_PD, WALK_NOT_PRESENT_PT)
    for level in range(4):
        shift = shifts[level]
        e = _entry(ram, table, (va >> shift) & 511)
        if e == -1:
            return WALK_OUTSIDE_RAM
        if (e & PTE_P) == 0:
            return fails[level]
        if (level == 1 or level == 2) and (e & PTE_PS):
            size_mask = (np.int64(1) << shift) - 1
            return (e & _ADDR_MASK_I & ~size_mask) | (va & size_mask)
        table = e & _ADDR_MASK_I
    return table | (va & 0xFFF)


def walk_py(ram: bytes, cr3: int, va: int) -> int:
    """Pure-Python twin of walk(), for tests."""
    va &= (1 << 64) - 1
    top = va >> 47
    if top not in (0, (1 << 17) - 1):
        return WALK_NON_CANONICAL
    table = cr3 & ADDR_MASK
    fails = (WALK_NOT_PRESENT_PML4, WALK_NOT_PRESENT_PDPT, WALK_NOT_PRESENT_PD, WALK_NOT_PRESENT_PT)
    for level, shift in enumerate((39, 30, 21, 12)):
        off = table + ((va >> shift) & 511) * 8
        if off + 8 > len(ram):
            return WALK_OUTSIDE_RAM
        e = int.from_bytes(ram[off:off + 8], "little")
        if not e & PTE_P:
            return fails[level]
        if level in (1, 2) and e & PTE_PS:
            mask = (1 << shift) - 1
            return (e & ADDR_MASK & ~mask) | (va & mask)
        table = e & ADDR_MASK
    return table | (va & 0xFFF)


def walk_steps(ram, cr3: int, va: int) -> list[tuple[str, int, int]]:
    """The walk as (level name, entry GPA, entry value) rows, for `hclsim step` and fault reports."""
    rows = []
    table = cr3 & ADDR_MASK
    for name, shift in (("PML4E", 39), ("PDPTE", 30), ("PDE", 21), ("PTE", 12)):
        off = table + ((va >> shift) & 511) * 8
        if off + 8 > len(ram):
            rows.append((name, off, -1))
            break
        e = int.from_bytes(bytes(ram[off:off + 8]), "little")
        rows.append((name, off, e))
        if not e & PTE_P or (name in ("PDPTE", "PDE") and e & PTE_PS):
            break
        table = e & ADDR_MASK
    return rows


def translate(ram, cr3: int, va: int) -> int:
    """walk() for a Python int address (high-half addresses included)."""
    va &= (1 << 64) - 1
    return int(walk(ram, cr3, va - (1 << 64) if va >= 1 << 63 else va))
