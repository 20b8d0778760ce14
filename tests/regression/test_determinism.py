"""Determinism the goldens rely on: a boot gives the same output and guest counters whatever ran
before it in the process (engines are pooled: cpu/pool.py) and in a brand-new process, so any
`pytest -n` split of the suite sees the same numbers."""
import hashlib
import json
import subprocess
import sys

from hclsim.config import BootConfig
from hclsim.machine import Machine
from hclsim.testkit import guest_counters

A = dict(cpus=8, numa_nodes=2, static_cmdline="OPENHCL_A=1")
B = dict(cpus=64, isolation="vbs", host_bootargs="OPENHCL_B=2")  # same RAM size: same pooled engine

FRESH_PROCESS = """
import json, sys
from tests.regression.test_determinism import A, fingerprint
from hclsim.config import BootConfig
from hclsim.machine import Machine
m = Machine(BootConfig(**A))
print(json.dumps(fingerprint(m.run_to_handoff())))
m.close()
"""


def fingerprint(result) -> dict:
    digest = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    return {"serial": {k: digest(v) for k, v in result.serial.items()}, "shim_log": digest(result.shim_log),
            "dtb": digest(result.handoff.dtb), "boot_params": digest(result.handoff.boot_params),
            "counters": guest_counters(result.counters), "hypercalls": [list(h) for h in result.hypercalls],
            "regs": result.regs}


def _boot(fields) -> tuple[dict, object]:
    machine = Machine(BootConfig(**fields))
    try:
        return fingerprint(machine.run_to_handoff()), machine.engine
    finally:
        machine.close()


def test_pooled_engine_reuse_does_not_leak_into_counts():
    a1, engine1 = _boot(A)
    b, engine2 = _boot(B)
    a2, engine3 = _boot(A)
    assert engine1 is engine2 is engine3  # the same engine really ran all three
    assert b["counters"] != a1["counters"]
    assert a2 == a1
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr
    fresh = json.loads(out.stdout.splitlines()[-1])
    assert fresh == json.loads(json.dumps(a1))
