"""A virtual processor: its architectural state as a saved engine context, so any engine of the
pool can run it (context_save/restore cost microseconds; an engine costs milliseconds)."""
from dataclasses import dataclass, field

from hclsim.cpu import engine as eng, fastpath
from hclsim.hv import hypercalls

MSR_PAT = 0x277


# Run states.
NOT_STARTED = "not-started"
RUNNABLE = "runnable"
HALTED = "halted"
EXTERNAL = "external"   # run by the Linux stand-in, not by an engine


@dataclass
class Vp:
    index: int
    apic_id: int
    context: object = field(default=None, repr=False)   # a Unicorn context, None until first save
    state: str = NOT_STARTED
    halted_with_interrupts: bool = False  # HLT with RFLAGS.IF set: an interrupt wakes it

    def start(self, engine, raw: bytes) -> None:
        """Start the VP with a StartVirtualProcessor's HvInitialVpContext. APs started alike
        differ only in CR3: the rest comes from a template context the engine keeps, keyed by
        the raw context less CR3 (one restore instead of a parse and ~15 register writes)."""
        key = raw[:hypercalls.VP_CONTEXT_CR3] + raw[hypercalls.VP_CONTEXT_CR3 + 8:]
        template = engine.long_mode_templates.get(key)
        if template is None:
            self.set_long_mode(engine, hypercalls.parse_vp_context(raw))
            engine.long_mode_templates[key] = engine.uc.context_save()
            return
        engine.uc.context_restore(template)
        engine.set_reg("cr3", int.from_bytes(raw[hypercalls.VP_CONTEXT_CR3:][:8], "little"))  # flushes the TLB
        self.save(engine)

    def set_long_mode(self, engine, ctx: dict) -> None:
        """Give the VP a 64-bit starting context (the image's BSP context or a parsed StartVp
        context) through engine, and keep it."""
        engine.uc.context_restore(engine.pristine)
        engine.set_table("gdtr", ctx["gdtr"][1], ctx["gdtr"][2])
        if "idtr" in ctx:
            engine.set_table("idtr", ctx["idtr"][1], ctx["idtr"][2])
        for name in ("cr3", "cr4"):
            engine.set_reg(name, ctx[name])
        engine.set_msr(eng.MSR_EFER, ctx["efer"])
        engine.set_reg("cr0", ctx["cr0"])
        if "pat" in ctx:
            engine.set_msr(MSR_PAT, ctx["pat"])
        for name in ("cs", "ss", "ds", "es", "fs", "gs", "rip", "rsi", "rsp", "rflags"):
            if name in ctx:
                engine.set_reg(name, ctx[name])
        self.save(engine)

    def load(self, engine) -> None:
        """Make engine run this VP next."""
        # A Linux boot CPU never ran VTL2 code here: it runs VTL0 over a reset context.
        engine.uc.context_restore(self.context if self.context is not None else engine.pristine)
        engine.flush_tlb()
        engine.state.buf[fastpath.H_APIC_ID] = self.apic_id
        engine.state.buf[fastpath.H_VP_INDEX] = self.index
        engine.current_vp = self

    def save(self, engine) -> None:
        if self.context is None:
            self.context = engine.uc.context_save()
        else:
            engine.uc.context_update(self.context)
