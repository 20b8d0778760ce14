"""What the stand-in kernel offers a profiler (hclsim's own, where the real OpenHCL has perf
events): /proc/hclsim/vp_samples, each read a sample of every VP (where it runs, its VTL, its
RIP and the symbol there, from the shim, sidecar and VTL0 images), and /proc/hclsim/stacks, the
Python stacks the paravisor's processes last reported (each process registers with an empty
STACKS and reports its threads' stacks, folded, when it gets SIGPROF: hcl/linux.py).
"""
import re
import time

from hclsim.defs.hvdef import VTL0
from hclsim.kernel_stub.vfs import Dir, GeneratedFile

_OFFSET = re.compile(r"\+0x[0-9a-f]+$")


def function_of(symbol: str | None) -> str:
    """'vtl0:loop+0x12' -> 'vtl0:loop' (samples aggregate by function)."""
    return _OFFSET.sub("", symbol) if symbol else "?"


def vp_samples(partition, online: set, lock, symbolize) -> bytes:
    """One line per VP: index, where (linux/sidecar), VTL, RIP, function. A Linux CPU's line is
    its VTL0 (the VMM runs it through RUN_VP); a sidecar CPU's is the VTL it is in."""
    lines = []
    with lock:
        for cpu in range(partition.vp_count):
            linux = cpu in online
            vtl = VTL0 if linux else partition.vtl(cpu)
            rip = partition.registers(cpu, vtl, ("rip",))["rip"]
            where = "linux" if linux else "sidecar"
            lines.append(f"{cpu} {where} {vtl} {rip:#x} {function_of(symbolize(rip) if symbolize else None)}")
    return ("\n".join(lines) + "\n").encode()


def stacks(server) -> bytes:
    """Per registered process: 'pid comm age_ms', then its folded stacks, then a blank line."""
    out = []
    now = time.monotonic()
    for pid in list(server.order):
        proc = server.processes.get(pid)
        if proc is None or not proc.sampled or proc.exit_status is not None:
            continue
        at, text = proc.stacks if proc.stacks else (None, "")
        age = f"{(now - at) * 1e3:.0f}" if at is not None else "-"
        out.append(f"{pid} {proc.comm} {age}\n{text}\n")
    return "\n".join(out).encode()


def proc_dir(partition, cpus, lock, symbolize, server) -> Dir:
    return Dir({"vp_samples": GeneratedFile(lambda: vp_samples(partition, set(cpus.online), lock, symbolize)),
                "stacks": GeneratedFile(lambda: stacks(server))})
