"""The kernel interface's declarations (defs/kabi.py): the message codec takes what it sends
and refuses what is malformed, the ioctl numbers are Linux's encoding of the real ones, and the
sidecar command page offsets the VM worker uses match the layout the firmware shares."""
import pytest
from hypothesis import given, strategies as st

from hclsim.defs import kabi
from hclsim.sidecar import layout as sl

values = st.lists(st.one_of(st.integers(-2**63, 2**63 - 1), st.binary(max_size=64), st.text(max_size=16),
                            st.lists(st.text(max_size=8), max_size=4)), max_size=6)


@given(values)
def test_round_trip(vs):
    seq, op, out = kabi.decode_request(kabi.encode_request(7, kabi.Op.OPEN, vs))
    assert (seq, op) == (7, kabi.Op.OPEN)
    assert out == [list(v) if isinstance(v, list) else v for v in vs]


@given(st.binary(max_size=80))
def test_garbage_is_refused_cleanly(raw):
    try:
        kabi.decode_request(raw)
    except kabi.KabiError:
        pass


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", kabi.REQUEST.pack(1, 2, 1) + b"b\xff\xff\xff\x7f",
                                 kabi.REQUEST.pack(1, 2, 1) + b"i\x00", kabi.REQUEST.pack(1, 2, 0) + b"junk",
                                 kabi.REQUEST.pack(1, 2, 1) + b"?"])
def test_malformed(raw):
    with pytest.raises(kabi.KabiError):
        kabi.decode_request(raw)


def test_ioctl_numbers():
    # openhcl/hcl/src/ioctl.rs: nix's ioctl_none!(hcl_return_to_lower_vtl, 0xb8, 0x27) etc.
    assert kabi.MSHV_VTL_RETURN_TO_LOWER_VTL == 0xB827
    assert kabi.RNDADDENTROPY == 0x40085203          # <linux/random.h>
    assert kabi.MSHV_SIDECAR_INFO >> 30 == 2 and kabi.MSHV_SIDECAR_INFO & 0xFFFF == 0xB8F3
    assert kabi.IOCTL_NAMES[kabi.MSHV_VTL_RETURN_TO_LOWER_VTL] == "MSHV_VTL_RETURN_TO_LOWER_VTL"


def test_sidecar_command_page_offsets():
    f = sl.command_page.fields
    assert kabi.SIDECAR_CMD_COMMAND == f["command"][1]
    assert kabi.SIDECAR_CMD_HAS_ERROR == f["has_error"][1]
    assert kabi.SIDECAR_CMD_CPU_CONTEXT == f["cpu_context"][1]
    assert kabi.SIDECAR_CMD_INTERCEPT_MESSAGE == f["intercept_message"][1]
    assert kabi.SIDECAR_CMD_ERROR == f["error"][1]
    assert kabi.SIDECAR_CMD_REQUEST_DATA == f["request_data"][1]
    assert kabi.SIDECAR_SHMEM_PAGES_PER_VP == sl.SHMEM_PAGES_PER_VP
    assert (kabi.SIDECAR_COMMAND_RUN_VP, kabi.SIDECAR_COMMAND_GET_VP_REGISTERS,
            kabi.SIDECAR_COMMAND_SET_VP_REGISTERS) == (sl.COMMAND_RUN_VP, sl.COMMAND_GET_VP_REGISTERS,
                                                       sl.COMMAND_SET_VP_REGISTERS)
    assert kabi.RUN_CONTEXT_GPRS == sl.CPU_CONTEXT_GPS


def test_run_page_layout_fits():
    assert kabi.RUN_PAGE_END <= kabi.PAGE_SIZE
    assert kabi.RUN_CONTEXT + 1024 == kabi.RUN_VTL_RET_ACTIONS
    assert kabi.RUN_EXIT_MESSAGE + 256 == kabi.RUN_CONTEXT
