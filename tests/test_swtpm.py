"""The vTPM's engine: a real swtpm process over its socket interface, driven with TPM 2.0
commands built from the TCG library's layouts; results checked against hashlib."""
import hashlib
import os

import pytest

from hclsim.devices import swtpm

pytestmark = pytest.mark.skipif(swtpm.swtpm_binary() is None, reason="swtpm is not installed (.ci/run installs it)")


def test_startup_random_and_a_measured_pcr(tmp_path):
    tpm = swtpm.Swtpm(str(tmp_path / "tpm"))
    try:
        assert swtpm.response_code(tpm.execute(swtpm.startup_clear())) == swtpm.TPM_RC_SUCCESS
        assert swtpm.response_code(tpm.execute(swtpm.startup_clear())) == swtpm.TPM_RC_INITIALIZE   # once only
        r = tpm.execute(swtpm.get_random(16))
        assert swtpm.response_code(r) == 0 and len(r) == 10 + 2 + 16
        measured = hashlib.sha256(b"kernel command line").digest()
        assert swtpm.response_code(tpm.execute(swtpm.pcr_extend_sha256(8, measured))) == 0
        got = swtpm.pcr_read_digest(tpm.execute(swtpm.pcr_read_sha256(8)))
        assert got == hashlib.sha256(bytes(32) + measured).digest()      # the event log replayed
    finally:
        tpm.close()
    assert tpm.proc.returncode is not None
    assert any(name.startswith("tpm2-") for name in os.listdir(tmp_path / "tpm"))   # its NV state on disk


def test_a_malformed_command_is_refused_before_swtpm_sees_it(tmp_path):
    tpm = swtpm.Swtpm(str(tmp_path / "tpm"))
    try:
        with pytest.raises(swtpm.SwtpmError, match="not a TPM command"):
            tpm.execute(b"\x80\x01\x00\x00\x00\xff\x00\x00\x01\x44")
        assert swtpm.response_code(tpm.execute(swtpm.startup_clear())) == 0      # it still serves
    finally:
        tpm.close()


def test_swtpm_gone_mid_session_is_one_clear_error(tmp_path):
    tpm = swtpm.Swtpm(str(tmp_path / "tpm"))
    try:
        tpm.execute(swtpm.startup_clear())
        tpm.proc.kill()
        tpm.proc.wait()
        with pytest.raises(swtpm.SwtpmError, match="swtpm is gone"):
            tpm.execute(swtpm.get_random(8))
    finally:
        tpm.close()
