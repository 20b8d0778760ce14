"""A Machine's run state as plain data and back: everything a snapshot holds besides guest RAM.

Captured generically, attribute by attribute, so that state added to these classes later is
captured too or makes save() fail with its name: the hypervisor and its per-VP state, the VPs,
the scheduler, and after the handoff the Linux stand-in's CPUs and sidecar driver. Captured
explicitly: the engine's live CPU context and fast-path slots (counters, UART registers), the
machine's serial buffers. Not captured, because Machine(config) rebuilds them identically from
the config and the images: the VTL2 layout and image, symbols, exit sites, the CPUID table, the
VTL0 guest handle and the engine's hooks.
"""
import ctypes

import numpy as np

from hclsim import HclsimError
from hclsim.cpu import fastpath
from hclsim.hv.hypervisor import GuestCrash
from hclsim.hv.vp import Vp
from hclsim.kernel_stub.handoff import HandoffRegs, check_handoff
from hclsim.kernel_stub.kernel import Kernel


class SnapshotStateError(HclsimError):
    pass


# Attributes rebuilt from the config (or references to other captured objects), per class.
DERIVED = {
    "Hypervisor": {"mem", "apic_ids", "isolation", "vps", "vp_by_apic", "native"},
    "HvNativeArea": {"vp", "contexts", "log"},           # views of its buf
    "VpState": {"index", "apic_id", "apic_row", "native"},  # apic_row: a view of Hypervisor.apic
    "Vp": {"index", "apic_id", "context"},
    "Scheduler": {"engine", "hv", "vps", "msr_sites", "pause_sites", "vtl0_sites", "engine_factory",
                  "vp_engines", "stop_addresses"},
    "LinuxCpus": {"partition", "sidecar", "_lock"},
    "Sidecar": {"partition", "nodes", "scanner"},
}
# The fast path's per-run state; its other header slots are pointers and the buffer's layout.
FASTPATH_SLOTS = ("H_ICOUNT", "H_BLOCKS", "H_IO_FAST", "H_IO_SLOW", "H_CPUID_EXITS", "H_APIC_ID",
                  "H_BT_MISSES", "H_BT_PROBES", "H_PAGING", "H_LAST_BLOCK", "H_VP_INDEX", "H_MSR_FAST",
                  "H_HC_FAST")
# Pointers and the buffer's layout; the native port table (H_NPIO*) is rebuilt by Bus.attach.
# H_BT_EVICTIONS and H_BT_ENTRIES go with the block-count cache, which a snapshot does not hold
# (restore empties it).
FASTPATH_LAYOUT = ("H_TOTAL", "H_FN_SLOW_IO", "H_FN_REG_READ", "H_FN_REG_WRITE", "H_FN_UC_STOP", "H_CPUID_OFF",
                   "H_CPUID_ROWS", "H_BT_ADDR", "H_BT_SIZE", "H_RAM_ADDR", "H_RAM_SIZE", "H_NPIO_COUNT", "H_NPIO",
                   "H_APIC_TABLE", "H_APIC_ROWS", "H_FN_SLOW_SITE", "H_HV_AREA",
                   "H_RUNVP_AREA", "H_NATIVE_STOP",   # the doorbell area (armed only inside a RUN_VP); a flag cleared at each run
                   "H_BT_EVICTIONS", "H_BT_ENTRIES",
                   # a real kernel's virtual time (hclsim/real_linux.py), which snapshots do not take
                   "H_DEADLINE", "H_DEADLINE_HIT", "H_SKIP_SYNC", "H_TSC_IDLE", "H_PENDING",
                   "H_PENDING_SIZE", "H_TSC_READS", "H_FRONT_ADDR", "H_MSR_TRAP", "H_BLOCK_START",
                   "H_BLOCK_COUNT", "H_RUN_START")
HANDOFF_REGS = ("rip", "rdi", "rsi", "rsp", "cr0", "cr3", "cr4", "efer", "cs", "ds", "ss")


# ---- values as tagged JSON ------------------------------------------------------------------

def encode(value, where: str):
    """JSON-ready form of value: lists stay lists, other containers become one-key tags."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, np.ndarray):
        return {"ndarray": [value.dtype.str, list(value.shape), value.tobytes().hex()]}
    if isinstance(value, list):
        return [encode(v, where) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode(v, where) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"set": [encode(v, where) for v in sorted(value, key=repr)]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, where), encode(v, where)] for k, v in value.items()]}
    if isinstance(value, Vp):
        return {"vp": value.index}
    if isinstance(value, GuestCrash):
        return {"crash": [encode(value.params, where), value.message]}
    raise SnapshotStateError(f"cannot snapshot {where}: {type(value).__name__} values are not supported")


def decode(value, vps):
    if not isinstance(value, (dict, list)):
        return value
    if isinstance(value, list):
        return [decode(v, vps) for v in value]
    (tag, body), = value.items()
    if tag == "bytes":
        return bytes.fromhex(body)
    if tag == "ndarray":
        dtype, shape, data = body
        return np.frombuffer(bytes.fromhex(data), np.dtype(dtype)).reshape(shape)
    if tag == "tuple":
        return tuple(decode(v, vps) for v in body)
    if tag == "set":
        return {decode(v, vps) for v in body}
    if tag == "dict":
        return {decode(k, vps): decode(v, vps) for k, v in body}
    if tag == "vp":
        return vps[body]
    if tag == "crash":
        return GuestCrash(decode(body[0], vps), body[1])
    raise SnapshotStateError(f"unknown value tag {tag!r}")


def capture_attrs(obj, where: str = "") -> dict:
    """Every attribute of obj that is not derived, encoded."""
    cls = type(obj).__name__
    skip = DERIVED.get(cls, set())
    return {name: encode(value, f"{where or cls}.{name}") for name, value in vars(obj).items() if name not in skip}


def apply_attrs(obj, saved: dict, vps, where: str = "") -> None:
    cls = type(obj).__name__
    have = set(vars(obj)) - DERIVED.get(cls, set())
    if have != set(saved):
        extra, missing = sorted(set(saved) - have), sorted(have - set(saved))
        raise SnapshotStateError(f"snapshot was taken by a different hclsim: {where or cls} state differs "
                                 f"(unknown {extra}, missing {missing})")
    for name, value in saved.items():
        value, current = decode(value, vps), getattr(obj, name)
        if isinstance(current, np.ndarray):  # in place: native hooks hold its address
            if not isinstance(value, np.ndarray) or (value.dtype, value.shape) != (current.dtype, current.shape):
                raise SnapshotStateError(f"snapshot's {where or cls}.{name} does not fit this machine's")
            current[...] = value
        else:
            setattr(obj, name, value)


# ---- CPU contexts ---------------------------------------------------------------------------
# A Unicorn context is a header (with a pointer) followed by the CPU state, which holds no
# pointers (the state of two engines' fresh contexts is byte-identical): the state part is
# what a snapshot stores, and it goes into a context allocated by the restoring engine.

def context_state_size(engine) -> int:
    return len(context_state(engine.pristine))


def context_state(ctx) -> bytes:
    raw = bytes(ctx)
    size = int.from_bytes(raw[:8], "little")  # uc_context.context_size
    return raw[len(raw) - size:]


def new_context(engine, state: bytes):
    ctx = engine.uc.context_save()
    size = ctx.size
    if len(state) > size:
        raise SnapshotStateError(f"CPU context of {len(state)} bytes does not fit this Unicorn's {size}")
    ctypes.memmove(ctx.context.value + size - len(state), state, len(state))
    return ctx


# ---- the whole machine ----------------------------------------------------------------------

def capture(machine) -> tuple[dict, bytes]:
    """(state, contexts): JSON-ready state and the concatenated CPU contexts (live engine
    context first, then every VP that has one, in VP order)."""
    engine, sched = machine.engine, machine.scheduler
    contexts = [context_state(engine.uc.context_save())]
    contexts += [context_state(vp.context) for vp in machine.vps if vp.context is not None]
    buf = engine.state.buf
    state = {
        "context_size": len(contexts[0]),
        "vp_has_context": [vp.context is not None for vp in machine.vps],
        "hypervisor": capture_attrs(machine.hv),
        "hypervisor_native": capture_attrs(machine.hv.native, "Hypervisor.native"),
        "vp_states": [capture_attrs(s, f"VpState[{s.index}]") for s in machine.hv.vps],
        "vps": [capture_attrs(vp, f"Vp[{vp.index}]") for vp in machine.vps],
        "scheduler": capture_attrs(sched),
        "stop_addresses": sorted(sched.stop_addresses),
        "engine": {
            "fastpath": {name: int(buf[getattr(fastpath, name)]) for name in FASTPATH_SLOTS},
            "vmcall_stops": engine.vmcall_stops,
            # A pooled engine's current_vp may still be a previous machine's VP until one is loaded.
            "current_vp": engine.current_vp.index if any(engine.current_vp is vp for vp in machine.vps) else None,
        },
        "serial": {name: bytes(data).hex() for name, data in machine.serial.items()},
        "devices": machine.bus.save(),   # each device through its saved-state schema
        "unclaimed_io": encode(machine.bus.unclaimed, "Bus.unclaimed"),
        "linux": _capture_linux(getattr(machine, "linux", None)),
    }
    return state, b"".join(contexts)


def _capture_linux(linux) -> dict | None:
    if linux is None:
        return None
    out = {"cpus": capture_attrs(linux.cpus)}
    if linux.sidecar is not None:
        out["sidecar"] = capture_attrs(linux.sidecar)
        out["outstanding"] = np.flatnonzero(linux.sidecar.scanner.outstanding).tolist()
    return out


def apply(machine, state: dict, contexts: bytes) -> None:
    """Put a captured state into a Machine freshly built from the same config and images (its
    RAM already restored)."""
    engine, sched, vps = machine.engine, machine.scheduler, machine.vps
    size = state["context_size"]
    if size != context_state_size(engine):
        raise SnapshotStateError(f"snapshot CPU contexts are {size} bytes; this Unicorn's are "
                                 f"{context_state_size(engine)}")
    has = state["vp_has_context"]
    if len(has) != len(vps) or len(contexts) != size * (1 + sum(has)):
        raise SnapshotStateError("snapshot CPU contexts do not match its VP count")
    pieces = iter(contexts[i:i + size] for i in range(0, len(contexts), size))
    live = next(pieces)
    vp_contexts = [next(pieces) if h else None for h in has]
    if state["linux"] is not None:
        _apply_linux(machine, state["linux"], vp_contexts[0])

    apply_attrs(machine.hv, state["hypervisor"], vps)
    apply_attrs(machine.hv.native, state["hypervisor_native"], vps, "Hypervisor.native")
    for s, saved in zip(machine.hv.vps, state["vp_states"]):
        apply_attrs(s, saved, vps, f"VpState[{s.index}]")
    for vp, saved, ctx in zip(vps, state["vps"], vp_contexts):
        apply_attrs(vp, saved, vps, f"Vp[{vp.index}]")
        vp.context = None if ctx is None else new_context(engine, ctx)
    apply_attrs(sched, state["scheduler"], vps)
    sched.set_stop_addresses(state["stop_addresses"])

    saved = state["engine"]
    engine.uc.context_restore(new_context(engine, live))
    engine.flush_tlb()  # uc_context_restore keeps the previous translations
    buf = engine.state.buf
    for name, value in saved["fastpath"].items():
        buf[getattr(fastpath, name)] = value
    engine.vmcall_stops = saved["vmcall_stops"]
    engine.current_vp = None if saved["current_vp"] is None else vps[saved["current_vp"]]

    machine.serial = {name: bytearray.fromhex(data) for name, data in state["serial"].items()}
    machine.bus.restore(state["devices"])
    machine.bus.unclaimed = decode(state["unclaimed_io"], vps)


def _apply_linux(machine, saved: dict, bsp_context: bytes | None) -> None:
    """The stand-in kernel as it was: its handoff checked again from the restored RAM and the
    BSP's registers at the kernel entry (the BSP has not run since), then its CPUs and driver."""
    if bsp_context is None:
        raise SnapshotStateError("snapshot after the handoff has no BSP context")
    engine = machine.engine
    engine.uc.context_restore(new_context(engine, bsp_context))
    regs = engine.registers()
    lay = machine.image.layout
    handoff = check_handoff(machine.mem, HandoffRegs(**{k: regs[k] for k in HANDOFF_REGS}),
                            kernel_entry=machine.image.kernel_entry, vtl2_base=lay.vtl2_base,
                            vtl2_size=lay.vtl2_size, initrd=machine.initrd.data if machine.initrd else None)
    machine.linux = linux = Kernel(machine.partition, handoff)
    apply_attrs(linux.cpus, saved["cpus"], machine.vps)
    if ("sidecar" in saved) != (linux.sidecar is not None):
        raise SnapshotStateError("snapshot's sidecar driver does not match the restored device tree")
    if linux.sidecar is not None:
        apply_attrs(linux.sidecar, saved["sidecar"], machine.vps)
        linux.sidecar.scanner.outstanding[:] = False
        linux.sidecar.scanner.outstanding[saved["outstanding"]] = True
