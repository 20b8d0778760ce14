"""Exceptions, interrupts and SYSCALL for a guest with an IDT of its own (a real Linux kernel),
done by the host the way a 64-bit CPU does them, since Unicorn 2.1.4 does none of it:

- an exception raised by an instruction reaches the engine's interrupt hook and is dropped
  there (QEMU's do_interrupt never runs). `exception(intno)` delivers it through the IDT: the
  gate's handler, its IST stack or (from ring 3) RSP0 of the TSS, the frame SS, RSP, RFLAGS, CS,
  RIP and, for the vectors that have one, the error code QEMU left in its CPU state, IF cleared
  for an interrupt gate. A delivery that itself faults becomes #DF, and one of #DF a triple
  fault (TripleFault: the machine would reset).
- QEMU remembers the exception in flight (old_exception) until its own delivery clears it; the
  next #PF would be promoted to #DF. Each delivery clears it.
- `interrupt(vector)`: an external interrupt (the PIC's), delivered the same way.
- SYSCALL in Unicorn 2.1.4 only calls hooks and steps over the instruction: `syscall()` (an
  instruction hook) does its architectural work.
- Ring changes: writing CS or SS through uc_reg_write sets the selector only, not the
  descriptor cache or the CPL (hflags), so entering ring 0 from ring 3 edits the saved CPU state
  (uc_context_save, patch, restore). IRETQ and SYSRETQ back to ring 3 are QEMU's own and right.

Where those fields lie in a saved context is found once, by experiment on a scratch engine
(`context_layout`), not taken from Unicorn's headers.
"""
import ctypes
import struct
from dataclasses import dataclass
from functools import lru_cache

from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, UcError
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from hclsim.cpu import block_clock, native
from hclsim.cpu.interrupts import RFLAGS_RF, DeliveryError, cleared_flags, idt_gate, push_frame, read_exactly

ERROR_CODE_VECTORS = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29, 30))
VECTOR_DF = 8
HF_CPL_MASK = 3
MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000084
# Descriptor cache flags, as QEMU keeps them (the descriptor's high dword, bits 8..23).
DESC_A, DESC_RW, DESC_CODE, DESC_S, DESC_P = 1 << 8, 1 << 9, 1 << 11, 1 << 12, 1 << 15
DESC_L, DESC_B, DESC_G = 1 << 21, 1 << 22, 1 << 23
SEG_CACHE = struct.Struct("<I4xQII")              # SegmentCache: selector, base, limit, flags
ES, CS, SS = 0, 1, 2
# In CPUX86State, segs[] follow regs[16], eip, eflags, cc_dst, cc_src, cc_src2, cc_op, df,
# hflags and hflags2: 184 bytes after RAX; then ldt and tr.
SEGS_AFTER_RAX, HFLAGS_BEFORE_SEGS, TR_AFTER_SEGS = 184, 8, 7 * SEG_CACHE.size


class TripleFault(Exception):
    """Delivering #DF failed: on hardware the CPU shuts down (the machine resets)."""


@dataclass(frozen=True)
class ContextLayout:
    """Offsets in a uc_context (uc_context_save's buffer, header included)."""
    segs: int
    hflags: int
    tr: int
    error_code: int
    is_int: int
    old_exception: int


@lru_cache(maxsize=1)
def context_layout() -> ContextLayout:
    """Found on a scratch engine: RAX by its value; the error code by raising #GP with two
    selectors (a load of one past the GDT limit has it as the error code); old_exception by
    dividing by zero twice (-1, then 0, then promoted to 8)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x3000)
    uc.hook_add(ucc.UC_HOOK_INTR, lambda u, intno, _: u.emu_stop())
    marker = 0x5AC3_96E1_0F7B_2D48
    uc.reg_write(x86.UC_X86_REG_RAX, marker)
    blob = bytes(uc.context_save())
    rax = blob.find(marker.to_bytes(8, "little"))
    if rax < 0 or blob.find(marker.to_bytes(8, "little"), rax + 1) >= 0:
        raise RuntimeError("cannot find RAX in a Unicorn context")
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0x2000, 0x17, 0))
    from hclsim.cpu.engine import _OLD_EXCEPTION
    shots = []
    for selector in (0x1238, 0x2348):
        uc.mem_write(0x1000, b"\x8e\x1d\x02\x00\x00\x00\xeb\x02" + struct.pack("<H", selector))  # mov ds, [rip+2]
        ctx = uc.context_save()
        _set_i32(ctx, _OLD_EXCEPTION, -1)          # else the second #GP is promoted to #DF
        uc.context_restore(ctx)
        try:
            uc.emu_start(0x1000, 0x1008)
        except UcError:
            pass
        shots.append(bytes(uc.context_save()))
    i32 = lambda b, off: int.from_bytes(b[off:off + 4], "little", signed=True)  # noqa: E731
    found = [off for off in range(0, len(shots[0]) - 3, 4) if i32(shots[0], off) == 0x1238
             and i32(shots[1], off) == 0x2348]
    if len(found) != 1:
        raise RuntimeError(f"cannot find the error code in a Unicorn context: {found}")
    segs = rax + SEGS_AFTER_RAX
    return ContextLayout(segs=segs, hflags=segs - HFLAGS_BEFORE_SEGS, tr=segs + TR_AFTER_SEGS,
                         error_code=found[0], is_int=found[0] + 4, old_exception=_OLD_EXCEPTION)


def _set_i32(ctx, off: int, value: int) -> None:
    ctypes.c_int32.from_address(ctypes.cast(ctx.context, ctypes.c_void_p).value + off).value = value


class Delivery:
    """Delivers exceptions, interrupts and SYSCALL to the loaded VP of engine."""

    def __init__(self, engine):
        self.engine = engine
        self.uc = engine.uc
        self.layout = context_layout()
        self._ctx = self.uc.context_save()
        self._base = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
        self.counts: dict[int, int] = {}          # vector -> deliveries
        self.syscalls = 0
        self.last: tuple | None = None            # (vector, rip, error code) of the last exception

    # ---- the saved CPU state ----------------------------------------------------------------
    def _save(self) -> None:
        native._raw.uc_context_save(self.engine._uch, self._ctx.context)

    def _restore(self) -> None:
        native._raw.uc_context_restore(self.engine._uch, self._ctx.context)

    def _i32(self, off: int) -> ctypes.c_int32:
        return ctypes.c_int32.from_address(self._base + off)

    def _enter_ring0(self, cs: int, cs_flags: int, ss_flags: int) -> None:
        """In the saved state: CPL 0, CS and SS caches (SS null when it comes from a gate)."""
        lay = self.layout
        hflags = ctypes.c_uint32.from_address(self._base + lay.hflags)
        hflags.value &= ~HF_CPL_MASK
        ss = (cs + 8) & 0xFFFC if ss_flags else 0
        for index, selector, flags in ((CS, cs, cs_flags), (SS, ss, ss_flags)):
            SEG_CACHE.pack_into((ctypes.c_char * SEG_CACHE.size).from_address(
                self._base + lay.segs + index * SEG_CACHE.size), 0, selector, 0, 0xFFFFFFFF if flags else 0, flags)

    def _tss_base(self) -> int:
        return ctypes.c_uint64.from_address(self._base + self.layout.tr + 8).value

    def _code_flags(self, selector: int) -> int:
        """The descriptor cache flags of a code segment, from the GDT."""
        _s, base, limit, _f = self.uc.reg_read(x86.UC_X86_REG_GDTR)
        if (selector | 7) > limit:
            raise DeliveryError(f"code selector {selector:#x} is past the GDT limit {limit:#x}")
        return (struct.unpack("<Q", read_exactly(self.engine, base + (selector & ~7), 8))[0] >> 32) & 0x00F0FF00

    # ---- delivery ----------------------------------------------------------------------------
    def exception(self, intno: int) -> bool:
        """The engine's interrupt hook: deliver what the instruction raised."""
        self._save()
        lay = self.layout
        error = self._i32(lay.error_code).value & 0xFFFFFFFF
        software = self._i32(lay.is_int).value != 0
        self._i32(lay.old_exception).value = -1
        self.last = (intno, self.engine.reg("rip"), error)
        block_clock.give_back(self.engine, self.last[1])   # the block's rest did not run
        code = error if intno in ERROR_CODE_VECTORS and not software else None
        self._deliver(intno, code, software=software)
        return True

    def interrupt_with_code(self, vector: int, code: int) -> None:
        """A fault the host raises for the instruction at RIP (a #GP for an MSR it refuses)."""
        block_clock.give_back(self.engine)
        self._save()
        self._deliver(vector, code, software=False)

    def interrupt(self, vector: int) -> None:
        """An external interrupt at the current instruction boundary (the caller checked IF)."""
        self._save()
        self._deliver(vector, None, software=False)

    def _deliver(self, vector: int, code, software: bool) -> None:
        try:
            self._deliver_once(vector, code, software)
        except DeliveryError as exc:
            if vector == VECTOR_DF:
                raise TripleFault(f"delivering #DF failed: {exc}") from None
            self._save()
            try:
                self._deliver_once(VECTOR_DF, 0, False)
            except DeliveryError as again:
                raise TripleFault(f"delivering #DF failed: {again} (raised delivering vector {vector}: "
                                  f"{exc})") from None

    def _deliver_once(self, vector: int, code, software: bool) -> None:
        eng = self.engine
        rip, rsp, rflags, cs, ss = eng.read_regs(("rip", "rsp", "rflags", "cs", "ss"))
        handler, selector, ist, kind, dpl = idt_gate(eng, vector)
        cpl = cs & 3
        if software and dpl < cpl:                   # INT n to a gate the ring may not use: #GP
            vector, code, software = 13, vector * 8 + 2, False
            handler, selector, ist, kind, dpl = idt_gate(eng, 13)
        if ist:
            new_rsp = struct.unpack("<Q", read_exactly(self.engine, self._tss_base() + 0x24 + 8 * (ist - 1), 8))[0]
        elif cpl:
            new_rsp = struct.unpack("<Q", read_exactly(self.engine, self._tss_base() + 4, 8))[0]
        else:
            new_rsp = rsp
        frame = [rip, cs, rflags, rsp, ss]
        if code is not None:
            frame.insert(0, code)
        top = push_frame(eng, new_rsp & ~0xF, frame)
        if cpl:
            self._enter_ring0(selector, self._code_flags(selector), 0)
        self._restore()
        eng.write_regs(("rsp", "rflags", "rip"), (top, rflags & ~cleared_flags(kind), handler))
        self.counts[vector] = self.counts.get(vector, 0) + 1

    def syscall(self, uc=None, user_data=None) -> None:
        """The SYSCALL instruction hook (RIP is the SYSCALL; Unicorn adds its length after)."""
        eng = self.engine
        rip, rflags = eng.read_regs(("rip", "rflags"))
        star, lstar, fmask = eng.msr(MSR_STAR), eng.msr(MSR_LSTAR), eng.msr(MSR_FMASK)
        self._save()
        self._enter_ring0((star >> 32) & 0xFFFC, DESC_G | DESC_P | DESC_S | DESC_CODE | DESC_RW | DESC_A | DESC_L,
                          DESC_G | DESC_B | DESC_P | DESC_S | DESC_RW | DESC_A)
        self._restore()
        eng.write_regs(("rcx", "r11", "rflags", "rip"), (rip + 2, rflags, rflags & ~fmask & ~RFLAGS_RF, lstar - 2))
        self.syscalls += 1

    def install(self) -> None:
        """Take over the engine's exceptions and SYSCALL (until the engine is reset)."""
        self.engine.exception_handler = self.exception
        self._syscall_hook = self.uc.hook_add(ucc.UC_HOOK_INSN, self.syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)

    def uninstall(self) -> None:
        self.engine.exception_handler = None
        if getattr(self, "_syscall_hook", None) is not None:
            self.uc.hook_del(self._syscall_hook)
            self._syscall_hook = None
