"""Watchpoints: Unicorn memory hooks bounded to the watched guest physical bytes.

Unicorn passes memory hooks the *physical* address (it checks the hook's bounds on the GPA
too), so a virtual range is watched at the GPAs it maps to: in the loaded images (fixed), and
under every VP's page tables when the run starts; a hit counts only if the accessing VP maps the
virtual page there. While any memory hook exists Unicorn translates every load and store as a
helper call, so the hooks exist only while a watchpoint does, and the translations are dropped
when they come and go.

A memory hook must not stop the run itself: Unicorn 2.1.4 then abandons the accessing
instruction half done (a store made, the rest of it not) with RIP put back, sometimes to the
start of its block although earlier instructions of the block have run. So the memory hook
only notes the hit, and a native code hook on every instruction (numba, present only while a
watchpoint exists) asks for the stop before the next instruction, where Unicorn stops exactly:
the VP stops right after the accessing instruction, as with a hardware watchpoint.
"""
from dataclasses import dataclass, field

import ctypes

import numpy as np
from numba import carray, cfunc, types
from unicorn import unicorn_const as ucc

from hclsim.cpu import native
from hclsim.cpu.pagetable import translate
from hclsim.debug.events import WATCHPOINT, DebugError, StopRequest

PAGE = 4096
KINDS = {"w": ucc.UC_HOOK_MEM_WRITE, "r": ucc.UC_HOOK_MEM_READ, "a": ucc.UC_HOOK_MEM_READ | ucc.UC_HOOK_MEM_WRITE}
KIND_NAMES = {"w": "watch", "r": "rwatch", "a": "awatch"}
WIDEST_ACCESS = 16   # an access starting this far below the range may still touch it
S_PENDING, S_CALLBACK, S_LAST, S_SLOTS = 0, 1, 2, 3   # the boundary hook's state


@cfunc(types.void(types.voidptr, types.uint64, types.uint32, types.voidptr), cache=True)
def _instruction_boundary(uc, address, size, user_data):
    """Before every instruction: if the previous one hit a watchpoint, ask Python to stop here
    (passing the hitting instruction's address); remember this one."""
    s = carray(user_data, S_SLOTS, np.int64)
    if s[S_PENDING] != 0:
        s[S_PENDING] = 0
        native.call_slow_site(s[S_CALLBACK], uc, np.uint64(s[S_LAST]), np.int32(0))
    s[S_LAST] = np.int64(address)


@dataclass
class Watch:
    address: int
    length: int
    kind: str                   # "w", "r" or "a"
    physical: bool
    pages: list = field(default_factory=list)    # (page of the watched address, its GPA page)
    hooks: list = field(default_factory=list)
    users: int = 0              # watchpoints set on this same range and kind: removed with the last

    @property
    def key(self) -> tuple:
        return self.address, self.length, self.kind, self.physical

    def describe(self) -> str:
        return f"{KIND_NAMES[self.kind]} {'phys ' if self.physical else ''}{self.address:#x} len {self.length}"


class Watchpoints:
    def __init__(self, machine, images, page_tables):
        """page_tables() -> the CR3s the VPs' virtual addresses go through now."""
        self.machine, self.images, self.page_tables = machine, images, page_tables
        self.items: dict[tuple, Watch] = {}
        self.hit = None            # this run's first hit, a StopRequest waiting for the next instruction
        self._boundary = None
        self._state = np.zeros(S_SLOTS, np.int64)
        self._callback = native.SLOW_SITE_PROTO(self._stop_after_access)
        self._state[S_CALLBACK] = ctypes.cast(self._callback, ctypes.c_void_p).value

    @property
    def engine(self):
        return self.machine.engine

    def add(self, address: int, length: int, kind: str, physical: bool) -> Watch:
        if kind not in KINDS:
            raise DebugError(f"watchpoint kind {kind!r}: use 'w' (write), 'r' (read) or 'a' (access)")
        if length < 1 or length > 1 << 20:
            raise DebugError(f"watchpoint length {length}: 1 to 1 MiB")
        if physical and not self.machine.mem.contains(address, length):
            raise DebugError(f"GPA range [{address:#x}, {address + length:#x}) is outside guest RAM")
        watch = self.items.setdefault((address, length, kind, physical), Watch(address, length, kind, physical))
        watch.users += 1
        self.sync()
        if not watch.pages:
            self.remove(address, length, kind, physical)
            raise DebugError(f"{address:#x} is not mapped in any VP's page tables or image")
        return watch

    def remove(self, address: int, length: int, kind: str, physical: bool) -> None:
        key = (address, length, kind, physical)
        watch = self.items.get(key)
        if watch is None:
            raise DebugError(f"no {KIND_NAMES.get(kind, kind)} watchpoint at {address:#x} length {length}")
        watch.users -= 1
        if watch.users > 0:
            return                  # another watchpoint on the same range still needs the hooks
        del self.items[key]
        self._unhook(watch)
        self.sync()

    # ---- hooks ----------------------------------------------------------------------------
    def _resolve(self, watch: Watch) -> list[tuple[int, int]]:
        first, last = watch.address & ~(PAGE - 1), (watch.address + watch.length - 1) & ~(PAGE - 1)
        pages = range(first, last + PAGE, PAGE)
        if watch.physical:
            return [(p, p) for p in pages]
        ram = self.machine.mem.array()
        cr3s = self.page_tables()
        found = []
        for page in pages:
            gpas = set()
            gpa = self.images.gpa_of(page)
            if gpa is not None:
                gpas.add(gpa & ~(PAGE - 1))
            for cr3 in cr3s:
                pa = translate(ram, cr3, page)
                if pa >= 0:
                    gpas.add(pa & ~(PAGE - 1))
            found += [(page, g) for g in sorted(gpas) if self.machine.mem.contains(g, PAGE)]
        return found

    def sync(self) -> None:
        """Hook the GPAs every watchpoint maps to now (virtual ones may have moved)."""
        changed = False
        for watch in self.items.values():
            pages = self._resolve(watch)
            if pages != watch.pages or not watch.hooks:
                self._unhook(watch)
                watch.pages = pages
                for page, gpa in pages:
                    lo = gpa + max(watch.address, page) - page
                    hi = gpa + min(watch.address + watch.length, page + PAGE) - page
                    watch.hooks.append(self.engine.uc.hook_add(KINDS[watch.kind], self._on_access, watch,
                                                               max(0, lo - WIDEST_ACCESS + 1), hi - 1))
                changed = True
        uc = self.engine.uc
        if self.items and self._boundary is None:
            self._boundary = native.hook_add(uc, ucc.UC_HOOK_CODE, _instruction_boundary.address,
                                             self._state.ctypes.data)
            changed = True
        elif not self.items and self._boundary is not None:
            native.hook_del(uc, self._boundary)
            self._boundary = None
            changed = True
        if changed:
            uc.ctl_flush_tb()  # memory accesses are translated differently with memory hooks

    def _unhook(self, watch: Watch) -> None:
        for hook in watch.hooks:
            native.binding_hook_del(self.engine.uc, hook)
        if watch.hooks:
            self.engine.uc.ctl_flush_tb()
        watch.hooks = []

    def _on_access(self, uc, access, gpa, size, value, watch):
        try:
            if self.hit is None:
                self._check(access, gpa, size, value, watch)
        except BaseException as exc:  # not through C frames
            self.engine.request_stop(exc)

    def _check(self, access, gpa, size, value, watch: Watch) -> None:
        e = self.engine
        for page, gpa_page in watch.pages:
            lo = gpa_page + max(watch.address, page) - page
            hi = gpa_page + min(watch.address + watch.length, page + PAGE) - page
            if not (gpa < hi and gpa + size > lo):
                continue
            if not watch.physical and e.translate(page) != gpa_page:
                continue  # another VP's mapping of that GPA
            at = max(gpa, lo)
            where = at if watch.physical else page + (at - gpa_page)
            old = int.from_bytes(self.machine.mem.read(gpa, size), "little")
            if access == ucc.UC_MEM_WRITE:
                detail = f"write of {size} bytes at {where:#x}: {old:#x} -> {value & ((1 << 8 * size) - 1):#x}"
            else:
                detail = f"read of {size} bytes at {where:#x}: {old:#x}"
            self.hit = StopRequest(WATCHPOINT, f"{watch.describe()}: {detail}", where, watch.kind)
            self._state[S_PENDING] = 1
            return

    def _stop_after_access(self, uc_ptr, address, _kind):
        try:
            self.engine.request_stop(self.pending())
        except BaseException as exc:  # not through C frames
            self.engine.request_stop(exc)

    def pending(self) -> StopRequest | None:
        """The hit waiting to stop the VP, with the instruction that made it."""
        if self.hit is not None and "by the instruction" not in self.hit.detail:
            self.hit.detail += f" by the instruction at {int(self._state[S_LAST]) & (2**64 - 1):#x}"
        return self.hit

    def begin_run(self) -> None:
        self.hit = None
        self._state[S_PENDING] = 0

    def close(self) -> None:
        for watch in list(self.items.values()):
            self._unhook(watch)
        self.items.clear()
        self.sync()
