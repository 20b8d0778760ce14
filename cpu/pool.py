"""A per-process pool of (guest RAM, engine) pairs.

A new Unicorn instance costs milliseconds and has to translate every guest block again, so
machines reuse idle engines (with their RAM mapping) of the same RAM size: registers, devices and
counters are reset, RAM is emptied, and translated code is kept as long as the same firmware sits
at the same addresses (Engine.load_code).
"""
import threading

from hclsim.cpu.engine import Engine
from hclsim.cpu.memory import GuestMemory, default_shared

MAX_IDLE_PER_SIZE = 2
_idle: dict[tuple[int, bool], list] = {}   # (size, shared): benches switch $HCLSIM_GUEST_RAM in-process
_lock = threading.Lock()


def acquire(memory_size: int, cpuid_table, **handlers) -> tuple[GuestMemory, Engine]:
    """A zeroed GuestMemory of memory_size and an engine mapping it, bound to handlers."""
    with _lock:
        pairs = _idle.get((memory_size, default_shared()))
        pair = pairs.pop() if pairs else None
    if pair is None:
        mem = GuestMemory(memory_size)
        return mem, Engine(mem, cpuid_table, **handlers)
    mem, engine = pair
    mem.reset()
    engine.reset(cpuid_table)
    for name, value in handlers.items():
        setattr(engine, name, value)
    return mem, engine


def release(mem: GuestMemory, engine: Engine) -> None:
    """Return a pair for reuse (or drop it when enough are idle)."""
    engine.retire()
    engine.io_handler = engine.hypercall_handler = None
    engine.after_run = []
    with _lock:
        pairs = _idle.setdefault((mem.size, mem.shared), [])
        if len(pairs) < MAX_IDLE_PER_SIZE:
            pairs.append((mem, engine))
            return
    engine.close()
