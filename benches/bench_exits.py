"""Cost per exit of the numba UART-OUT and CPUID hooks against the same work in Python hooks.
The numba UART exit goes through the device bus's native port table (devices/bus.py) into the
16550 device's own native handler, as in a machine.

Goal (issue 2): the native exit is >= 8x cheaper. Both variants run the same guest loop on the
same kind of engine in the same run; the ratio is stored in extra_info.
    .venv/bin/pytest benches/bench_exits.py --benchmark-only
"""

import numpy as np
import pytest
from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from hclsim.benches.goals import check_goal
from hclsim.cpu import fastpath, native
from hclsim.cpu.cpuid import build_cpuid_table, cpuid_lookup
from hclsim.cpu.engine import SLOW_IO
from hclsim.devices.bus import Bus
from hclsim.devices.uart16550 import Uart16550, new_registers, uart_access
from hclsim.tests.asmutil import assemble

EXITS = 20_000
LOOPS = {
    "uart_out": f"mov ecx, {EXITS}\n1: mov dx, 0x3e8\n mov al, 'x'\n out dx, al\n dec ecx\n jnz 1b\n hlt",
    "cpuid": f"mov esi, {EXITS}\n1: mov eax, 0x40000000\n xor ecx, ecx\n cpuid\n dec esi\n jnz 1b\n hlt",
}
EMPTY = {
    "uart_out": f"mov ecx, {EXITS}\n1: mov dx, 0x3e8\n mov al, 'x'\n nop\n dec ecx\n jnz 1b\n hlt",
    "cpuid": f"mov esi, {EXITS}\n1: mov eax, 0x40000000\n xor ecx, ecx\n nop\n dec esi\n jnz 1b\n hlt",
}
RESULTS = {}


def _engine(code: bytes, mode: str, kind: str):
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x200000, UC_PROT_ALL)
    uc.mem_write(0x1000, code)
    table = build_cpuid_table(0, 64)
    state = fastpath.FastPathState(table, 0, 0, SLOW_IO.address)
    uart = Uart16550("COM3", 0x3E8)
    if mode == "numba":
        bus = Bus("bench")
        bus.add(uart)
        state.set_native_pio([(0x3E8, 8, *uart.native_pio())])
        hook = fastpath.hook_out if kind == "uart_out" else fastpath.hook_cpuid
        insn = x86.UC_X86_INS_OUT if kind == "uart_out" else x86.UC_X86_INS_CPUID
        native.hook_add(uc, ucc.UC_HOOK_INSN, hook.address, state.address, insn)
    elif mode == "python":
        regs, out = new_registers(), np.zeros(1 << 16, np.uint8)
        n = [0]

        def py_out(uc_, port, size, value, ud):
            _, n[0] = uart_access.py_func(regs, out, n[0] % 60000, 1 << 16, port - 0x3E8, True, value)

        def py_cpuid(uc_, ud):
            r = cpuid_lookup.py_func(table, uc_.reg_read(x86.UC_X86_REG_RAX), uc_.reg_read(x86.UC_X86_REG_RCX), 0)
            for reg, v in zip((x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX), r):
                uc_.reg_write(reg, int(v) & 0xFFFFFFFF)
            return 1
        if kind == "uart_out":
            uc.hook_add(ucc.UC_HOOK_INSN, py_out, None, 1, 0, x86.UC_X86_INS_OUT)
        else:
            uc.hook_add(ucc.UC_HOOK_INSN, py_cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)
    return uc, state, uart


@pytest.mark.parametrize("kind", ["uart_out", "cpuid"])
@pytest.mark.parametrize("mode", ["baseline", "numba", "python"])
def test_exit_cost(benchmark, kind, mode):
    code = assemble(EMPTY[kind] if mode == "baseline" else LOOPS[kind])
    uc, state, uart = _engine(code, mode, kind)

    def run():
        uc.emu_start(0x1000, 0x1000 + len(code))
        uart.flush()  # what the bus does after every run
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    RESULTS[(kind, mode)] = benchmark.stats.stats.median
    if all((kind, m) in RESULTS for m in ("baseline", "numba", "python")):
        base = RESULTS[(kind, "baseline")]
        per_numba = (RESULTS[(kind, "numba")] - base) / EXITS
        per_python = (RESULTS[(kind, "python")] - base) / EXITS
        benchmark.extra_info.update(ns_per_exit_numba=per_numba * 1e9, ns_per_exit_python=per_python * 1e9,
                                    python_over_numba=per_python / per_numba)
        print(f"\n{kind}: numba {per_numba * 1e9:.1f} ns/exit, python {per_python * 1e9:.1f} ns/exit, "
              f"ratio {per_python / per_numba:.1f}x")
        check_goal(benchmark, f"{kind} exit: Python hook / numba cfunc", per_python / per_numba, 8,
                   at_most=False, unit="x")
