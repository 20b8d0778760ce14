"""Kernel command line policies: the measured static line, append-chosen vs static, and what
the host's /chosen/bootargs may add."""
import pytest

HOST = "OPENHCL_B=2 console=ttyS0"
CASES = {
    "append-chosen-default": dict(),
    "append-chosen-static-and-host": dict(static_cmdline="OPENHCL_A=1", host_bootargs=HOST),
    "static-ignores-host": dict(static_cmdline="OPENHCL_A=1", cmdline_policy="static", host_bootargs=HOST),
    "static-empty": dict(cmdline_policy="static", host_bootargs=HOST),
    "host-turns-sidecar-off": dict(host_bootargs="OPENHCL_SIDECAR=off"),
    "no-com3": dict(com3=False, host_bootargs=HOST),
}
POLICY_LOG_WORDS = ("command line", "bootargs", "serial:")


def cmdline_record(run) -> str:
    """The kernel command line one word a line, then the shim's log lines about the policy."""
    lines = ["cmdline:"] + [f"  {w}" for w in run.cmdline.split()] + ["shim log:"]
    lines += [f"  {line}" for line in run.shim_log.splitlines() if any(w in line for w in POLICY_LOG_WORDS)]
    return "\n".join(lines)


@pytest.mark.parametrize("case", CASES)
def test_cmdline_policy(hclsim_boot, golden, case):
    run = hclsim_boot(cpus=4, **CASES[case])
    words = run.cmdline.split()
    cfg = run.config
    if cfg.static_cmdline:
        assert cfg.static_cmdline in words
    host_words = cfg.host_bootargs.split()
    host_taken = bool(host_words) and all(w in words for w in host_words)
    assert host_taken == (cfg.cmdline_policy == "append-chosen" and bool(host_words))
    if host_taken:  # the host's words come last, after the measured line
        assert words[-len(host_words):] == host_words
    golden.check(f"{case}.txt", cmdline_record(run))
