"""The boot report (report.json) and the other files `hclsim boot --out DIR` writes.

Codes are given by name, as a person reads them (the regression kit's fixtures use the same
names): hypercalls and their statuses (hvdef), e820 and setup_data types, and the memory types
of the device tree's /openhcl memory (boot.layout.MEMORY_VTL_TYPE).
"""
import json
import re
from dataclasses import asdict
from pathlib import Path

from hclsim.boot.layout import E820_RAM, E820_RESERVED, MEMORY_VTL_TYPE, SETUP_DTB, SETUP_E820_EXT
from hclsim.defs.hvdef import hypercall_name, status_name

REPORT_VERSION = 1
# e820 types (Linux's E820_TYPE_*): what the report and the regression kit call them.
E820_TYPE_NAMES = {E820_RAM: "ram", E820_RESERVED: "reserved", 3: "acpi", 4: "nvs", 5: "unusable"}
SETUP_DATA_NAMES = {SETUP_E820_EXT: "e820_ext", SETUP_DTB: "dtb"}
MEMORY_VTL_TYPE_NAMES = {code: name for name, code in MEMORY_VTL_TYPE.items()}


def _hex(value: int) -> str:
    return f"{value:#x}"


def e820_type_name(code: int) -> str:
    """'ram', 'reserved', ... or the number as text for a type Linux does not define."""
    return E820_TYPE_NAMES.get(code, str(code))


def memory_type_name(code: int) -> str:
    """'VTL2_RAM', 'SIDECAR_NODE', ... (MemoryVtlType) or the number as text."""
    return MEMORY_VTL_TYPE_NAMES.get(code, str(code))


def setup_data_name(code: int) -> str:
    return SETUP_DATA_NAMES.get(code, str(code))


def hypercall_entry(vp: int, code: int, status: int) -> dict:
    return {"vp": vp, "call": hypercall_name(code), "code": _hex(code), "status": status_name(status)}


def device_tree_summary(dt: dict) -> dict:
    """The stand-in kernel's parse of the Linux device tree, JSON-ready, memory types by name."""
    out = _jsonable(dt)
    if "openhcl_memory" in out:
        out["openhcl_memory"] = [[base, size, memory_type_name(kind)] for base, size, kind in dt["openhcl_memory"]]
    return out


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
            "e820": [{"addr": _hex(e.addr), "size": _hex(e.size), "type": e820_type_name(e.type)} for e in h.e820],
            "initrd": {"addr": _hex(h.initrd_gpa), "size": h.initrd_size},
            "setup_data": [{"addr": _hex(a), "type": setup_data_name(t), "len": n} for a, t, n in h.setup_data],
        },
        "device_tree": device_tree_summary(h.dt),
        "cpus": [{"vp": i, "apic_id": apic, "numa_node": node} for i, (apic, node) in enumerate(h.dt.get("cpus", []))],
        "memory": [{"base": _hex(b), "size": _hex(s)} for b, s in h.dt.get("memory", [])],
        "timings_ms": {k.removesuffix("_ms"): round(v, 3) for k, v in result.timings.items()},
        "counters": result.counters,
        "hypercalls": [hypercall_entry(vp, code, status) for vp, code, status in result.hypercalls],
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
                  boot_params: bytes | None = None, shim_log: bytes | None = None,
                  files: dict | None = None) -> list[Path]:
    """report.json, serial.log (COM3), serial-com1.log, linux.dtb, boot_params.bin, shim.log and
    files ({name: bytes or str}, e.g. fault.txt); returns the paths, in the order written. Files of
    those names that this run did not write (an earlier run's) are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name, data):
        path = out / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
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
    for name, data in (files or {}).items():
        put(name, data)
    for name in OUTPUT_NAMES:         # an earlier run's files would pass for this run's
        stale = out / name
        if stale not in written and stale.is_file():
            stale.unlink()
    return written


# Every file name write_outputs may write (checked before a run: `--out` must take them all).
OUTPUT_NAMES = ("report.json", "serial.log", "serial-com1.log", "linux.dtb", "boot_params.bin", "shim.log",
                "fault.txt", "sidecar.json", "kmsg.log", "com1.log")


# ---- guest faults ---------------------------------------------------------------------------

_REG = re.compile(r"([a-z][a-z0-9_]*)\s+(0x[0-9a-fA-F]+)")
_WALK_HEAD = re.compile(r"page walk for (0x[0-9a-fA-F]+) \(CR3 (0x[0-9a-fA-F]+)\):")
_WALK_STEP = re.compile(r"(\w+) at (0x[0-9a-fA-F]+) = (0x[0-9a-fA-F]+) \((.*)\)")
_CODE = re.compile(r"(=>|  ) (0x[0-9a-fA-F]+)\s*(.*)")


def _sections(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The fault report's free lines (its summary first, then notes such as a #PF error code),
    and its sections ("name:" lines followed by indented lines), as cpu/fault.py writes them."""
    free, sections, current = [], {}, None
    for line in text.splitlines():
        if line.startswith("  ") and current is not None:
            current.append(line[2:])
        elif line and not line.startswith(" ") and line.endswith(":") and free:
            current = sections.setdefault(line[:-1], [])
        else:
            current = None
            if line.strip():
                free.append(line.strip())
    return free, sections


def _code_line(line: str) -> dict:
    m = _CODE.fullmatch(line)
    if not m:
        return {"text": line}
    current, address, rest = m.group(1) == "=>", m.group(2), m.group(3)
    words = rest.split()
    i = next((k for k, w in enumerate(words) if re.fullmatch(r"(?:[0-9a-f]{2})+", w)), None)
    entry = {"address": _hex(int(address, 16)), "current": current}
    if i is None:
        entry["text"] = rest.strip()
    else:
        entry.update(symbol=" ".join(words[:i]) or None, bytes=words[i], instruction=" ".join(words[i + 1:]))
    return entry


def fault_details(exc) -> dict:
    """A guest fault (cpu.fault.GuestFaultError) as JSON-ready data: the same report as its text
    (fault.txt): summary, detail, registers, page walk, code around RIP, last serial lines."""
    text = getattr(exc, "report", "") or str(exc)
    head, sections = _sections(text)
    summary = str(exc).splitlines()[0] if str(exc) else (head[0] if head else "")
    detail = [line for line in head[1:] if line.strip()]
    out = {"summary": summary, "detail": "\n".join(detail) or None, "registers": {}, "page_walk": None,
           "code": [], "serial_tail": []}
    for name, lines in sections.items():
        walk = _WALK_HEAD.fullmatch(name + ":")
        if name == "registers":
            out["registers"] = {r: _hex(int(v, 16)) for line in lines for r, v in _REG.findall(line)}
        elif walk:
            steps = []
            for line in lines:
                m = _WALK_STEP.fullmatch(line.strip())
                steps.append({"level": m.group(1), "gpa": _hex(int(m.group(2), 16)),
                              "entry": _hex(int(m.group(3), 16)), "state": m.group(4)} if m else {"text": line})
            out["page_walk"] = {"address": _hex(int(walk.group(1), 16)), "cr3": _hex(int(walk.group(2), 16)),
                                "steps": steps}
        elif name == "code":
            out["code"] = [_code_line(line) for line in lines]
        elif name == "last serial lines":
            out["serial_tail"] = [] if lines == ["(none)"] else lines
        else:
            out.setdefault("other", {})[name] = lines
    if "rip" in out["registers"]:
        out["rip"] = out["registers"]["rip"]
    return out


def fault_report(exc, config=None, machine=None) -> dict:
    """report.json of a run that ended in a guest fault: the fault's whole report (fault_details),
    and what the machine had done until then (hypercalls, counters, serial line counts)."""
    serial = getattr(exc, "serial", None) or {}
    report = {"version": REPORT_VERSION, "status": "fault", "error": str(exc).splitlines()[0] if str(exc) else ""}
    if config is not None:
        report["config"] = {k: v for k, v in asdict(config).items() if k != "host_cpu_order"}
    report["fault"] = fault_details(exc)
    if machine is not None:
        hv = getattr(machine, "hv", None)
        if hv is not None:
            report["hypercalls"] = [hypercall_entry(vp, code, status) for vp, code, status in hv.hypercall_log]
        engine = getattr(machine, "engine", None)
        if engine is not None:
            report["counters"] = engine.counters()
    report["serial_lines"] = {name: len(data.splitlines()) for name, data in serial.items()}
    return report


# ---- why something is off (the console says it) ---------------------------------------------

def sidecar_off_reason(config, shim_log) -> str:
    """Why the sidecar did not run, from the shim's own log line ("sidecar: off (...)") and the
    options that led there: 'off: isolated VM (--isolation vbs): ...'."""
    text = shim_log.decode("utf-8", "replace") if isinstance(shim_log, bytes) else (shim_log or "")
    said = re.search(r"sidecar: off \((.*?)\)", text)
    reason = said.group(1) if said else None
    static_words = config.static_cmdline.split()
    host_words = config.host_bootargs.split()
    if reason == "isolated VM" or (reason is None and config.isolation != "none"):
        return (f"off: isolated VM (--isolation {config.isolation}): the shim never starts the sidecar "
                "in an isolated VM; every CPU boots as a Linux CPU")
    if reason == "OPENHCL_SIDECAR=off" or (reason is None and "OPENHCL_SIDECAR=off" in static_words + host_words):
        source = ("--static-cmdline" if "OPENHCL_SIDECAR=off" in static_words else
                  "--host-bootargs" if "OPENHCL_SIDECAR=off" in host_words else "the command line")
        return f"off: the command line says OPENHCL_SIDECAR=off (from {source}); every CPU boots as a Linux CPU"
    if reason == "no sidecar image" or (reason is None and config.no_sidecar):
        why = "--no-sidecar" if config.no_sidecar else "the image has none"
        return f"off: no sidecar image ({why}); every CPU boots as a Linux CPU"
    if reason == "every node would hold one CPU" or (reason is None and config.cpus <= config.numa_nodes):
        return (f"off: every node would hold one CPU ({config.cpus} CPUs on {config.numa_nodes} NUMA "
                "nodes), so there is nothing for it to start; every CPU boots as a Linux CPU")
    return f"off ({reason})" if reason else "off"


def serial_notes(config, serial: dict, cmdline: str) -> list[tuple[str, str]]:
    """(label, note) lines for what is off on the serial side: a silent COM3 in a
    hardware-isolated VM, a Linux console sent to ttynull (isolated VM, --no-com3)."""
    notes = []
    if not serial.get("COM3"):
        if config.isolation in ("snp", "tdx"):
            notes.append(("serial", f"COM3 silent: the shim writes no serial output in a hardware-isolated VM "
                                    f"(--isolation {config.isolation}); its log is shim.log (--out)"))
        else:
            notes.append(("serial", "COM3 silent: the shim wrote nothing to COM3"))
    if "console=ttynull" in cmdline.split():
        if config.isolation != "none":
            why = f"in an isolated VM (--isolation {config.isolation}) the host's console is not trusted"
        elif not config.com3:
            why = "the host offers no COM3 (--no-com3)"
        else:
            why = "the command line says so"
        notes.append(("console", f"ttynull: Linux gets no serial console: {why}"))
    return notes
