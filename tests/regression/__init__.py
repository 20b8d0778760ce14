"""hclsim's own firmware regression suite, written with the kit (hclsim.pytest_plugin): every
test compares deterministic boot output with golden files under golden/<module>/. After an
intended change: `pytest tests/regression --hclsim-update-golden`, then review the diff."""
