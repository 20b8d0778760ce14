"""The whole boot of the default configuration and of a large one: the shim's serial log, the
normalised boot report (handoff registers, command line, e820, device tree, VTL2 layout,
counters, every hypercall, sidecar) and the Linux device tree as text."""
import pytest

CONFIGS = {"default": dict(), "64cpu-2numa": dict(cpus=64, numa_nodes=2)}


@pytest.mark.parametrize("name", CONFIGS)
def test_boot_report(hclsim_boot, golden, name):
    run = hclsim_boot(**CONFIGS[name])
    report = run.golden_report()
    assert report["status"] == "handoff" and "timings_ms" not in report
    assert report["handoff"]["registers"]["rip"] == report["handoff"]["kernel_entry"]
    golden.check(f"{name}-serial-com3.txt", run.serial_text("COM3"))
    golden.check(f"{name}-report.json", report)
    golden.check(f"{name}-linux.dts", run.device_tree_text())


def test_boot_params(hclsim_boot, golden):
    run = hclsim_boot()
    fields = run.boot_params
    assert fields["hdr"]["boot_flag"] == 0xAA55 and fields["e820_entries"] == len(run.e820)
    golden.check("boot-params.json", fields)
