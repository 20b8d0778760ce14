"""One Unicorn engine running vCPUs over the shared guest RAM, and the VP exits it reports.

Exits come from three places (see shared/design/architecture.md, "Measured facts"):
- native hooks (cpu/fastpath.py) for port I/O and CPUID, which only leave the engine for
  devices Python owns;
- exit addresses (ctl_exits) for RDMSR/WRMSR (Unicorn cannot hook them), the kernel entry and
  breakpoints: emu_start returns with RIP on the instruction, not yet executed;
- HLT (emu_start returns after it), vmcall (the invalid-instruction hook) and faults.
"""
import ctypes
from dataclasses import dataclass, field

import numpy as np

from unicorn import Uc, UcError, UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from hclsim.cpu import fastpath, hypercall_fastpath, msr_fastpath, native, runvp_fastpath, uc_internals
from hclsim.cpu.native import raw_ctl, raw_reg_read, raw_reg_read_batch, raw_reg_write, raw_reg_write_batch
from hclsim.cpu.memory import GuestMemory
from hclsim.cpu.slow_paths import SLOW_IO, SLOW_SITE, WATCHDOG  # noqa: F401 (SLOW_IO: the benches' too)
from hclsim.cpu.pagetable import translate

MSR_EFER = 0xC0000080

# Exit kinds.
EXIT_HLT = "hlt"
EXIT_ADDRESS = "exit-address"   # RIP reached a registered exit address
EXIT_STOP = "stop"              # a handler asked the engine to stop (crash MSR, error, ...)
EXIT_FAULT = "fault"
# EXIT_STOP reasons the block hook gives (cpu/fastpath.py): the deadline; a block whose trapped
# instructions (H_MSR_TRAP) the host must hook before it runs.
STOP_DEADLINE, STOP_PENDING = "deadline", "pending"

VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4")
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss")
REG_IDS = {name: getattr(x86, "UC_X86_REG_" + name.upper()) for name in GPR_NAMES + CONTROL_NAMES + SEGMENT_NAMES}
REG_IDS["fs_base"] = x86.UC_X86_REG_FS_BASE
REG_IDS["gs_base"] = x86.UC_X86_REG_GS_BASE


class _RegBatch:
    """The arrays uc_reg_read_batch/uc_reg_write_batch take for one tuple of register names."""

    def __init__(self, names: tuple):
        n = len(names)
        self.ids = (ctypes.c_int * n)(*(REG_IDS[name] for name in names))
        self.vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * n)(*(base + 8 * i for i in range(n)))


_NATIVE_SITES = {"rdmsr": msr_fastpath.hook_rdmsr, "wrmsr": msr_fastpath.hook_wrmsr,
                 "vtl0:in": runvp_fastpath.hook_vtl0_in, "vtl0:out": runvp_fastpath.hook_vtl0_out}


class GuestException(Exception):
    """A handler decided the guest's instruction raises a CPU exception (vector)."""
    vector = 13


class _UcMsr(ctypes.Structure):  # uc_x86_msr: the binding's msr_read/write cost ~10 us a call
    _fields_ = [("rid", ctypes.c_uint32), ("val", ctypes.c_uint64)]


class _UcMmr(ctypes.Structure):  # uc_x86_mmr, for GDTR/IDTR
    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


# uc_ctl_flush_tlb's control word: UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0 arguments).
_CTL_TLB_FLUSH = (ucc.UC_CTL_IO_WRITE << 30) | ucc.UC_CTL_TLB_FLUSH

_TABLES = {"gdtr": x86.UC_X86_REG_GDTR, "idtr": x86.UC_X86_REG_IDTR}

_raw_context_save = native._raw.uc_context_save
_raw_context_restore = native._raw.uc_context_restore


def _old_exception_offset() -> int:
    """Where a saved context (uc_context_save, header included) holds QEMU's "exception in
    flight" (CPUX86State.old_exception, -1 when none). Unicorn never delivers an exception (the
    interrupt hook ends the run), so nothing resets it: each one raised is remembered, and the
    next is promoted as if raised while delivering it (#GP/#PF -> #DF; anything after #DF is a
    triple fault, which ends emu_start silently, no hook called; unicorn#1883). Silent ones come
    from Unicorn's own cache invalidation of virtual addresses the loaded page tables do not map
    (every exit address at the end of every emu_start, hook_del of a hook that was translated,
    ctl_remove_cache). Found by dividing by zero twice on a scratch engine: -1 -> 0 -> 8."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, b"\xf7\xf1")  # div ecx, with ecx = 0
    uc.hook_add(ucc.UC_HOOK_INTR, lambda uc, intno, _: uc.emu_stop())
    seen = [bytes(uc.context_save())]
    for _ in range(2):
        uc.emu_start(0, 0x1000)
        seen.append(bytes(uc.context_save()))
    found = [off for off in range(0, len(seen[0]) - 3, 4)
             if [int.from_bytes(s[off:off + 4], "little", signed=True) for s in seen] == [-1, 0, 8]]
    if len(found) != 1:
        raise RuntimeError(f"cannot locate the x86 exception state in a Unicorn context: {found}")
    return found[0]


_OLD_EXCEPTION = _old_exception_offset()


@dataclass
class VpExit:
    kind: str
    rip: int
    vector: int | None = None        # faults: the CPU exception vector, if known
    fault_address: int | None = None  # faults: the unmapped/denied address, if known
    message: str = ""
    stop_reason: object = None       # EXIT_STOP: what the handler passed to request_stop
    unmapped_write: bool | None = None  # faults on a GPA outside RAM: was it a write


@dataclass
class Engine:
    mem: GuestMemory
    cpuid_table: object
    io_handler: object                   # (port, size, value, is_in) -> int: the device bus
    hypercall_handler: object            # (engine) -> None; vmcall at RIP, RIP not yet advanced
    exits: set = field(default_factory=set)

    def __post_init__(self):
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._uch = ctypes.c_void_p(self.uc._uch.value)
        self._reg_buf = ctypes.c_uint64()
        self._reg_ptr = ctypes.byref(self._reg_buf)
        self._batches: dict = {}
        self.uc.mem_map_ptr(0, self.mem.size, UC_PROT_ALL, self.mem.address)
        self.state = fastpath.FastPathState(self.cpuid_table, self.mem.address, self.mem.size, SLOW_IO.address)
        self.state.buf[fastpath.H_PAGING] = 1
        ud = self.state.address
        native.hook_add(self.uc, ucc.UC_HOOK_INSN, fastpath.hook_out.address, ud, x86.UC_X86_INS_OUT)
        native.hook_add(self.uc, ucc.UC_HOOK_INSN, fastpath.hook_in.address, ud, x86.UC_X86_INS_IN)
        native.hook_add(self.uc, ucc.UC_HOOK_INSN, fastpath.hook_cpuid.address, ud, x86.UC_X86_INS_CPUID)
        native.hook_add(self.uc, ucc.UC_HOOK_BLOCK, fastpath.hook_block.address, ud)
        # vmcall: EnableVpVtl/StartVp natively when they succeed, the rest via SLOW_SITE.
        native.hook_add(self.uc, ucc.UC_HOOK_INSN_INVALID, hypercall_fastpath.hook_invalid.address, ud)
        self.uc.hook_add(ucc.UC_HOOK_INTR, self._on_interrupt)
        # Bounded to the GPAs above RAM: Unicorn keeps every store to a page that any memory
        # hook covers on its slow path (notdirty_write on each store, never marking the page
        # dirty), which made the guest's stores the biggest cost of AP bring-up.
        self.uc.hook_add(ucc.UC_HOOK_MEM_UNMAPPED, self._on_unmapped, None, self.mem.size, 0xFFFFFFFFFFFFFFFF)
        SLOW_IO.engines[native.uc_handle(self.uc)] = self
        SLOW_SITE.engines[native.uc_handle(self.uc)] = self
        self.state.buf[fastpath.H_FN_SLOW_SITE] = SLOW_SITE.address
        self.runvp = runvp_fastpath.RunVpFastPath()      # RUN_VP by doorbell, answered in the hook
        self.state.buf[fastpath.H_RUNVP_AREA] = self.runvp.address
        self._stop_reason = None
        self._fault = None
        self.code_signature = None
        self.current_vp = None
        self.vmcall_stops = 0
        self.sites, self.site_handler, self._site_hooks = {}, None, []
        self.uc.ctl_exits_enabled(True)
        self.set_exits(self.exits, force=True)
        self.pristine = self.uc.context_save()
        self._scratch = self.uc.context_save()   # _run_once: the CPU state, to clear old_exception
        self._scratch_ptr = self._scratch.context
        self._old_exception = ctypes.c_int32.from_address(
            ctypes.cast(self._scratch_ptr, ctypes.c_void_p).value + _OLD_EXCEPTION)
        self.long_mode_templates = {}   # Vp.start: StartVp contexts by all but CR3
        self.after_run = []             # callables run after every emu_start (device output flushes)
        self.exception_handler = None   # intno -> True when it delivered the exception to the guest

    def reset(self, cpuid_table) -> None:
        """Make a pooled engine look new to the next machine: registers, counters and devices
        as at creation. Translated code is kept (see load_code)."""
        self.uc.context_restore(self.pristine)
        self.long_mode_templates.clear()
        self.after_run = []
        self.exception_handler = None
        if not uc_internals.memory_exit_checks(self.uc):
            uc_internals.set_memory_exit_checks(self.uc, True)
        self.state.reset(cpuid_table)
        self.state.buf[fastpath.H_PAGING] = 1
        self.runvp.reset()
        self.flush_tlb()  # memory contents changed

    def load_code(self, signature) -> None:
        """Declare what executable images the guest RAM now holds; translated blocks survive
        only if they are the same images at the same addresses as last time, and only those of
        pages that still hold what they were translated from (see retire)."""
        images, pages = self.code_signature or (None, None)
        if signature != images or pages is None:
            self.uc.ctl_flush_tb()
            self.state.forget_blocks()
        else:
            self._drop_stale_code(pages)
        self.code_signature = (signature, None)  # the pages are known once the machine is done
        self.runvp.forget()

    # A guest that writes over its own code (a stray pointer, a bad ShimParams offset), or a
    # debugger poking it, makes Unicorn retranslate the changed code, and those translations
    # outlive the machine: the next one writes the pristine images straight into RAM, which
    # Unicorn does not see. So an engine going back to the pool notes, with its code signature,
    # the pages its translated code (every block of the instruction-count cache) came from and
    # their contents; load_code drops the translations and cached counts of the pages whose
    # contents differ in the new machine's RAM (typically none; the sidecar's hypercall page,
    # which it fills in at run time).
    def retire(self) -> None:
        """Called when the machine is done with the engine (pool.release), RAM still intact."""
        if self.code_signature is None:
            return
        self.code_signature = (self.code_signature[0], self._code_pages())

    def _code_pages(self) -> dict | None:
        """{GPA page: (its bytes, [(first, end) VA spans of the blocks in it])}, or None when a
        block cannot be placed (then the next machine translates everything anew)."""
        if not self.state.holds_every_block:    # an evicted block's translation could be kept
            return None
        table = self.state.block_table
        keys = table[table[:, 0] != 0, 0].astype(np.uint64)
        mask = np.uint64((1 << 48) - 1)
        low = (keys - np.uint64(1)) & mask                       # key = (VA + 1) ^ (size << 48)
        high = np.where(low & np.uint64(1 << 47), np.uint64(0xFFFF), np.uint64(0))
        vas = low | (high << np.uint64(48))
        sizes = ((keys >> np.uint64(48)) ^ high) & np.uint64(0xFFFF)
        first = {}                   # VA page -> lowest start of a block reaching into it
        for va, size in zip(vas.tolist(), sizes.tolist()):
            for page in {va & ~0xFFF, (va + max(size, 1) - 1) & ~0xFFF & ((1 << 64) - 1)}:
                first[page] = min(first.get(page, va), va)
        # Page-table roots: the loaded VP's, and those of the VPs started from a context (each
        # StartVp template keeps the first one's CR3; the sidecar maps its image alike in all).
        roots = [self.reg("cr3")] + [ctx.reg_read(x86.UC_X86_REG_CR3) for ctx in self.long_mode_templates.values()]
        ram = self.mem.array()
        found = {}
        for va, start in first.items():
            gpa = next((pa for pa in (translate(ram, cr3, va) for cr3 in roots) if pa >= 0), -1)
            if gpa < 0 and va + 0x1000 <= self.mem.size:
                gpa = va  # executed with paging off, or identity-mapped (the VTL0 test guest)
            if gpa < 0 or gpa + 0x1000 > self.mem.size:
                return None
            found.setdefault(gpa & ~0xFFF, []).append((start, va + 0x1000))
        return {gpa: (self.mem.read(gpa, 0x1000), spans) for gpa, spans in found.items()}

    def _drop_stale_code(self, pages: dict) -> None:
        stale = [(gpa, spans) for gpa, (data, spans) in pages.items() if self.mem.read(gpa, 0x1000) != data]
        if not stale:
            return
        # ctl_remove_cache takes the CPU's view of an address: with paging off (the pristine
        # context) that is the GPA, and every translation from the page goes, whatever its VA.
        saved = self.uc.context_save()
        self.uc.context_restore(self.pristine)
        for gpa, spans in stale:
            self.remove_cache(gpa, gpa + 0x1000)
            for start, end in spans:  # the counts of the blocks reaching into the page
                self.state.invalidate_blocks(start, end)
        self.uc.context_restore(saved)

    def close(self):
        SLOW_IO.engines.pop(native.uc_handle(self.uc), None)
        SLOW_SITE.engines.pop(native.uc_handle(self.uc), None)

    def attach_hypervisor(self, hv) -> None:
        """Let the native MSR and vmcall paths use the hypervisor's APIC table and native area
        (hv/hypervisor.py); they must outlive the engine's use of them (the Machine holds both)."""
        self._hv_tables = (hv.apic, hv.native)
        self.state.buf[fastpath.H_APIC_TABLE] = hv.apic.ctypes.data
        self.state.buf[fastpath.H_APIC_ROWS] = hv.apic.shape[0]
        self.state.buf[fastpath.H_HV_AREA] = hv.native.address

    # ---- registers and memory -------------------------------------------------------------
    # Straight to uc_reg_read/uc_reg_write: the binding's generic reg_read costs ~3 us a call,
    # more than a VP exit should.
    def reg(self, name: str) -> int:
        self._reg_buf.value = 0  # segment registers fill only their low bytes
        raw_reg_read(self._uch, REG_IDS[name], self._reg_ptr)
        return self._reg_buf.value

    def set_reg(self, name: str, value: int) -> None:
        self._reg_buf.value = value & 0xFFFFFFFFFFFFFFFF
        raw_reg_write(self._uch, REG_IDS[name], self._reg_ptr)

    # One uc_reg_read_batch for many registers: a VP exit's ~20 registers cost one call (~3 us)
    # instead of 20 (~14 us).
    def read_regs(self, names: tuple) -> list[int]:
        batch = self._batch(names)
        ctypes.memset(batch.vals, 0, 8 * len(names))     # segment registers fill only their low bytes
        raw_reg_read_batch(self._uch, batch.ids, batch.ptrs, len(names))
        return list(batch.vals)

    def write_regs(self, names: tuple, values) -> None:
        batch = self._batch(names)
        for i, v in enumerate(values):
            batch.vals[i] = v & 0xFFFFFFFFFFFFFFFF
        raw_reg_write_batch(self._uch, batch.ids, batch.ptrs, len(names))

    def _batch(self, names: tuple) -> "_RegBatch":
        batch = self._batches.get(names)
        if batch is None:
            batch = self._batches[names] = _RegBatch(names)
        return batch

    def msr(self, index: int) -> int:
        msr = _UcMsr(index, 0)
        raw_reg_read(self._uch, x86.UC_X86_REG_MSR, ctypes.byref(msr))
        return msr.val

    def set_msr(self, index: int, value: int) -> None:
        msr = _UcMsr(index, value & 0xFFFFFFFFFFFFFFFF)
        raw_reg_write(self._uch, x86.UC_X86_REG_MSR, ctypes.byref(msr))

    def table(self, name: str) -> tuple[int, int]:
        """(base, limit) of "gdtr" or "idtr"."""
        mmr = _UcMmr()
        raw_reg_read(self._uch, _TABLES[name], ctypes.byref(mmr))
        return mmr.base, mmr.limit

    def set_table(self, name: str, base: int, limit: int) -> None:
        mmr = _UcMmr(0, base, limit, 0)
        raw_reg_write(self._uch, _TABLES[name], ctypes.byref(mmr))

    def registers(self) -> dict[str, int]:
        regs = {name: self.reg(name) for name in GPR_NAMES + CONTROL_NAMES + SEGMENT_NAMES}
        regs["efer"] = self.msr(MSR_EFER)
        regs["fs_base"] = self.reg("fs_base")
        regs["gs_base"] = self.reg("gs_base")
        return regs

    def translate(self, va: int) -> int:
        """GPA for va under the running VP's CR3, or a negative pagetable.WALK_* code."""
        if not self.reg("cr0") & 0x80000000:
            return va
        return translate(self.mem.array(), self.reg("cr3"), va)

    def read_virtual(self, va: int, length: int) -> bytes:
        """Bytes at va..va+length through the page tables; stops early at an unmapped page."""
        out = bytearray()
        while len(out) < length:
            pa = self.translate(va + len(out))
            if pa < 0 or not self.mem.contains(pa):
                break
            chunk = min(length - len(out), 0x1000 - ((va + len(out)) & 0xFFF), self.mem.size - pa)
            out += self.mem.read(pa, chunk)
        return bytes(out)

    def flush_tlb(self) -> None:
        """Forget cached translations. Needed whenever another VP's context is restored:
        uc_context_restore copies the CPU state but keeps the TLB, so a VP would otherwise see
        the previous VP's mappings of the VAs they share (the sidecar's per-CPU window)."""
        raw_ctl(self._uch, _CTL_TLB_FLUSH)

    def set_memory_exit_checks(self, on: bool) -> bool:
        """Unicorn's stop check after each guest load and store, on (its default) or off, for
        code translated from now on (cpu/uc_internals.py); off, the block hook also spares the
        instruction hooks their state rebuild. Off suits a guest that only stops at blocks'
        starts (deadlines); a code hook that stops or writes RIP needs it on. False if this
        Unicorn has no such switch."""
        ok = uc_internals.set_memory_exit_checks(self.uc, on)
        self.state.buf[fastpath.H_SKIP_SYNC] = uc_internals.skip_sync_address(self.uc) if ok and not on else 0
        return ok

    def remove_cache(self, start: int, end: int) -> None:
        """ctl_remove_cache, keeping CR2: finding the blocks walks the page tables, and a miss
        sets CR2 as a #PF would though the guest saw none."""
        cr2 = self.reg("cr2")
        self.uc.ctl_remove_cache(start, end)
        self.set_reg("cr2", cr2)

    def code_changed(self, start: int, end: int) -> None:
        """Guest code in [start, end) (identity-mapped addresses) was rewritten by the host."""
        self.remove_cache(start, end)
        self.state.invalidate_blocks(start, end)
        self.runvp.forget()

    def map_mmio(self, base: int, size: int, read, write) -> None:
        """An MMIO range outside RAM: read(offset, size) -> int, write(offset, size, value).
        Accesses are VP exits handled in Python (devices are rare, and own their state)."""
        def on_read(uc, offset, width, user_data):
            try:
                return read(offset, width) & ((1 << (8 * width)) - 1)
            except BaseException as exc:
                self.request_stop(exc)
                return 0

        def on_write(uc, offset, width, value, user_data):
            try:
                write(offset, width, value)
            except BaseException as exc:
                self.request_stop(exc)
        self.uc.mmio_map(base, size, on_read, None, on_write, None)

    # ---- sites ---------------------------------------------------------------------------
    def set_sites(self, sites: dict, handler) -> None:
        """Per-address code hooks: handler(engine, address, kind) runs before the instruction at
        each site (RDMSR/WRMSR, PAUSE, ...). Writing RIP in the handler skips or redirects the
        instruction and ends the translated block; request_stop after writing RIP ends the run
        exactly there. Unlike exit addresses, sites cost nothing on each emu_start (Unicorn
        re-invalidates every exit address's block whenever emulation starts)."""
        if sites == self.sites:
            self.site_handler = handler
            return
        for native_hook, handle in self._site_hooks:
            if native_hook:
                native.hook_del(self.uc, handle)
            else:
                native.binding_hook_del(self.uc, handle)
        self._site_hooks = [self._add_site_hook(addr, kind) for addr, kind in sorted(sites.items())]
        self.sites, self.site_handler = dict(sites), handler
        self.uc.ctl_flush_tb()  # blocks translated before a hook existed would not call it

    def _add_site_hook(self, addr: int, kind: str) -> tuple[bool, int]:
        if kind in _NATIVE_SITES:  # APIC MSRs natively, the rest through SLOW_SITE
            return True, native.hook_add(self.uc, ucc.UC_HOOK_CODE, _NATIVE_SITES[kind].address,
                                         self.state.address, begin=addr, end=addr)
        return False, self.uc.hook_add(ucc.UC_HOOK_CODE, self._on_site, kind, addr, addr)

    def _on_site(self, uc, address, size, kind):
        try:
            self.site_handler(self, address, kind)
        except GuestException as exc:
            self._fault = VpExit(EXIT_FAULT, address, vector=exc.vector, message=str(exc))
            self.set_reg("rip", address)
            uc.emu_stop()
        except BaseException as exc:  # not through C frames: end the run and raise after it
            self.set_reg("rip", address)
            self.request_stop(exc)

    # ---- exits ---------------------------------------------------------------------------
    def set_exits(self, addresses, force: bool = False) -> None:
        addresses = set(addresses)
        if addresses == self.exits and not force:
            return  # translated blocks already stop at these addresses
        self.exits = addresses
        self.uc.ctl_set_exits(sorted(self.exits) or [0xFFFFFFFFFFFFFFF0])
        self.uc.ctl_flush_tb()

    def request_stop(self, reason) -> None:
        """Called from a handler inside the run: end it with EXIT_STOP and this reason."""
        self._stop_reason = reason
        self.uc.emu_stop()

    def _on_invalid(self, uc, user_data):
        rip = self.reg("rip")
        insn = self.read_virtual(rip, 3)
        if insn in (b"\x0f\x01\xc1", b"\x0f\x01\xd9"):  # vmcall / vmmcall
            return self._hypercall(rip)
        self._fault = VpExit(EXIT_FAULT, rip, vector=6, message=f"invalid opcode {insn.hex()}")
        return False

    def _hypercall(self, rip: int) -> bool:
        try:
            self.hypercall_handler(self)
            return True
        except GuestException as exc:
            self._fault = VpExit(EXIT_FAULT, rip, vector=exc.vector, message=str(exc))
            self.uc.emu_stop()
            return True

    def _on_interrupt(self, uc, intno, user_data):
        # No IDT delivery in Unicorn: any exception ends the run (the shim has no IDT either,
        # so on hardware this would escalate to a triple fault), unless an exception handler
        # (a guest with an IDT of its own: cpu/delivery.py) takes it.
        if self.exception_handler is not None:
            try:
                if self.exception_handler(intno):
                    return
            except BaseException as exc:  # not through C frames: end the run and raise after it
                self.request_stop(exc)
                return
        rip = uc.reg_read(x86.UC_X86_REG_RIP)
        if intno == 14:
            cr2 = uc.reg_read(x86.UC_X86_REG_CR2)
            self._fault = VpExit(EXIT_FAULT, rip, vector=14, fault_address=cr2,
                                 message=f"page fault at {cr2:#x}")
        else:
            self._fault = VpExit(EXIT_FAULT, rip, vector=intno,
                                 message=f"{VECTOR_NAMES.get(intno, 'vector ' + str(intno))} exception")
        uc.emu_stop()

    def _on_unmapped(self, uc, access, address, size, value, user_data):
        kind = {ucc.UC_MEM_READ_UNMAPPED: "read", ucc.UC_MEM_WRITE_UNMAPPED: "write",
                ucc.UC_MEM_FETCH_UNMAPPED: "instruction fetch"}.get(access, "access")
        rip = uc.reg_read(x86.UC_X86_REG_RIP)
        self._fault = VpExit(EXIT_FAULT, rip, vector=14, fault_address=address,
                             message=f"{kind} of unmapped address {address:#x}",
                             unmapped_write=access == ucc.UC_MEM_WRITE_UNMAPPED)
        return False

    def run(self, timeout_us: int = 0) -> VpExit:
        """Run the loaded VP from its RIP until the next exit."""
        while True:
            exit = self._run_once(timeout_us)
            if exit is not None:
                return exit

    def _run_once(self, timeout_us: int) -> VpExit | None:
        self._stop_reason = None
        self._fault = None
        h = self.state.buf
        h[fastpath.H_NATIVE_STOP] = 0
        rip = self.reg("rip")
        # No exception is in flight at an instruction boundary (see _old_exception_offset).
        _raw_context_save(self._uch, self._scratch_ptr)
        if self._old_exception.value != -1:
            self._old_exception.value = -1
            _raw_context_restore(self._uch, self._scratch_ptr)
        if timeout_us:
            WATCHDOG.arm(self, timeout_us / 1e6)
        # QEMU's translator probes code pages ahead of a block and a failed probe sets CR2 though
        # no #PF reaches the guest (Unicorn delivers none: a real one ends the run): CR2 is the
        # guest's only when a fault stopped it.
        cr2 = self.reg("cr2")
        try:
            self.uc.emu_start(rip, 0)
            error = None
        except UcError as exc:
            error = exc
        finally:
            if timeout_us:
                WATCHDOG.disarm(self)
        if self._fault is None and error is None and self.exception_handler is None:
            self.set_reg("cr2", cr2)         # (a guest that takes its own #PFs keeps its CR2)
        for flush in self.after_run:
            flush()
        rip = self.reg("rip")
        if self._fault is not None:
            return self._fault
        if isinstance(self._stop_reason, BaseException):
            raise self._stop_reason
        if h[fastpath.H_PENDING]:          # a block holds an MSR instruction to hook first
            return VpExit(EXIT_STOP, rip, stop_reason=STOP_PENDING)
        if h[fastpath.H_DEADLINE_HIT]:     # the instruction count reached H_DEADLINE
            h[fastpath.H_DEADLINE_HIT] = 0
            return VpExit(EXIT_STOP, rip, stop_reason=STOP_DEADLINE)
        if h[fastpath.H_NATIVE_STOP]:      # before a watchdog's timeout: the exit was answered
            return VpExit(EXIT_STOP, rip, stop_reason=runvp_fastpath.ANSWERED)
        if self._stop_reason is not None:
            return VpExit(EXIT_STOP, rip, stop_reason=self._stop_reason)
        if error is not None:
            return VpExit(EXIT_FAULT, rip, message=str(error))
        if rip in self.exits:
            return VpExit(EXIT_ADDRESS, rip)
        if self.read_virtual(rip - 1, 1) == b"\xf4":
            return VpExit(EXIT_HLT, rip)
        if self.read_virtual(rip, 3) in (b"\x0f\x01\xc1", b"\x0f\x01\xd9"):
            # Unicorn ended emu_start on a vmcall without calling the invalid-instruction hook.
            # That was the silent "triple fault" of a stale old_exception (see
            # _old_exception_offset), now cleared before every run; kept as a safety net that
            # emulates the vmcall as the hook would have (vmcall_stops counts it: 0 expected).
            self.vmcall_stops += 1
            self._hypercall(rip)
            if self._fault is not None:
                return self._fault
            if self._stop_reason is not None:
                return VpExit(EXIT_STOP, self.reg("rip"), stop_reason=self._stop_reason)
            return None
        return VpExit(EXIT_STOP, rip, stop_reason="stopped")

    def counters(self) -> dict:
        return self.state.counters()
