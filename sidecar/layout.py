"""Sidecar shared layouts as numpy structured dtypes: the Python side of the "Sidecar" section of
boot/firmware/include/hclsim_abi.h (tests/test_abi.py compares every offset and constant).

numpy, not ctypes: the host side reads and writes these pages in place in guest RAM (a view of
the page, no copies), and the numba dispatch loop scans the control pages as arrays.
"""
import numpy as np

from hclsim.defs.hvdef import HvEnableVpVtlInput, HvInitialVpContext

MAX_NODES = 128
MAX_NODE_CPUS = 32
PRIVATE_PAGES_PER_VP = 11
SHMEM_PAGES_PER_VP = 2
IMAGE_VA = 0xFFFFFF8000000000
DEFAULT_REQUEST_VECTOR = 0x20
MAX_REGISTERS_PER_COMMAND = 31

CPU_REMOVED, CPU_IDLE, CPU_RUN, CPU_STOP, CPU_REMOVE = 0, 1, 2, 3, 4
CPU_STATUS_NAMES = {CPU_REMOVED: "REMOVED", CPU_IDLE: "IDLE", CPU_RUN: "RUN", CPU_STOP: "STOP", CPU_REMOVE: "REMOVE"}

COMMAND_NONE, COMMAND_RUN_VP, COMMAND_GET_VP_REGISTERS, COMMAND_SET_VP_REGISTERS, COMMAND_TRANSLATE_GVA = range(5)


def node_pages(vp_count: int) -> int:
    """Pages of one node's memory: control page + (command, register) + 11 private pages per VP."""
    return 1 + (SHMEM_PAGES_PER_VP + PRIVATE_PAGES_PER_VP) * vp_count


def _struct(fields, size=None):
    dt = np.dtype(fields, align=False)
    if size is not None:
        assert dt.itemsize <= size, (dt, size)
        if dt.itemsize < size:
            dt = np.dtype({"names": dt.names, "formats": [dt.fields[n][0] for n in dt.names],
                           "offsets": [dt.fields[n][1] for n in dt.names], "itemsize": size})
    return dt


node_params = _struct([("memory_base", "<u8"), ("memory_size", "<u8"), ("base_vp", "<u4"), ("vp_count", "<u4")])

params = _struct([("hypercall_page", "<u8"), ("enable_logging", "u1"), ("reserved", "u1", 3),
                  ("node_count", "<u4"), ("nodes", node_params, MAX_NODES)])

node_output = _struct([("control_page", "<u8"), ("shmem_pages_base", "<u8"), ("shmem_pages_size", "<u8")])

output = _struct([("error_len", "u1"), ("error_buf", "u1", 255), ("nodes", node_output, MAX_NODES)])

control_page = _struct([
    ("index", "<u4"), ("base_cpu", "<u4"), ("cpu_count", "<u4"), ("request_vector", "<u4"),
    ("response_cpu", "<u4"), ("response_vector", "<u4"), ("needs_attention", "<u4"),
    ("reserved", "u1", 36), ("cpu_status", "u1", 4032)])

cpu_context = _struct([("gps", "<u8", 16), ("fx_state", "u1", 1024 - 0x80)])
# cpu_context.gps, in order (the sidecar loads them into VTL0 on each RUN_VP and saves them back).
CPU_CONTEXT_GPS = ("rax", "rcx", "rdx", "rbx", "cr2", "rbp", "rsi", "rdi",
                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

error = _struct([("len", "u1"), ("buf", "u1", 255)])

command_page = _struct([
    ("command", "<u4"), ("has_error", "u1"), ("padding", "u1", 11), ("cpu_context", cpu_context),
    ("intercept_message", "u1", 256), ("error", error), ("request_data", "u1", 1024),
    ("reserved", "u1", 4096 - 0xA10)])

get_set_vp_registers_request = _struct([("count", "<u2"), ("target_vtl", "u1"), ("rsvd", "u1"),
                                        ("status", "<u2"), ("rsvd2", "u1", 10)])

translate_gva_request = _struct([("gvn", "<u8"), ("control_flags", "<u8")])
translate_gva_response = _struct([("status", "<u2"), ("rsvd", "u1", 6), ("result", "<u8"), ("gpa_page", "<u8")])
run_vp_response = _struct([("intercept", "u1")])

# The HvInitialVpContext the sidecar's StartVp calls carry: declared in defs/hvdef.py.
hv_initial_vp_context = np.dtype(HvInitialVpContext)
hv_enable_vp_vtl_input = np.dtype(HvEnableVpVtlInput)

# dtype -> C struct name, for the layout test.
SHARED_DTYPES = {
    "sidecar_node_params": node_params, "sidecar_params": params, "sidecar_node_output": node_output,
    "sidecar_output": output, "sidecar_control_page": control_page, "sidecar_cpu_context": cpu_context,
    "sidecar_error": error, "sidecar_command_page": command_page,
    "sidecar_get_set_vp_registers_request": get_set_vp_registers_request,
    "sidecar_translate_gva_request": translate_gva_request,
    "sidecar_translate_gva_response": translate_gva_response, "sidecar_run_vp_response": run_vp_response,
}


def view(mem, gpa: int, dtype: np.dtype) -> np.ndarray:
    """A zero-copy record view of dtype at gpa in guest RAM (writes go to the guest)."""
    return mem.array(gpa, dtype.itemsize).view(dtype)[0]
