"""cpu/uc_internals.py: Unicorn 2.1.4's private switches, found by fingerprint, and what they do."""
import ctypes

from unicorn import Uc, UC_ARCH_X86, UC_MODE_64
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from hclsim.cpu import engine as eng
from hclsim.cpu import fastpath as fp
from hclsim.cpu import uc_internals
from hclsim.cpu.cpuid import build_cpuid_table
from hclsim.cpu.memory import GuestMemory
from hclsim.tests.asmutil import assemble

# A store, then three instructions in the same block, then a second block.
CODE = assemble("mov [rbx], eax\n inc rcx\n inc rcx\n inc rcx\n jmp 1f\n1: inc rdx\n hlt")


def _stop_on_store(checks: bool) -> tuple[int, int]:
    """(RCX, RDX) when a memory hook asks for a stop at the block's store."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x2000)
    uc.mem_write(0x1000, CODE)
    uc.reg_write(x86.UC_X86_REG_RBX, 0x2800)
    assert uc_internals.set_memory_exit_checks(uc, checks)
    uc.hook_add(ucc.UC_HOOK_MEM_WRITE, lambda u, *_: u.emu_stop())
    uc.emu_start(0x1000, 0x1000 + len(CODE))
    return uc.reg_read(x86.UC_X86_REG_RCX), uc.reg_read(x86.UC_X86_REG_RDX)


def test_the_fields_are_found_on_the_pinned_unicorn():
    assert uc_internals.available()
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    assert uc_internals.memory_exit_checks(uc)                 # Unicorn's default
    address = uc_internals.skip_sync_address(uc)
    assert address and ctypes.c_uint8.from_address(address).value == 0


def test_without_the_checks_a_stop_asked_inside_a_block_ends_it_where_the_next_begins():
    assert _stop_on_store(True) == (0, 0)                       # at once, after the store
    assert _stop_on_store(False) == (3, 0)                      # the block ran to its end


def test_an_engine_given_back_to_the_pool_has_the_checks_again():
    mem = GuestMemory(1 << 20)
    e = eng.Engine(mem, build_cpuid_table(0, 1), io_handler=lambda *a: 0, hypercall_handler=lambda en: None)
    try:
        assert e.set_memory_exit_checks(False)
        assert not uc_internals.memory_exit_checks(e.uc) and e.state.buf[fp.H_SKIP_SYNC] != 0
        e.reset(build_cpuid_table(0, 1))
        assert uc_internals.memory_exit_checks(e.uc) and e.state.buf[fp.H_SKIP_SYNC] == 0
    finally:
        e.close()
