"""A virtual processor: its architectural state as a saved engine context, so any engine of the
pool can run it (context_save/restore cost microseconds; an engine costs milliseconds)."""
from dataclasses import dataclass, field

from hclsim.cpu import engine as eng, fastpath
from hclsim.defs.hvdef import HvInitialVpContext
from hclsim.hv import hypercalls

MSR_PAT = 0x277
PAT_DEFAULT = 0x0007040600070406   # the architectural reset value (WB WT UC- UC, twice)
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")


def long_mode_context(*, rip: int, rsp: int, cr3: int, gdt: tuple[int, int], cr0: int, cr4: int, efer: int,
                      cs: int, ds: int, rflags: int = 0x2, idt: tuple[int, int] = (0, 0),
                      pat: int = PAT_DEFAULT) -> HvInitialVpContext:
    """A 64-bit starting context, as an HvInitialVpContext (what StartVirtualProcessor carries):
    the one way a VP's initial state is built, for the BSP's image context, the VTL0 firmware's
    state and the tests alike. gdt/idt: (base, limit); ds is loaded into every data segment."""
    ctx = HvInitialVpContext(rip=rip, rsp=rsp, rflags=rflags, efer=efer, cr0=cr0, cr3=cr3, cr4=cr4, msr_cr_pat=pat)
    for seg in SEGMENTS:
        getattr(ctx, seg).selector = cs if seg == "cs" else ds
    ctx.gdtr.base, ctx.gdtr.limit = gdt
    ctx.idtr.base, ctx.idtr.limit = idt
    return ctx


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

    def set_long_mode(self, engine, ctx: HvInitialVpContext, gprs: dict | None = None) -> None:
        """Give the VP a 64-bit starting context (the image's BSP context or a StartVp's) and
        general registers beyond it (the BSP's RSI), through engine, and keep it."""
        engine.uc.context_restore(engine.pristine)
        engine.set_table("gdtr", ctx.gdtr.base, ctx.gdtr.limit)
        engine.set_table("idtr", ctx.idtr.base, ctx.idtr.limit)
        engine.set_reg("cr3", ctx.cr3)
        engine.set_reg("cr4", ctx.cr4)
        engine.set_msr(eng.MSR_EFER, ctx.efer)
        engine.set_reg("cr0", ctx.cr0)
        engine.set_msr(MSR_PAT, ctx.msr_cr_pat)
        for seg in SEGMENTS:
            engine.set_reg(seg, getattr(ctx, seg).selector)
        for name in ("rip", "rsp", "rflags"):
            engine.set_reg(name, getattr(ctx, name))
        for name, value in (gprs or {}).items():
            engine.set_reg(name, value)
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
