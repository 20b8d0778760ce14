"""The sidecar: when it runs, how the CPUs are split into nodes, which CPUs Linux boots
(boot_cpus=) and that every AP reaches IDLE; and when it stays off."""
import pytest

ON = {"8cpu": dict(cpus=8), "40cpu-3numa": dict(cpus=40, numa_nodes=3), "64cpu-2numa": dict(cpus=64, numa_nodes=2)}
OFF = {"isolated-vbs": dict(cpus=8, isolation="vbs"),
       "measured-cmdline": dict(cpus=8, static_cmdline="OPENHCL_SIDECAR=off"),
       "host-cmdline": dict(cpus=8, host_bootargs="OPENHCL_SIDECAR=off"),
       "one-cpu-per-node": dict(cpus=2, numa_nodes=2),
       "no-image": dict(cpus=8, no_sidecar=True)}


def boot_cpus(cmdline: str) -> list[int] | None:
    words = [w for w in cmdline.split() if w.startswith("boot_cpus=")]
    return [int(c) for c in words[-1].split("=", 1)[1].split(",")] if words else None


def sidecar_record(run) -> dict:
    sidecar = run.sidecar and dict(run.sidecar, nodes=[dict(n, cpu_status=" ".join(n["cpu_status"]))
                                                      for n in run.sidecar["nodes"]])
    return {"boot_cpus": boot_cpus(run.cmdline), "sidecar": sidecar,
            "sidecar_log": [line for line in run.shim_log.splitlines() if "sidecar" in line]}


@pytest.mark.parametrize("case", ON)
def test_sidecar_starts_every_ap(hclsim_boot, golden, case):
    run = hclsim_boot(**ON[case])
    sidecar = run.sidecar
    bases = [n["base_cpu"] for n in sidecar["nodes"]]
    assert boot_cpus(run.cmdline) == bases == sidecar["linux_cpus"]
    assert sum(n["cpu_count"] for n in sidecar["nodes"]) == run.config.cpus
    for node in sidecar["nodes"]:  # the base CPU is Linux's, the others wait in the dispatch loop
        assert node["cpu_status"] == ["REMOVED"] + ["IDLE"] * (node["cpu_count"] - 1)
    assert list(run.cpu_status().values()).count("IDLE") == run.config.cpus - len(bases)
    golden.check(f"on-{case}.json", sidecar_record(run))


@pytest.mark.parametrize("case", OFF)
def test_sidecar_off(hclsim_boot, golden, case):
    run = hclsim_boot(**OFF[case])
    assert run.sidecar is None and boot_cpus(run.cmdline) is None
    assert set(run.cpu_status().values()) == {"linux"} and len(run.cpu_status()) == run.config.cpus
    golden.check(f"off-{case}.json", sidecar_record(run))
