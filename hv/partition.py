"""The partition: the one owner of VP state, and what the layers above the hypervisor (the Linux
stand-in, the sidecar driver, the VP loop, the debugger) are given instead of the machine.

A VP's registers live in one of three places, and only this module decides which: the engine,
for the VTL the loaded VP runs now; the VP's saved engine context, for VTL2 otherwise (lent to
the engine for the access, then the loaded VP is put back); the hypervisor's VTL0 register file
(VpState.vtl0_registers, by HvRegister), for VTL0 while it does not run. Registers are named as
the engine names them ("rax", "cr3", "efer", ...).

Besides registers, the partition offers what mshv_vtl offers the kernel and the VMM: raise an
interrupt on a VP, run the simulated CPUs until a condition holds, run a Linux CPU's VTL0 until
its next intercept (RUN_VP), hand a VP to Linux, and the CPUID and MSR answers a VMM completes
intercepts with.
"""
from contextlib import contextmanager

from unicorn import x86_const as x86

from hclsim import HclsimError
from hclsim.cpu.cpuid import cpuid_lookup
from hclsim.cpu.engine import MSR_EFER
from hclsim.defs.hvdef import REGISTER_BY_NAME, VTL0, HvRegister
from hclsim.hv.vp import EXTERNAL

REGISTER_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
                  "r13", "r14", "r15", "rip", "rflags", "cs", "ss", "ds", "es", "fs", "gs", "fs_base",
                  "gs_base", "cr0", "cr2", "cr3", "cr4", "efer")


CR0_PG = 1 << 31


class PartitionError(HclsimError):
    pass


class Partition:
    def __init__(self, mem, hv, vps, scheduler):
        self.mem, self._hv, self._vps, self._sched = mem, hv, vps, scheduler

    # ---- VPs --------------------------------------------------------------------------------
    @property
    def vp_count(self) -> int:
        return len(self._vps)

    def _vp(self, index: int):
        if not isinstance(index, int) or not 0 <= index < len(self._vps):
            raise PartitionError(f"no VP {index} (VPs 0-{len(self._vps) - 1})")
        return self._vps[index]

    def apic_id(self, index: int) -> int:
        return self._vp(index).apic_id

    def vtl(self, index: int) -> int:
        """The VTL the VP runs (or last ran) in."""
        return self._hv.vps[self._vp(index).index].vtl

    def started(self, index: int) -> bool:
        return self._vp(index).context is not None

    # ---- registers --------------------------------------------------------------------------
    def registers(self, index: int, vtl: int | None = None, names=REGISTER_NAMES) -> dict[str, int]:
        """The VP's registers in vtl (default: the VTL it runs in); a VP never started reads 0."""
        vp = self._vp(index)
        vtl = self.vtl(index) if vtl is None else vtl
        if self._live(vp, vtl):                 # only what is asked, in one batch
            engine = self._sched.engine
            names = tuple(names)
            plain = tuple(n for n in names if n != "efer")
            regs = dict(zip(plain, engine.read_regs(plain)))
            if len(plain) != len(names):
                regs["efer"] = engine.msr(MSR_EFER)
            return regs
        if vtl == VTL0:
            saved = self._hv.vps[index].vtl0_registers
            return {n: saved.get(REGISTER_BY_NAME[n], 0) if n in REGISTER_BY_NAME else 0 for n in names}
        if vp.context is None:
            return {n: self._start_registers(index).get(n, 0) for n in names}
        with self._borrowed(vp) as engine:
            regs = engine.registers()
        return {n: regs[n] for n in names}

    def set_registers(self, index: int, values: dict, vtl: int | None = None) -> None:
        vp = self._vp(index)
        vtl = self.vtl(index) if vtl is None else vtl
        unknown = set(values) - set(REGISTER_NAMES)
        if unknown:
            raise PartitionError(f"unknown register {sorted(unknown)[0]!r}: one of {', '.join(REGISTER_NAMES)}")
        values = {n: v & (2**64 - 1) for n, v in values.items()}
        if self._live(vp, vtl):
            return self._write(self._sched.engine, values)
        if vtl == VTL0:
            kept = [n for n in values if n not in REGISTER_BY_NAME]
            if kept:
                raise PartitionError(f"{kept[0]} of VTL0 is not kept while VTL0 is not running")
            saved = self._hv.vps[index].vtl0_registers
            for n, v in values.items():
                saved[REGISTER_BY_NAME[n]] = v
            return None
        if vp.context is None:
            raise PartitionError(f"VP {index} has not been started: it has no registers yet")
        with self._borrowed(vp, write=True) as engine:
            self._write(engine, values)

    # The kernel's RUN_VP path: VTL0 registers of a Linux CPU by a fixed tuple of names, batched
    # when the VP is parked in the engine (one call instead of ~20), without the checks above.
    def read_vtl0(self, index: int, names: tuple) -> list[int]:
        vp = self._vps[index]
        if self._live(vp, VTL0):
            engine = self._sched.engine
            if names[-1] == "efer":
                return engine.read_regs(names[:-1]) + [engine.msr(MSR_EFER)]
            return engine.read_regs(names)
        saved = self._hv.vps[index].vtl0_registers
        return [saved.get(REGISTER_BY_NAME[n], 0) for n in names]

    def write_vtl0(self, index: int, names: tuple, values) -> None:
        vp = self._vps[index]
        if self._live(vp, VTL0):
            self._sched.engine.write_regs(names, values)
            return
        saved = self._hv.vps[index].vtl0_registers
        for n, v in zip(names, values):
            saved[REGISTER_BY_NAME[n]] = v & 0xFFFFFFFFFFFFFFFF

    def _start_registers(self, index: int) -> dict:
        """A VP not run yet: the context a StartVirtualProcessor gave it, which it will start
        with; nothing (zeros) if none is pending."""
        ctx = self._hv.vps[index].start_context
        if ctx is None:
            return {}
        regs = {n: getattr(ctx, n) for n in ("rip", "rsp", "rflags", "cr0", "cr3", "cr4", "efer")}
        regs.update({seg: getattr(ctx, seg).selector for seg in ("cs", "ds", "es", "fs", "gs", "ss")})
        return regs

    def start_pending(self, index: int) -> bool:
        return self._vp(index).context is None and self._hv.vps[index].start_pending

    def vtl0_state(self, index: int) -> dict:
        """VTL0's register file by HvRegister (what Get/SetVpRegisters on VTL0 reach)."""
        return dict(self._hv.vps[self._vp(index).index].vtl0_registers)

    def set_vtl0_state(self, index: int, state: dict) -> None:
        """Replace VTL0's register file (e.g. the VTL0 firmware's starting state)."""
        if self._live(self._vp(index), VTL0):
            raise PartitionError(f"VP {index} runs VTL0 now")
        self._hv.vps[index].vtl0_registers = dict(state)

    def paging_roots(self) -> set[int]:
        """CR3 of every VP's VTL2 and VTL0 where paging is on (what a virtual address may mean)."""
        roots = set()
        engine = self._sched.engine
        if self._sched.loaded is not None and engine.reg("cr0") & CR0_PG:
            roots.add(engine.reg("cr3"))
        for vp in self._vps:
            vtl0 = self._hv.vps[vp.index].vtl0_registers
            if vtl0.get(HvRegister.Cr0, 0) & CR0_PG:
                roots.add(vtl0.get(HvRegister.Cr3, 0))
            if vp.context is not None and vp.context.reg_read(x86.UC_X86_REG_CR0) & CR0_PG:
                roots.add(vp.context.reg_read(x86.UC_X86_REG_CR3))   # no need to lend the context
        return roots

    def _live(self, vp, vtl: int) -> bool:
        """Whether the engine holds vp's registers of vtl now (a parked Linux CPU: its VTL0)."""
        sched = self._sched
        if sched.loaded is not vp:
            return False
        return vtl == VTL0 if sched.parked is vp else self._hv.vps[vp.index].vtl == vtl

    @staticmethod
    def _write(engine, values: dict) -> None:
        if "efer" in values:
            engine.set_msr(MSR_EFER, values["efer"])
        names = tuple(n for n in values if n != "efer")
        if names:
            engine.write_regs(names, [values[n] for n in names])

    @contextmanager
    def _borrowed(self, vp, write: bool = False):
        """The engine holding vp's saved VTL2 context for a moment (the loaded VP is put back)."""
        uc = self._sched.engine.uc
        live = uc.context_save()
        uc.context_restore(vp.context)
        try:
            yield self._sched.engine
            if write:
                uc.context_update(vp.context)
        finally:
            uc.context_restore(live)
            self._sched.engine.flush_tlb()  # context_restore keeps translations (cpu/engine.py)

    # ---- what the kernel and the VMM do with VPs ----------------------------------------------
    def raise_interrupt(self, index: int, vector: int) -> None:
        self._hv.raise_interrupt(self._vp(index).index, vector)

    def run(self, until=None, timeout: float = 30.0):
        """Run the simulated CPUs (the sidecar's, VTL2 code) until until() holds or none can run."""
        return self._sched.run(until=until, timeout=timeout)

    def run_vtl0(self, index: int, timeout: float = 30.0, preempt: bool = False, doorbell=None):
        """RUN_VP on a Linux CPU: VTL0 until its next intercept (the HvMessage), None if it halted;
        with preempt, hv.scheduler.PREEMPTED once timeout (a time slice) has passed; with a
        doorbell (cpu.runvp_fastpath.DoorbellRun), ANSWERED (see Scheduler.run_external_vtl0)."""
        return self._sched.run_external_vtl0(self._vp(index), timeout, preempt, doorbell)

    def is_linux_cpu(self, index: int) -> bool:
        return self._vp(index).state == EXTERNAL

    def give_to_linux(self, index: int) -> None:
        """The VP is a Linux CPU from now on: the stand-in runs it, not the scheduler."""
        self._sched.mark_external(self._vp(index))

    def cpuid(self, index: int, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """What CPUID answers on the VP (EAX, EBX, ECX, EDX): the default a VMM completes with."""
        a, b, c, d = cpuid_lookup(self._sched.engine.state.cpuid_table, leaf & 0xFFFFFFFF, subleaf & 0xFFFFFFFF,
                                  self.apic_id(index))
        return int(a), int(b), int(c), int(d)

    def rdmsr(self, index: int, msr: int) -> int:
        """The hypervisor's value of msr on the VP (#GP for an unknown one raises)."""
        return self._hv.rdmsr(self._sched.engine, self._vp(index).index, msr)

