"""The VTL0 test guest on every CPU (RUN_VP through the sidecar on sidecar CPUs, directly on
Linux CPUs): every intercept it causes, what was emulated for it (its result record), and the
test devices it drove."""
import struct

import pytest

from tests.test_sidecar import VTL0_MMIO_INTERCEPTS, vtl0_mmio_expected

EXPECTED_INTERCEPTS = ["cpuid", "io-port", "io-port", *["unmapped-gpa"] * VTL0_MMIO_INTERCEPTS, "msr"]


@pytest.mark.parametrize("cpus,numa", [(4, 1), (12, 2)])
def test_vtl0_guest_on_every_cpu(hclsim_boot, golden, cpus, numa):
    run = hclsim_boot(cpus=cpus, numa_nodes=numa)
    sidecar_cpus = [c for c, status in run.cpu_status().items() if status == "IDLE"]
    outputs = [run.run_vtl0(cpu) for cpu in sorted(run.cpu_status())]
    hello = "hello from VTL0 vp 0\n"
    for out in outputs:
        cpu, record = out["cpu"], out["record"]
        says_hello = cpu == 0
        assert [i["type"] for i in out["intercepts"]] == ["io-port"] * len(hello) * says_hello + EXPECTED_INTERCEPTS
        assert record["done"] == 1 and record["vp_index"] == cpu
        assert struct.pack("<3I", record["cpuid_ebx"], record["cpuid_ecx"], record["cpuid_edx"]) == b"Microsoft Hv"
        assert out["port_writes"] == [["0x440", f"{0xC0DE0000 | cpu:#x}"]]
        fields, accesses = vtl0_mmio_expected(cpu)   # every MMIO instruction form, emulated
        assert {name: record[name] for name in fields} == fields
        assert out["mmio_writes"] == [[f"{gpa:#x}", f"{v:#x}"] for kind, gpa, size, v in accesses if kind == "write"]
        assert [i["gpa"] for i in out["intercepts"] if "gpa" in i] == [f"{a[1]:#x}" for a in accesses]
        assert out["com1"] == (hello if says_hello else "")  # only VP 0 says hello on COM1
    assert all(status == "IDLE" for c, status in run.cpu_status().items() if c in sidecar_cpus)
    golden.check(f"{cpus}cpu-{numa}numa.json", [compact(out) for out in outputs])


def compact(out: dict) -> dict:
    """One line per intercept and per device access, record values in hex."""
    return {"cpu": out["cpu"],
            "intercepts": [" ".join(f"{k}={v}" for k, v in i.items()) for i in out["intercepts"]],
            "record": {k: f"{v:#x}" for k, v in out["record"].items()}, "com1": out["com1"],
            "port_writes": [" ".join(w) for w in out["port_writes"]],
            "mmio_writes": [" ".join(w) for w in out["mmio_writes"]]}
