"""Memory layouts across CPU and NUMA configurations: the e820 map Linux gets, the VTL2 layout
the image builder chose, and the CPUs and memory of the Linux device tree."""
import pytest

CONFIGS = [(1, 1), (4, 1), (4, 2), (4, 4), (33, 1), (33, 3), (64, 2), (64, 4)]


def layout_record(run) -> dict:
    dt = run.device_tree
    hx = lambda pairs: [[f"{v:#x}" for v in p] for p in pairs]  # noqa: E731
    sidecar = run.sidecar
    return {
        "e820": run.e820,
        "vtl2_layout": run.vtl2_layout,
        "dt_cpus": [f"apic {apic} numa {node}" for apic, node in dt["cpus"]],
        "dt_memory": hx(dt["memory"]),
        "dt_openhcl_memory": hx(dt["openhcl_memory"]),
        "dt_memreserve": hx(dt["memreserve"]),
        "boot_params": {k: run.boot_params["hdr"][k] for k in ("cmd_line_ptr", "ramdisk_image", "ramdisk_size",
                                                               "setup_data", "hardware_subarch")},
        "sidecar_nodes": None if sidecar is None else [[n["base_cpu"], n["cpu_count"]] for n in sidecar["nodes"]],
        "instructions": run.counters["instructions"],
    }


@pytest.mark.parametrize("cpus,numa", CONFIGS, ids=[f"{c}cpu-{n}numa" for c, n in CONFIGS])
def test_layout(hclsim_boot, golden, cpus, numa):
    run = hclsim_boot(cpus=cpus, numa_nodes=numa)
    dt_cpus = run.device_tree["cpus"]
    assert [apic for apic, _ in dt_cpus] == list(range(cpus))
    assert sorted({node for _, node in dt_cpus}) == list(range(numa))
    lay = run.result.image.layout
    assert all(lay.vtl2_base <= e.addr and e.end <= lay.vtl2_base + lay.vtl2_size for e in run.result.handoff.e820)
    golden.check(f"{cpus}cpu-{numa}numa.json", layout_record(run))
