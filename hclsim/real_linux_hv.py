"""`--linux real` with the Hyper-V interface shown (RealLinux(hyperv=True)): the kernel's
RDMSR/WRMSR of synthetic MSRs (0x40000000..0x400000FF) served by the hypervisor model
(hv/hypervisor.py: GUEST_OS_ID, HYPERCALL and its page, VP_INDEX, TIME_REF_COUNT, the
frequencies, VP_ASSIST_PAGE, crash MSRs); an MSR it does not know is a #GP, as Hyper-V gives.

Unicorn cannot hook RDMSR/WRMSR: the block hook stops before a block that holds one (MSR_FLAG,
cpu/fastpath.py) and a code hook goes on each of its MSR instructions; the architectural MSRs
(EFER, the FS/GS bases, ...) still run in QEMU.
"""
from unicorn import unicorn_const as ucc

from hclsim.cpu.insnlen import insn_length
from hclsim.hv.hypervisor import GeneralProtection

SYNTHETIC = range(0x40000000, 0x40000100)
RDMSR, WRMSR = b"\x0f\x32", b"\x0f\x30"


class SyntheticMsrs:
    def __init__(self, machine, delivery):
        self.machine, self.engine, self.delivery = machine, machine.engine, delivery
        self.hooks: dict[int, int] = {}
        self.reads = self.writes = self.faults = 0

    def hook_block(self, address: int, code) -> None:
        e, pos, added = self.engine, 0, False
        while pos < len(code):
            if bytes(code[pos:pos + 2]) in (RDMSR, WRMSR) and address + pos not in self.hooks:
                site = address + pos
                self.hooks[site] = e.uc.hook_add(ucc.UC_HOOK_CODE, self._on_msr, None, site, site)
                added = True
            length = insn_length(code, pos, len(code))
            if length <= 0:
                break
            pos += length
        if added:
            e.remove_cache(address, address + len(code))

    def _on_msr(self, uc, address, size, _user_data):
        e = self.engine
        try:
            insn = e.read_virtual(address, 2)
            index = e.reg("rcx") & 0xFFFFFFFF
            if insn not in (RDMSR, WRMSR) or index not in SYNTHETIC:
                return                                       # QEMU's: an architectural MSR
            hv = self.machine.hv
            try:
                if insn == RDMSR:
                    value = hv.rdmsr(e, 0, index)
                    e.write_regs(("rax", "rdx"), (value & 0xFFFFFFFF, value >> 32))
                    self.reads += 1
                else:
                    hv.wrmsr(e, 0, index, (e.reg("rdx") & 0xFFFFFFFF) << 32 | (e.reg("rax") & 0xFFFFFFFF))
                    self.writes += 1
                e.set_reg("rip", address + 2)                # past it (ends the block)
            except GeneralProtection:
                self.faults += 1
                self.delivery.interrupt_with_code(13, 0)     # #GP(0) at the instruction
        except BaseException as exc:                         # not through C frames
            e.request_stop(exc)

    def close(self) -> None:
        for handle in self.hooks.values():
            self.engine.uc.hook_del(handle)
        self.hooks.clear()
