"""The VTL0 test guest as a workload that ends the VM (boot/firmware/vtl0, docs/contracts.md "VTL0
test guest"): its loop and checksum against the Python model, every VP's COM1 lines, the
power-off device firing once after every VP, the iteration count from BootConfig and the CLI to
the guest's RCX; and the devices the VM worker runs, importable without numpy, numba, unicorn or
capstone."""
import json
import subprocess
import sys
from functools import reduce

import pytest

from hclsim.config import BootConfig, ConfigError
from hclsim.defs.platform import (COM1_PORT, COM3_PORT, UART_PORT_COUNT, VTL0_CHECKSUM_BASIS, VTL0_CHECKSUM_PRIME,
                                  VTL0_LOOP_PORT, VTL0_MAX_ITERATIONS, VTL0_POWER_PORT, VTL0_TEST_PORT, Region)
from hclsim.devices import vtl0_test
from hclsim.devices.bus import IoError
from hclsim.devices.uart16550 import Uart16550
from hclsim.devices.vtl0_test import LoopPort, PowerOff, loop_checksum, vtl0_bus
from tests.test_sidecar import intercept_kinds, vtl0_com1, vtl0_intercepts

HEAVY = ("numba", "numpy", "unicorn", "capstone")


def _run(machine, cpu: int, devices):
    from hclsim.sidecar.vp_loop import vtl0_runner
    results = machine.vtl0_guest.results(machine.mem)
    seen = vtl0_runner(machine.linux, cpu, devices).run_until_halted(lambda: results[cpu]["done"] == 1)
    return seen, results[cpu]


# ---- the loop ---------------------------------------------------------------------------------
def test_loop_checksum_model():
    def fnv1a(n):   # written out again: x = (x ^ i) * PRIME, 64-bit, from BASIS
        return reduce(lambda x, i: ((x ^ i) * VTL0_CHECKSUM_PRIME) % 2**64, range(n), VTL0_CHECKSUM_BASIS)
    assert loop_checksum(0) == VTL0_CHECKSUM_BASIS
    assert loop_checksum(1) == (VTL0_CHECKSUM_BASIS * VTL0_CHECKSUM_PRIME) % 2**64
    assert [loop_checksum(n) for n in (2, 7, 1000)] == [fnv1a(n) for n in (2, 7, 1000)]


@pytest.mark.parametrize("iterations", [0, 1, 7, 1000])
def test_the_guest_loop_matches_the_model(hclsim_boot, iterations):
    run = hclsim_boot(cpus=1, vtl0_iterations=iterations)   # the BSP, a Linux CPU: the quick VP loop
    devices = vtl0_test.TestDevices(vp_count=1)
    seen, rec = _run(run.machine, 0, devices)
    assert intercept_kinds(seen) == vtl0_intercepts(0, iterations)
    assert rec["iterations"] == iterations and rec["checksum"] == loop_checksum(iterations)
    assert rec["done"] == 1 and rec["pad2"] == 0 and rec["hypercall_status"] == 0x12
    assert rec["post_message"].tolist() == [0, 0, 0, 0, 1, 0, 0, 0] + [0] * 8    # connection 0, type 1, no payload
    assert devices.loop.writes == iterations and devices.loop.last == max(iterations - 1, 0)
    assert bytes(devices.com1).decode() == vtl0_com1(0) and devices.power.powered_off


def test_every_vp_prints_and_the_vm_powers_off_once_after_the_last(hclsim_boot):
    run = hclsim_boot(cpus=4, vtl0_iterations=2)   # VP 0 a Linux CPU, VPs 1-3 sidecar CPUs
    fired = []
    devices = vtl0_test.TestDevices(vp_count=4, on_power_off=lambda: fired.append(sorted(devices.power.reported)))
    order = [2, 0, 3, 1]
    for n, cpu in enumerate(order):
        seen, rec = _run(run.machine, cpu, devices)
        assert intercept_kinds(seen)[-1] == ("io-port", VTL0_POWER_PORT) and rec["done"] == 1
        assert devices.power.reported == set(order[:n + 1])
        assert devices.power.powered_off == (n == 3) and fired == ([[0, 1, 2, 3]] if n == 3 else [])
    assert bytes(devices.com1).decode() == "".join(vtl0_com1(cpu) for cpu in order)
    assert devices.loop.writes == 2 * 4
    devices.bus.pio_write(VTL0_POWER_PORT, 4, 1)     # a VP reporting again: nothing new
    assert fired == [[0, 1, 2, 3]] and not devices.bus.errors


# ---- the devices ------------------------------------------------------------------------------
def test_loop_port_counts_and_keeps_the_last_value():
    bus = vtl0_bus(2)
    for value in (5, 6, 0xFFFFFFFF):
        bus.pio_write(VTL0_LOOP_PORT, 4, value)
    loop = bus.devices["loop_port"]
    assert (loop.writes, loop.last) == (3, 0xFFFFFFFF) and bus.pio_read(VTL0_LOOP_PORT, 4) == 0xFFFFFFFF
    again = LoopPort()
    again.restore(LoopPort.saved_state.decode(LoopPort.saved_state.encode(loop.save())))
    assert (again.writes, again.last) == (3, 0xFFFFFFFF)


def test_power_off_fires_once_and_refuses_unknown_vps():
    calls = []
    dev = PowerOff(3, on_power_off=lambda: calls.append(sorted(dev.reported)))
    assert dev.pio_write(VTL0_POWER_PORT, 4, 2) is None and not dev.powered_off
    assert isinstance(dev.pio_write(VTL0_POWER_PORT, 4, 3), IoError)        # VP 3 of 3: no such VP
    dev.pio_write(VTL0_POWER_PORT, 4, 2)
    dev.pio_write(VTL0_POWER_PORT, 4, 0)
    assert calls == [] and dev.pio_read(VTL0_POWER_PORT, 4) == 2
    dev.pio_write(VTL0_POWER_PORT, 4, 1)
    assert dev.powered_off and calls == [[0, 1, 2]]
    dev.pio_write(VTL0_POWER_PORT, 4, 1)
    assert calls == [[0, 1, 2]]
    blob = PowerOff.saved_state.encode(dev.save())
    restored = PowerOff(3, on_power_off=lambda: calls.append("again"))
    restored.restore(PowerOff.saved_state.decode(blob))
    assert restored.reported == {0, 1, 2} and restored.powered_off
    restored.pio_write(VTL0_POWER_PORT, 4, 0)
    assert calls == [[0, 1, 2]]                                             # fired before the save
    half = PowerOff(3, on_power_off=lambda: calls.append("restored"))
    half.restore({"reported": "0,2", "fired": 0})
    half.pio_write(VTL0_POWER_PORT, 4, 1)
    assert calls[-1] == "restored"
    unknown = PowerOff(None)                         # the VM's size not known: never powers off
    unknown.pio_write(VTL0_POWER_PORT, 4, 1000)
    assert unknown.reported == {1000} and not unknown.powered_off
    with pytest.raises(ValueError):
        PowerOff(0)


def test_the_new_ports_overlap_nothing():
    bus = vtl0_bus(1)                                # Bus.add refuses overlapping claims
    pio = {(dev, start, size) for space, dev, _, start, size in bus.regions() if space == "pio"}
    assert {("loop_port", VTL0_LOOP_PORT, 4), ("power_off", VTL0_POWER_PORT, 4)} <= pio
    others = [Region("COM1", COM1_PORT, UART_PORT_COUNT), Region("COM3", COM3_PORT, UART_PORT_COUNT),
              Region("test", VTL0_TEST_PORT, 4)]
    for port in (VTL0_LOOP_PORT, VTL0_POWER_PORT):
        assert not any(Region("new", port, 4).overlaps(r) for r in others)
    assert set(bus.save()) == {"COM1", "test_port", "mmio_test", "loop_port", "power_off"}


def test_pure_and_native_uart_devices_agree():
    script = [(3, 0x80), (0, 1), (1, 0), (3, 0x03), (2, 0xC7), (4, 0x0B), (7, 0x5A)] + [(0, c) for c in b"Hi\n"]
    outs = []
    for native in (True, False):
        got = bytearray()
        uart = Uart16550("COM1", 0x3F8, sink=lambda name, data: got.extend(data), native=native)
        for off, value in script:
            uart.pio_write(0x3F8 + off, 1, value)
        reads = [uart.pio_read(0x3F8 + off, 1) for off in range(8)]
        uart.flush()
        outs.append((reads, bytes(got), uart.save()))
    assert outs[0] == outs[1] and outs[0][1] == b"Hi\n"
    assert type(Uart16550("x", 0x3F8, native=False).state) is list   # no numpy in the pure device


def test_the_vm_workers_devices_import_without_heavy_modules():
    code = ("import sys\n"
            "import hclsim.devices.vtl0_test as t, hclsim.devices.bus, hclsim.devices.saved_state\n"
            "d = t.TestDevices(vp_count=1)\n"
            "for c in b'hi\\n': d.bus.pio_write(0x3F8, 1, c)\n"
            f"d.bus.pio_write({VTL0_LOOP_PORT}, 4, 7); d.bus.pio_write({VTL0_POWER_PORT}, 4, 0)\n"
            "d.bus.restore(d.bus.save())\n"
            "assert bytes(d.com1) == b'hi\\n' and d.power.powered_off and d.loop.writes == 1\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    timed = subprocess.run([sys.executable, "-X", "importtime", "-c", "import hclsim.devices.vtl0_test"],
                           capture_output=True, text=True, timeout=60)
    assert timed.returncode == 0, timed.stderr
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in timed.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2}
    assert "hclsim" in imported and not imported & set(HEAVY)


# ---- the knob ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, VTL0_MAX_ITERATIONS + 1, True, 2.5, "7"])
def test_vtl0_iterations_is_validated(value):
    with pytest.raises(ConfigError, match=r"--vtl0-iterations .*: must be a whole number 0\.\.1000000000"):
        BootConfig(vtl0_iterations=value).validated()


def test_vtl0_iterations_bounds_are_accepted():
    assert BootConfig().vtl0_iterations == 100
    for value in (0, VTL0_MAX_ITERATIONS):
        assert BootConfig(vtl0_iterations=value).validated().vtl0_iterations == value


def _hclsim(*args):
    return subprocess.run([sys.executable, "-m", "hclsim", *args], capture_output=True, text=True, timeout=120)


def test_the_cli_option_reaches_the_guest():
    regs = _hclsim("sidecar", "--cpus", "4", "--vtl0-iterations", "7", "--json", "get-regs", "3", "rcx")
    assert regs.returncode == 0, regs.stderr
    assert json.loads(regs.stdout)["registers"] == {"rcx": "0x7"}      # VTL0's RCX at the entry
    run = _hclsim("sidecar", "--cpus", "4", "--json", "run-vp", "2", "--vtl0-iterations", "7")  # after the action
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert [i.get("port") for i in out["intercepts"]].count(f"{VTL0_LOOP_PORT:#x}") == 7
    assert out["done"] and out["com1"] == vtl0_com1(2)
    bad = _hclsim("sidecar", "--cpus", "4", "--vtl0-iterations", "-1", "info")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == ("hclsim: error: --vtl0-iterations -1: must be a whole number 0..1000000000 "
                                  "(the VTL0 test guest's loop iterations per VP)")
