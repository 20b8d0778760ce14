"""The gdb remote stub end to end: the machine's real gdb (batch mode) against a real Machine
served by GdbServer on a free port, and `hclsim boot --gdb` as a user runs it."""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from hclsim.boot import firmware
from hclsim.boot.elfimage import load_firmware_image
from hclsim.config import BootConfig
from hclsim.debug import rsp
from hclsim.debug.gdbserver import GdbServer
from hclsim.debug.target import DebugTarget
from hclsim.machine import Machine

from .tools import require


GDB_TIMEOUT = int(os.environ.get("GDB_TIMEOUT", "120"))


@contextmanager
def served(cpus=4, wait=True, **config):
    """A Machine behind a GdbServer on a free port, served from a thread. Yields (port, server,
    logs, status); on exit checks that the server thread ended (gdb detached or killed)."""
    machine = Machine(BootConfig(cpus=cpus, **config))
    logs, status = [], {}
    server = GdbServer(DebugTarget(machine), "127.0.0.1", 0, wait=wait, log=logs.append)
    thread = threading.Thread(target=lambda: status.update(exit=server.serve()), daemon=True)
    thread.start()
    try:
        yield server.address[1], server, logs, status
        thread.join(timeout=GDB_TIMEOUT)
        assert not thread.is_alive(), f"the stub did not end: {logs}"
    finally:
        server.close()
        thread.join(timeout=10)
        server.target.close()
        machine.close()


def gdb(port, *commands):
    """Run gdb in batch mode on the shim ELF against the stub; its stdout (stderr appended)."""
    args = [require("gdb"), "-batch", "-nx", "-ex", "set architecture i386:x86-64", "-ex", "set confirm off",
            "-ex", f"file {firmware.build(firmware.SHIM)}", "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=GDB_TIMEOUT)
    return proc.stdout + proc.stderr


def values(output: str) -> list[int]:
    """The integers gdb printed as `$N = 0x...` (p/x results), in order."""
    return [int(v, 16) for v in re.findall(r"\$\d+ = (0x[0-9a-f]+)", output)]


def test_threads_registers_and_memory():
    with served(cpus=4) as (port, server, logs, status):
        machine = server.target.machine
        out = gdb(port, "info threads", "info registers rip cr3", "p/x $pc", "p/x $cr3",
                  "x/4gx $pc", "detach")
        entry, cr3 = machine.image.shim_entry, machine.image.pml4
        assert len(re.findall(r'Thread \d+ "VP \d+', out)) == 4, out
        assert re.search(r'\* 1 +Thread 1 "VP 0[^"]*"', out), out
        assert values(out) == [entry, cr3], out
        assert re.search(r"cr3 +0x%x" % cr3, out), out
        words = [int(w, 16) for w in re.findall(r"\t(0x[0-9a-f]{16})", out)]
        assert words == [int.from_bytes(machine.mem.read(entry + 8 * i, 8), "little") for i in range(4)], out
        assert "detached" in out
    assert status["exit"] == 0
    assert any("kernel handoff" in line for line in logs), logs   # after detach the boot went on


def test_break_step_next_and_source():
    shim = firmware.build(firmware.SHIM)
    with served() as (port, server, logs, status):
        base = server.target.machine.image.shim_base
        out = gdb(port, "break shim_main", "continue", "p/x $pc", "x/2i $pc", "stepi", "p/x $pc",
                  "info line *$pc", "next", "next", "next", "info line *$pc", "list shim_main", "kill")
        assert "Breakpoint 1, shim_main" in out and "main.c" in out, out
        shim_main = base + load_firmware_image(shim).symbol("shim_main")
        first, second = values(out)
        assert first == shim_main, out
        insn_len = re.findall(r"0x[0-9a-f]+ <shim_main(?:\+\d+)?>:.*\n\s+0x([0-9a-f]+) <shim_main\+(\d+)>", out)
        assert insn_len and second == int(insn_len[0][0], 16), out
        lines = [int(n) for n in re.findall(r'Line (\d+) of ".*main\.c"', out)]
        assert len(lines) == 2 and lines[1] > lines[0], out       # -O2: `next` visits inlined lines too
        assert re.search(r"^52\t    log_init\(", out, re.M), out
        assert "void shim_main(const struct shim_params_raw *p, uint64_t base)" in out, out
    assert status["exit"] == 0 and any("killed" in line for line in logs)


def test_register_and_memory_writes():
    with served() as (port, server, logs, status):
        out = gdb(port, "hbreak shim_main", "continue", "set $rax = 0x1234abcd", "p/x $rax",
                  "set var kernel_cmdline[0] = 'Z'", "p kernel_cmdline[0]", "set var $r11 = $rax + 1",
                  "p/x $r11", "kill")
        assert values(out) == [0x1234ABCD, 0x1234ABCE], out
        assert "90 'Z'" in out, out
        target = server.target
        assert target.read_memory(0, target.resolve("kernel_cmdline"), 1) == b"Z"   # in guest RAM
        assert target.registers(0)["r11"] == 0x1234ABCE


def test_watchpoints_stop_after_the_access():
    with served() as (port, server, logs, status):
        out = gdb(port, "break shim_main", "continue", "rwatch -l p->log_buffer_size", "continue", "delete",
                  "watch kernel_cmdline[0]", "continue", "p kernel_cmdline[0]", "kill")
        assert re.search(r"hit Hardware read watchpoint 2: -location p->log_buffer_size\s+Value = 8192\s+"
                         r"shim_main \(.*\) at .*main\.c:52", out), out
        assert re.search(r"hit Hardware watchpoint 3: kernel_cmdline\[0\]\s+Old value = 0 '\\000'\s+"
                         r"New value = (\d+) ", out), out
        new = int(re.search(r"New value = (\d+) ", out).group(1))
        assert re.search(r"\$1 = %d " % new, out), out   # the write had happened when it stopped


def test_thread_stepi_steps_only_that_vp():
    with served(cpus=4) as (port, server, logs, status):
        out = gdb(port, "break ap_main", "continue", "delete", "info threads",
                  "thread 1", "p/x $pc", "thread 2", "p/x $pc", "stepi", "stepi", "p/x $pc", "thread 1", "p/x $pc",
                  "kill")
        assert re.search(r'Thread 2 "VP 1 sidecar VTL2" hit Breakpoint 1, ap_main \(\) at .*vp\.c', out), out
        assert re.search(r'Thread 3 "VP 2 sidecar start pending \(StartVp\)"', out), out   # its StartVp waits
        vp0_before, vp1_before, vp1_after, vp0_after = values(out)
        assert vp1_after > vp1_before, out           # VP 1 ran two instructions ...
        assert vp0_after == vp0_before, out          # ... and VP 0, runnable too, did not run


class RawClient:
    """A bare RSP client for what gdb's batch mode cannot do (Ctrl-C at a chosen moment)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=GDB_TIMEOUT)
        self.conn = rsp.Connection(self.sock)
        self.console = []
        assert self.ask(b"QStartNoAckMode") == b"OK"
        self.conn.no_ack = True

    def reply(self, timeout=GDB_TIMEOUT):
        """The next reply; `O` console packets are collected on the way."""
        while True:
            item = self.conn.get(timeout=timeout)
            if not (isinstance(item, bytes) and item.startswith(b"O") and item != b"OK"):
                return item
            self.console.append(bytes.fromhex(item[1:].decode()).decode())

    def ask(self, packet):
        self.conn.send(packet)
        item = self.reply()
        assert isinstance(item, bytes), item
        return item

    def close(self):
        self.conn.close()


def test_interrupt_with_ctrl_c_and_idle_guest():
    """Continue after the handoff: the sidecar VPs go idle, the guest "runs" until Ctrl-C -> T02."""
    with served(cpus=2, wait=True) as (port, server, logs, status):
        client = RawClient(port)
        try:
            assert client.ask(b"?").startswith(b"T05thread:1;")
            assert client.ask(b"Zx,0,0").startswith(b"E")            # malformed: an error, not a crash
            assert client.ask(b"vCont;c") == b"T05thread:1;"        # the kernel handoff stops
            assert "kernel entry" in client.console[-1]
            client.conn.send(b"vCont;c")
            assert client.reply(timeout=1) is None
            client.sock.sendall(b"\x03")
            assert client.reply().startswith(b"T02thread:")
            assert client.ask(b"qC").startswith(b"QC")
            assert client.ask(b"D") == b"OK"
        finally:
            client.close()
    assert status["exit"] == 0


def test_ctrl_c_stops_a_running_guest_and_a_fault_stops_with_sigsegv():
    with served(cpus=1) as (port, server, logs, status):
        entry = server.target.machine.image.shim_entry
        client = RawClient(port)
        try:
            assert client.ask(b"M%x,2:ebfe" % entry) == b"OK"     # jmp $: the guest spins
            client.conn.send(b"vCont;c")
            assert client.reply(timeout=0.5) is None
            client.sock.sendall(b"\x03")
            assert client.reply() == b"T02thread:1;"
            assert client.ask(b"p10") == entry.to_bytes(8, "little").hex().encode()
            assert client.ask(b"M%x,2:0f0b" % entry) == b"OK"     # ud2
            assert client.ask(b"c") == b"T0bthread:1;"
            assert "#UD" in client.console[-1]
            assert client.ask(b"M%x,2:ebfe" % entry) == b"OK"
            client.conn.send(b"vCont;c")
        finally:
            client.close()                 # gdb goes away while the guest runs: as a detach
        for _ in range(500):
            if any("detached" in line for line in logs):
                break
            time.sleep(0.01)
        client = RawClient(port)           # the guest spun on without gdb; attaching stops it
        try:
            assert client.ask(b"?").startswith(b"T05thread:1;")
            assert client.ask(b"p10") == entry.to_bytes(8, "little").hex().encode()
            client.conn.send(b"k")
        finally:
            client.close()
    assert status["exit"] == 0 and any("killed" in line for line in logs)
    assert logs.count("gdb attached") == 2


def test_the_simulation_ends_with_x_after_an_unfixed_fault_and_w_when_nothing_is_left():
    with served(cpus=1) as (port, server, logs, status):
        client = RawClient(port)
        try:
            entry = server.target.machine.image.shim_entry
            assert client.ask(b"M%x,2:0f0b" % entry) == b"OK"     # ud2
            assert client.ask(b"vCont;c") == b"T0bthread:1;"
            assert client.ask(b"vCont;c") == b"X0b"                # resumed as it was: it dies of it
        finally:
            client.close()
    assert status["exit"] == 2
    with served(cpus=2, no_sidecar=True) as (port, server, logs, status):
        client = RawClient(port)
        try:
            assert client.ask(b"c") == b"T05thread:1;"             # the handoff
            assert client.ask(b"c") == b"W00"                      # every VP is the Linux stand-in's
        finally:
            client.close()
    assert status["exit"] == 0


def hclsim_gdb(*args):
    return subprocess.Popen([sys.executable, "-m", "hclsim", "boot", "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listening_port(proc) -> int:
    for line in proc.stderr:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError("no listening line: " + proc.stderr.read())


def test_cli_wait_gdb_break_and_kill():
    proc = hclsim_gdb("--cpus", "2", "--gdb", "127.0.0.1:0", "--wait-gdb")
    try:
        port = _listening_port(proc)
        out = gdb(port, "p/x $pc", "break shim_main", "continue", "bt 1", "kill")
        assert "Breakpoint 1, shim_main" in out, out
        assert proc.wait(timeout=GDB_TIMEOUT) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_cli_attach_after_the_boot_ran_then_detach():
    proc = hclsim_gdb("--cpus", "4", "--gdb", "127.0.0.1:0")
    try:
        port = _listening_port(proc)
        for line in proc.stderr:     # the boot runs without gdb: handoff, then idle sidecar VPs
            if "idle" in line:
                break
        out = gdb(port, "info threads", "thread 2", "bt 1", "detach")
        assert re.search(r'Thread 1 "VP 0[^"]*Linux', out), out
        assert re.search(r'Thread 2 "VP 1[^"]*sidecar', out), out
        assert "detached" in out
        assert proc.wait(timeout=GDB_TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()


def test_cli_no_sidecar_ends_once_idle_and_gdb_is_gone_and_writes_out(tmp_path):
    """--no-sidecar: after the handoff no VP is left to run; once gdb detached the run ends by
    itself, and --out holds what `hclsim boot --out` writes."""
    out = tmp_path / "out"
    proc = hclsim_gdb("--cpus", "2", "--no-sidecar", "--gdb", "127.0.0.1:0", "--wait-gdb", "--out", str(out))
    try:
        port = _listening_port(proc)
        gdb(port, "break shim_main", "continue", "detach")
        assert proc.wait(timeout=GDB_TIMEOUT) == 0
        err = proc.stderr.read()
        assert "no sidecar VPs to run" in err and "every VP is idle" in err and "Traceback" not in err, err
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "handoff" and (out / "linux.dtb").stat().st_size > 0
        assert (out / "serial.log").read_bytes().startswith(b"[INFO] ")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("address", ["1234", "127.0.0.1:port", "256.1.1.1:1"])
def test_cli_bad_gdb_address_is_one_error_line(address):
    proc = subprocess.run([sys.executable, "-m", "hclsim", "boot", "--quiet", "--gdb", address],
                          capture_output=True, text=True, timeout=GDB_TIMEOUT)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hclsim: error: ") and "gdb" in lines[0], proc.stderr
