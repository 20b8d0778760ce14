"""Host memory per idle sidecar vCPU (issue 3 goal: <= 64 KiB): the resident set of a process that
booted 2048 vCPUs minus one that booted 8, over the 2040 extra vCPUs. Each boot runs in a fresh
process so nothing else is counted.
    .venv/bin/pytest benches/bench_memory.py --benchmark-only -s
"""
import json
import subprocess
import sys

PROBE = """
import json, resource, sys
from hclsim.config import BootConfig
from hclsim.machine import Machine
cpus = int(sys.argv[1])
m = Machine(BootConfig(cpus=cpus, numa_nodes=max(1, cpus // 32), memory=4 << 30))
r = m.run_to_handoff()
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
print(json.dumps({"rss_kib": rss_kib(), "idle": r.sidecar_summary["idle_cpus"]}))
"""


def _rss(cpus: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(cpus)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_per_idle_vcpu(benchmark):
    result = {}

    def measure():
        small, large = _rss(8), _rss(2048)
        result.update(small=small, large=large,
                      per_vcpu_kib=(large["rss_kib"] - small["rss_kib"]) / (large["idle"] - small["idle"]))
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\nRSS 8 vCPUs {result['small']['rss_kib']} KiB, 2048 vCPUs {result['large']['rss_kib']} KiB: "
          f"{result['per_vcpu_kib']:.1f} KiB per idle vCPU")
