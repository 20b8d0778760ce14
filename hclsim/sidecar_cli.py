"""`hclsim sidecar`: boot a simulation, then act on its sidecar CPUs the way the paravisor does
(INFO, GET/SET_VP_REGISTERS, TRANSLATE_GVA, RUN_VP through VTL0's intercepts, CPU online)."""
import json
import struct
import sys

import numpy as np

from hclsim import HclsimError
from hclsim.defs.hvdef import CONTROL_NAMES, GPR_NAMES, HvRegister, message_name
from hclsim.sidecar import layout as sl
from hclsim.sidecar.client import registers_request, registers_response

REGISTER_NAMES = {name: hv for hv, name in {**GPR_NAMES, **CONTROL_NAMES, HvRegister.Efer: "efer"}.items()}


def add_parser(sub, add_boot_options) -> None:
    p = sub.add_parser("sidecar", help="boot, then run sidecar commands on its CPUs")
    add_boot_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("info", help="the sidecar nodes and every CPU's status")
    g = actions.add_parser("get-regs", help="GET_VP_REGISTERS of a VP's VTL0 (e.g. get-regs 3 rip cr3)")
    g.add_argument("cpu", type=int)
    g.add_argument("registers", nargs="+", choices=sorted(REGISTER_NAMES), metavar="REG")
    s = actions.add_parser("set-regs", help="SET_VP_REGISTERS of a VP's VTL0 (e.g. set-regs 3 rax=0x10)")
    s.add_argument("cpu", type=int)
    s.add_argument("assignments", nargs="+", metavar="REG=VALUE")
    t = actions.add_parser("translate", help="TRANSLATE_GVA through a VP's VTL0 page tables")
    t.add_argument("cpu", type=int)
    t.add_argument("gva", type=lambda v: int(v, 0))
    t.add_argument("--write", action="store_true", help="validate write access")
    r = actions.add_parser("run-vp", help="run the VTL0 test guest through all its intercepts (RUN_VP on sidecar CPUs, directly on Linux CPUs)")
    r.add_argument("cpu", type=int)
    o = actions.add_parser("online", help="convert sidecar CPUs into Linux CPUs")
    o.add_argument("targets", type=int, nargs="+", metavar="CPU")


def _check(sc, page, what: str) -> None:
    if page["has_error"]:
        raise HclsimError(f"{what}: {sc.error_text(page)}")


def run_action(args, machine, result) -> dict:
    linux = result.linux
    sc = linux.sidecar
    if sc is None and args.action != "info":
        raise HclsimError("the sidecar is not running in this configuration")
    if args.action == "info":
        from hclsim.report import boot_report
        return boot_report(result)["sidecar"] or {"nodes": [], "linux_cpus": sorted(linux.cpus.online)}
    if args.action == "get-regs":
        names = [REGISTER_NAMES[r] for r in args.registers]
        page = sc.run(args.cpu, sl.COMMAND_GET_VP_REGISTERS, registers_request([(n, 0) for n in names]))
        _check(sc, page, "GET_VP_REGISTERS")
        values = registers_response(page, len(names))
        return {"cpu": args.cpu, "registers": {r: f"{v:#x}" for r, v in zip(args.registers, values)}}
    if args.action == "set-regs":
        pairs = []
        for a in args.assignments:
            name, _, value = a.partition("=")
            if name not in REGISTER_NAMES or not value:
                raise HclsimError(f"bad assignment {a!r}: use NAME=VALUE with NAME one of {', '.join(sorted(REGISTER_NAMES))}")
            pairs.append((REGISTER_NAMES[name], int(value, 0)))
        _check(sc, sc.run(args.cpu, sl.COMMAND_SET_VP_REGISTERS, registers_request(pairs)), "SET_VP_REGISTERS")
        return {"cpu": args.cpu, "set": args.assignments}
    if args.action == "translate":
        flags = (0x10 << 56) | (1 << 1 if args.write else 1 << 0)
        page = sc.run(args.cpu, sl.COMMAND_TRANSLATE_GVA, struct.pack("<QQ", args.gva >> 12, flags))
        _check(sc, page, "TRANSLATE_GVA")
        status, res, gpa_page = struct.unpack_from("<H6xQQ", bytes(np.asarray(page["request_data"])))
        code = res & 0xFFFFFFFF
        out = {"cpu": args.cpu, "gva": f"{args.gva:#x}", "status": status, "result": code}
        if status == 0 and code == 0:
            out["gpa"] = f"{(gpa_page << 12) | (args.gva & 0xFFF):#x}"
        return out
    if args.action == "run-vp":
        from hclsim.sidecar.vp_loop import vtl0_runner
        from hclsim.devices.vtl0_test import TestDevices
        if machine.vtl0_guest is None:
            raise HclsimError("no VTL0 guest is loaded")
        results = machine.vtl0_guest.results(machine.mem)
        runner = vtl0_runner(machine.linux, args.cpu, TestDevices())
        seen = runner.run_until_halted(lambda: results[args.cpu]["done"] == 1)
        rec = results[args.cpu]
        return {"cpu": args.cpu, "done": bool(rec["done"]),
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
    from hclsim.machine import Machine
    machine = Machine(config_from_args(args))
    try:
        result = machine.run_to_handoff()
        out = run_action(args, machine, result)
    finally:
        machine.close()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print(out)
    return 0


def _print(out: dict, indent: str = "") -> None:
    for key, value in out.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}:")
            for item in value:
                print(f"{indent}  - " + ", ".join(f"{k}={v}" for k, v in item.items()))
        else:
            print(f"{indent}{key}: {value}")
    sys.stdout.flush()
