"""The driver's scan over every control page after a response IPI (numba; the Python twin is
`poll_completions.py_func`): nodes that raised needs_attention are cleared and each CPU that had
a command outstanding and is back to IDLE (or went REMOVED) is reported as completed.
"""
import numpy as np
from numba import njit

from hclsim.sidecar import layout as sl

NEEDS_ATTENTION_OFFSET = sl.control_page.fields["needs_attention"][1]
CPU_STATUS_OFFSET = sl.control_page.fields["cpu_status"][1]


@njit(cache=True)
def poll_completions(ram, control_gpas, cpu_counts, base_cpus, outstanding, completed):
    """Scan the nodes; fill completed[] with CPU numbers, clear their outstanding flag and the
    nodes' needs_attention. outstanding is indexed by CPU number. Returns how many completed."""
    n = 0
    for node in range(control_gpas.shape[0]):
        gpa = control_gpas[node]
        attention = ram[gpa + NEEDS_ATTENTION_OFFSET] | ram[gpa + NEEDS_ATTENTION_OFFSET + 1] \
            | ram[gpa + NEEDS_ATTENTION_OFFSET + 2] | ram[gpa + NEEDS_ATTENTION_OFFSET + 3]
        if attention == 0:
            continue
        for b in range(4):
            ram[gpa + NEEDS_ATTENTION_OFFSET + b] = 0
        for i in range(cpu_counts[node]):
            cpu = base_cpus[node] + i
            status = ram[gpa + CPU_STATUS_OFFSET + i]
            if outstanding[cpu] and (status == sl.CPU_IDLE or status == sl.CPU_REMOVED):
                outstanding[cpu] = False
                completed[n] = cpu
                n += 1
    return n


class AttentionScanner:
    """Arrays for poll_completions over one machine's sidecar nodes."""

    def __init__(self, mem, nodes, cpu_total: int):
        self.ram = mem.array()
        self.control_gpas = np.array([n.control_gpa for n in nodes], np.int64)
        self.cpu_counts = np.array([n.cpu_count for n in nodes], np.int64)
        self.base_cpus = np.array([n.base_cpu for n in nodes], np.int64)
        self.outstanding = np.zeros(cpu_total, np.bool_)
        self.completed = np.zeros(cpu_total, np.int64)

    def expect(self, cpu: int) -> None:
        self.outstanding[cpu] = True

    def poll(self, twin: bool = False) -> list[int]:
        fn = poll_completions.py_func if twin else poll_completions
        n = fn(self.ram, self.control_gpas, self.cpu_counts, self.base_cpus, self.outstanding, self.completed)
        return self.completed[:n].tolist()
