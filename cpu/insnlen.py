"""x86-64 instruction length decoding, for counting instructions per translated block.

The block hook learns a block's address and byte size; the number of instructions in it is
found once per block by walking instruction lengths here (numba) and cached. capstone is the
reference: tests/test_insnlen.py checks this decoder against it over the project's firmware.
"""
import numpy as np
from numba import njit


def _bitmap(ranges):
    table = np.zeros(256, np.uint8)
    for r in ranges:
        lo, hi = (r, r) if isinstance(r, int) else r
        table[lo:hi + 1] = 1
    return table


# One-byte opcodes that take a ModRM byte.
_MODRM_1 = _bitmap([(0x00, 0x03), (0x08, 0x0B), (0x10, 0x13), (0x18, 0x1B), (0x20, 0x23),
                    (0x28, 0x2B), (0x30, 0x33), (0x38, 0x3B), 0x62, 0x63, 0x69, 0x6B,
                    (0x80, 0x8F), (0xC0, 0xC1), (0xC4, 0xC7), (0xD0, 0xD3), (0xD8, 0xDF),
                    (0xF6, 0xF7), (0xFE, 0xFF)])
# Two-byte (0F xx) opcodes WITHOUT a ModRM byte; everything else in that map has one.
_NO_MODRM_2 = _bitmap([(0x05, 0x09), 0x0B, 0x0E, (0x30, 0x37), 0x77, (0x80, 0x8F),
                       (0xA0, 0xA2), (0xA8, 0xAA), (0xC8, 0xCF)])
# Immediate size class for one-byte opcodes: 0 none, 1 imm8, 2 imm16, 4 imm z (16/32),
# 8 imm z or imm64 with REX.W (mov r64, imm), 3 imm16+imm8 (enter), 5 moffs.
_IMM_1 = np.zeros(256, np.uint8)
for _op in (0x04, 0x0C, 0x14, 0x1C, 0x24, 0x2C, 0x34, 0x3C, 0x6A, 0x6B, 0x70, 0x71, 0x72, 0x73,
            0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x7B, 0x7C, 0x7D, 0x7E, 0x7F, 0x80, 0x83,
            0xA8, 0xC0, 0xC1, 0xC6, 0xCD, 0xE0, 0xE1, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xEB):
    _IMM_1[_op] = 1
_IMM_1[0xB0:0xB8] = 1
for _op in (0x05, 0x0D, 0x15, 0x1D, 0x25, 0x2D, 0x35, 0x3D, 0x68, 0x69, 0x81, 0xA9, 0xC7, 0xE8, 0xE9):
    _IMM_1[_op] = 4
_IMM_1[0xB8:0xC0] = 8
_IMM_1[0xC2] = 2
_IMM_1[0xCA] = 2
_IMM_1[0xC8] = 3
_IMM_1[0xA0:0xA4] = 5
# Two-byte opcodes with an imm8.
_IMM8_2 = _bitmap([(0x70, 0x73), 0xA4, 0xAC, 0xBA, 0xC2, (0xC4, 0xC6)])


@njit(cache=True)
def _modrm_len(code, pos, end):
    """Bytes taken by ModRM + SIB + displacement starting at pos (-1 if truncated)."""
    if pos >= end:
        return -1
    modrm = code[pos]
    mod = modrm >> 6
    rm = modrm & 7
    n = 1
    if mod == 3:
        return n
    if rm == 4:
        if pos + 1 >= end:
            return -1
        sib = code[pos + 1]
        n += 1
        if mod == 0 and (sib & 7) == 5:
            n += 4
    elif mod == 0 and rm == 5:
        n += 4  # RIP-relative disp32
    if mod == 1:
        n += 1
    elif mod == 2:
        n += 4
    return n


@njit(cache=True)
def insn_length(code, pos, end):
    """Length of the instruction at code[pos] (64-bit mode), or -1 if it runs past end."""
    start = pos
    opsize16 = False
    addr32 = False
    rex_w = False
    while pos < end:
        b = code[pos]
        if b == 0x66:
            opsize16 = True
        elif b == 0x67:
            addr32 = True
        elif b in (0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65):
            pass
        else:
            break
        pos += 1
    if pos < end and (code[pos] & 0xF0) == 0x40:
        rex_w = (code[pos] & 8) != 0
        pos += 1
    if pos >= end:
        return -1
    op = code[pos]
    pos += 1
    if op == 0xC4 or op == 0xC5 or op == 0x62:
        # VEX (C4: 3 bytes, C5: 2 bytes) or EVEX (62: 4 bytes), then opcode, ModRM.
        if op == 0xC5:
            mmap = 1
            pos += 1
        elif op == 0xC4:
            if pos >= end:
                return -1
            mmap = code[pos] & 0x1F
            pos += 2
        else:
            if pos >= end:
                return -1
            mmap = code[pos] & 0x7
            pos += 3
        pos += 1  # opcode
        m = _modrm_len(code, pos, end)
        if m < 0:
            return -1
        pos += m
        if mmap == 3:
            pos += 1
        return pos - start if pos <= end else -1
    if op == 0x0F:
        if pos >= end:
            return -1
        op2 = code[pos]
        pos += 1
        if op2 == 0x38 or op2 == 0x3A:
            pos += 1  # third opcode byte
            m = _modrm_len(code, pos, end)
            if m < 0:
                return -1
            pos += m
            if op2 == 0x3A:
                pos += 1
        elif op2 == 0x0F:  # 3DNow!: ModRM then an imm8 opcode suffix
            m = _modrm_len(code, pos, end)
            if m < 0:
                return -1
            pos += m + 1
        else:
            if _NO_MODRM_2[op2] == 0:
                m = _modrm_len(code, pos, end)
                if m < 0:
                    return -1
                pos += m
            if 0x80 <= op2 <= 0x8F:
                pos += 4
            elif _IMM8_2[op2]:
                pos += 1
        return pos - start if pos <= end else -1
    reg = 0
    if _MODRM_1[op]:
        if pos >= end:
            return -1
        reg = (code[pos] >> 3) & 7
        m = _modrm_len(code, pos, end)
        if m < 0:
            return -1
        pos += m
    imm = _IMM_1[op]
    if op == 0xF6 and reg < 2:
        imm = 1
    elif op == 0xF7 and reg < 2:
        imm = 4
    if imm == 1:
        pos += 1
    elif imm == 2:
        pos += 2
    elif imm == 3:
        pos += 3
    elif imm == 4:
        pos += 2 if (opsize16 and not rex_w) else 4
    elif imm == 8:
        pos += 8 if rex_w else (2 if opsize16 else 4)
    elif imm == 5:
        pos += 4 if addr32 else 8
    return pos - start if pos <= end else -1


@njit(cache=True)
def count_instructions(code, pos, end):
    """Instructions in code[pos:end]; a trailing partial instruction counts as one."""
    n = 0
    while pos < end:
        length = insn_length(code, pos, end)
        n += 1
        if length <= 0:
            break
        pos += length
    return n
