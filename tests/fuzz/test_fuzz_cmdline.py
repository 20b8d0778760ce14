"""Mutated command lines: the measured static line and the host's /chosen/bootargs built from
pieces that matter to the shim and to Linux's parser (boot_cpus= in its spellings and quotes,
"--", OPENHCL_SIDECAR=off, OPENHCL_CONFIDENTIAL_DEBUG=1, isspace bytes, quotes, non-ASCII and
control bytes, very long lines), under each policy and isolation. The oracle is the kernel
command line the shim should build (harness.expected_cmdline): fixed options, console, the
shim's boot_cpus= when the sidecar runs, then the static and trusted host lines without any
other boot_cpus; too long a line is the shim's panic."""
from hypothesis import given, strategies as st

from hclsim.config import BootConfig
from hclsim.machine import Machine

from .harness import ShimInputs, boot_case, expect_panic_if, fuzz_settings, host_dt_for, run_then_check_pristine

PIECES = [b"boot_cpus=1", b"boot-cpus=0,1", b"BOOT_CPUS=2", b"boot_cpus", b"boot_cpus=", b"boot_cpus=0-3",
          b'"boot_cpus=2 3"', b'x="a boot_cpus=1"', b"--", b'"--"', b"OPENHCL_SIDECAR=off",
          b"OPENHCL_CONFIDENTIAL_DEBUG=1", b"console=ttyS0", b"quiet", b"a=b=c", b"=x", b'"', b'""',
          b"caf\xc3\xa9", b"\xff\xfe", b"\x01", b"\x7f", b"\xa0", b"\t", b"\n", b"\x0b", b"\x0c", b"\r", b" ", b"   "]
SEPARATORS = [b" ", b" ", b"", b"\t", b"\xa0", b"  "]

lines = st.lists(st.tuples(st.sampled_from(PIECES), st.sampled_from(SEPARATORS)), max_size=8).map(
    lambda parts: b"".join(p + s for p, s in parts))
long_lines = st.integers(1000, 4100).map(lambda n: (b"OPENHCL_LONG=" + b"y" * n)[:n])
configs = st.builds(BootConfig, cpus=st.sampled_from([1, 4, 8]),
                    isolation=st.sampled_from(["none", "none", "none", "vbs", "snp"]),
                    cmdline_policy=st.sampled_from(["append-chosen", "append-chosen", "static"]))
_LAYOUTS = {}


def layout(config):
    key = (config.cpus, config.isolation)
    if key not in _LAYOUTS:
        m = Machine(config)
        _LAYOUTS[key] = m.layout
        m.close()
    return _LAYOUTS[key]


@given(config=configs, static=st.one_of(lines, lines, long_lines), bootargs=st.one_of(lines, lines, long_lines))
@fuzz_settings(200)
def _cmdline(config, static, bootargs):
    # The host's tree carries the bootargs as bytes (a BootConfig takes printable text only).
    host, blob = host_dt_for(config, layout(config), bootargs=bootargs.decode("utf-8", "surrogateescape"))
    out = boot_case(config, host_dt=blob, static_raw=static[:4092])
    expect_panic_if(out, ShimInputs.of(config, host, static=static[:4092]))


def test_mutated_command_lines():
    run_then_check_pristine(_cmdline)
