"""Property-based fuzzing of the boot path's inputs (issue 9, "What mutated inputs break").

Host device trees, ShimParams, command lines, kernels and initrds are mutated by hypothesis with
a fixed seed (derandomize=True, no example database), fed to the real shim and the loaders, and
every outcome must be a clean shim panic, a clean HclsimError before the boot, or a handoff that
the oracles in harness.py (the command line and e820 the shim should build, CPU ownership)
agree with. benches/bench_fuzz.py runs the same properties for longer.
"""
