"""The debugger core (hclsim.debug.target.DebugTarget) on real boots: stepping as capstone predicts
with exact instruction counts, next over calls, breakpoints by symbol / file:line / address on
the BSP and the sidecar APs, physical and virtual watchpoints, catchpoints (VTL switches through
RUN_VP, exiting instructions), registers and memory of any VP, and determinism: a boot that was
stepped, stopped and continued ends exactly like one that was not."""
import threading

import capstone
import pytest
from capstone import x86_const as csx

from hclsim.boot.layout import SHIM_LOG_MAGIC
from hclsim.boot.vtl0_guest import PML4_GPA
from hclsim.config import BootConfig
from hclsim.debug.target import DebugError, DebugTarget
from hclsim.machine import Machine
from hclsim.sidecar import layout as sl

# Counters that say which host path handled an exit (native or Python) or how often the
# block-count cache missed, not what the guest did: stepping moves exits between the paths.
HOST_PATH_COUNTERS = {"block_count_misses", "msr_fast_exits", "hypercalls_fast"}

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True


@pytest.fixture
def debug():
    """debug(**BootConfig fields) -> a DebugTarget on a fresh machine (closed afterwards)."""
    made = []

    def make(**fields):
        machine = Machine(BootConfig(**{"cpus": 4, **fields}))
        target = DebugTarget(machine)
        made.append((target, machine))
        return target
    yield make
    for target, machine in made:
        target.close()
        machine.close()


def guest_counters(counters: dict) -> dict:
    return {k: v for k, v in counters.items() if k not in HOST_PATH_COUNTERS}


def successors(target, vp: int, rip: int) -> set[int]:
    """Where the instruction at rip can go next, as capstone decodes it."""
    code = target.read_memory(vp, rip, 16)
    insn = next(_cs.disasm(code, rip))
    nxt = {rip + insn.size}
    if insn.group(csx.X86_GRP_JUMP) or insn.group(csx.X86_GRP_CALL):
        op = insn.operands[0]
        if op.type == csx.X86_OP_IMM:
            nxt = {op.imm} if insn.id in (csx.X86_INS_JMP, csx.X86_INS_CALL) else nxt | {op.imm}
        else:
            nxt = None  # indirect: anywhere
    if insn.group(csx.X86_GRP_RET):
        nxt = {int.from_bytes(target.read_memory(vp, target.registers(vp)["rsp"], 8), "little")}
    return nxt


def test_starts_at_the_shim_entry(debug):
    t = debug()
    m = t.machine
    assert t.last_stop.reason == "start" and t.last_stop.vp == 0
    assert t.last_stop.rip == m.image.shim_base + m.shim.entry == t.resolve("shim:_start")
    assert t.vp_indexes() == [0, 1, 2, 3]
    assert t.vp_label(0) == "VP 0 boot shim VTL2" and t.vp_state(1) == "not-started"
    assert t.symbolize(t.last_stop.rip) == "shim:_start"
    assert t.source_line(t.last_stop.rip)[0].endswith("boot/firmware/shim/start.S")


def test_stepi_moves_rip_as_capstone_predicts_and_counts_one_instruction(debug):
    t = debug()
    counters = t.machine.engine.counters
    for _ in range(400):
        rip = t.registers(0)["rip"]
        expected = successors(t, 0, rip)
        before = counters()["instructions"]
        stop = t.step()
        assert stop.reason == "step" and stop.vp == 0
        assert expected is None or stop.rip in expected, (hex(rip), hex(stop.rip))
        assert counters()["instructions"] == before + 1  # a REP string instruction counts as one
    assert t.symbolize(t.registers(0)["rip"]).startswith("shim:")


def test_step_count_runs_that_many_instructions(debug):
    a, b = debug(), debug()
    for _ in range(37):
        a.step()
    stop = b.step(count=37)
    assert stop.rip == a.registers(0)["rip"]
    assert a.registers(0) == b.registers(0)


def test_next_steps_over_a_call(debug):
    t = debug()
    t.add_breakpoint(t.resolve("shim_main"))
    t.cont()
    while not t.disassemble(0, t.registers(0)["rip"], 1)[0][2].startswith("call"):
        t.step()
    before = t.registers(0)
    insn = t.disassemble(0, before["rip"], 1)[0]
    count = t.machine.engine.counters()["instructions"]
    stop = t.next()
    assert stop.reason == "step" and stop.rip == before["rip"] + len(insn[1])
    assert t.registers(0)["rsp"] == before["rsp"]
    assert t.machine.engine.counters()["instructions"] > count + 2  # the callee ran
    assert t.next().reason == "step"  # not a call: a plain step


def test_break_at_symbol_file_line_and_address(debug):
    t = debug()
    shim_main = t.resolve("shim_main")
    file, line = t.source_line(shim_main)
    assert file.endswith("shim/main.c")
    with pytest.raises(DebugError, match="ambiguous"):
        t.resolve(f"main.c:{line}")  # the shim and the VTL0 guest both have a main.c
    assert t.resolve(f"shim/main.c:{line}") == shim_main
    t.add_breakpoint(t.resolve(f"shim/main.c:{line}"))
    stop = t.cont()
    assert (stop.reason, stop.vp, stop.rip) == ("breakpoint", 0, shim_main)
    t.remove_breakpoint(shim_main)
    target = t.resolve("shim:hv_confirm_isolation")
    t.add_breakpoint(t.resolve(f"{target:#x}"))
    stop = t.cont()
    assert (stop.reason, stop.rip) == ("breakpoint", target)
    assert t.cont().reason == "handoff"


def test_sidecar_ap_breakpoint_is_hit_by_the_aps(debug):
    t = debug(cpus=6)
    ap_main = t.resolve("sidecar:ap_main")
    assert ap_main >> 39 == sl.IMAGE_VA >> 39  # the high alias the sidecar runs at
    for addr in t.locations("sidecar:ap_main"):
        t.add_breakpoint(addr)
    hits = []
    while (stop := t.cont()).reason == "breakpoint":
        assert stop.rip == ap_main and t.current == stop.vp
        assert t.vp_label(stop.vp) == f"VP {stop.vp} sidecar VTL2"
        hits.append(stop.vp)
        other = t.step(stop.vp, 3)
        assert other.vp == stop.vp and other.rip != ap_main
    assert sorted(hits) == [1, 2, 3, 4, 5] and stop.reason == "handoff"


def test_watch_a_physical_range_the_shim_log(debug):
    t = debug()
    log = t.machine.layout.region("log").start
    t.add_watchpoint(log, 4, "w", physical=True)
    stop = t.cont()
    assert (stop.reason, stop.vp, stop.watch_address, stop.watch_kind) == ("watchpoint", 0, log, "w")
    assert int.from_bytes(t.read_memory(0, log, 4, physical=True), "little") == SHIM_LOG_MAGIC
    writer = int(stop.detail.rsplit(" ", 1)[1], 16)
    insn = t.disassemble(0, writer, 1)[0]
    assert insn[2].startswith("mov") and writer + len(insn[1]) == stop.rip  # stopped right after it
    t.remove_watchpoint(log, 4, "w", physical=True)
    assert t.cont().reason == "handoff"


def test_watch_a_virtual_range_a_sidecar_variable(debug):
    t = debug()
    node_count = t.resolve("sidecar:node_count")  # in the sidecar's BSS, at its high alias
    t.add_watchpoint(node_count, 4, "w")
    stop = t.cont()
    assert (stop.reason, stop.vp, stop.watch_address) == ("watchpoint", 0, node_count)
    assert t.symbolize(stop.rip).startswith("sidecar:sidecar_main")
    assert t.read_memory(0, node_count, 4) == (1).to_bytes(4, "little")
    t.remove_watchpoint(node_count, 4, "w")
    t.add_watchpoint(node_count, 4, "r")
    stop = t.cont()
    assert (stop.reason, stop.watch_kind) == ("watchpoint", "r") and "read of 4 bytes" in stop.detail
    with pytest.raises(DebugError, match="no rwatch"):
        t.remove_watchpoint(node_count, 8, "r")


def test_catch_vtl_switch_when_the_host_runs_a_vp(debug):
    t = debug(cpus=8)
    assert t.cont().reason == "handoff"
    assert t.vp_label(0) == "VP 0 Linux" and t.vp_state(0) == "external"
    assert t.vp_label(5) == "VP 5 sidecar VTL2 halted"
    with pytest.raises(DebugError, match="Linux stand-in"):
        t.step(0)
    t.break_on("vtl-switch")
    t.machine.linux.sidecar.start(3, sl.COMMAND_RUN_VP)  # the host's RUN_VP: VTL return on CPU 3
    stop = t.cont()
    assert (stop.reason, stop.vp) == ("event", 3) and "VTL return" in stop.detail
    regs = t.registers(3)
    assert regs["rip"] == t.machine.vtl0_guest.entry == stop.rip and regs["cr3"] == PML4_GPA
    assert t.vp_label(3) == "VP 3 sidecar VTL0" and t.symbolize(stop.rip) == "vtl0:vtl0_entry"
    stop = t.cont()  # VTL0's first intercept enters VTL2 again
    assert (stop.reason, stop.vp) == ("event", 3) and "intercept in VTL0" in stop.detail
    assert t.vp_label(3) == "VP 3 sidecar VTL2" and t.symbolize(stop.rip).startswith("sidecar:")
    assert t.cont().reason == "idle"  # the sidecar reported the intercept; the host has not answered


@pytest.mark.parametrize("kind,mnemonic", [("cpuid", "cpuid"), ("msr", "rdmsr"), ("io", "out"),
                                           ("hypercall", "vmcall"), ("hlt", "hlt")])
def test_catch_exit_stops_before_the_instruction(debug, kind, mnemonic):
    t = debug()
    t.break_on(kind)
    stop = t.cont()
    assert stop.reason == "event" and stop.detail.startswith(f"catch exit {kind}")
    insn = t.disassemble(stop.vp, stop.rip, 1)[0]
    assert insn[2].split()[0] in (mnemonic, "wrmsr")
    t.break_on(kind, False)
    after = t.step(stop.vp)  # the caught instruction runs on resuming
    assert after.reason == "step" and after.rip == stop.rip + len(insn[1])


def test_unknown_event_and_locations(debug):
    t = debug()
    with pytest.raises(DebugError, match="unknown event"):
        t.break_on("syscall")
    with pytest.raises(DebugError, match="unknown symbol"):
        t.resolve("no_such_function")
    with pytest.raises(DebugError, match="shim and sidecar"):
        t.resolve("memset")
    assert t.resolve("sidecar:memset") != t.resolve("shim:memset")
    assert t.resolve("$rip+4") == t.registers(0)["rip"] + 4
    with pytest.raises(DebugError, match="no VP 9"):
        t.registers(9)


def test_registers_of_any_vp_loaded_or_saved(debug):
    t = debug()
    t.add_breakpoint(t.resolve("sidecar:ap_main"))
    stop = t.cont()
    ap = stop.vp
    assert ap != 0 and t.machine.scheduler.loaded.index == ap
    bsp = t.registers(0)  # saved context, lent to the engine for the read
    assert bsp["efer"] == 0xD00 and bsp["cr0"] & 0x80000001 == 0x80000001 and bsp["cr3"]
    assert t.symbolize(bsp["rip"]).startswith("sidecar:")  # the BSP waits in sidecar_main
    regs = t.registers(ap)
    assert regs["rip"] == stop.rip and regs["cr3"] != bsp["cr3"]  # each AP has its own page tables
    t.set_register(0, "r12", 0x1234)
    assert t.registers(0)["r12"] == 0x1234 and t.registers(ap)["rip"] == stop.rip
    t.set_register(0, "r12", bsp["r12"])
    assert t.registers(3) == t.registers(3) and t.vp_state(3) in ("not-started", "runnable", "halted")
    with pytest.raises(DebugError, match="unknown register"):
        t.set_register(0, "xmm0", 1)


def test_memory_page_walk_and_code_writes(debug):
    t = debug()
    start = t.registers(0)["rip"]
    assert t.read_memory(0, start, 4) == t.read_memory(0, start, 4, physical=True)  # identity map
    rows = t.page_walk(0, start)
    assert [r[0] for r in rows][:2] == ["PML4E", "PDPTE"] and all(v & 1 for _, _, v in rows)
    with pytest.raises(DebugError, match="not mapped"):
        t.read_memory(0, 0x7FFF_0000_0000, 8)
    with pytest.raises(DebugError, match="outside guest RAM"):
        t.read_memory(0, 1 << 40, 8, physical=True)
    t.step()  # the first block is translated now
    original = t.read_memory(0, start + 1, 3)  # mov r15, rsi
    t.write_memory(0, start + 1, b"\x90\x90\x90")
    assert t.step().rip == start + 2  # the new code runs, not the translated old one
    t.write_memory(0, start + 1, original)


def test_a_guest_fault_is_reported_and_the_target_goes_on(debug):
    t = debug()
    t.set_register(0, "rip", 0xDEAD00000000)
    stop = t.step()
    assert stop.reason == "fault" and "\n" not in stop.detail and "#GP" in stop.detail
    assert "registers:" in t.last_fault_report
    t.set_register(0, "rip", t.resolve("shim:_start"))
    assert t.step().reason == "step"


def test_interrupt_from_another_thread(debug):
    t = debug(cpus=64, numa_nodes=2)
    t.add_watchpoint(0x7000, 8, "w", physical=True)  # nothing writes there; it slows the run down
    threading.Timer(0.01, t.interrupt).start()
    stop = t.cont()
    assert stop.reason == "interrupted"
    t.remove_watchpoint(0x7000, 8, "w", physical=True)
    assert t.cont().reason == "handoff"


def test_stepped_and_continued_boot_ends_like_a_plain_boot():
    config = BootConfig(cpus=16, numa_nodes=2)
    machine = Machine(config)
    plain = machine.run_to_handoff()
    machine.close()
    machine = Machine(config)
    t = DebugTarget(machine)
    try:
        for count in (1, 1, 5, 50):
            t.step(count=count)
        log = machine.layout.region("log").start
        t.add_watchpoint(log, 8, "w", physical=True)
        assert t.cont().reason == "watchpoint"
        t.remove_watchpoint(log, 8, "w", physical=True)
        ap_main = t.resolve("sidecar:ap_main")
        t.add_breakpoint(ap_main)
        hits = 0
        while (stop := t.cont()).reason == "breakpoint":
            hits += 1
            t.step(count=7)
            t.next()
            t.step(count=13)
        assert (stop.reason, hits) == ("handoff", 14)  # VP 8 starts node 1: a Linux CPU
        debugged = t.boot_result
        assert guest_counters(debugged.counters) == guest_counters(plain.counters)
        assert debugged.serial == plain.serial and debugged.shim_log == plain.shim_log
        assert debugged.handoff.dtb == plain.handoff.dtb
    finally:
        t.close()
        machine.close()


@pytest.mark.parametrize("spec", ["SHIM", "SIDECAR", "VTL0_GUEST"])
def test_firmware_has_no_line_rows_of_discarded_code(spec):
    """--gc-sections drops unused functions but keeps their DWARF line rows at address 0, where
    gdb and `hclsim step` would then show them at the entry point: keep firmware free of them."""
    from elftools.elf.elffile import ELFFile

    from hclsim.boot import firmware
    with open(firmware.build(getattr(firmware, spec)), "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        at_zero = set()
        for cu in dwarf.iter_CUs():
            lp = dwarf.line_program_for_CU(cu)
            for entry in lp.get_entries():
                if entry.state is not None and entry.state.address == 0 and not entry.state.end_sequence:
                    at_zero.add(lp["file_entry"][entry.state.file - 1].name.decode()
                                if lp.header.version < 5 else lp["file_entry"][entry.state.file].name.decode())
    assert at_zero <= {"start.S", "entry.S"}, at_zero
