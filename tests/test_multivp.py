"""Several VPs on one engine: StartVirtualProcessor, x2APIC IPIs, interrupt delivery through the
guest IDT, HLT wake-up and PAUSE yields, on hand-assembled guest code."""
import struct

import numpy as np
import pytest
from unicorn import x86_const as x86

from hclsim.boot.image import plan_layout, write_page_tables
from hclsim.cpu import pool
from hclsim.cpu.cpuid import build_cpuid_table
from hclsim.cpu.exit_sites import find_exit_sites
from hclsim.hv.hypervisor import Hypervisor
from hclsim.hv.scheduler import STOP_IDLE, Scheduler
from hclsim.hv.vp import HALTED, RUNNABLE, Vp, long_mode_context
from hclsim.sidecar import layout as sl

from .asmutil import assemble

BASE = 0x8000000
CODE = BASE + 0x400000
AP, HANDLER = CODE + 0x400, CODE + 0x800
DATA, IDT, HCPAGE, HCIN, GDT = (CODE + off for off in (0x8000, 0x9000, 0xA000, 0xB000, 0xC000))

GUEST = f"""
    mov ecx, 0x40000001
    mov eax, {HCPAGE | 1}
    xor edx, edx
    wrmsr
    mov ecx, 0x1b
    rdmsr
    or eax, 0xc00
    wrmsr
    mov rcx, 0x0f
    mov rdx, {HCIN}
    xor r8, r8
    mov rax, {HCPAGE}
    call rax
    mov r14, rax
    mov rcx, 0x99
    mov rdx, {HCIN}
    xor r8, r8
    mov rax, {HCPAGE}
    call rax
    mov r15, rax
1:  pause
    cmp dword ptr [{DATA}], 1
    jne 1b
    xor ebx, ebx
2:  mov ecx, 0x830
    mov eax, 0x20
    mov edx, 1
    wrmsr
    inc ebx
3:  pause
    cmp dword ptr [{DATA + 4}], ebx
    jne 3b
    cmp ebx, 3
    jne 2b
    mov rcx, 0x99
    mov rdx, {HCIN}
    xor r8, r8
    mov rax, {HCPAGE}
    call rax
    mov r13, rax
    cli
    hlt

    .org 0x400
    mov ecx, 0x1b
    rdmsr
    or eax, 0xc00
    wrmsr
    mov ecx, 0x80f
    mov eax, 0x1ff
    xor edx, edx
    wrmsr
    mov dword ptr [{DATA}], 1
4:  sti
    hlt
    cli
    jmp 4b

    .org 0x800
    inc dword ptr [{DATA + 4}]
    push rcx
    push rax
    push rdx
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rax
    pop rcx
    iretq
"""


def _setup(mem, cr3):
    for i, e in enumerate((0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)):
        mem.write_u64(GDT + 8 * i, e)
    gate = (HANDLER & 0xFFFF) | (0x10 << 16) | (0x8E << 40) | (((HANDLER >> 16) & 0xFFFF) << 48)
    mem.write(IDT + 16 * 0x20, struct.pack("<QQ", gate, HANDLER >> 32))
    inp = sl.view(mem, HCIN, sl.hv_enable_vp_vtl_input)
    inp["partition_id"], inp["vp_index"], inp["target_vtl"] = 2**64 - 1, 1, 2
    c = inp["context"]
    c["rip"], c["rsp"], c["rflags"] = AP, CODE + 0x20000, 2
    c["cs"]["selector"] = 0x10
    for seg in ("ds", "es", "fs", "gs", "ss"):
        c[seg]["selector"] = 0x18
    c["gdtr"]["base"], c["gdtr"]["limit"] = GDT, 0x1F
    c["idtr"]["base"], c["idtr"]["limit"] = IDT, 16 * 0x21 - 1
    c["efer"], c["cr0"], c["cr3"], c["cr4"] = 0xD00, 0x80000021, cr3, 0x40060


def _run():
    mem, engine = pool.acquire(256 << 20, build_cpuid_table(0, 4), io_handler=lambda *a: 0,
                               hypercall_handler=None)
    try:
        cr3 = write_page_tables(mem, plan_layout(BASE, 64 << 20, 0x1000, 0x200000, 0x1000, 0))
        code = assemble(GUEST)
        mem.write(CODE, code)
        _setup(mem, cr3)
        hv = Hypervisor(mem, [0, 1, 2, 3])
        engine.hypercall_handler = lambda e: hv.hypercall(e, e.current_vp.index)
        sites = find_exit_sites(code, CODE)
        engine.load_code(("multivp", code))
        vps = [Vp(i, i) for i in range(4)]
        bsp_ctx = long_mode_context(rip=CODE, rsp=CODE + 0x30000, cr3=cr3, gdt=(GDT, 0x1F), cr0=0x80000021,
                                    cr4=0x40060, efer=0xD00, cs=0x10, ds=0x18)
        vps[0].set_long_mode(engine, bsp_ctx)
        vps[0].state = RUNNABLE
        sched = Scheduler(engine, hv, vps, {a: k for a, k in sites.items() if k != "pause"},
                          {a: k for a, k in sites.items() if k == "pause"}, set())
        stop = sched.run(timeout=20)
        sched.unload()
        vps[0].load(engine)
        regs = {r: engine.reg(r) for r in ("r13", "r14", "r15")}
        vps[1].load(engine)
        ap_rip = engine.reg("rip")
        return stop, regs, ap_rip, mem.read_u32(DATA + 4), vps, engine.counters()["instructions"], hv
    finally:
        pool.release(mem, engine)


def test_ipis_wake_a_halted_vp_through_its_idt():
    stop, regs, ap_rip, count, vps, _, hv = _run()
    assert stop.reason == STOP_IDLE
    assert regs["r14"] == 0 and regs["r15"] == 0           # EnableVpVtl, StartVirtualProcessor
    assert regs["r13"] & 0xFFFF == 0x15                     # restarting a started VP: INVALID_VP_STATE
    assert count == 3                                       # three IPIs, three handler runs
    assert vps[1].state == HALTED and vps[2].state != RUNNABLE
    assert CODE + 0x400 < ap_rip < CODE + 0x800             # back in its sti; hlt loop
    assert hv.vps[1].isr == [] and hv.vps[1].irr == set()   # every interrupt EOIed


def test_multi_vp_runs_are_deterministic():
    a, b = _run(), _run()
    assert a[5] == b[5] and a[3] == b[3]
