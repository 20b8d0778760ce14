"""Guest faults and panics end the run with a report: vector, RIP and symbol, registers,
disassembly around RIP and the last serial lines (user shims built here with gcc)."""
import pytest

from hclsim.config import BootConfig
from hclsim.cpu.fault import GuestFaultError
from hclsim.machine import boot

from .asmutil import build_elf, com3_print


def _boot_shim(tmp_path, body: str) -> GuestFaultError:
    source = ".globl _start\n.text\n_start:\n" + com3_print("[INFO] test shim up\n") + body
    elf = build_elf(source, tmp_path)
    with pytest.raises(GuestFaultError) as info:
        boot(BootConfig(shim=str(elf), timeout=10))
    return info.value


def _common(err, vector_name):
    text = err.report
    assert str(err).splitlines()[0] == text.splitlines()[0]
    assert vector_name in str(err)
    assert "RIP 0x" in str(err)
    for section in ("registers:", "code:", "last serial lines:"):
        assert section in text
    assert "[INFO] test shim up" in text
    assert "=>" in text  # the faulting instruction is marked in the disassembly
    assert "shim:" in text  # and symbolized against the shim image


def test_page_fault_on_unmapped_virtual_address(tmp_path):
    err = _boot_shim(tmp_path, "    movabs $0x7f0000000000, %rax\nbad_load:\n    mov (%rax), %rbx\n")
    _common(err, "#PF")
    assert "0x7f0000000000" in str(err)
    assert "shim:bad_load" in str(err)
    assert "page walk for 0x7f0000000000" in err.report


def test_general_protection_on_unknown_msr(tmp_path):
    err = _boot_shim(tmp_path, "    mov $0x12345678, %ecx\n    rdmsr\n")
    _common(err, "#GP")
    assert "unknown MSR 0x12345678" in str(err)


def test_invalid_opcode(tmp_path):
    err = _boot_shim(tmp_path, "    ud2\n")
    _common(err, "#UD")


def test_running_off_mapped_memory(tmp_path):
    err = _boot_shim(tmp_path, "    movabs $0x40000000000, %rax\n    jmp *%rax\n")
    assert "guest fault" in str(err)
    assert "0x40000000000" in str(err)


def test_halt_before_handoff(tmp_path):
    err = _boot_shim(tmp_path, "    cli\n    hlt\n")
    assert "guest halted" in str(err)


def test_runaway_guest_times_out(tmp_path):
    source = ".globl _start\n.text\n_start:\n1:  jmp 1b\n"
    elf = build_elf(source, tmp_path)
    with pytest.raises(GuestFaultError, match="timeout"):
        boot(BootConfig(shim=str(elf), timeout=0.5))


def test_page_fault_error_code_is_derived_and_named(tmp_path):
    read = _boot_shim(tmp_path, "    movabs $0x7f0000000000, %rax\n    mov (%rax), %rbx\n")
    assert "#PF error code 0x0: not-present page, read, supervisor mode (derived" in read.report
    write = _boot_shim(tmp_path, "    movabs $0x7f0000000000, %rax\n    movq $5, 8(%rax)\n")
    assert "#PF error code 0x2: not-present page, write, supervisor mode" in write.report
    fetch = _boot_shim(tmp_path, "    movabs $0x7f0000000000, %rax\n    jmp *%rax\n")
    assert "#PF error code 0x10: not-present page, instruction fetch, supervisor mode" in fetch.report


def test_fault_listing_starts_on_instruction_boundaries(tmp_path):
    # Long instructions right before the fault: a decode from a few bytes back would start inside
    # one of them; the listing decodes from the function's start instead.
    body = ("    .type crash_here, @function\ncrash_here:\n" + "    movabs $0x1122334455667788, %rcx\n" * 6 +
            "    movabs $0x7f0000000000, %rax\n    mov (%rax), %rbx\n    .size crash_here, .-crash_here\n")
    err = _boot_shim(tmp_path, "    jmp crash_here\n" + body)   # no call: the test shim has no stack
    code = err.report.split("code:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert code[-1].lstrip().startswith("=>") or any(l.lstrip().startswith("=>") for l in code)
    before = [l for l in code if not l.lstrip().startswith("=>")][:4]
    assert before and all("movabs" in l for l in before), code
