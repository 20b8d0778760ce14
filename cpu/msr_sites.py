"""Where the guest's RDMSR/WRMSR instructions are: Unicorn 2.1.4 cannot hook them, so the engine
stops at their addresses (exit addresses) and the hypervisor emulates them. Found with capstone
over each loaded executable image's code.
"""
import capstone
from capstone import x86_const as csx

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.skipdata = True  # keep sweeping past bytes that are not code (e.g. the hypercall page filler)

MSR_INSNS = {csx.X86_INS_RDMSR: "rdmsr", csx.X86_INS_WRMSR: "wrmsr"}


def find_msr_sites(code: bytes, address: int) -> dict[int, str]:
    """{runtime address: 'rdmsr' | 'wrmsr'} for every MSR instruction in code loaded at address."""
    sites = {}
    for insn in _cs.disasm(code, address):
        if insn.id in MSR_INSNS:
            sites[insn.address] = MSR_INSNS[insn.id]
    return sites
