"""The Linux stand-in after the handoff: its CPUs, and the sidecar driver over the nodes the shim
described in the device tree (`/bus/sidecar@...`, compatible "microsoft,openhcl-sidecar")."""
from dataclasses import dataclass

from hclsim.boot import fdt as fdtutil
from hclsim.kernel_stub.cpus import LinuxCpus, boot_cpu_plan
from hclsim.sidecar.client import Sidecar

SIDECAR_COMPATIBLE = "microsoft,openhcl-sidecar"


def dt_sidecar_nodes(dtb: bytes) -> list[tuple[int, int, int]]:
    """[(control page GPA, shmem base, shmem size)] of the sidecar nodes, in device-tree order."""
    fdt = fdtutil.open_fdt(dtb)
    bus = fdtutil.node(fdt, "/bus")
    if bus is None:
        return []
    nodes = []
    for off, _name in fdtutil.subnodes(fdt, bus):
        if SIDECAR_COMPATIBLE not in fdtutil.prop_strings(fdt, off, "compatible", default=[]):
            continue
        regs = fdtutil.prop_reg(fdt, off, 2, 2)
        names = fdtutil.prop_strings(fdt, off, "reg-names", default=["ctrl", "shmem"])
        by_name = dict(zip(names, regs))
        (ctrl, _), (shmem, shmem_size) = by_name["ctrl"], by_name["shmem"]
        nodes.append((ctrl, shmem, shmem_size))
    return nodes


@dataclass
class Kernel:
    """What the booted stand-in kernel knows and runs."""
    partition: object                  # hv.partition.Partition: the VPs and guest memory
    handoff: object
    cpus: LinuxCpus = None
    sidecar: Sidecar | None = None

    def __post_init__(self):
        nodes = dt_sidecar_nodes(self.handoff.dtb)
        self.sidecar = Sidecar.from_device_tree(self.partition, nodes) if nodes else None
        self.cpus = LinuxCpus(self.partition, self.sidecar)
        self.cpus.boot(boot_cpu_plan(self.handoff.dt["cpus"], self.handoff.cmdline_bytes, self.partition,
                                     self.sidecar))
