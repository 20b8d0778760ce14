"""What a user asks of one simulated boot (the `hclsim boot` options), validated once."""
import math
import os
import re
from dataclasses import dataclass, replace

from hclsim import HclsimError
from hclsim.boot.layout import CMDLINE_POLICY_BY_NAME, MAX_CPU_COUNT, MAX_NUMA_NODES
from hclsim.defs.platform import ISOLATION_BY_NAME, VTL0_MAX_ITERATIONS

VTL0_CMDLINE_MAX = 4095                # the guest's command line page holds it and its NUL
LINUX_MODES = ("stand-in", "real")
# What the host's device tree adds for a real kernel (hclsim/real_linux.py says why), before
# --host-bootargs, whose words then win (Linux takes the last of a repeated option).
REAL_LINUX_BOOTARGS = "noapic nolapic nokaslr rdinit=/init initcall_blacklist=do_init_real_mode"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
SIZE_SUFFIXES = {"": 1, "k": KiB, "m": MiB, "g": GiB}


class ConfigError(HclsimError):
    pass


def parse_size(text: str) -> int:
    """'512M', '1G', '64MiB', '0x8000000' or plain bytes (suffixes K, M, G; binary units)."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m:
        raise ConfigError(f"invalid size {text!r}: use a byte count or a number with K, M or G, e.g. 512M, 1G, 0x8000000")
    suffix = m.group(2).lower()
    unit = re.fullmatch(r"([kmg]?)(?:i?b)?", suffix) if suffix not in ("b", "ib") else re.fullmatch(r"()b", suffix)
    if unit is None:
        raise ConfigError(f"invalid size {text!r}: unknown unit {m.group(2)!r} (use K, M or G, e.g. 512M, 1G)")
    return int(m.group(1), 0) * SIZE_SUFFIXES[unit.group(1)]


def format_size(value: int) -> str:
    """A size (or an address) for people: '64 MiB', '1 GiB', '1537 MiB', '68 KiB', '132.7 MiB',
    '307 bytes'."""
    units = ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB"))
    for i, (unit, name) in enumerate(units):
        if value >= unit:
            if value % unit == 0:
                return f"{value // unit} {name}"
            if i + 1 < len(units) and value % units[i + 1][0] == 0 and value // units[i + 1][0] < 10240:
                return f"{value // units[i + 1][0]} {units[i + 1][1]}"
            return f"{value / unit:.4g} {name}"
    return f"{value} byte{'s' if value != 1 else ''}"


def max_guest_memory() -> int:
    """Guest RAM the simulated CPUs can address: 2^(CPUID 0x80000008 physical address bits)."""
    from hclsim.cpu.cpuid import PHYSICAL_ADDRESS_BITS
    return 1 << PHYSICAL_ADDRESS_BITS


def cmdline_bytes(text: str) -> bytes:
    """A command line as the bytes the firmware gets (argv's undecodable bytes kept as they were)."""
    return text.encode("utf-8", "surrogateescape")


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
    vtl0_iterations: int = 100        # the VTL0 test guest's workload loop: iterations per VP (RCX)
    isolation: str = "none"
    static_cmdline: str = ""
    cmdline_policy: str = "append-chosen"
    host_bootargs: str = ""
    com3: bool = True                 # the host offers the ns16550 at 0x3E8
    host_cpu_order: tuple | None = None  # adversarial hosts: DT cpu order as a VP-index permutation
    timeout: float = 120.0            # wall-clock seconds before a running guest is stopped
    device_workers: tuple = ()        # VTL0 devices the VM worker runs in device worker processes
    tpm: bool = False                 # the host's platform settings enable a vTPM (the "tpm" worker)
    state_dir: str | None = None      # the VM's state folder, kept across runs (its VMGS); None: fresh per run
    vtl0_cmdline: str = "console=ttyS0 hclsim.vtl0=test"  # what the VTL0 test guest measures as its command line
    linux: str = "stand-in"           # who takes the handoff: the stand-in kernel, or "real" (the kernel image itself)
    hyperv: bool = False              # --linux real: the kernel sees the Hyper-V interface, not a bare PC

    def validated(self) -> "BootConfig":
        """self, or ConfigError naming the option and what it must be (nothing is built yet)."""
        if not 1 <= self.cpus <= MAX_CPU_COUNT:
            raise ConfigError(f"--cpus {self.cpus}: must be 1..{MAX_CPU_COUNT}")
        if not 1 <= self.numa_nodes <= min(MAX_NUMA_NODES, self.cpus):
            raise ConfigError(f"--numa-nodes {self.numa_nodes}: must be 1..{min(MAX_NUMA_NODES, self.cpus)}")
        if self.isolation not in ISOLATION_BY_NAME:
            raise ConfigError(f"--isolation {self.isolation!r}: one of {', '.join(ISOLATION_BY_NAME)}")
        if self.cmdline_policy not in CMDLINE_POLICY_BY_NAME:
            raise ConfigError(f"--cmdline-policy {self.cmdline_policy!r}: one of {', '.join(CMDLINE_POLICY_BY_NAME)}")
        if self.vtl2_base % (2 * MiB) or self.vtl2_size % (2 * MiB):
            raise ConfigError(f"--vtl2-size {format_size(self.vtl2_size)} at {format_size(self.vtl2_base)}: "
                              "VTL2 base and size must be multiples of 2 MiB")
        if self.memory <= 0 or self.memory % (2 * MiB):
            raise ConfigError(f"--memory {format_size(self.memory)}: must be a positive multiple of 2 MiB")
        if self.memory > max_guest_memory():
            raise ConfigError(f"--memory {format_size(self.memory)}: more than the guest can address "
                              f"({format_size(max_guest_memory())}, its physical address width)")
        vtl2_end = self.vtl2_base + self.vtl2_size
        if vtl2_end > self.memory:
            raise ConfigError(f"--memory {format_size(self.memory)} cannot hold VTL2 ({format_size(self.vtl2_size)} "
                              f"at {format_size(self.vtl2_base)}, --vtl2-size): ask for --memory "
                              f"{vtl2_end // MiB}M or more, or a smaller --vtl2-size")
        n = self.vtl0_iterations
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= VTL0_MAX_ITERATIONS:
            raise ConfigError(f"--vtl0-iterations {n}: must be a whole number 0..{VTL0_MAX_ITERATIONS} "
                              "(the VTL0 test guest's loop iterations per VP)")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0) or math.isnan(self.timeout):
            raise ConfigError(f"--timeout {self.timeout}: must be a positive number of seconds")
        if len(cmdline_bytes(self.static_cmdline)) > 4092:
            raise ConfigError("--static-cmdline is longer than the 4092-byte ParavisorCommandLine")
        # Linux takes every byte of its command line but the NUL that ends it (so does the shim).
        for option, text in (("--static-cmdline", self.static_cmdline), ("--host-bootargs", self.host_bootargs)):
            if "\0" in text:
                raise ConfigError(f"{option} {text!r}: a NUL byte would end the kernel command line there")
        from hclsim.devices.vtl0_test import WORKER_DEVICES
        for name in self.device_workers:
            if name not in WORKER_DEVICES:
                raise ConfigError(f"--device-worker {name}: no such device for a worker (one of "
                                  f"{', '.join(sorted(WORKER_DEVICES))})")
        if len(self.vtl0_cmdline.encode()) > VTL0_CMDLINE_MAX or "\0" in self.vtl0_cmdline:
            raise ConfigError(f"--vtl0-cmdline: at most {VTL0_CMDLINE_MAX} bytes and no NUL (the guest's command line page)")
        if self.linux not in LINUX_MODES:
            raise ConfigError(f"--linux {self.linux!r}: one of {', '.join(LINUX_MODES)}")
        if self.linux == "real" and (self.kernel is None or self.tpm or self.device_workers):
            raise ConfigError("--linux real runs the kernel image itself: it needs --kernel BZIMAGE (a distribution "
                              "kernel), and has no paravisor userspace for --tpm or --device-worker")
        if self.hyperv and self.linux != "real":
            raise ConfigError("--hyperv shows the Hyper-V interface to a real kernel: it needs --linux real")
        if self.tpm:
            from hclsim.devices.swtpm import swtpm_binary
            if swtpm_binary() is None:
                raise ConfigError("--tpm: swtpm, the vTPM's TPM 2.0 engine, is not installed "
                                  "(Debian: apt-get install swtpm)")
        if self.state_dir is not None and os.path.exists(self.state_dir) and not os.path.isdir(self.state_dir):
            raise ConfigError(f"--state {self.state_dir}: not a folder")
        if self.host_cpu_order is not None and sorted(self.host_cpu_order) != list(range(self.cpus)):
            raise ConfigError("host_cpu_order must be a permutation of the VP indexes")
        return self

    def check_layout(self, vtl2_base: int, vtl2_size: int) -> None:
        """ConfigError when the VTL2 region the images need (grown past --vtl2-size) does not fit
        in --memory: the RAM is never grown behind the user's back."""
        end = vtl2_base + vtl2_size
        if end > self.memory:
            raise ConfigError(f"--memory {format_size(self.memory)} cannot hold VTL2: the images need "
                              f"{format_size(vtl2_size)} at {format_size(vtl2_base)}; ask for --memory "
                              f"{-(-end // MiB)}M or more")

    def with_(self, **changes) -> "BootConfig":
        return replace(self, **changes)

    @property
    def bootargs(self) -> str:
        """What the host's device tree gives the kernel: --host-bootargs, which devices run in
        workers (HCLSIM_DEVICE_WORKERS) and whether there is a vTPM (HCLSIM_TPM, where OpenHCL
        reads the host's platform settings), passed to userspace like any unknown KEY=VALUE."""
        extra = f"HCLSIM_DEVICE_WORKERS={','.join(self.device_workers)}" if self.device_workers else ""
        tpm = "HCLSIM_TPM=1" if self.tpm else ""
        real = REAL_LINUX_BOOTARGS if self.linux == "real" else ""
        return " ".join(w for w in (real, self.host_bootargs, extra, tpm) if w)

    @property
    def isolation_type(self) -> int:
        return ISOLATION_BY_NAME[self.isolation]

    @property
    def cmdline_policy_value(self) -> int:
        return CMDLINE_POLICY_BY_NAME[self.cmdline_policy]
