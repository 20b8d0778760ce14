"""Where the engine must stop before an instruction runs, found with capstone over each loaded
executable image's code:
- RDMSR/WRMSR: Unicorn 2.1.4 cannot hook them, so the hypervisor emulates them at exit addresses;
- PAUSE: a spin-wait; the scheduler lets other VPs run there (like VMX pause-loop exiting).
"""
import capstone
from capstone import x86_const as csx

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.skipdata = True  # keep sweeping past bytes that are not code (e.g. the hypercall page filler)

SITE_KINDS = {csx.X86_INS_RDMSR: "rdmsr", csx.X86_INS_WRMSR: "wrmsr", csx.X86_INS_PAUSE: "pause"}
# In VTL0 code every instruction VTL2 intercepts stops the engine before it runs.
VTL0_SITE_KINDS = {**SITE_KINDS, csx.X86_INS_IN: "in", csx.X86_INS_OUT: "out", csx.X86_INS_CPUID: "cpuid"}


def find_exit_sites(code: bytes, address: int, kinds: dict = SITE_KINDS) -> dict[int, str]:
    """{runtime address: kind} ('rdmsr', 'wrmsr', 'pause', ...) for code loaded at address.

    Also 'irq-window': a NOP right after an STI (`sti; nop; cli` opens a one-instruction window
    for pending interrupts, which has to be an exit to be seen; the NOP is then skipped)."""
    sites, after_sti = {}, False
    for insn in _cs.disasm(code, address):
        if insn.id in kinds:
            sites[insn.address] = kinds[insn.id]
        elif after_sti and insn.bytes == b"\x90":
            sites[insn.address] = "irq-window"
        after_sti = insn.id == csx.X86_INS_STI
    return sites


def find_msr_sites(code: bytes, address: int) -> dict[int, str]:
    return {a: k for a, k in find_exit_sites(code, address).items() if k in ("rdmsr", "wrmsr")}
