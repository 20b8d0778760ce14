"""`hclsim boot --linux real` (hclsim/real_linux.py): the Debian kernel takes the boot shim's
handoff on the same engine and boots to the shipped /init (boot/firmware/init), which prints what
Linux shows userspace; that is held against what the shim built. Two runs give the same console
and instruction counts. Also the engine pieces on small guests: the deadline and virtual RDTSC."""
import json
import re
import subprocess
import sys

import pytest

from hclsim.config import BootConfig
from hclsim.cpu import engine as eng
from hclsim.cpu import fastpath as fp
from hclsim.cpu.cpuid import build_cpuid_table
from hclsim.cpu.memory import GuestMemory
from hclsim.cpu.virtual_tsc import VirtualTsc
from hclsim.machine import Machine
from hclsim.real_linux import RealLinux
from hclsim.real_linux_cli import real_config
from tests.asmutil import assemble


def _boot(kernel, **changes):
    config = real_config(BootConfig(cpus=1, kernel=str(kernel), linux="real", timeout=300, **changes))
    machine = Machine(config)
    try:
        result = machine.run_to_handoff()
        return result, RealLinux(machine).run(timeout=config.timeout)
    finally:
        machine.close()


@pytest.fixture(scope="module")
def booted(real_kernel):
    return _boot(real_kernel)


def _init_lines(outcome) -> dict:
    lines = {}
    for line in outcome.console.decode("utf-8", "replace").splitlines():
        if line.startswith("init: "):
            key, _, value = line[len("init: "):].partition(" ")
            lines.setdefault(key, []).append(value)
    return lines


def test_the_kernel_boots_to_init_through_every_milestone_and_halts(booted):
    _result, outcome = booted
    names = [m.name for m in outcome.milestones]
    for name in ("linux_version", "command_line", "e820", "smpboot", "free_initmem", "run_init", "init", "halted"):
        assert name in names, (name, outcome.console[-2000:])
    assert outcome.status == "halted" and outcome.panic is None
    counts = [m.instructions for m in outcome.milestones]
    assert counts == sorted(counts) and counts[-1] <= outcome.instructions
    assert outcome.exceptions.get(14, 0) > 0 and outcome.syscalls > 50 and outcome.interrupts > 10
    assert outcome.tsc_reads > 0                       # the TSC is virtual, read through the hooks


def test_init_sees_what_the_shim_built(booted):
    result, outcome = booted
    init = _init_lines(outcome)
    assert init["pid"] == ["1"] and init["machine"] == ["x86_64"] and "poweroff" in init
    assert init["cmdline"] == [result.handoff.cmdline] == [outcome.command_line]
    # /sys/firmware/memmap is the e820 map the shim gave (inclusive ends), in order.
    e820 = [(e.addr, e.end - 1, "System RAM" if e.type == 1 else "Reserved") for e in result.handoff.e820]
    memmap = [tuple(v.split(" ", 3)[1:]) for v in init["memmap"]]
    assert [(int(a, 16), int(b, 16), t) for a, b, t in memmap] == e820
    printed = [re.match(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\]", line).groups() for line in outcome.e820]
    assert [(int(a, 16), int(b, 16)) for a, b in printed] == [(a, b) for a, b, _ in e820]
    ram = sum(b - a + 1 for a, b, t in e820 if t == "System RAM")
    memtotal = int(init["memtotal"][0].split()[0]) * 1024
    assert ram // 2 < memtotal < ram                    # the kernel's own image and reservations aside
    assert init["cpus-online"] == ["0"]


def test_two_runs_give_the_same_console_and_instruction_counts(booted, real_kernel):
    _result, first = booted
    _result, second = _boot(real_kernel)
    assert second.console == first.console
    assert second.instructions == first.instructions
    assert [(m.name, m.instructions) for m in second.milestones] == [(m.name, m.instructions) for m in first.milestones]


def test_hclsim_boot_linux_real_writes_the_milestones_to_report_json(real_kernel, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "hclsim", "boot", "--linux", "real", "--kernel", str(real_kernel),
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the real kernel halted after" in done.stdout and "run_init" in done.stdout
    report = json.loads((out / "report.json").read_text())
    real = report["real_linux"]
    assert real["status"] == "halted" and real["instructions"] > 10**8
    assert {m["name"] for m in real["milestones"]} >= {"linux_version", "run_init", "halted"}
    assert b"init: poweroff" in (out / "serial.log").read_bytes()


def test_linux_real_needs_a_kernel_and_not_the_paravisors_options(tmp_path):
    for args, words in ((["--linux", "real"], "needs --kernel BZIMAGE"),
                        (["--linux", "real", "--kernel", "x", "--tpm"], "needs --kernel BZIMAGE"),
                        (["--linux", "real", "--kernel", sys.executable, "--until", "handoff"], "drop --until")):
        done = subprocess.run([sys.executable, "-m", "hclsim", "boot", *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and words in done.stderr and done.stderr.count("\n") == 1, done.stderr


# ---- the engine's pieces, on a small guest ------------------------------------------------------
def _engine(source: str):
    mem = GuestMemory(1 << 20)
    mem.write(0x1000, assemble(source))
    e = eng.Engine(mem, build_cpuid_table(0, 1), io_handler=lambda *a: 0, hypercall_handler=lambda en: None)
    e.state.buf[fp.H_PAGING] = 0
    e.uc.ctl_exits_enabled(False)
    e.set_reg("rip", 0x1000)
    e.set_reg("rsp", 0x8000)
    return mem, e


LOOP = "mov ecx, 100000\n1: dec ecx\n jnz 1b\n hlt"


def test_the_deadline_ends_the_run_at_an_instruction_count():
    _mem, whole = _engine(LOOP)
    assert whole.run().kind == eng.EXIT_HLT
    _mem, e = _engine(LOOP)
    e.state.buf[fp.H_DEADLINE] = 1000
    exit = e.run()
    assert exit.kind == eng.EXIT_STOP and exit.stop_reason == eng.STOP_DEADLINE
    assert 1000 <= e.counters()["instructions"] < 1010          # the block that crossed it finishes
    assert e.state.buf[fp.H_DEADLINE] == 0                      # one shot
    assert e.run().kind == eng.EXIT_HLT
    # Stopped and resumed, the count is within a block of the run's without a stop (Unicorn
    # translates the resumed loop's first block anew, from the instruction it stopped at).
    assert abs(e.counters()["instructions"] - whole.counters()["instructions"]) <= 2


@pytest.mark.parametrize("checks", [True, False], ids=["exit-checks", "no-exit-checks"])
def test_rdtsc_reads_the_instructions_retired_plus_the_skipped_idle_time(checks):
    source = "mov ecx, 500\n1: dec ecx\n jnz 1b\n rdtsc\n mov r8, rax\n mov r9, rdx\n rdtscp\n mov r10, rax\n hlt"
    _mem, e = _engine(source)
    assert e.set_memory_exit_checks(checks)
    tsc = VirtualTsc(e)
    tsc.on()
    e.state.buf[fp.H_TSC_IDLE] = 7 << 32                        # time a halted guest skipped
    exit = e.run()                                              # no stop: the hooks answer in the run
    assert exit.kind == eng.EXIT_HLT
    at = e.counters()["instructions"]
    r8, r9, r10, rcx = (e.reg(n) for n in ("r8", "r9", "r10", "rcx"))
    assert r9 == 7 and 990 < r8 <= r10 <= at and rcx == 0        # the count where each run began
    assert tsc.reads == 2
    tsc.off()
    e.set_reg("rip", 0x1000)
    e.run()
    assert tsc.reads == 2 and e.reg("r9") != 7                  # off: the host's TSC again (QEMU's)


def test_a_kernel_without_an_init_panics_and_the_run_says_so(real_kernel):
    done = subprocess.run([sys.executable, "-m", "hclsim", "boot", "--linux", "real", "--kernel", str(real_kernel),
                           "--no-initrd", "--quiet", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "the kernel did not finish cleanly: panic: Kernel panic - not syncing: No working " \
        "init found" in errors[0]
    real = json.loads(done.stdout)["real_linux"]
    assert real["status"] == "panic" and real["panic"].startswith("Kernel panic - not syncing: No working init found")
    assert "Run /sbin/init as init process" in {m["line"] for m in real["milestones"]}   # the fallbacks tried


# ---- gdb follows into the kernel ----------------------------------------------------------------
def _rip_at(kernel, instructions: int) -> int:
    """Where the kernel stands after `instructions` (a deadline stop: the same in every run)."""
    from hclsim.cpu import fastpath as fpath
    config = real_config(BootConfig(cpus=1, kernel=str(kernel), linux="real"))
    machine = Machine(config)
    try:
        machine.run_to_handoff()
        run = RealLinux(machine)
        run.start()
        e = machine.engine
        e.state.buf[fpath.H_DEADLINE] = e.state.buf[fpath.H_ICOUNT] + instructions
        x = e.run()
        assert x.kind == eng.EXIT_STOP and x.stop_reason == eng.STOP_DEADLINE
        rip = e.reg("rip")
        run.finish("interrupted", "")
        return rip
    finally:
        machine.close()


def test_gdb_follows_the_shim_into_the_real_kernel(real_kernel):
    import threading
    from hclsim.debug.gdbserver import GdbServer
    from hclsim.debug.kernel_target import RealLinuxTarget
    from tests.tools import require
    address = _rip_at(real_kernel, 150_000_000)
    assert address >> 48 == 0xFFFF                                  # kernel text
    config = real_config(BootConfig(cpus=1, kernel=str(real_kernel), linux="real"))
    machine = Machine(config)
    logs, status = [], {}
    server = GdbServer(RealLinuxTarget(machine), "127.0.0.1", 0, wait=True, log=logs.append)
    thread = threading.Thread(target=lambda: status.update(exit=server.serve()), daemon=True)
    thread.start()
    try:
        args = [require("gdb"), "-batch", "-nx", "-ex", "set architecture i386:x86-64",
                "-ex", f"target remote 127.0.0.1:{server.address[1]}", "-ex", f"break *{address:#x}",
                "-ex", "continue", "-ex", "continue", "-ex", "p/x $pc", "-ex", "p/x $cs", "-ex", "stepi",
                "-ex", "p/x $pc", "-ex", "delete", "-ex", "continue"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        thread.join(timeout=120)
    finally:
        server.close()
        thread.join(timeout=10)
        server.target.close()
        machine.close()
    assert "the real kernel runs VP 0" in text, text                 # the handoff, said on gdb's console
    assert re.search(rf"Breakpoint 1, 0x0*{address:x} ", text), text
    pcs = [int(v, 16) for v in re.findall(r"\$\d+ = (0x[0-9a-f]+)", text)]
    assert pcs[0] == address and pcs[1] == 0x10 and pcs[2] != address   # in ring 0; stepi moved on
    assert "exited normally" in text and status.get("exit") == 0     # the kernel halted: the process ended
    assert any("the real kernel halted" in line for line in logs), logs


def test_gdb_breaks_on_the_kernels_own_symbols(real_kernel):
    """The kernel's symbols from its kallsyms reach gdb as a shared library: break by name."""
    import threading
    from hclsim.debug.gdbserver import GdbServer
    from hclsim.debug.kernel_target import RealLinuxTarget
    from tests.tools import require
    config = real_config(BootConfig(cpus=1, kernel=str(real_kernel), linux="real"))
    machine = Machine(config)
    status = {}
    server = GdbServer(RealLinuxTarget(machine), "127.0.0.1", 0, wait=True)
    thread = threading.Thread(target=lambda: status.update(exit=server.serve()), daemon=True)
    thread.start()
    try:
        args = [require("gdb"), "-batch", "-nx", "-ex", f"file {machine.shim_path}", "-ex", "set breakpoint pending on",
                "-ex", f"target remote 127.0.0.1:{server.address[1]}", "-ex", "break start_kernel",
                "-ex", "continue", "-ex", "continue", "-ex", "bt", "-ex", "kill"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
    finally:
        server.close()
        thread.join(timeout=10)
        server.target.close()
        machine.close()
    assert re.search(r"Breakpoint 1, 0x[0-9a-f]+ in start_kernel \(\)", text), text
    assert re.search(r"#1 +0x[0-9a-f]+ in secondary_startup_64\w* \(\)", text), text   # its caller, named


def test_hclsim_step_breaks_on_the_kernels_own_symbols(real_kernel):
    done = subprocess.run([sys.executable, "-m", "hclsim", "step", "--quiet", "--linux", "real", "--kernel",
                           str(real_kernel), "-x", "break start_kernel", "-x", "continue", "-x", "continue",
                           "-x", "x/2i $pc"], capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert re.search(r"kernel symbols from kallsyms", out), out
    assert re.search(r"Breakpoint 1, VP 0 stopped at 0xffffffff[0-9a-f]{8} <linux:start_kernel>", out), out
    assert re.search(r"<linux:start_kernel\+0x[0-9a-f]+>:", out), out          # the disassembly named too


def test_with_hyperv_the_kernel_takes_its_hyper_v_path_to_init(real_kernel):
    """--hyperv: the Hyper-V leaves shown, the synthetic MSRs served by the hypervisor model; the
    kernel runs on the reference TSC page's clock and still boots to /init."""
    done = subprocess.run([sys.executable, "-m", "hclsim", "boot", "--linux", "real", "--hyperv", "--kernel",
                           str(real_kernel), "--quiet", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    real = json.loads(done.stdout)["real_linux"]
    lines = {m["line"] for m in real["milestones"]}
    assert real["status"] == "halted" and "init: poweroff" in lines
    assert real["synthetic_msrs"]["reads"] >= 1 and real["synthetic_msrs"]["refused"] == 0
    plain = subprocess.run([sys.executable, "-m", "hclsim", "boot", "--hyperv"], capture_output=True, text=True,
                           timeout=60)
    assert plain.returncode != 0 and "needs --linux real" in plain.stderr


def test_the_hyper_v_path_uses_the_reference_tsc_page(real_kernel):
    config = real_config(BootConfig(cpus=1, kernel=str(real_kernel), linux="real", hyperv=True))
    machine = Machine(config)
    try:
        machine.run_to_handoff()
        outcome = RealLinux(machine, hyperv=True).run(timeout=300)
    finally:
        machine.close()
    text = outcome.console.decode("utf-8", "replace")
    assert "Hypervisor detected: Microsoft Hyper-V" in text
    assert "Switched to clocksource hyperv_clocksource_tsc_page" in text
    assert outcome.status == "halted"


def test_hclsim_step_follows_into_the_real_kernel(real_kernel):
    address = _rip_at(real_kernel, 150_000_000)
    done = subprocess.run([sys.executable, "-m", "hclsim", "step", "--quiet", "--linux", "real", "--kernel",
                           str(real_kernel), "-x", f"break *{address:#x}", "-x", "continue", "-x", "continue",
                           "-x", "info registers rip cs", "-x", "stepi", "-x", "x/2i $pc"],
                          capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert "the real kernel runs VP 0" in out and f"Breakpoint 1, VP 0 stopped at {address:#x}" in out, out
    assert re.search(r"cs +0x10 ", out) and re.search(rf"=> {address:#x}( <linux:\S+>)?:\t\S", out), out   # disassembled live
    stops = re.findall(r"VP 0 stopped at (0xffffffff[0-9a-f]{8})( <linux:\S+>)?\n", out)
    stops = [at for at, _sym in stops]
    assert stops[0] == f"{address:#x}" and int(stops[1], 16) != address, out   # stepi moved on


def test_a_run_stopped_and_stepped_under_the_debugger_ends_as_one_without_it(booted, real_kernel):
    """Breakpoints and steps give back what a stopped block did not run: the kernel's virtual
    time, so its console and instruction count, are those of the run without a debugger."""
    from hclsim.debug.kernel_target import RealLinuxTarget
    _result, plain = booted
    address = _rip_at(real_kernel, 150_000_000)
    config = real_config(BootConfig(cpus=1, kernel=str(real_kernel), linux="real"))
    machine = Machine(config)
    target = RealLinuxTarget(machine)
    try:
        assert target.cont().reason == "handoff"
        target.add_breakpoint(address)
        assert target.cont().rip == address
        for _ in range(3):
            target.step()
        target.remove_breakpoint(address)
        end = target.cont()
        assert end.reason == "idle" and target.vp_state(0) == "external"
        outcome = target.outcome
    finally:
        target.close()
        machine.close()
    assert outcome.console == plain.console and outcome.instructions == plain.instructions
