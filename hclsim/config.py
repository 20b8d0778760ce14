"""What a user asks of one simulated boot (the `hclsim boot` options), validated once."""
import re
from dataclasses import dataclass, replace

from hclsim import HclsimError
from hclsim.boot.layout import CMDLINE_POLICY_BY_NAME, MAX_CPU_COUNT, MAX_NUMA_NODES
from hclsim.defs.platform import ISOLATION_BY_NAME

MiB = 1 << 20
GiB = 1 << 30


class ConfigError(HclsimError):
    pass


def parse_size(text: str) -> int:
    """'512M', '1G', '64MiB', '0x8000000' or plain bytes."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([kKmMgG]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ConfigError(f"invalid size {text!r}: use e.g. 512M, 1G or a byte count")
    value = int(m.group(1), 0)
    return value * {"": 1, "k": 1 << 10, "m": MiB, "g": GiB}[m.group(2).lower()]


@dataclass(frozen=True)
class BootConfig:
    cpus: int = 4
    numa_nodes: int = 1
    memory: int = 1 * GiB             # all guest RAM (VTL0 + VTL2)
    vtl2_base: int = 128 * MiB
    vtl2_size: int = 64 * MiB         # minimum; grown in 2 MiB steps when the images need more
    kernel: str | None = None         # None: the shipped stand-in kernel
    initrd: str | None = None         # None: the shipped initrd
    no_initrd: bool = False
    shim: str | None = None           # None: the shipped boot shim (built from boot/firmware/shim)
    sidecar: str | None = None        # None: the shipped sidecar kernel (built from sidecar/firmware)
    no_sidecar: bool = False          # leave the image's sidecar slot empty
    vtl0_guest: bool = True           # load the VTL0 test guest (boot/firmware/vtl0) on every VP
    isolation: str = "none"
    static_cmdline: str = ""
    cmdline_policy: str = "append-chosen"
    host_bootargs: str = ""
    com3: bool = True                 # the host offers the ns16550 at 0x3E8
    host_cpu_order: tuple | None = None  # adversarial hosts: DT cpu order as a VP-index permutation
    timeout: float = 120.0            # wall-clock seconds before a running guest is stopped

    def validated(self) -> "BootConfig":
        if not 1 <= self.cpus <= MAX_CPU_COUNT:
            raise ConfigError(f"--cpus {self.cpus}: must be 1..{MAX_CPU_COUNT}")
        if not 1 <= self.numa_nodes <= min(MAX_NUMA_NODES, self.cpus):
            raise ConfigError(f"--numa-nodes {self.numa_nodes}: must be 1..{min(MAX_NUMA_NODES, self.cpus)}")
        if self.isolation not in ISOLATION_BY_NAME:
            raise ConfigError(f"--isolation {self.isolation!r}: one of {', '.join(ISOLATION_BY_NAME)}")
        if self.cmdline_policy not in CMDLINE_POLICY_BY_NAME:
            raise ConfigError(f"--cmdline-policy {self.cmdline_policy!r}: one of {', '.join(CMDLINE_POLICY_BY_NAME)}")
        if self.vtl2_base % (2 * MiB) or self.vtl2_size % (2 * MiB):
            raise ConfigError("VTL2 base and size must be 2 MiB aligned")
        if self.memory % (2 * MiB):
            raise ConfigError(f"--memory {self.memory:#x}: must be a multiple of 2 MiB")
        if len(self.static_cmdline.encode()) > 4092:
            raise ConfigError("--static-cmdline is longer than the 4092-byte ParavisorCommandLine")
        if self.host_cpu_order is not None and sorted(self.host_cpu_order) != list(range(self.cpus)):
            raise ConfigError("host_cpu_order must be a permutation of the VP indexes")
        return self

    def with_(self, **changes) -> "BootConfig":
        return replace(self, **changes)

    @property
    def isolation_type(self) -> int:
        return ISOLATION_BY_NAME[self.isolation]

    @property
    def cmdline_policy_value(self) -> int:
        return CMDLINE_POLICY_BY_NAME[self.cmdline_policy]
