"""Linux CPUs in the stand-in: the boot CPUs the shim named in `boot_cpus=`, and sidecar CPUs
onlined on demand (reference section 2, "conversion to a Linux CPU").

Onlining a sidecar CPU is what the kernel's hotplug callback does: one CPU at a time under a
global lock, CAS IDLE->REMOVE, IPI, wait for REMOVED, then bring it up as a Linux CPU. A CPU in
the middle of a command (RUN) is stopped first. Onlining an online CPU is an error, not a hang.
"""
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from hclsim import HclsimError
from hclsim.boot.layout import MAX_CPU_COUNT
from hclsim.defs.hvdef import VTL0
from hclsim.kernel_stub.handoff import HandoffError, kernel_params, param_is
from hclsim.sidecar import layout as sl


class CpuOnlineError(HclsimError):
    pass


def parse_boot_cpus(cmdline) -> list[int] | None:
    """The CPUs of the kernel parameter boot_cpus= (a CPU list, `0,4,8` or `0-3,8`), or None if
    there is none. The line (bytes, or text) is split the way Linux parses it (kernel_params:
    quotes, '-' = '_' in names, nothing after "--"); the last boot_cpus= wins, as Linux's
    handlers run once per occurrence."""
    raw = cmdline if isinstance(cmdline, bytes) else cmdline.encode("utf-8", "surrogateescape")
    found = [p for p in kernel_params(raw)[0] if param_is(p, "boot_cpus")]
    if not found:
        return None
    value = found[-1].value
    text = (value or b"").decode("ascii", "backslashreplace")
    cpus = set()
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise CpuOnlineError(f"malformed kernel parameter boot_cpus={text}")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last >= MAX_CPU_COUNT:  # as cpulist_parse refuses a CPU past NR_CPUS (-ERANGE)
            raise CpuOnlineError(f"kernel parameter boot_cpus={text}: CPU {last} is beyond the {MAX_CPU_COUNT} "
                                 f"CPUs a partition has at most")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def boot_cpu_plan(dt_cpus, cmdline: bytes, partition, sidecar) -> list[int]:
    """The VPs Linux brings up at boot: every CPU of the device tree without a sidecar, else the
    BSP and the CPUs of boot_cpus= (Linux CPU n is the n-th /cpus node, the VP with its APIC
    id). What the shim handed over must be one consistent plan; a HandoffError names the
    first conflict: a CPU that does not exist, or one Linux and the sidecar would both run."""
    vp_of_apic = {partition.apic_id(i): i for i in range(partition.vp_count)}
    vps = [vp_of_apic.get(apic) for apic, _numa in dt_cpus]
    if sidecar is None:  # a CPU whose APIC id no VP has never comes up (Linux times out on it)
        return list(dict.fromkeys(vp for vp in vps if vp is not None))
    where = "kernel command line boot_cpus"
    listed = parse_boot_cpus(cmdline)
    if listed is None:
        raise HandoffError(f"handoff: {where}: missing, but the sidecar runs: Linux would bring up the CPUs "
                           f"the sidecar holds")
    plan = [0]  # the BSP runs Linux already
    for cpu in listed:
        if cpu >= len(vps) or vps[cpu] is None:
            why = (f"the device tree lists {len(vps)} CPUs" if cpu >= len(vps)
                   else f"no VP has its APIC id {dt_cpus[cpu][0]}")
            raise HandoffError(f"handoff: {where}={','.join(map(str, listed))}: CPU {cpu} does not exist ({why})")
        if vps[cpu] not in plan:
            plan.append(vps[cpu])
    for vp in plan:
        node = next((n for n in sidecar.nodes if n.owns(vp)), None)
        if node is not None and node.cpu_status(vp) != sl.CPU_REMOVED:
            state = sl.CPU_STATUS_NAMES.get(node.cpu_status(vp), "?")
            raise HandoffError(f"handoff: {where}={','.join(map(str, listed))}: CPU {vp} is also a sidecar CPU "
                               f"(node {node.index}, {state})")
    return sorted(plan)


@dataclass
class LinuxCpus:
    partition: object                    # hv.partition.Partition
    sidecar: object                      # sidecar.client.Sidecar, or None without a sidecar
    online: set = field(default_factory=set)
    conversions_ms: list = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()    # the global CPU hotplug lock

    def boot(self, boot_cpus: list[int] | None) -> None:
        """Bring up the boot CPUs, VP indexes (boot_cpu_plan; None: every VP)."""
        cpus = boot_cpus if boot_cpus is not None else range(self.partition.vp_count)
        for cpu in cpus:
            self._bring_up(cpu)

    def _bring_up(self, cpu: int) -> None:
        self.partition.give_to_linux(cpu)
        self.online.add(cpu)

    def _restore_vtl0(self, node, cpu: int) -> None:
        """A CPU that ran VTL0 through the sidecar keeps VTL0's shared registers in its command
        page's cpu_context; as a Linux CPU it runs VTL0 from the VP's own state, so they move
        there (its private registers, RIP and the rest, never left the hypervisor)."""
        if cpu not in self.sidecar.vtl0_in_context:
            return
        gps = np.asarray(node.command_page(cpu)["cpu_context"]["gps"])
        self.partition.set_registers(cpu, {name: int(v) for name, v in zip(sl.CPU_CONTEXT_GPS, gps)}, vtl=VTL0)
        self.sidecar.vtl0_in_context.discard(cpu)

    def online_cpu(self, cpu: int, timeout: float = 30.0) -> float:
        """`echo 1 > /sys/devices/system/cpu/cpuN/online`; returns the conversion time (ms)."""
        with self._lock:
            if not 0 <= cpu < self.partition.vp_count:
                raise CpuOnlineError(f"CPU {cpu} does not exist")
            if cpu in self.online:
                raise CpuOnlineError(f"CPU {cpu} is already online")
            if self.sidecar is None:
                raise CpuOnlineError(f"CPU {cpu} is offline and there is no sidecar to take it from")
            t0 = time.perf_counter()
            node = self.sidecar.node_of(cpu)
            if node.cpu_status(cpu) in (sl.CPU_RUN, sl.CPU_STOP):  # mid-command: stop it first
                self.sidecar.stop(cpu)
                self.sidecar.wait(cpu, timeout)
            if not node.cas_status(cpu, sl.CPU_IDLE, sl.CPU_REMOVE):
                raise CpuOnlineError(f"CPU {cpu} is {sl.CPU_STATUS_NAMES.get(node.cpu_status(cpu), '?')}, "
                                     f"cannot be removed from the sidecar")
            self.sidecar.kick(node, cpu)
            self.sidecar.wait(cpu, timeout)
            if node.cpu_status(cpu) != sl.CPU_REMOVED:
                raise CpuOnlineError(f"CPU {cpu} reported back {sl.CPU_STATUS_NAMES.get(node.cpu_status(cpu), '?')}, "
                                     f"not REMOVED")
            self._restore_vtl0(node, cpu)
            self._bring_up(cpu)
            elapsed = (time.perf_counter() - t0) * 1e3
            self.conversions_ms.append(elapsed)
            return elapsed
