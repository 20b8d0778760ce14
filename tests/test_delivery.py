"""Exception, interrupt and SYSCALL delivery through a guest's own IDT (cpu/delivery.py), on a
small guest with a GDT, a TSS and an IDT of its own: ring 0 traps and faults with their frames
and error codes, ring 3 to ring 0 through RSP0 and IST, SYSCALL, and a triple fault."""
import struct

import pytest

from hclsim.cpu import engine as eng
from hclsim.cpu.cpuid import build_cpuid_table
from hclsim.cpu.delivery import Delivery, TripleFault, context_layout
from hclsim.cpu.memory import GuestMemory
from tests.asmutil import assemble

GDT, IDT, TSS, RESULTS = 0x1000, 0x2000, 0x3000, 0x4000
CODE, USER, HANDLERS = 0x10000, 0x20000, 0x30000
RSP0, IST1, KSTACK, USTACK = 0x9000, 0xA000, 0x8000, 0x28000
LSTAR = 0x31000


def _gate(handler: int, ist: int = 0, dpl: int = 0, kind: int = 0xE) -> bytes:
    lo = (handler & 0xFFFF) | (0x10 << 16) | (ist << 32) | (kind << 40) | (dpl << 45) | (1 << 47) \
        | ((handler >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", lo, handler >> 32)


def _guest(handlers: dict, kernel_code: str, user_code: str = "hlt"):
    mem = GuestMemory(1 << 20)
    gdt = [0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF]
    tss_lo = 0x67 | (TSS & 0xFFFFFF) << 16 | 0x89 << 40 | ((TSS >> 24) & 0xFF) << 56
    for i, d in enumerate(gdt + [tss_lo, TSS >> 32]):
        mem.write_u64(GDT + 8 * i, d)
    mem.write(TSS + 4, struct.pack("<Q", RSP0))
    mem.write(TSS + 0x24, struct.pack("<Q", IST1))
    for vector, (source, ist, dpl, kind) in handlers.items():
        address = HANDLERS + 0x100 * vector
        mem.write(address, assemble(source))
        mem.write(IDT + 16 * vector, _gate(address, ist, dpl, kind))
    mem.write(CODE, assemble(kernel_code))
    mem.write(USER, assemble(user_code))
    e = eng.Engine(mem, build_cpuid_table(0, 1), io_handler=lambda *a: 0, hypercall_handler=lambda en: None)
    e.state.buf[eng.fastpath.H_PAGING] = 0
    from unicorn import x86_const as x86
    e.uc.reg_write(x86.UC_X86_REG_GDTR, (0, GDT, 8 * 8 - 1, 0))
    e.uc.reg_write(x86.UC_X86_REG_IDTR, (0, IDT, 16 * 256 - 1, 0))
    e.set_msr(eng.MSR_EFER, 0xD01)                        # SCE: SYSCALL enabled
    e.set_msr(0xC0000081, (0x10 << 32) | (0x1B << 48))   # STAR: kernel CS 0x10, user base 0x1B
    e.set_msr(0xC0000082, LSTAR)
    e.set_msr(0xC0000084, 1 << 9)                         # FMASK: IF
    e.set_reg("cs", 0x10)
    e.set_reg("ss", 0x18)
    e.set_reg("rsp", KSTACK)
    e.set_reg("rip", CODE)
    e.uc.ctl_exits_enabled(False)
    d = Delivery(e)
    d.install()
    return mem, e, d


def _run(e):
    e.uc.emu_start(e.reg("rip"), 0, count=100000)
    return e.reg("rip")


def _results(mem, n):
    return struct.unpack(f"<{n}Q", mem.read(RESULTS, 8 * n))


# A handler that records its frame (5 or 6 quadwords from RSP) and RSP, then halts.
def _recorder(words: int) -> str:
    lines = [f"mov rax, [rsp + {8 * i}]\n mov [{RESULTS + 8 * i}], rax" for i in range(words)]
    return "\n".join(lines) + f"\n mov [{RESULTS + 8 * words}], rsp\n hlt"


def test_the_layout_is_found_on_a_scratch_engine():
    lay = context_layout()
    assert lay.hflags == lay.segs - 8 and lay.is_int == lay.error_code + 4
    assert len({lay.segs, lay.error_code, lay.old_exception}) == 3


def test_int3_at_ring0_pushes_the_next_rip_and_clears_if_for_an_interrupt_gate():
    mem, e, d = _guest({3: (_recorder(5), 0, 0, 0xE)}, "mov ax, 0x30\n ltr ax\n sti\n nop\n int3\n hlt")
    _run(e)
    rip, cs, rflags, rsp, ss = _results(mem, 6)[:5]
    int3 = CODE + len(assemble("mov ax, 0x30\n ltr ax\n sti\n nop"))
    assert rip == int3 + 1 and cs == 0x10 and rflags & (1 << 9) and rsp == KSTACK and ss == 0x18
    assert _results(mem, 6)[5] == KSTACK - 40                       # same ring, same stack
    assert not e.reg("rflags") & (1 << 9) and d.counts == {3: 1}


def test_a_general_protection_fault_pushes_its_error_code_and_the_faulting_rip():
    bad = "mov ax, 0x30\n ltr ax\n mov rbx, 0x1238\n push rbx\n mov ds, [rsp]\n hlt"
    mem, e, d = _guest({13: (_recorder(6), 0, 0, 0xE)}, bad)
    _run(e)
    error, rip, cs = _results(mem, 7)[:3]
    assert error == 0x1238 and cs == 0x10
    assert rip == CODE + len(assemble("mov ax, 0x30\n ltr ax\n mov rbx, 0x1238\n push rbx"))


def test_two_page_faults_in_a_row_are_not_a_double_fault():
    # Two #GPs one after the other: QEMU's remembered exception would make the second a #DF.
    skip = len(assemble("mov ds, [rsp]"))
    handler = f"add qword ptr [rsp + 8], {skip}\n inc qword ptr [0x4000]\n add rsp, 8\n iretq"   # past mov ds
    code = "mov ax, 0x30\n ltr ax\n push 0x1238\n mov ds, [rsp]\n mov ds, [rsp]\n hlt"
    mem, e, d = _guest({13: (handler, 0, 0, 0xE), 8: (_recorder(0), 0, 0, 0xE)}, code)
    _run(e)
    assert _results(mem, 1)[0] == 2 and d.counts == {13: 2}


def test_ring3_enters_ring0_on_rsp0_and_ist_and_syscall_does_its_architectural_work():
    to_user = f"mov ax, 0x30\n ltr ax\n push 0x23\n push {USTACK}\n push 0x202\n push 0x2b\n push {USER}\n iretq"
    user = "mov rax, 7\n syscall\n int3\n hlt"
    syscall_entry = (f"mov [{RESULTS}], rcx\n mov [{RESULTS + 8}], r11\n mov ax, cs\n mov [{RESULTS + 16}], rax\n"
                     f" mov ax, ss\n mov [{RESULTS + 24}], rax\n pushfq\n pop qword ptr [{RESULTS + 32}]\n"
                     f" mov [{RESULTS + 40}], rsp\n sysretq")
    bp = "\n".join(f"mov rax, [rsp + {8 * i}]\n mov [{RESULTS + 48 + 8 * i}], rax" for i in range(5))
    bp += f"\n mov [{RESULTS + 88}], rsp\n mov ax, cs\n mov [{RESULTS + 96}], rax\n hlt"
    mem, e, d = _guest({3: (bp, 1, 3, 0xF)}, to_user, user)
    mem.write(LSTAR, assemble(syscall_entry))
    _run(e)
    r = _results(mem, 13)
    after_syscall = USER + len(assemble("mov rax, 7\n syscall"))
    assert r[0] == after_syscall and r[1] & (1 << 9)               # RCX = next RIP, R11 = RFLAGS (IF set)
    assert r[2] == 0x10 and r[3] == 0x18 and not r[4] & (1 << 9)    # ring 0 CS/SS, IF masked by FMASK
    assert r[5] == USTACK                                           # SYSCALL keeps RSP
    rip, cs, rflags, rsp, ss = r[6:11]
    assert (rip, cs, rsp, ss) == (after_syscall + 1, 0x2b, USTACK, 0x23)   # int3 from ring 3 (back by SYSRET)
    assert r[11] == IST1 - 40 and r[12] == 0x10                     # on IST1, in ring 0
    assert d.syscalls == 1 and d.counts == {3: 1}


def test_ring3_fault_without_ist_uses_rsp0():
    to_user = f"mov ax, 0x30\n ltr ax\n push 0x23\n push {USTACK}\n push 0x2\n push 0x2b\n push {USER}\n iretq"
    mem, e, d = _guest({13: (_recorder(6), 0, 0, 0xE)}, to_user, "push 0x1238\n mov ds, [rsp]\n hlt")
    _run(e)
    r = _results(mem, 7)
    assert r[2] == 0x2b and r[5] == 0x23 and r[4] == USTACK - 8 and r[6] == RSP0 - 48


def test_a_fault_while_delivering_a_double_fault_is_a_triple_fault():
    # No IDT gate for #GP: delivery fails -> #DF, which has no gate either -> triple fault.
    mem, e, d = _guest({}, "mov ax, 0x30\n ltr ax\n push 0x1238\n mov ds, [rsp]\n hlt")
    with pytest.raises(TripleFault, match="delivering #DF failed"):
        exit = e.run()
        if exit.kind == eng.EXIT_STOP and isinstance(exit.stop_reason, BaseException):
            raise exit.stop_reason
