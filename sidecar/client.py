"""The host side of the sidecar: what Linux's mshv_vtl sidecar driver does with the control and
command pages (reference section 2, "Linux side").

One SidecarNode per `sidecar@` node of the device tree the shim built (= /dev/mshv_vtl_sidecar<i>):
START (async: CAS IDLE->RUN, IPI the request vector), STOP (CAS RUN->STOP, IPI), RUN (START and
wait for IDLE), INFO, and read() of the CPUs that stopped. Waiting means running the simulated
sidecar CPUs (Partition.run) until the condition holds, as the real driver sleeps until
the sidecar's response IPI.
"""
import struct
from dataclasses import dataclass

import numpy as np

from hclsim import HclsimError
from hclsim.sidecar import layout as sl
from hclsim.sidecar.dispatch import AttentionScanner

PAGE = 4096


class SidecarError(HclsimError):
    pass


def registers_request(pairs, target_vtl: int = 0) -> bytes:
    """request_data of GET/SET_VP_REGISTERS: the header, then one HvRegisterAssoc per
    (name, value) pair (values are ignored by GET)."""
    if len(pairs) > sl.MAX_REGISTERS_PER_COMMAND:
        raise SidecarError(f"at most {sl.MAX_REGISTERS_PER_COMMAND} registers per command")
    head = struct.pack("<HBBH10x", len(pairs), target_vtl, 0, 0)
    return head + b"".join(struct.pack("<I12xQQ", name, value, 0) for name, value in pairs)


def registers_response(page, count: int) -> list[int]:
    """The values GET_VP_REGISTERS wrote back into request_data."""
    raw = bytes(np.asarray(page["request_data"]))
    return [struct.unpack_from("<Q", raw, 16 + 32 * i + 16)[0] for i in range(count)]


@dataclass(frozen=True)
class NodeInfo:
    """INFO ioctl: {base_cpu, cpu_count, per_cpu_shmem}."""
    base_cpu: int
    cpu_count: int
    per_cpu_shmem: int


class SidecarNode:
    def __init__(self, mem, index: int, control_gpa: int, shmem_base: int, shmem_size: int):
        self.mem, self.index = mem, index
        self.control_gpa, self.shmem_base, self.shmem_size = control_gpa, shmem_base, shmem_size
        self.control = sl.view(mem, control_gpa, sl.control_page)
        self.base_cpu = int(self.control["base_cpu"])
        self.cpu_count = int(self.control["cpu_count"])
        if self.cpu_count < 1 or self.cpu_count > sl.MAX_NODE_CPUS or \
                shmem_size < self.cpu_count * sl.SHMEM_PAGES_PER_VP * PAGE:
            raise SidecarError(f"sidecar node {index}: control page at {control_gpa:#x} is not initialised")
        # cpu_status is an array of u8; a numpy view lets the driver CAS and scan it in place.
        self.status = mem.array(control_gpa + sl.control_page.fields["cpu_status"][1], self.cpu_count)

    def info(self) -> NodeInfo:
        return NodeInfo(self.base_cpu, self.cpu_count, sl.SHMEM_PAGES_PER_VP * PAGE)

    def owns(self, cpu: int) -> bool:
        return self.base_cpu <= cpu < self.base_cpu + self.cpu_count

    def command_page(self, cpu: int):
        return sl.view(self.mem, self.command_page_gpa(cpu), sl.command_page)

    def command_page_gpa(self, cpu: int) -> int:
        return self.shmem_base + (cpu - self.base_cpu) * sl.SHMEM_PAGES_PER_VP * PAGE

    def register_page_gpa(self, cpu: int) -> int:
        return self.command_page_gpa(cpu) + PAGE

    def cpu_status(self, cpu: int) -> int:
        return int(self.status[cpu - self.base_cpu])

    def cas_status(self, cpu: int, old: int, new: int) -> bool:
        # The simulated CPUs run only inside scheduler.run(), so this is atomic with respect to them.
        i = cpu - self.base_cpu
        if self.status[i] != old:
            return False
        self.status[i] = new
        return True


class Sidecar:
    """All sidecar nodes of a booted machine, and the driver operations on their CPUs. It needs of
    the partition (hv/partition.py) only guest memory, IPIs and running the sidecar CPUs."""

    def __init__(self, partition, nodes: list[SidecarNode]):
        self.partition = partition
        self.nodes = nodes
        self.stopped: dict[int, list[int]] = {n.index: [] for n in nodes}
        self.scanner = AttentionScanner(partition.mem, nodes, partition.vp_count)
        self.completed: set[int] = set()
        self.vtl0_in_context: set[int] = set()   # CPUs that ran RUN_VP: see LinuxCpus.online_cpu

    @classmethod
    def from_device_tree(cls, partition, dt_sidecars) -> "Sidecar":
        """dt_sidecars: [(control gpa, shmem base, shmem size)] from the Linux DT, in node order."""
        return cls(partition, [SidecarNode(partition.mem, i, c, b, s) for i, (c, b, s) in enumerate(dt_sidecars)])

    def node_of(self, cpu: int) -> SidecarNode:
        for node in self.nodes:
            if node.owns(cpu):
                return node
        raise SidecarError(f"CPU {cpu} is not a sidecar CPU")

    def sidecar_cpus(self) -> list[int]:
        return [n.base_cpu + i for n in self.nodes for i in range(n.cpu_count)
                if n.status[i] != sl.CPU_REMOVED]

    # ---- ioctls ----------------------------------------------------------------------------
    def kick(self, node: SidecarNode, cpu: int) -> None:
        """IPI the CPU with its node's request vector; its completion is awaited from now on."""
        self.scanner.expect(cpu)
        self.completed.discard(cpu)
        self.partition.raise_interrupt(cpu, int(node.control["request_vector"]))

    def poll(self) -> None:
        """Collect the CPUs whose commands completed (the response IPI's work)."""
        for cpu in self.scanner.poll():
            self.completed.add(cpu)
            self.stopped[self.node_of(cpu).index].append(cpu)

    def wait(self, cpu: int, timeout: float = 30.0) -> None:
        """Run the sidecar CPUs until cpu reports back (IDLE after a command, REMOVED after REMOVE)."""
        def done():
            self.poll()
            return cpu in self.completed
        stop = self.partition.run(until=done, timeout=timeout)
        if not done():
            status = sl.CPU_STATUS_NAMES.get(self.node_of(cpu).cpu_status(cpu), "?")
            raise SidecarError(f"CPU {cpu} did not report back (status {status}): {stop.reason} {stop.detail}".rstrip())
        self.completed.discard(cpu)

    def start(self, cpu: int, command: int, request: bytes = b"") -> None:
        """START: hand cpu a command (async)."""
        node = self.node_of(cpu)
        page = node.command_page(cpu)
        if len(request) > page["request_data"].nbytes:
            raise SidecarError(f"request for CPU {cpu} is {len(request)} bytes, more than request_data holds")
        page["command"] = command
        np.asarray(page["request_data"])[:len(request)] = np.frombuffer(request, np.uint8)
        try:
            self.start_written(cpu)
        except SidecarError:
            page["command"] = sl.COMMAND_NONE
            raise

    def start_written(self, cpu: int) -> None:
        """START of the command already in cpu's command page (what the driver's ioctl does: the
        VMM wrote the command through its mapping of the page)."""
        node = self.node_of(cpu)
        page = node.command_page(cpu)
        page["has_error"] = 0
        if int(page["command"]) == sl.COMMAND_RUN_VP:
            self.vtl0_in_context.add(cpu)  # the VP's VTL0 GPRs now live in its cpu_context
        if not node.cas_status(cpu, sl.CPU_IDLE, sl.CPU_RUN):
            raise SidecarError(f"CPU {cpu} is {sl.CPU_STATUS_NAMES.get(node.cpu_status(cpu), '?')}, not IDLE")
        self.kick(node, cpu)

    def stop(self, cpu: int) -> bool:
        """STOP: ask a running command (RUN_VP) to return; False if it was not running."""
        node = self.node_of(cpu)
        if not node.cas_status(cpu, sl.CPU_RUN, sl.CPU_STOP):
            return False
        self.kick(node, cpu)
        return True

    def run(self, cpu: int, command: int, request: bytes = b"", timeout: float = 30.0):
        """RUN: start a command and wait for it; returns the command page (a live view)."""
        self.start(cpu, command, request)
        self.wait(cpu, timeout)
        return self.node_of(cpu).command_page(cpu)

    def info(self, node_index: int) -> NodeInfo:
        return self.nodes[node_index].info()

    def read_stopped(self, node_index: int) -> list[int]:
        """read(): the CPU numbers whose commands completed since the last read."""
        done, self.stopped[node_index] = self.stopped[node_index], []
        return done

    @staticmethod
    def error_text(page) -> str:
        err = page["error"]
        return bytes(np.asarray(err["buf"])[:int(err["len"])]).decode("utf-8", "replace")
