"""What a firmware regression test looks at in one boot, in deterministic, golden-ready form.

BootRun wraps a Machine that reached the kernel handoff and its BootResult with accessors:
serial text per UART, the kernel command line, e820, the Linux device tree (summary and full
text), boot_params fields, the sidecar's nodes and CPU states, the VTL0 test guest's run on a
sidecar CPU, and the boot report with host-dependent values (wall-clock timings, image paths,
engine-cache statistics) normalised away. Used by hclsim.pytest_plugin.
"""
import ctypes
from pathlib import Path

from hclsim.boot.layout import BootParams
from hclsim.boot import fdt as fdtutil
from hclsim.defs.hvdef import message_name
from hclsim.report import E820_TYPE_NAMES, boot_report, e820_type_name, memory_type_name
from hclsim.sidecar import layout as sl

# Counters that depend on the engine's translation cache (pooled engines, earlier boots in the
# process), not on the guest: left out of anything compared across runs.
HOST_COUNTERS = ("block_count_misses",)
E820_TYPES = E820_TYPE_NAMES  # the names report.json uses too



def guest_counters(counters: dict) -> dict:
    """The counters that are the same in any process (everything but engine-cache statistics)."""
    return {k: v for k, v in counters.items() if k not in HOST_COUNTERS}


def golden_counters(counters: dict) -> dict:
    """What the guest did, independent of how the simulator split the work (native vs Python
    exit paths, translated blocks, scheduling): instructions and exits by kind."""
    return {"instructions": counters["instructions"],
            "io_exits": counters["io_fast_exits"] + counters["io_slow_exits"],
            "cpuid_exits": counters["cpuid_exits"], "msr_exits": counters["msr_exits"],
            "hypercalls": counters["hypercalls"], "ipis": counters["ipis"]}


def image_label(path, shipped: bool) -> str | None:
    """An image path as goldens show it: '<shipped>' or the file name (never the host's directories)."""
    if path is None:
        return None
    return "<shipped>" if shipped else Path(str(path)).name


def normalized_report(result) -> dict:
    """boot_report(result) without what differs between hosts and processes (timings, image
    paths: file names only) or between simulator versions (counters: golden_counters).
    Instruction counts stay: they are exact."""
    report = boot_report(result)
    cfg = result.config
    report.pop("timings_ms", None)
    report["counters"] = golden_counters(report["counters"])
    report["config"] = dict(report["config"], **{k: image_label(getattr(cfg, k), False)
                                                for k in ("kernel", "initrd", "shim", "sidecar")})
    images = report["images"]
    images["shim"] = image_label(images["shim"], cfg.shim is None)
    images["kernel"]["path"] = image_label(images["kernel"]["path"], cfg.kernel is None)
    if images["initrd"] is not None:
        images["initrd"]["path"] = image_label(images["initrd"]["path"], cfg.initrd is None)
    return report


# ---- device tree as text --------------------------------------------------------------------

def _value(raw: bytes) -> str:
    if raw.endswith(b"\0") and len(raw) > 1 and all(32 <= b < 127 for b in raw[:-1].replace(b"\0", b" ")) \
            and b"\0\0" not in raw:
        return ", ".join(f'"{s}"' for s in raw[:-1].decode().split("\0"))
    if len(raw) % 4 == 0:
        return "<" + " ".join(f"{int.from_bytes(raw[i:i + 4], 'big'):#x}" for i in range(0, len(raw), 4)) + ">"
    return "[" + raw.hex(" ") + "]"


def device_tree_text(dtb: bytes) -> str:
    """The tree in dts syntax (strings, <cells> or [bytes] per property), for goldens and diffs."""
    fdt = fdtutil.open_fdt(dtb)
    lines = [f"/memreserve/ {a:#x} {s:#x};" for a, s in fdtutil.mem_reserves(fdt)]

    def node(off: int, name: str, depth: int) -> None:
        pad = "    " * depth
        lines.append(f"{pad}{name or '/'} {{")
        for prop in fdtutil.prop_names(fdt, off):
            raw = fdtutil.prop(fdt, off, prop)
            lines.append(f"{pad}    {prop};" if not raw else f"{pad}    {prop} = {_value(raw)};")
        for child, child_name in fdtutil.subnodes(fdt, off):
            node(child, child_name, depth + 1)
        lines.append(f"{pad}}};")
    node(0, "", 0)
    return "\n".join(lines) + "\n"


# ---- boot_params ----------------------------------------------------------------------------

def _struct_dict(obj) -> dict:
    out = {}
    for name, _type in obj._fields_:
        if name.startswith("_pad"):
            continue
        value = getattr(obj, name)
        if isinstance(value, ctypes.Structure):
            out[name] = _struct_dict(value)
        elif isinstance(value, ctypes.Array):
            data = bytes(value)
            if any(data):
                out[name] = data.hex()
        else:
            out[name] = int(value)
    return out


def boot_params_fields(raw: bytes) -> dict:
    """The zero page's fields (setup header nested under 'hdr'; byte arrays as hex when not
    all zero; the e820 table as its used entries, types by name as in report.json)."""
    bp = BootParams.from_buffer_copy(raw)
    fields = _struct_dict(bp)
    fields["e820_table"] = [{"addr": e.addr, "size": e.size, "type": e820_type_name(e.type)}
                            for e in list(bp.e820_table)[:bp.e820_entries]]
    return fields


# ---- one boot -------------------------------------------------------------------------------

class BootRun:
    """A machine at (or after) the kernel handoff and what its boot produced."""

    def __init__(self, machine, result):
        self.machine, self.result = machine, result

    @property
    def config(self):
        return self.result.config

    # Output
    def serial_text(self, uart: str = "COM3") -> str:
        """What the guest wrote to uart (COM3: the boot shim; COM1: VTL2 code writing COM1)."""
        return bytes(self.machine.serial[uart]).decode("utf-8", "replace")

    @property
    def serial(self) -> dict:
        return {name: self.serial_text(name) for name in self.machine.serial}

    @property
    def shim_log(self) -> str:
        return self.result.shim_log.decode("utf-8", "replace")

    # The handoff
    @property
    def cmdline(self) -> str:
        return self.result.handoff.cmdline

    @property
    def e820(self) -> list[dict]:
        return [{"addr": f"{e.addr:#x}", "size": f"{e.size:#x}", "type": e820_type_name(e.type)}
                for e in self.result.handoff.e820]

    @property
    def openhcl_memory(self) -> list[dict]:
        """The device tree's /openhcl memory ranges with their memory type by name (VTL0,
        VTL2_RAM, SIDECAR_NODE, ...: boot.layout.MEMORY_VTL_TYPE), as report.json names them."""
        return [{"base": f"{base:#x}", "size": f"{size:#x}", "type": memory_type_name(kind)}
                for base, size, kind in self.result.handoff.dt.get("openhcl_memory", [])]

    @property
    def dtb(self) -> bytes:
        return self.result.handoff.dtb

    @property
    def device_tree(self) -> dict:
        """The Linux device tree as the stand-in kernel parsed it: cpus [(apic id, numa node)],
        memory [(base, size)], openhcl_memory, reftimes, isolation_type, compatible, memreserve."""
        return self.result.handoff.dt

    def device_tree_text(self) -> str:
        return device_tree_text(self.dtb)

    @property
    def boot_params(self) -> dict:
        return boot_params_fields(self.result.handoff.boot_params)

    @property
    def vtl2_layout(self) -> list[dict]:
        return [{"name": r.name, "start": f"{r.start:#x}", "size": f"{r.size:#x}"}
                for r in self.result.image.layout.regions]

    # Counters and reports
    @property
    def counters(self) -> dict:
        """Counters at the handoff that are the same in any process (instructions, exits,
        hypercalls, IPIs, VP switches...); golden_counters(run.counters) for goldens."""
        return guest_counters(self.result.counters)

    @property
    def report(self) -> dict:
        return boot_report(self.result)

    def golden_report(self) -> dict:
        return normalized_report(self.result)

    # The sidecar
    @property
    def sidecar(self) -> dict | None:
        """Nodes (base_cpu, cpu_count, cpu_status names now) and Linux CPUs; None without a sidecar."""
        linux = self.machine.linux
        if linux.sidecar is None:
            return None
        nodes = [{"index": n.index, "base_cpu": n.base_cpu, "cpu_count": n.cpu_count,
                  "cpu_status": [sl.CPU_STATUS_NAMES.get(int(s), str(int(s))) for s in n.status]}
                 for n in linux.sidecar.nodes]
        return {"nodes": nodes, "linux_cpus": sorted(linux.cpus.online),
                "bring_up_reftime_100ns": self.result.sidecar_summary["bring_up_reftime_100ns"]}

    def cpu_status(self) -> dict[int, str]:
        """Every CPU's state now: 'linux' for Linux CPUs, else its sidecar status."""
        out = {cpu: "linux" for cpu in self.machine.linux.cpus.online}
        for node in (self.sidecar or {"nodes": []})["nodes"]:
            for i, status in enumerate(node["cpu_status"]):
                out.setdefault(node["base_cpu"] + i, status)
        return dict(sorted(out.items()))

    def run_vtl0(self, cpu: int) -> dict:
        """Run the VTL0 test guest on CPU cpu to its end, intercept by intercept (RUN_VP through
        the sidecar, or directly on a Linux CPU): its intercepts, result record, COM1 output and
        test-device accesses."""
        from hclsim.sidecar.vp_loop import vtl0_runner
        from hclsim.devices.vtl0_test import TestDevices
        m = self.machine
        results = m.vtl0_guest.results(m.mem)
        runner = vtl0_runner(m.linux, cpu, TestDevices())
        seen = runner.run_until_halted(lambda: results[cpu]["done"] == 1)
        from hclsim.boot.vtl0_guest import record_values
        record = {k: v for k, v in record_values(results[cpu]).items() if k not in ("pad", "pad2")}
        return {"cpu": cpu,
                "intercepts": [_intercept(msg) for msg in seen],
                "record": record,
                "com1": bytes(runner.devices.com1).decode("utf-8", "replace"),
                "port_writes": [[f"{p:#x}", f"{v:#x}"] for p, v in runner.devices.port_writes],
                "mmio_writes": [[f"{g:#x}", f"{v:#x}"] for g, v in runner.devices.mmio_writes]}


def _intercept(msg: dict) -> dict:
    out = {"type": message_name(msg["type"]), "rip": f"{msg['rip']:#x}"}
    for key in ("port", "gpa", "msr"):
        if key in msg:
            out[key] = f"{msg[key]:#x}"
    return out
