"""The numba hot paths agree with their references: capstone for instruction lengths, the
pure-Python twins for the page walk and the UART, and the CPUID table for the hook."""
import struct
from pathlib import Path

import capstone
import numpy as np
import pytest
from elftools.elf.elffile import ELFFile

from hclsim.defs.platform import ISOLATION_NONE, ISOLATION_VBS
from hclsim.cpu import pagetable
from hclsim.cpu.cpuid import build_cpuid_table, cpuid_lookup
from hclsim.cpu.insnlen import count_instructions, insn_length
from hclsim.devices import uart16550 as uart
from hclsim.devices import uart16550_native as uart_native

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")


def _text(path: Path) -> tuple[bytes, int]:
    with path.open("rb") as f:
        sec = ELFFile(f).get_section_by_name(".text")
        return sec.data(), sec["sh_addr"]


@pytest.mark.parametrize("limit", [400_000])
def test_insn_length_matches_capstone_on_libc(limit):
    """libc is real compiler output with SSE/AVX/VEX and every prefix gcc emits."""
    code, addr = _text(LIBC)
    code = code[:limit]
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    arr = np.frombuffer(code, np.uint8)
    checked = 0
    for insn in cs.disasm(code, addr):
        off = insn.address - addr
        assert insn_length(arr, off, len(arr)) == insn.size, f"{insn.mnemonic} {insn.op_str} {insn.bytes.hex()}"
        checked += 1
    assert checked > 50_000


def test_count_instructions():
    code = np.frombuffer(bytes.fromhex("4889c8" "b911000000" "0f01c1" "c3"), np.uint8)
    assert count_instructions(code, 0, len(code)) == 4
    assert insn_length(code, 0, 2) == -1  # truncated


def _identity_tables(ram: bytearray, base: int) -> int:
    pml4, pdpt, pd, pt = base, base + 0x1000, base + 0x2000, base + 0x3000
    struct.pack_into("<Q", ram, pml4, pdpt | 3)
    struct.pack_into("<Q", ram, pml4 + 511 * 8, pdpt | 3)               # high half too
    struct.pack_into("<Q", ram, pdpt, pd | 3)
    struct.pack_into("<Q", ram, pdpt + 8, (1 << 30) | 0x83)             # 1 GiB leaf
    struct.pack_into("<Q", ram, pd, pt | 3)                              # 4 KiB tables for 0-2M
    struct.pack_into("<Q", ram, pd + 8, (2 << 21) | 0x83)               # 2 MiB leaf -> 4M
    for i in range(16):
        struct.pack_into("<Q", ram, pt + 8 * i, (0x100000 + 0x1000 * (15 - i)) | 3)
    return pml4


def test_page_walk_twins_agree():
    ram = bytearray(8 << 20)
    cr3 = _identity_tables(ram, 0x10000)
    arr = np.frombuffer(ram, np.uint8)
    addresses = [0, 0x1234, 0xF123, 0x10000, 0x200000 + 0x5678, 0x40000000 + 0x123456,
                 0xFFFFFF8000001234, 0x0000800000000000, 0x7FFFFFFFF000, 0x400000]
    for va in addresses:
        assert pagetable.translate(arr, cr3, va) == pagetable.walk_py(bytes(ram), cr3, va), hex(va)
    assert pagetable.walk(arr, cr3, 0x1234) == 0x10E000 + 0x234
    assert pagetable.walk(arr, cr3, 0x200000 + 0x5678) == 0x400000 + 0x5678
    assert pagetable.walk(arr, cr3, 0x40000000 + 0x123456) == 0x40000000 + 0x123456
    assert pagetable.walk(arr, cr3, 0x0000800000000000) == pagetable.WALK_NON_CANONICAL
    assert pagetable.walk(arr, cr3, 0x400000) == pagetable.WALK_NOT_PRESENT_PD
    assert pagetable.walk(arr, cr3, 0x10000) == pagetable.WALK_NOT_PRESENT_PT


def _uart_script():
    # LCR DLAB, divisor 1, 8N1, FCR, MCR, then "Hi\n", then reads of every register.
    return [(3, 1, 0x80), (0, 1, 1), (1, 1, 0), (3, 1, 0x03), (2, 1, 0xC7), (4, 1, 0x0B),
            (0, 1, ord("H")), (0, 1, ord("i")), (0, 1, 10)] + [(off, 0, 0) for off in range(8)]


def test_uart_numba_matches_python_twin():
    """One source of the register logic: numba's compile of it, and the pure function itself
    over the native path's arrays and over the pure device's list and bytearray."""
    assert uart_native.uart_access.py_func is uart.register_access
    results = []
    for fn, regs, out in ((uart_native.uart_access, uart_native.new_registers(), np.zeros(16, np.uint8)),
                          (uart.register_access, uart_native.new_registers(), np.zeros(16, np.uint8)),
                          (uart.register_access, uart.new_registers(), bytearray(16))):
        n, reads = 0, []
        for off, write, value in _uart_script():
            v, n = fn(regs, out, n, 16, off, bool(write), value)
            reads.append(int(v))
        results.append((reads, bytes(out[:n]), [int(r) for r in regs]))
        assert bytes(out[:n]) == b"Hi\n"
        assert uart.baud(regs) == 115200
    assert results[0] == results[1] == results[2]
    assert results[0][0][-8 + 5] == uart.LSR_THRE_TEMT


def test_uart_ring_full_drops_nothing_silently():
    regs, out = uart_native.new_registers(), np.zeros(2, np.uint8)
    _, n = uart_native.uart_access(regs, out, 2, 2, 0, True, 65)
    assert n == 2  # the caller drains at capacity before writing; a full ring is not overwritten
    _, n = uart.register_access(uart.new_registers(), bytearray(2), 2, 2, 0, True, 65)
    assert n == 2


@pytest.mark.parametrize("isolation", [ISOLATION_NONE, ISOLATION_VBS])
def test_cpuid_table(isolation):
    table = build_cpuid_table(isolation, 64)
    eax, ebx, ecx, edx = cpuid_lookup(table, 0x40000000, 0, 5)
    assert (ebx, ecx, edx) == (0x7263694D, 0x666F736F, 0x76482074)  # "Microsoft Hv"
    assert cpuid_lookup(table, 1, 0, 0x2A)[1] >> 24 == 0x2A          # initial APIC id
    assert cpuid_lookup(table, 1, 0, 0)[2] & (1 << 21)               # x2APIC
    assert cpuid_lookup(table, 0xB, 1, 77)[3] == 77                  # x2APIC id
    assert bool(cpuid_lookup(table, 0x40000003, 0, 0)[1] & (1 << 22)) == (isolation == ISOLATION_VBS)
    assert cpuid_lookup(table, 0x4000000C, 0, 0)[1] & 0xF == isolation
    assert cpuid_lookup(table, 0x12345678, 0, 0) == (0, 0, 0, 0)
    assert cpuid_lookup.py_func(table, 0xB, 1, 77) == cpuid_lookup(table, 0xB, 1, 77)


def test_native_apic_msr_path_matches_the_python_handler():
    """The numba APIC_BASE/SVR/TPR sites leave the machine exactly as the Python MSR handler
    does: same serial output, instruction counts, APIC registers and hypercalls."""
    from hclsim.config import BootConfig
    from hclsim.cpu import fastpath
    from hclsim.machine import Machine

    runs = []
    for native_path in (True, False):
        m = Machine(BootConfig(cpus=16, numa_nodes=2))
        if not native_path:
            m.engine.state.buf[fastpath.H_APIC_TABLE] = 0   # every MSR site goes to Python
        r = m.run_to_handoff()
        runs.append((r, m.hv.apic.copy(), r.counters))
        m.close()
    (a, apic_a, ca), (b, apic_b, cb) = runs
    assert ca["msr_fast_exits"] >= 3 * 14 and cb["msr_fast_exits"] == 0
    assert ca["msr_exits"] == cb["msr_exits"]
    assert ca["instructions"] == cb["instructions"] and a.serial == b.serial
    assert (apic_a == apic_b).all()
    assert all(row[0] & (1 << 10) and row[1] & 0x100 for row in apic_a[2:8])  # APs: x2APIC, enabled
    assert a.hypercalls == b.hypercalls


def test_native_vmcall_path_matches_the_python_handler():
    """EnableVpVtl/StartVp done natively leave the machine as Python's handler does: same
    serial, instruction counts, hypercall log (in order) and per-VP start state."""
    from hclsim.config import BootConfig
    from hclsim.cpu import fastpath
    from hclsim.machine import Machine

    runs = []
    for native_path in (True, False):
        m = Machine(BootConfig(cpus=24, numa_nodes=2))
        if not native_path:
            m.engine.state.buf[fastpath.H_HV_AREA] = 0   # every vmcall goes to Python
        r = m.run_to_handoff()
        state = [(s.vtl2_enabled, s.started, s.vtl2_context) for s in m.hv.vps]
        runs.append((r, state, m.hv.native.vp.copy()))
        m.close()
    (a, state_a, vp_a), (b, state_b, vp_b) = runs
    assert a.counters["hypercalls_fast"] == 2 * a.sidecar_summary["idle_cpus"] and b.counters["hypercalls_fast"] == 0
    assert a.hypercalls == b.hypercalls and len(a.hypercalls) == a.counters["hypercalls"]
    assert a.counters["instructions"] == b.counters["instructions"] and a.serial == b.serial
    assert state_a == state_b and (vp_a == vp_b).all()
    assert all(s[0] and s[1] and len(s[2]) == 0xE0 for s in state_a[2:12])
