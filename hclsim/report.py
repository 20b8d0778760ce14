"""The boot report (report.json) and the other files `hclsim boot --out DIR` writes."""
import json
from dataclasses import asdict
from pathlib import Path

REPORT_VERSION = 1


def _hex(value: int) -> str:
    return f"{value:#x}"


def boot_report(result) -> dict:
    """Everything a test or a person wants to know about one boot, as JSON-ready data."""
    h = result.handoff
    lay = result.image.layout
    cfg = result.config
    return {
        "version": REPORT_VERSION,
        "status": "handoff",
        "config": {k: v for k, v in asdict(cfg).items() if k != "host_cpu_order"},
        "images": {
            "shim": result.shim_path,
            "kernel": {"path": str(result.kernel.path), "format": result.kernel.format,
                       "version": result.kernel.version, "compression": result.kernel.compression},
            "initrd": None if result.initrd is None else {
                "path": str(result.initrd.path), "size": len(result.initrd.data),
                "compression": list(result.initrd.compression), "files": result.initrd.files},
        },
        "vtl2": {"base": _hex(lay.vtl2_base), "size": _hex(lay.vtl2_size),
                 "regions": [{"name": r.name, "start": _hex(r.start), "size": _hex(r.size)} for r in lay.regions]},
        "handoff": {
            "registers": {k: _hex(v) for k, v in sorted(result.regs.items())},
            "kernel_entry": _hex(result.image.kernel_entry),
            "boot_params": _hex(h.boot_params_gpa),
            "cmdline": h.cmdline,
            "e820": [{"addr": _hex(e.addr), "size": _hex(e.size), "type": e.type} for e in h.e820],
            "initrd": {"addr": _hex(h.initrd_gpa), "size": h.initrd_size},
            "setup_data": [{"addr": _hex(a), "type": t, "len": n} for a, t, n in h.setup_data],
        },
        "device_tree": _jsonable(h.dt),
        "cpus": [{"vp": i, "apic_id": apic, "numa_node": node} for i, (apic, node) in enumerate(h.dt.get("cpus", []))],
        "memory": [{"base": _hex(b), "size": _hex(s)} for b, s in h.dt.get("memory", [])],
        "timings_ms": {k.removesuffix("_ms"): round(v, 3) for k, v in result.timings.items()},
        "counters": result.counters,
        "hypercalls": [{"vp": vp, "code": _hex(code), "status": _hex(status)} for vp, code, status in result.hypercalls],
        "serial_lines": {name: len(data.splitlines()) for name, data in result.serial.items()},
        "sidecar": _sidecar(result.sidecar_summary),
    }


def _sidecar(summary):
    if summary is None:
        return None
    nodes = [dict(n, control_page=_hex(n["control_page"]), shmem_base=_hex(n["shmem_base"]),
                  shmem_size=_hex(n["shmem_size"])) for n in summary["nodes"]]
    return dict(summary, nodes=nodes)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def write_outputs(out_dir, report: dict, serial: dict, dtb: bytes | None = None,
                  boot_params: bytes | None = None, shim_log: bytes | None = None) -> list[Path]:
    """report.json, serial.log (COM3), linux.dtb, boot_params.bin, shim.log; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name, data):
        path = out / name
        path.write_bytes(data)
        written.append(path)

    put("report.json", (json.dumps(report, indent=2, sort_keys=False) + "\n").encode())
    put("serial.log", serial.get("COM3", b""))
    if serial.get("COM1"):
        put("serial-com1.log", serial["COM1"])
    if dtb is not None:
        put("linux.dtb", dtb)
    if boot_params is not None:
        put("boot_params.bin", boot_params)
    if shim_log:
        put("shim.log", shim_log)
    return written
