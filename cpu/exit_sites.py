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


def find_exit_sites(code: bytes, address: int) -> dict[int, str]:
    """{runtime address: 'rdmsr' | 'wrmsr' | 'pause'} for code loaded at address."""
    return {insn.address: SITE_KINDS[insn.id] for insn in _cs.disasm(code, address) if insn.id in SITE_KINDS}


def find_msr_sites(code: bytes, address: int) -> dict[int, str]:
    return {a: k for a, k in find_exit_sites(code, address).items() if k != "pause"}
