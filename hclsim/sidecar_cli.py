"""`hclsim sidecar`: boot a simulation, then act on its sidecar CPUs the way the paravisor does
(INFO, GET/SET_VP_REGISTERS, TRANSLATE_GVA, RUN_VP through VTL0's intercepts, CPU online).

A Linux CPU (the boot CPUs, onlined CPUs) is not the sidecar's: its VTL0 registers are read and
written through the partition (hv/partition.py), as the kernel's own mshv_vtl path does, and a
GVA is translated by walking its VTL0 page tables. Every argument is checked before the boot.
Results print as tables (or JSON with --json); --json, --quiet and --out may come before or
after the action.
"""
import json
import struct
import sys

from hclsim import HclsimError
from hclsim.defs.hvdef import CONTROL_NAMES, GPR_NAMES, HvRegister

REGISTER_NAMES = {name: hv for hv, name in {**GPR_NAMES, **CONTROL_NAMES, HvRegister.Efer: "efer"}.items()}
# HV_TRANSLATE_GVA_RESULT_CODE (TLFS): what TRANSLATE_GVA's result means.
TRANSLATE_RESULTS = {
    0: ("HvTranslateGvaSuccess", "translated"),
    1: ("HvTranslateGvaPageNotPresent", "a page-table entry on the way is not present"),
    2: ("HvTranslateGvaPrivilegeViolation", "the mapping does not allow this access"),
    3: ("HvTranslateGvaInvalidPageTableFlags", "a page-table entry has reserved bits set"),
    4: ("HvTranslateGvaGpaUnmapped", "the GPA it maps to is not guest RAM"),
    5: ("HvTranslateGvaGpaNoReadAccess", "the GPA may not be read"),
    6: ("HvTranslateGvaGpaNoWriteAccess", "the GPA may not be written"),
    7: ("HvTranslateGvaGpaIllegalOverlayAccess", "the GPA is an overlay page"),
    8: ("HvTranslateGvaIntercept", "the access was intercepted"),
}
ACTIONS = ("info", "get-regs", "set-regs", "translate", "run-vp", "online")


def _cpu(text: str) -> int:
    import argparse
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid CPU {text!r}: a VP index, e.g. 3") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid CPU {text!r}: VP indexes start at 0")
    return value


def _address(text: str) -> int:
    import argparse
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: a number, e.g. 0x201000") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: must be 0..0xffffffffffffffff")
    return value


def _assignment(text: str) -> tuple[str, int]:
    import argparse
    name, eq, value = text.partition("=")
    name = name.strip().lower()
    if name not in REGISTER_NAMES or not eq:
        raise argparse.ArgumentTypeError(f"bad assignment {text!r}: use NAME=VALUE with NAME one of "
                                         f"{', '.join(sorted(REGISTER_NAMES))}")
    try:
        number = int(value.strip(), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad assignment {text!r}: {value!r} is not a number "
                                         f"(e.g. {name}=0x55)") from None
    if not -(1 << 63) <= number < 1 << 64:
        raise argparse.ArgumentTypeError(f"bad assignment {text!r}: does not fit in 64 bits")
    return name, number & ((1 << 64) - 1)


def _register(text: str) -> str:
    import argparse
    name = text.strip().lower()
    if name not in REGISTER_NAMES:
        raise argparse.ArgumentTypeError(f"unknown register {text!r}: one of {', '.join(sorted(REGISTER_NAMES))}")
    return name


def add_parser(sub, add_boot_options, add_output_options=None) -> None:
    p = sub.add_parser("sidecar", help="boot, then run sidecar commands on its CPUs")
    add_boot_options(p)
    what = "report.json, serial.log, linux.dtb, boot_params.bin, shim.log and sidecar.json (the result)"
    if add_output_options is not None:
        add_output_options(p, what=what)
    else:
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               help="one of " + ", ".join(ACTIONS))

    def action(name, help):
        a = actions.add_parser(name, help=help)
        add_boot_options(a, suppress=True)     # also after the action, e.g. `info --cpus 8`
        if add_output_options is not None:
            add_output_options(a, suppress=True, what=what)
        return a
    action("info", "the sidecar nodes and every CPU's status")
    g = action("get-regs", "VTL0 registers of a VP (GET_VP_REGISTERS; e.g. get-regs 3 rip cr3)")
    g.add_argument("cpu", type=_cpu)
    g.add_argument("registers", nargs="+", type=_register, metavar="REG")
    s = action("set-regs", "set VTL0 registers of a VP (SET_VP_REGISTERS; e.g. set-regs 3 rax=0x10), then read them back")
    s.add_argument("cpu", type=_cpu)
    s.add_argument("assignments", nargs="+", type=_assignment, metavar="REG=VALUE")
    t = action("translate", "translate a GVA through a VP's VTL0 page tables (TRANSLATE_GVA)")
    t.add_argument("cpu", type=_cpu)
    t.add_argument("gva", type=_address)
    t.add_argument("--write", action="store_true", help="validate write access")
    r = action("run-vp", "run the VTL0 test guest through all its intercepts (RUN_VP on sidecar CPUs, directly on Linux CPUs)")
    r.add_argument("cpu", type=_cpu)
    o = action("online", "convert sidecar CPUs into Linux CPUs")
    o.add_argument("targets", type=_cpu, nargs="+", metavar="CPU")


def check_args(args, config) -> None:
    """The action's arguments against the configuration, before the boot."""
    from hclsim.sidecar import layout as sl
    cpus = [args.cpu] if hasattr(args, "cpu") else list(getattr(args, "targets", []))
    for cpu in cpus:
        if cpu >= config.cpus:
            raise HclsimError(f"CPU {cpu} is not a sidecar CPU: this VM has {config.cpus} CPUs "
                              f"(0-{config.cpus - 1})")
    count = len(getattr(args, "registers", None) or getattr(args, "assignments", None) or [])
    if count > sl.MAX_REGISTERS_PER_COMMAND:
        raise HclsimError(f"{args.action}: at most {sl.MAX_REGISTERS_PER_COMMAND} registers per command")


# ---- the actions ------------------------------------------------------------------------------

def _check(sc, page, what: str) -> None:
    if page["has_error"]:
        raise HclsimError(f"{what}: {sc.error_text(page)}")


def _is_linux_cpu(linux, cpu: int) -> bool:
    return cpu in linux.cpus.online


def _not_running(result) -> HclsimError:
    from hclsim.report import sidecar_off_reason
    return HclsimError(f"the sidecar is not running in this configuration: "
                       f"{sidecar_off_reason(result.config, result.shim_log)}")


def _get_regs(machine, sc, linux, cpu: int, names: list[str]) -> tuple[dict, str]:
    """VTL0 registers {name: value} of cpu, and the path they took ('sidecar' or 'linux')."""
    from hclsim.sidecar import layout as sl
    from hclsim.sidecar.client import registers_request, registers_response
    if _is_linux_cpu(linux, cpu) or sc is None:
        values = machine.partition.registers(cpu, vtl=0, names=names)
        return {n: values[n] for n in names}, "linux"
    page = sc.run(cpu, sl.COMMAND_GET_VP_REGISTERS, registers_request([(REGISTER_NAMES[n], 0) for n in names]))
    _check(sc, page, "GET_VP_REGISTERS")
    return dict(zip(names, registers_response(page, len(names)))), "sidecar"


def _set_regs(machine, sc, linux, cpu: int, pairs: list[tuple[str, int]]) -> str:
    from hclsim.sidecar import layout as sl
    from hclsim.sidecar.client import registers_request
    if _is_linux_cpu(linux, cpu) or sc is None:
        machine.partition.set_registers(cpu, dict(pairs), vtl=0)
        return "linux"
    page = sc.run(cpu, sl.COMMAND_SET_VP_REGISTERS, registers_request([(REGISTER_NAMES[n], v) for n, v in pairs]))
    _check(sc, page, "SET_VP_REGISTERS")
    return "sidecar"


def _walk(machine, cr0: int, cr3: int, gva: int) -> dict:
    """VTL0's page walk for gva as rows, for the explanation."""
    from hclsim.cpu.pagetable import walk_steps
    if not cr0 & 0x80000000:
        return {"paging": False, "cr3": f"{cr3:#x}", "steps": []}
    va = gva - (1 << 64) if gva >= 1 << 63 else gva
    steps = [{"level": name, "gpa": f"{gpa:#x}",
              "entry": None if value < 0 else f"{value:#x}",
              "state": "outside RAM" if value < 0 else ("present" if value & 1 else "not present")}
             for name, gpa, value in walk_steps(machine.mem.array(), cr3, va)]
    return {"paging": True, "cr3": f"{cr3:#x}", "steps": steps}


def _translate_linux(machine, cpu: int, gva: int, write: bool) -> tuple[int, int | None]:
    """(result code, GPA) of a VTL0 walk on a Linux CPU, with TRANSLATE_GVA's semantics."""
    from hclsim.cpu.pagetable import walk_steps
    regs = machine.partition.registers(cpu, vtl=0, names=("cr0", "cr3"))
    mem = machine.mem
    if not regs["cr0"] & 0x80000000:
        return (0, gva) if gva < mem.size else (4, None)
    va = gva - (1 << 64) if gva >= 1 << 63 else gva
    steps = walk_steps(mem.array(), regs["cr3"], va)
    writable = True
    for _name, _gpa, entry in steps:
        if entry < 0 or not entry & 1:
            return 1, None
        writable &= bool(entry & 2)
    if write and not writable:
        return 2, None
    name, _gpa, leaf = steps[-1]
    size = {"PDPTE": 1 << 30, "PDE": 1 << 21}.get(name, 1 << 12)
    gpa = (leaf & 0x000FFFFFFFFFF000 & ~(size - 1)) | (gva & (size - 1))
    return (0, gpa) if gpa < mem.size else (4, None)


def _translate(machine, sc, linux, cpu: int, gva: int, write: bool) -> dict:
    import numpy as np
    from hclsim.defs.hvdef import status_name
    from hclsim.sidecar import layout as sl
    regs, path = _get_regs(machine, sc, linux, cpu, ["cr0", "cr3"])
    status = 0
    if path == "linux":
        code, gpa = _translate_linux(machine, cpu, gva, write)
    else:
        flags = (0x10 << 56) | (1 << 1 if write else 1 << 0)
        page = sc.run(cpu, sl.COMMAND_TRANSLATE_GVA, struct.pack("<QQ", gva >> 12, flags))
        _check(sc, page, "TRANSLATE_GVA")
        status, res, gpa_page = struct.unpack_from("<H6xQQ", bytes(np.asarray(page["request_data"])))
        code = res & 0xFFFFFFFF
        gpa = (gpa_page << 12) | (gva & 0xFFF) if status == 0 and code == 0 else None
    walk = _walk(machine, regs["cr0"], regs["cr3"], gva)
    name, meaning = TRANSLATE_RESULTS.get(code, (f"result {code:#x}", "an unknown result"))
    access = "write" if write else "read"
    if status != 0:
        explanation = f"TRANSLATE_GVA failed: {status_name(status)}"
    elif code == 0:
        explanation = f"GVA {gva:#x} maps to GPA {gpa:#x} ({access} access allowed)"
    else:
        explanation = f"GVA {gva:#x} does not translate for {access} access: {meaning}"
        bad = next((s for s in walk["steps"] if s["state"] != "present"), None)
        if code == 1 and bad is not None:
            explanation += f" (the {bad['level']} at {bad['gpa']} is {bad['state']})"
    out = {"cpu": cpu, "path": path, "gva": f"{gva:#x}", "access": access, "status": status_name(status),
           "result": name, "result_code": code, "explanation": explanation, "page_walk": walk}
    if gpa is not None:
        out["gpa"] = f"{gpa:#x}"
    return out


def run_action(args, machine, result) -> dict:
    linux = result.linux
    sc = linux.sidecar
    if args.action == "info":
        from hclsim.report import boot_report, sidecar_off_reason
        info = boot_report(result)["sidecar"]
        if info is None:
            info = {"nodes": [], "linux_cpus": sorted(linux.cpus.online),
                    "off": sidecar_off_reason(result.config, result.shim_log)}
        return info
    if args.action == "get-regs":
        values, path = _get_regs(machine, sc, linux, args.cpu, args.registers)
        return {"cpu": args.cpu, "path": path, "registers": {r: f"{v:#x}" for r, v in values.items()}}
    if args.action == "set-regs":
        path = _set_regs(machine, sc, linux, args.cpu, args.assignments)
        names = list(dict.fromkeys(n for n, _ in args.assignments))
        back, _ = _get_regs(machine, sc, linux, args.cpu, names)
        asked = dict(args.assignments)
        return {"cpu": args.cpu, "path": path, "set": [f"{n}={v:#x}" for n, v in args.assignments],
                "registers": {n: {"set": f"{asked[n]:#x}", "read_back": f"{back[n]:#x}"} for n in names},
                "all_read_back": all(back[n] == asked[n] for n in names)}
    if args.action == "translate":
        return _translate(machine, sc, linux, args.cpu, args.gva, args.write)
    if sc is None:
        raise _not_running(result)
    if args.action == "run-vp":
        from hclsim.defs.hvdef import message_name
        from hclsim.devices.vtl0_test import TestDevices
        from hclsim.sidecar.vp_loop import vtl0_runner
        if machine.vtl0_guest is None:
            raise HclsimError("no VTL0 guest is loaded")
        results = machine.vtl0_guest.results(machine.mem)
        path = "linux" if _is_linux_cpu(linux, args.cpu) else "sidecar"
        runner = vtl0_runner(machine.linux, args.cpu, TestDevices())
        seen = runner.run_until_halted(lambda: results[args.cpu]["done"] == 1)
        rec = results[args.cpu]
        return {"cpu": args.cpu, "path": path, "done": bool(rec["done"]),
                "intercepts": [{"type": message_name(m["type"]), "rip": f"{m['rip']:#x}",
                                **({"port": f"{m['port']:#x}"} if "port" in m else {}),
                                **({"gpa": f"{m['gpa']:#x}"} if "gpa" in m else {}),
                                **({"msr": f"{m['msr']:#x}"} if "msr" in m else {})} for m in seen],
                "com1": bytes(runner.devices.com1).decode("utf-8", "replace")}
    if args.action == "online":
        times = {cpu: round(linux.cpus.online_cpu(cpu), 3) for cpu in args.targets}
        return {"onlined_ms": times, "linux_cpus": sorted(linux.cpus.online)}
    raise HclsimError(f"unknown action {args.action}")


def cmd_sidecar(args, config_from_args) -> int:
    from hclsim import cli
    from hclsim.cpu.fault import GuestFaultError
    from hclsim.report import boot_report, fault_report, write_outputs
    config = config_from_args(args)
    check_args(args, config)
    quiet = args.json or getattr(args, "quiet", False)
    console = cli.Console(echo=False, progress=not quiet)
    machine = cli._new_machine(config, console)
    try:
        try:
            with console.phase(f"booting {config.cpus} vCPU{'s' if config.cpus > 1 else ''}"):
                result = machine.run_to_handoff()
        except GuestFaultError as exc:
            return cli._report_fault(args, exc, fault_report(exc, config, machine))
        with console.phase(f"sidecar {args.action}"):
            out = run_action(args, machine, result)
    finally:
        machine.close()
    wrote = []
    if getattr(args, "out", None):
        h = result.handoff
        wrote = write_outputs(args.out, boot_report(result), result.serial, dtb=h.dtb, boot_params=h.boot_params,
                              shim_log=result.shim_log,
                              files={"sidecar.json": json.dumps(out, indent=2) + "\n"})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for line in render(args.action, out):
            print(line)
        if wrote:
            print(cli._wrote(wrote))
    sys.stdout.flush()
    return 0


# ---- tables -----------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list]) -> list[str]:
    """Aligned columns, a header line first (numbers right-aligned)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(r[i].replace(",", "").replace(".", "").isdigit() for r in cells)
               for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)).rstrip()
    return [line(headers)] + [line(r) for r in cells]


def _runs(values: list) -> list[tuple[int, int, object]]:
    """(first index, last index, value) of each run of equal values."""
    runs = []
    for i, v in enumerate(values):
        if runs and runs[-1][2] == v and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i, v)
        else:
            runs.append((i, i, v))
    return runs


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def render(action: str, out: dict) -> list[str]:
    """The result of an action as a person reads it."""
    from hclsim.cli import _cpu_list
    from hclsim.config import format_size
    via = {"sidecar": "through the sidecar", "linux": "through the Linux path (a Linux CPU)"}
    if action == "info":
        if not out["nodes"]:
            return [f"sidecar: {out.get('off', 'off')}", f"Linux CPUs: {_cpu_list(out['linux_cpus'])}"]
        lines = [f"sidecar: {len(out['nodes'])} node(s), {out['idle_cpus']} CPUs IDLE, Linux CPUs "
                 f"{_cpu_list(out['linux_cpus'])}; bring-up {out['bring_up_reftime_100ns'] / 10_000:.3f} ms guest time "
                 f"({out['bring_up_reftime_100ns']} x 100 ns, {out['bring_up_instructions']:,} instructions)", ""]
        rows = []
        for n in out["nodes"]:
            states = ", ".join(f"{s} {n['cpu_status'].count(s)}" for s in dict.fromkeys(n["cpu_status"]))
            rows.append([n["index"], _span(n["base_cpu"], n["base_cpu"] + n["cpu_count"] - 1), n["control_page"],
                         f"{format_size(int(n['shmem_size'], 16))} at {n['shmem_base']}", states])
        lines += table(["node", "CPUs", "control page", "shared memory", "status"], rows) + [""]
        rows = []
        linux_cpus = set(out["linux_cpus"])
        for n in out["nodes"]:
            shown = [f"{s} (a Linux CPU)" if n["base_cpu"] + i in linux_cpus else s for i, s in enumerate(n["cpu_status"])]
            for a, b, status in _runs(shown):
                rows.append([_span(n["base_cpu"] + a, n["base_cpu"] + b), n["index"], status])
        return lines + table(["CPUs", "node", "status"], rows)
    if action == "get-regs":
        return ([f"VP {out['cpu']} VTL0 registers, {via[out['path']]}:"]
                + ["  " + line for line in table(["register", "value"], [[r, v] for r, v in out["registers"].items()])])
    if action == "set-regs":
        rows = [[r, v["set"], v["read_back"], "" if v["set"] == v["read_back"] else "differs"]
                for r, v in out["registers"].items()]
        return ([f"VP {out['cpu']} VTL0 registers set {via[out['path']]}, then read back:"]
                + ["  " + line for line in table(["register", "set", "read back", ""], rows)])
    if action == "translate":
        lines = [f"VP {out['cpu']} VTL0, {via[out['path']]}: {out['explanation']}",
                 f"  result: {out['result']} ({out['result_code']}), status {out['status']}"]
        walk = out["page_walk"]
        if not walk["paging"]:
            lines.append("  paging is off in VTL0: the GVA is the GPA")
        else:
            lines.append(f"  page walk (CR3 {walk['cr3']}):")
            lines += ["    " + line for line in table(["level", "entry at", "value", "state"],
                                                       [[s["level"], s["gpa"], s["entry"] or "-", s["state"]]
                                                        for s in walk["steps"]])]
        return lines
    if action == "run-vp":
        lines = [f"VP {out['cpu']} VTL0 test guest, RUN_VP {via[out['path']]}: "
                 f"{'done' if out['done'] else 'not done'}, {len(out['intercepts'])} intercepts"]
        rows = [[i + 1, m["type"], m["rip"], " ".join(f"{k} {m[k]}" for k in ("port", "gpa", "msr") if k in m)]
                for i, m in enumerate(out["intercepts"])]
        lines += ["  " + line for line in table(["#", "intercept", "rip", "detail"], rows)]
        com1 = out["com1"].splitlines()
        lines += [f"COM1: {line}" for line in com1] or ["COM1: (nothing)"]
        return lines
    if action == "online":
        rows = [[cpu, f"{ms:.3f} ms"] for cpu, ms in out["onlined_ms"].items()]
        return table(["CPU", "onlined in"], rows) + [f"Linux CPUs: {_cpu_list(out['linux_cpus'])}"]
    return [json.dumps(out, indent=2)]
