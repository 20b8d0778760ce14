"""How the boot shim splits CPUs into sidecar nodes (reference section 2, "Nodes and start"):
runs of consecutive CPUs on the same NUMA node, each run cut into chunks of ceil(n / ceil(n/32))
CPUs (the last one shorter), the base VP of each chunk left to Linux. The shim does this in C;
this twin sizes VTL2 for the node memory and checks the shim's result.
"""
from dataclasses import dataclass

from hclsim.sidecar.layout import MAX_NODE_CPUS, MAX_NODES, node_pages


@dataclass(frozen=True)
class SidecarNode:
    base_vp: int
    vp_count: int

    @property
    def pages(self) -> int:
        return node_pages(self.vp_count)


def partition(numa_of_vp: list[int]) -> list[SidecarNode]:
    """Nodes for CPUs whose NUMA node ids are numa_of_vp (VP order); [] when the sidecar would
    not run (every node would hold one CPU)."""
    runs: list[list[int]] = []
    for vp, node in enumerate(numa_of_vp):
        if runs and numa_of_vp[runs[-1][0]] == node:
            runs[-1].append(vp)
        else:
            runs.append([vp])
    nodes = []
    for vps in runs:
        chunk = -(-len(vps) // -(-len(vps) // MAX_NODE_CPUS))
        nodes += [SidecarNode(vps[i], min(chunk, len(vps) - i)) for i in range(0, len(vps), chunk)]
    if len(nodes) > MAX_NODES or all(n.vp_count == 1 for n in nodes):
        return []
    return nodes


def node_memory_bytes(nodes: list[SidecarNode]) -> int:
    return sum(n.pages for n in nodes) * 4096
