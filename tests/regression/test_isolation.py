"""Isolation filtering: what an isolated VM's shim refuses to take from an adversarial host."""
import pytest

# A host that tries to get a debug console, confidential debugging, its own init and the sidecar.
HOSTILE = "console=ttyS2 OPENHCL_CONFIDENTIAL_DEBUG=1 rdinit=/evil OPENHCL_SIDECAR=on"


def isolation_record(run) -> dict:
    return {"cmdline": run.cmdline.split(), "isolation_type": run.device_tree["isolation_type"],
            "com3_lines": len(run.serial_text("COM3").splitlines()), "shim_log": run.shim_log.splitlines(),
            "hypercalls": run.report["hypercalls"], "sidecar": run.sidecar is not None}


@pytest.mark.parametrize("isolation", ["none", "vbs", "snp", "tdx"])
def test_adversarial_host_bootargs(hclsim_boot, golden, isolation):
    run = hclsim_boot(cpus=4, isolation=isolation, host_bootargs=HOSTILE)
    words = run.cmdline.split()
    assert run.device_tree["isolation_type"] == isolation
    if isolation == "none":  # a trusted host's words are appended
        assert words[-4:] == HOSTILE.split()
    else:
        assert not set(HOSTILE.split()) & set(words)
        assert "console=ttynull" in words and "OPENHCL_CONFIDENTIAL=1" in words
        assert run.sidecar is None  # never on an isolated VM
    if isolation in ("snp", "tdx"):  # hardware-isolated: no serial output, no hypercalls
        assert run.serial_text("COM3") == "" and run.result.hypercalls == []
    golden.check(f"{isolation}.json", isolation_record(run))


@pytest.mark.parametrize("isolation", ["vbs", "snp"])
def test_measured_confidential_debug_trusts_host(hclsim_boot, golden, isolation):
    run = hclsim_boot(cpus=2, isolation=isolation, static_cmdline="OPENHCL_CONFIDENTIAL_DEBUG=1",
                      host_bootargs="OPENHCL_B=2")
    assert run.cmdline.endswith("OPENHCL_CONFIDENTIAL_DEBUG=1 OPENHCL_B=2")
    golden.check(f"confidential-debug-{isolation}.json", isolation_record(run))
