"""Linux CPUs in the stand-in: the boot CPUs the shim named in `boot_cpus=`, and sidecar CPUs
onlined on demand (reference section 2, "conversion to a Linux CPU").

Onlining a sidecar CPU is what the kernel's hotplug callback does: one CPU at a time under a
global lock, CAS IDLE->REMOVE, IPI, wait for REMOVED, then bring it up as a Linux CPU. A CPU in
the middle of a command (RUN) is stopped first. Onlining an online CPU is an error, not a hang.
"""
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from hclsim import HclsimError
from hclsim.defs.hvdef import VTL0
from hclsim.sidecar import layout as sl


class CpuOnlineError(HclsimError):
    pass


def parse_boot_cpus(cmdline: str) -> list[int] | None:
    """The CPUs of `boot_cpus=0,4,8` (the last one given wins), or None if absent."""
    value = None
    for word in cmdline.split():
        if word.startswith("boot_cpus="):
            value = word.split("=", 1)[1]
    if value is None:
        return None
    try:
        return sorted({int(x) for x in value.split(",") if x})
    except ValueError:
        raise CpuOnlineError(f"malformed kernel parameter boot_cpus={value}") from None


@dataclass
class LinuxCpus:
    partition: object                    # hv.partition.Partition
    sidecar: object                      # sidecar.client.Sidecar, or None without a sidecar
    online: set = field(default_factory=set)
    conversions_ms: list = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()    # the global CPU hotplug lock

    def boot(self, boot_cpus: list[int] | None) -> None:
        """Bring up the boot CPUs (all CPUs when the sidecar does not run)."""
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
