"""The VTL0 test guest on every CPU (RUN_VP through the sidecar on sidecar CPUs, directly on
Linux CPUs): every intercept it causes (a short workload loop), what was emulated for it (its
result record), and the test devices it drove."""
import struct

import pytest

from tests.test_sidecar import VTL0_ITERATIONS, vtl0_com1, vtl0_intercepts, vtl0_mmio_expected


@pytest.mark.parametrize("cpus,numa", [(4, 1), (12, 2)])
def test_vtl0_guest_on_every_cpu(hclsim_boot, golden, cpus, numa):
    run = hclsim_boot(cpus=cpus, numa_nodes=numa, vtl0_iterations=VTL0_ITERATIONS)
    sidecar_cpus = [c for c, status in run.cpu_status().items() if status == "IDLE"]
    outputs = [run.run_vtl0(cpu) for cpu in sorted(run.cpu_status())]
    for out in outputs:
        cpu, record = out["cpu"], out["record"]
        assert [(i["type"], int(i["port"], 16) if "port" in i else None) for i in out["intercepts"]] == \
            vtl0_intercepts(cpu)
        assert record["done"] == 1 and record["vp_index"] == cpu and record["iterations"] == VTL0_ITERATIONS
        assert struct.pack("<3I", record["cpuid_ebx"], record["cpuid_ecx"], record["cpuid_edx"]) == b"Microsoft Hv"
        assert out["port_writes"] == [["0x440", f"{0xC0DE0000 | cpu:#x}"]]
        fields, accesses = vtl0_mmio_expected(cpu)   # every MMIO instruction form, emulated
        assert {name: record[name] for name in fields} == fields
        assert out["mmio_writes"] == [[f"{gpa:#x}", f"{v:#x}"] for kind, gpa, size, v in accesses if kind == "write"]
        assert [i["gpa"] for i in out["intercepts"] if "gpa" in i] == [f"{a[1]:#x}" for a in accesses]
        assert out["com1"] == vtl0_com1(cpu)    # every VP says hello, then done
    assert all(status == "IDLE" for c, status in run.cpu_status().items() if c in sidecar_cpus)
    golden.check(f"{cpus}cpu-{numa}numa.json", [compact(out) for out in outputs])


def compact(out: dict) -> dict:
    """One line per intercept and per device access, record values in hex."""
    return {"cpu": out["cpu"],
            "intercepts": [" ".join(f"{k}={v}" for k, v in i.items()) for i in out["intercepts"]],
            "record": {k: v if isinstance(v, str) else f"{v:#x}" for k, v in out["record"].items()}, "com1": out["com1"],
            "port_writes": [" ".join(w) for w in out["port_writes"]],
            "mmio_writes": [" ".join(w) for w in out["mmio_writes"]]}
