"""`hclsim step`: the gdb-like prompt, scripted (-x, --script) as a user runs it, and its commands
in process (StepShell over a StringIO)."""
import io
import re
import subprocess
import sys

import pytest

from hclsim.config import BootConfig
from hclsim.debug.target import DebugTarget
from hclsim.machine import Machine
from hclsim.step_cli import StepShell


def hclsim_step(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hclsim", "step", "--quiet", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def log_gpa() -> int:
    """GPA of the shim's log buffer (its first write: SHIM_LOG_MAGIC), from the image layout."""
    m = Machine(BootConfig(cpus=4))
    try:
        return m.image.log_gpa
    finally:
        m.close()


@pytest.fixture
def shell():
    """shell(*commands, cpus=4, **BootConfig fields) -> the output of running them at a fresh prompt."""
    made = []

    def run(*commands, cpus=4, **config):
        machine = Machine(BootConfig(cpus=cpus, **config))
        target = DebugTarget(machine)
        out = io.StringIO()
        sh = StepShell(target, out, 30)
        made.append((target, machine))
        for command in commands:
            sh.onecmd(command)
        sh.output = out.getvalue()
        return sh
    yield run
    for target, machine in made:
        target.close()
        machine.close()


def test_scripted_session_breaks_at_shim_main():
    proc = hclsim_step("-x", "break shim_main", "-x", "continue", "-x", "info registers rip cr3 efer", "-x", "quit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("VP 0 stopped at 0x") and "<shim:_start> shim/start.S:" in out.splitlines()[0]
    assert re.search(r"^Breakpoint 1 at 0x[0-9a-f]+ <shim:shim_main> shim/main\.c:\d+$", out, re.M)
    assert re.search(r"^Breakpoint 1, VP 0 stopped at 0x[0-9a-f]+ <shim:shim_main> shim/main\.c:\d+$", out, re.M)
    assert re.search(r"^=> 0x[0-9a-f]+ <shim:shim_main>:\t\w+", out, re.M)
    assert re.search(r"^rip +0x[0-9a-f]+ +<shim:shim_main>$", out, re.M)
    assert re.search(r"^efer +0xd00$", out, re.M) and re.search(r"^cr3 +0x[0-9a-f]+$", out, re.M)
    assert "Traceback" not in proc.stderr


def test_bad_commands_give_one_error_line_and_the_session_goes_on(tmp_path):
    script = tmp_path / "cmds"
    script.write_text("# comment\nfrobnicate\nbreak no_such_function\nx/4q 0x1000\nstepi 2\n")
    proc = hclsim_step("--script", str(script), "-x", "info registers rip")
    assert proc.returncode == 1  # a command failed
    lines = proc.stdout.splitlines()
    errors = [l for l in lines if l.startswith("error: ")]
    assert errors == ["error: unknown command 'frobnicate' (help lists the commands)",
                      "error: unknown symbol or address 'no_such_function'",
                      "error: bad x format /4q: count, then a format (xduotacsi) and a size (bhwg)"]
    assert any(l.startswith("VP 0 stopped at") and "_start+0x4" in l for l in lines)  # stepi 2 ran
    assert any(l.startswith("rip ") for l in lines)
    assert "Traceback" not in proc.stdout + proc.stderr


def test_stepi_nexti_and_the_stop_lines(shell):
    sh = shell("stepi", "si 3", "break shim_main", "c", "nexti 2")
    out = sh.output.splitlines()
    assert out[0].startswith("VP 0 stopped at ") and "<shim:_start+0x1> shim/start.S:" in out[0]
    assert out[1].startswith("=> ") and out[1].endswith("\tmov r15, rsi")
    assert any(line.startswith("VP 0 stopped at ") and "<shim:_start+0x12>" in line for line in out)  # si 3
    assert not sh.failed and sh.target.last_stop.reason == "step"


def test_x_formats(shell):
    sh = shell("break shim_main", "continue", "x/4gx $rsp", "x/8xb $rsp", "x/2dw $rsp", "x/3i $rip",
               "x/4gx -phys 0x8500000", "x/2a $rsp", "x/2c shim:_start", "x/s shim:line_buf", "x/uh $rsp")
    assert not sh.failed, sh.output
    out = sh.output
    assert re.search(r"^0x[0-9a-f]+ <[^>]+>:\t0x[0-9a-f]{16}\t0x[0-9a-f]{16}$", out, re.M)     # x/4gx: 2 a line
    assert re.search(r"^0x[0-9a-f]+ <[^>]+>:(\t0x[0-9a-f]{2}){8}$", out, re.M)                 # x/8xb
    assert re.search(r"^0x[0-9a-f]+ <[^>]+>:\t-?\d+\t-?\d+$", out, re.M)                        # x/2dw
    assert re.search(r"^=> 0x[0-9a-f]+ <shim:shim_main>:\tpush r15$", out, re.M)                # x/3i
    assert re.search(r"^   0x[0-9a-f]+ <shim:shim_main\+0x2>:\t", out, re.M)
    assert re.search(r"^0x8500000 \(phys\):\t0x[0-9a-f]{16}\t0x[0-9a-f]{16}$", out, re.M)       # x/4gx -phys
    assert re.search(r"^0x[0-9a-f]+ <shim:_start>:\t252 '\\xfc'\t73 'I'$", out, re.M)          # cld; REX.WB
    assert re.search(r"^0x[0-9a-f]+ <shim:line_buf>:\t'", out, re.M)


def test_breakpoints_threads_and_a_sidecar_ap(shell):
    sh = shell("break sidecar:ap_main", "continue", "info threads", "thread 1", "info breakpoints",
               "delete 1", "info breakpoints", "thread 3", "stepi", cpus=4)
    assert not sh.failed, sh.output
    out = sh.output
    assert re.search(r"^Breakpoint 1 at 0xffffff8000[0-9a-f]+ <sidecar:ap_main> sidecar/vp\.c:\d+ \(and 1 alias\)$",
                     out, re.M)
    assert re.search(r"^Breakpoint 1, VP 1 stopped at 0xffffff8000[0-9a-f]+ <sidecar:ap_main>", out, re.M)
    # gdb's thread numbering, as the gdb stub's: thread N is VP N-1
    assert re.search(r"^\* 2    VP 1 sidecar VTL2 +0xffffff8000[0-9a-f]+ <sidecar:ap_main>", out, re.M)
    assert re.search(r"^  1    VP 0 boot shim VTL2 +0x[0-9a-f]+ <sidecar:sidecar_main\+0x", out, re.M)
    assert "[Current thread is 1 (VP 0 boot shim VTL2)]" in out
    assert re.search(r"^1    breakpoint +0xffffff8000[0-9a-f]+ <sidecar:ap_main>", out, re.M)
    assert "No breakpoints, watchpoints or catchpoints." in out
    assert sh.target.current == 2 or "VP 2 is not-started" in out  # VP 2 may not be started yet


def test_watchpoints(shell, log_gpa):
    g = f"{log_gpa:#x}"
    sh = shell(f"watch -phys {g} 4", "continue", "delete", "watch sidecar:node_count 4", "continue",
               "info breakpoints", f"rwatch phys {g}", f"awatch {g} 2")
    assert not sh.failed, sh.output
    out = sh.output
    assert f"Hardware watchpoint 1: phys {g} len 4" in out
    assert re.search(rf"^Hardware watchpoint 1: watch phys {g} len 4: write of 4 bytes at {g}: "
                     r"0x0 -> 0x474f4c53 by the instruction at 0x[0-9a-f]+$", out, re.M)
    assert re.search(r"^VP 0 stopped at 0x[0-9a-f]+ <shim:log_init\+0x[0-9a-f]+> shim/log\.c:\d+$", out, re.M)
    assert re.search(r"^Hardware watchpoint 2: watch 0xffffff8000[0-9a-f]+ len 4: write of 4 bytes", out, re.M)
    assert re.search(r"^2    hw watchpoint   0xffffff8000[0-9a-f]+ len 4$", out, re.M)
    assert f"Hardware read watchpoint 3: phys {g} len 8" in out
    assert f"Hardware access (read/write) watchpoint 4: {g} len 2" in out


def test_catch_pagewalk_disassemble_and_list(shell):
    sh = shell("catch exit cpuid", "continue", "info pagewalk $rip", "disassemble", "list",
               "disassemble shim_main 3", "catch exit bogus")
    out = sh.output
    assert re.search(r"^Catchpoint 1 \(catch exit cpuid: leaf 0x40000000\), VP 0 stopped at", out, re.M)
    assert re.search(r"^  PML4E at 0x[0-9a-f]+ = 0x[0-9a-f]{16} \(present", out, re.M)
    assert re.search(r"^  -> GPA 0x[0-9a-f]+$", out, re.M)
    assert re.search(r"^=> 0x[0-9a-f]+ <shim:hv_confirm_isolation\+0xa>:\tcpuid$", out, re.M)
    assert re.search(r"^   shim/hv\.c:\d+$", out, re.M)                     # source lines in the disassembly
    assert re.search(r"^\d+ +> ", out, re.M)                               # list marks RIP's line
    assert re.search(r"^   0x[0-9a-f]+ <shim:shim_main\+0x4>:\tpush r13$", out, re.M)
    assert out.splitlines()[-1].startswith("error: usage: catch vtl-switch")


def test_catch_vtl_switch_with_run_vp(shell):
    sh = shell("continue", "sidecar start-vp 3", "catch vtl-switch", "continue", "info registers rip cr3",
               "catch intercept", "continue", cpus=8)
    assert not sh.failed, sh.output
    out = sh.output
    assert "VP 0 reached the kernel entry" in out and "RUN_VP started on CPU 3" in out
    assert re.search(r"^Catchpoint 1 \(VTL return: the VP runs VTL0\), VP 3 stopped at 0x200000 <vtl0:vtl0_entry>",
                     out, re.M)
    assert re.search(r"^cr3 +0x1000$", out, re.M)
    assert re.search(r"^Catchpoint 1 \(VTL entry: \w+ intercept in VTL0 at 0x[0-9a-f]+\), VP 3 stopped at", out, re.M)


def test_sidecar_run_vp_at_the_prompt_shows_intercepts_and_com1(shell):
    sh = shell("continue", "sidecar run-vp 3", "sidecar run-vp 0", cpus=4, vtl0_iterations=2)
    out = sh.output
    assert not sh.failed, out
    assert re.search(r"^CPU 3: \d+ intercepts, VTL0 done$", out, re.M)
    assert re.search(r"^  cpuid at 0x[0-9a-f]+ <vtl0:step_cpuid", out, re.M)
    assert re.search(r"^  io-port at 0x[0-9a-f]+ <vtl0:step_port_out.* port=0x440$", out, re.M)
    assert re.search(r"^  unmapped-gpa at 0x[0-9a-f]+ <vtl0:.* gpa=0xfed000c0$", out, re.M)   # VP 3's MMIO slot
    assert re.search(r"^  io-port at 0x[0-9a-f]+ <vtl0:step_loop.* port=0x444$", out, re.M)
    assert re.search(r"^  io-port at 0x[0-9a-f]+ <vtl0:step_power_off.* port=0x404$", out, re.M)
    assert "COM1: hello from VTL0 vp 3\nCOM1: vp 3 done\n" in out   # every VP says hello, then done
    assert re.search(r"^CPU 0: \d+ intercepts, VTL0 done$", out, re.M)   # the BSP, a Linux CPU
    assert "COM1: hello from VTL0 vp 0\nCOM1: vp 0 done\n" in out


def test_a_guest_fault_prints_the_report_and_keeps_the_prompt(shell):
    sh = shell("set $rip = 0xdead00000000", "stepi", "info registers rip", "set $rip = shim:_start", "stepi")
    out = sh.output
    assert re.search(r"^guest fault: #\w+ at RIP 0xdead00000000: ", out, re.M)
    assert "registers:" in out and "code:" in out
    assert re.search(r"^VP 0 stopped at 0x[0-9a-f]+ <shim:_start\+0x1>", out, re.M)
    assert sh.faulted and not sh.failed


def test_step_is_a_subcommand_with_the_boot_options():
    from hclsim.cli import build_parser
    args = build_parser().parse_args(["step", "--cpus", "8", "--no-sidecar", "-x", "si", "-x", "c"])
    assert (args.cpus, args.no_sidecar, args.commands, args.script) == (8, True, ["si", "c"], None)


def test_snapshot_at_the_prompt_and_go_on_from_it(tmp_path):
    """`snapshot FILE` at a sidecar breakpoint, then `hclsim step --snapshot FILE` goes on with the
    same VP exactly as the first session did."""
    snap = tmp_path / "ap_main.snap"
    after = ["-x", "stepi 3", "-x", "info registers rip rsp rbx", "-x", "continue", "-x", "info threads", "-x", "quit"]
    first = hclsim_step("--cpus", "8", "-x", "break ap_main", "-x", "continue", "-x", f"snapshot {snap}",
                        "-x", "delete", *after)   # breakpoints belong to the session, not the machine
    assert first.returncode == 0, first.stderr
    assert f"saved the machine to {snap}" in first.stdout
    again = hclsim_step("--snapshot", str(snap), *after)
    assert again.returncode == 0, again.stderr
    tail = first.stdout.split(f"saved the machine to {snap}", 1)[1].split("\n", 1)[1]
    assert "VP 1 stopped at 0xffffff8000001ae6" in tail and "reached the kernel entry" in tail
    assert again.stdout.split("\n", 2)[2] == tail   # after the restored stop's two lines: identical


def test_snapshot_after_the_handoff_is_refused(tmp_path):
    from hclsim import snapshot
    m = Machine(BootConfig(cpus=4))
    m.run_to_handoff()
    snapshot.save(m, tmp_path / "late.snap")
    m.close()
    r = hclsim_step("--snapshot", str(tmp_path / "late.snap"), "-x", "quit")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "after the kernel handoff" in r.stderr


def test_source_level_stepping_frames_and_print(shell):
    sh = shell("break host_dt_parse", "continue", "bt", "info frame", "finish", "info line", "info symbol $rip",
               "print &host", "print host", "print line_buf", "print/x $rsp",
               "next", "step", "bt", "advance log_msg", "until", "print no_such_thing")
    out = sh.output
    assert re.search(r"^#0  0x[0-9a-f]+ <shim:host_dt_parse> shim/host_dt\.c:\d+$", out, re.M)
    assert re.search(r"^#1  0x[0-9a-f]+ <shim:shim_main\+0x[0-9a-f]+> shim/main\.c:\d+$", out, re.M)
    assert re.search(r"^#2  0x[0-9a-f]+ <shim:_start\+0x[0-9a-f]+> shim/start\.S:\d+$", out, re.M)
    assert "(backtrace ends: no unwind information here)" in out          # assembly has no CFI
    assert re.search(r"^Stack level 0, frame at 0x[0-9a-f]+:$", out, re.M) and " saved rip = 0x" in out
    assert re.search(r"^Run till exit from #0  0x[0-9a-f]+ <shim:host_dt_parse>", out, re.M)
    assert re.search(r"^Value returned is rax = 0x[0-9a-f]+$", out, re.M)
    assert re.search(r'^Line \d+ of "shim/main\.c" starts at address 0x[0-9a-f]+ <shim:shim_main\+0x[0-9a-f]+> '
                     r"and ends at 0x[0-9a-f]+\.$", out, re.M)
    assert re.search(r"^shim_main \+ \d+ in section \.text of shim$", out, re.M)
    assert re.search(r"^\$1 = \(struct host_info \*\) 0x[0-9a-f]+ <shim:host>$", out, re.M)
    # host_dt_parse filled `host` from the host device tree: 4 CPUs, APIC ids 0-3, the rest repeats
    assert re.search(r"^\$2 = \{cpu_count = 4, cpus = \{\{apic_id = 0, numa = 0\}, \{apic_id = 1, numa = 0\}, .*"
                     r"<repeats \d+ times>\}", out, re.M)
    assert re.search(r'^\$3 = "\[INFO\] .*\\n"$', out, re.M)               # a char array as a C string
    assert re.search(r"^\$4 = 0x[0-9a-f]+$", out, re.M)
    assert re.search(r"^VP 0 stopped at 0x[0-9a-f]+ <shim:log_msg> shim/log\.c:\d+$", out, re.M)  # advance
    assert "error: unknown symbol or address 'no_such_thing'" in out
    assert out.count("error:") == 1, out


def test_list_goes_on_and_back_and_help_has_no_internals(shell):
    sh = shell("list shim_main", "list", "list -", "list -", "help")
    out = sh.output
    blocks = [b for b in re.split(r"\n(?=\d+ )", out) if b]
    numbers = [int(l.split()[0]) for l in out.splitlines() if re.match(r"^\d+ ", l)]
    first = numbers[:10]
    assert numbers[10:20] == list(range(first[-1] + 1, first[-1] + 11))   # `list` again: the next ten
    assert numbers[20:30] == first                                        # `list -`: back
    assert numbers[30:40] == list(range(first[0] - 10, first[0]))        # and further back
    assert "EOF" not in out and "step" in out and "finish" in out and "backtrace" in out
    assert blocks
    assert sh.completenames("fin") == ["finish"] and "EOF" not in sh.completenames("")
    assert "shim_main" in sh.completedefault("shim_ma", "break shim_ma", 6, 13)
    assert "shim:shim_main" in sh.completedefault("shim:shim_m", "break shim:shim_m", 6, 17)
    assert "$rip" in sh.completedefault("$ri", "print $ri", 6, 9)


def test_pending_starts_inside_instruction_breakpoints_and_call_targets(shell):
    sh = shell("break sidecar:ap_main", "continue", "info threads", "thread 3", "info registers rip rsp",
               "break *shim_main+1", "thread 1", "disassemble shim_main 40", cpus=4)
    out = sh.output
    # a VP whose StartVp waits for the scheduler shows the context it will start with, not zeros
    assert re.search(r"^  3    VP 2 sidecar start pending \(StartVp\) 0xffffff8000[0-9a-f]+ <sidecar:ap_entry>", out, re.M)
    assert re.search(r"^rip +0xffffff8000[0-9a-f]+ +<sidecar:ap_entry>$", out, re.M)
    assert re.search(r"^warning: 0x[0-9a-f]+ is inside the instruction at 0x[0-9a-f]+ <shim:shim_main> .*"
                     r"the instruction boundary is 0x[0-9a-f]+$", out, re.M)
    assert re.search(r"\tcall 0x[0-9a-f]+ <shim:log_msg>$", out, re.M)       # call targets carry symbols


def test_deleting_one_of_two_watchpoints_on_a_range_keeps_the_other(shell, log_gpa):
    g = f"{log_gpa:#x}"
    sh = shell(f"watch -phys {g} 4", f"watch -phys {g} 4", "delete 1", "continue", "delete 2",
               "info breakpoints")
    out = sh.output
    assert not sh.failed, out
    assert re.search(rf"^Hardware watchpoint 2: watch phys {g} len 4: write of 4 bytes at {g}", out, re.M)
    assert "No breakpoints, watchpoints or catchpoints." in out
