"""A firmware team's regression suite written with hclsim's pytest plugin (it comes with
hclsim: no conftest.py, no imports of hclsim needed).

    pytest examples/firmware-regression                                   # the shipped firmware
    pytest examples/firmware-regression --hclsim-shim build/shim.elf      # your boot shim build
    pytest examples/firmware-regression --hclsim-shim build/shim.elf --hclsim-sidecar build/sidecar.elf
    pytest examples/firmware-regression --hclsim-update-golden            # accept new output

Golden files live in golden/test_my_firmware/; commit them, and review their diff whenever a
firmware change is meant to change the output. Add `-n auto` (pytest-xdist) to use every core:
output and instruction counts are the same however the tests are split.
"""
import pytest


def test_shim_log(hclsim_boot, golden):
    run = hclsim_boot(cpus=8, numa_nodes=2)
    assert "[PANIC]" not in run.serial_text("COM3")
    golden.check("shim-8cpu.log", run.serial_text("COM3"))


@pytest.mark.parametrize("isolation", ["none", "snp"])
def test_command_line(hclsim_boot, golden, isolation):
    run = hclsim_boot(isolation=isolation, static_cmdline="OPENHCL_MY_FEATURE=1",
                      host_bootargs="console=ttyS0 OPENHCL_HOST_KNOB=1")
    words = run.cmdline.split()
    assert "OPENHCL_MY_FEATURE=1" in words  # measured: always there
    assert ("OPENHCL_HOST_KNOB=1" in words) == (isolation == "none")  # the host is trusted only without isolation
    golden.check(f"cmdline-{isolation}.txt", "\n".join(words))


def test_handoff(hclsim_boot, golden):
    run = hclsim_boot(cpus=4)
    report = run.golden_report()  # timings and host paths removed; instruction counts kept
    golden.check("handoff-4cpu.json", {key: report[key] for key in ("handoff", "cpus", "memory", "counters")})
    golden.check("linux-4cpu.dts", run.device_tree_text())


def test_sidecar_starts_every_ap(hclsim_boot):
    run = hclsim_boot(cpus=64, numa_nodes=2)
    status = run.cpu_status()
    assert [cpu for cpu, s in status.items() if s == "linux"] == [n["base_cpu"] for n in run.sidecar["nodes"]]
    assert all(s in ("linux", "IDLE") for s in status.values())


def test_vtl0_guest_runs_on_a_sidecar_cpu(hclsim_boot):
    out = hclsim_boot(cpus=4, vtl0_iterations=5).run_vtl0(cpu=2)
    assert out["record"]["done"] == 1 and out["record"]["iterations"] == 5
    assert out["com1"] == "hello from VTL0 vp 2\nvp 2 done\n"
    assert [i.get("port") for i in out["intercepts"]][-1] == "0x404"   # the power-off write ends it


def test_breakpoint_and_snapshot(hclsim_machine, hclsim_snapshot):
    machine = hclsim_machine(cpus=4)
    shim_main = machine.shim.symbol("shim_main")
    if shim_main is None:
        pytest.skip("this shim build has no shim_main symbol")
    machine.run_to(machine.image.shim_base + shim_main)  # stop at a breakpoint in the shim
    saved = hclsim_snapshot.save(machine)
    first = machine.run_to_handoff()
    again = hclsim_snapshot.restore(saved).run_to_handoff()  # resume from the breakpoint
    assert again.serial == first.serial and again.counters["instructions"] == first.counters["instructions"]
