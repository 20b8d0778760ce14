"""The long fuzz run: the properties of tests/fuzz/ (host device trees, ShimParams, command
lines, kernels, initrds) with many more cases than the test suite's few hundred, same fixed seed
and oracles. Each property is one timed round; a failure is a failing case hypothesis has
shrunk, printed like in the suite.
    .venv/bin/pytest benches/bench_fuzz.py --benchmark-only -s          # 3000 cases a property
    HCLSIM_FUZZ_EXAMPLES=20000 .venv/bin/pytest benches/bench_fuzz.py --benchmark-only
"""
import importlib
import os

import pytest

LONG_RUN = os.environ.get("HCLSIM_FUZZ_EXAMPLES") or "3000"

PROPERTIES = [
    ("test_fuzz_host_dt", "_structured", False),
    ("test_fuzz_host_dt", "_damaged", False),
    ("test_fuzz_shim_params", "_shim_params", False),
    ("test_fuzz_cmdline", "_cmdline", False),
    ("test_fuzz_images", "_kernel", True),
    ("test_fuzz_images", "_initrd", True),
]


def _long(module: str):
    """The fuzz module with its properties set to the long run's case count (read when the
    module decorates them)."""
    saved = os.environ.get("HCLSIM_FUZZ_EXAMPLES")
    os.environ["HCLSIM_FUZZ_EXAMPLES"] = LONG_RUN
    try:
        return importlib.reload(importlib.import_module(f"hclsim.tests.fuzz.{module}"))
    finally:
        if saved is None:
            del os.environ["HCLSIM_FUZZ_EXAMPLES"]
        else:
            os.environ["HCLSIM_FUZZ_EXAMPLES"] = saved


@pytest.mark.parametrize("module,prop,needs_tmp", PROPERTIES, ids=[f"{m[10:]}:{p.strip('_')}" for m, p, _ in PROPERTIES])
def test_fuzz_long_run(benchmark, tmp_path, module, prop, needs_tmp):
    mod = _long(module)
    fuzz = getattr(mod, prop)
    run = (lambda: fuzz(tmp=tmp_path)) if needs_tmp else fuzz
    benchmark.pedantic(lambda: mod.run_then_check_pristine(run), rounds=1, iterations=1)
    benchmark.extra_info.update(cases=int(LONG_RUN))
