"""Hypercall ABI rules and handlers (hyperv-essentials.md sections 3-6) on a real engine."""
import struct

import pytest

from hclsim.defs import hvdef
from hclsim.hv import hypercalls as hc
from hclsim.cpu import pool
from hclsim.cpu.cpuid import build_cpuid_table
from hclsim.hv.hypervisor import GeneralProtection, Hypervisor

IN, OUT = 0x10000, 0x11000
SELF = 2**64 - 1


@pytest.fixture
def hv():
    mem, engine = pool.acquire(16 << 20, build_cpuid_table(0, 4), io_handler=None,
                               hypercall_handler=None)
    h = Hypervisor(mem, [0, 2, 4, 6])
    h.engine = engine
    yield h
    pool.release(mem, engine)


def call(h, code, payload, reps=0, rep_start=0, in_gpa=IN, extra=0):
    h.mem.write(in_gpa, payload)
    control = code | (reps << 32) | (rep_start << 48) | extra
    result = hc.dispatch(h, h.engine, 0, control, in_gpa, OUT)
    return result & 0xFFFF, (result >> 32) & 0xFFF


def test_get_vp_index_from_apic_id(hv):
    header = struct.pack("<QB7x", SELF, 0)
    assert call(hv, 0x9A, header + struct.pack("<4I", 6, 0, 4, 2), reps=4) == (0, 4)
    assert struct.unpack("<4I", hv.mem.read(OUT, 16)) == (3, 0, 2, 1)
    # an unknown APIC id fails at its index; earlier elements are written
    assert call(hv, 0x9A, header + struct.pack("<3I", 2, 4, 99), reps=3) == (hvdef.HV_STATUS_INVALID_PARAMETER, 2)
    # rep start resumes mid-list
    hv.mem.write(OUT, bytes(16))
    assert call(hv, 0x9A, header + struct.pack("<3I", 2, 4, 6), reps=3, rep_start=1) == (0, 3)
    assert struct.unpack("<3I", hv.mem.read(OUT, 12)) == (0, 2, 3)


def test_get_vp_registers(hv):
    header = struct.pack("<QIB3x", SELF, 0xFFFFFFFE, 0)
    names = struct.pack("<3I", hvdef.HvRegister.VsmVpStatus, hvdef.HvRegister.VsmCodePageOffsets, hvdef.HvRegister.VpIndex)
    assert call(hv, 0x50, header + names, reps=3) == (0, 3)
    values = struct.unpack("<6Q", hv.mem.read(OUT, 48))
    assert values[0] & 0xF == 2 and values[2] == 0x2600F and values[4] == 0
    unknown = struct.pack("<2I", hvdef.HvRegister.VsmVpStatus, 0x12345)
    assert call(hv, 0x50, header + unknown, reps=2) == (hvdef.HV_STATUS_INVALID_PARAMETER, 1)
    other_partition = struct.pack("<QIB3x", 5, 0xFFFFFFFE, 0)
    assert call(hv, 0x50, other_partition + names, reps=1)[0] == hvdef.HV_STATUS_INVALID_PARAMETER


def test_set_vp_registers_guest_os_id(hv):
    header = struct.pack("<QIB3x", SELF, 0xFFFFFFFE, 0)
    assoc = struct.pack("<I12xQQ", hvdef.HvRegister.GuestOsId, 0x1234, 0)
    assert call(hv, 0x51, header + assoc, reps=1) == (0, 1)
    assert hv.guest_os_id == 0x1234
    read_only = struct.pack("<I12xQQ", hvdef.HvRegister.VsmVpStatus, 1, 0)
    assert call(hv, 0x51, header + read_only, reps=1) == (hvdef.HV_STATUS_INVALID_PARAMETER, 0)


@pytest.mark.parametrize("code,reps,rep_start,extra,status", [
    (0x7777, 0, 0, 0, hvdef.HV_STATUS_INVALID_HYPERCALL_CODE),
    (0x9A, 0, 0, 0, hvdef.HV_STATUS_INVALID_HYPERCALL_INPUT),          # rep call with rep count 0
    (0x9A, 2, 2, 0, hvdef.HV_STATUS_INVALID_HYPERCALL_INPUT),          # rep start >= rep count
    (0x9A, 1, 0, 1 << 27, hvdef.HV_STATUS_INVALID_HYPERCALL_INPUT),    # reserved control bits
    (0x9A, 1, 0, 1 << 16, hvdef.HV_STATUS_INVALID_HYPERCALL_INPUT),    # fast calls are not offered
    (0x9A, 1100, 0, 0, hvdef.HV_STATUS_INVALID_HYPERCALL_INPUT),       # input crosses a page
])
def test_abi_rules(hv, code, reps, rep_start, extra, status):
    assert call(hv, code, struct.pack("<QB7x", SELF, 0) + bytes(8), reps=reps, rep_start=rep_start,
                extra=extra)[0] == status


def test_misaligned_input(hv):
    assert call(hv, 0x9A, struct.pack("<QB7xI", SELF, 0, 0), reps=1, in_gpa=IN + 4)[0] == hvdef.HV_STATUS_INVALID_ALIGNMENT


def test_synthetic_msrs(hv):
    e = hv.engine
    hv.wrmsr(e, 0, 0x40000000, 0x0000010000000000)
    assert hv.rdmsr(e, 0, 0x40000000) == 0x0000010000000000
    assert hv.rdmsr(e, 2, 0x40000002) == 2
    with pytest.raises(GeneralProtection):
        hv.wrmsr(e, 0, 0x40000002, 5)              # VP_INDEX is read-only
    with pytest.raises(GeneralProtection):
        hv.wrmsr(e, 0, 0x40000001, 0x5000 | 0x4)   # reserved bits
    original = hv.mem.read(0x5000, 16)
    hv.wrmsr(e, 0, 0x40000001, 0x5000 | 1)
    assert hv.mem.read(0x5000, 4) == b"\x0f\x01\xc1\xc3"
    assert hv.mem.read(0x5026, 11) == bytes.fromhex("4889c8b912000000 0f01c1".replace(" ", ""))
    hv.wrmsr(e, 0, 0x40000001, 0)                  # disabled: the RAM underneath shows again
    assert hv.mem.read(0x5000, 16) == original


def _vp_input(vp_index, vtl=2, partition=SELF):
    return struct.pack("<QIB3x", partition, vp_index, vtl) + bytes(0xE0)


@pytest.mark.parametrize("code", [0x0F, 0x99])
def test_enable_vtl_and_start_vp_errors(hv, code):
    assert call(hv, code, _vp_input(9))[0] == hvdef.HV_STATUS_INVALID_VP_INDEX
    assert call(hv, code, _vp_input(0))[0] == hvdef.HV_STATUS_INVALID_PARAMETER      # the caller itself
    assert call(hv, code, _vp_input(1, partition=7))[0] == hvdef.HV_STATUS_INVALID_PARAMETER


def test_enable_vtl_then_start(hv):
    assert call(hv, 0x99, _vp_input(1))[0] == hvdef.HV_STATUS_INVALID_VP_STATE      # VTL2 not enabled yet
    assert call(hv, 0x0F, _vp_input(1, vtl=1))[0] == hvdef.HV_STATUS_INVALID_PARAMETER
    assert call(hv, 0x0F, _vp_input(1))[0] == hvdef.HV_STATUS_SUCCESS
    assert call(hv, 0x0F, _vp_input(1))[0] == hvdef.HV_STATUS_VTL_ALREADY_ENABLED
    assert call(hv, 0x99, _vp_input(1, vtl=3))[0] == hvdef.HV_STATUS_ACCESS_DENIED
    assert call(hv, 0x99, _vp_input(1))[0] == hvdef.HV_STATUS_SUCCESS
    assert hv.vps[1].start_context is not None and hv.vps[1].started
    assert call(hv, 0x99, _vp_input(1))[0] == hvdef.HV_STATUS_INVALID_VP_STATE      # already started


def test_x2apic_msrs_and_ipis(hv):
    e = hv.engine
    with pytest.raises(GeneralProtection):
        hv.rdmsr(e, 1, 0x802)                       # x2APIC mode off
    hv.wrmsr(e, 1, 0x1B, 0xFEE00000 | (1 << 10) | (1 << 11))
    assert hv.rdmsr(e, 1, 0x802) == 2               # APIC id of VP 1
    hv.wrmsr(e, 1, 0x80F, 0x1FF)
    hv.wrmsr(e, 0, 0x1B, 0xFEE00000 | (1 << 10) | (1 << 11))
    hv.wrmsr(e, 0, 0x830, 0x41 | (2 << 32))         # fixed IPI, vector 0x41, to APIC id 2 (VP 1)
    assert hv.vps[1].deliverable() == 0x41
    hv.vps[1].accept(0x41)
    hv.wrmsr(e, 1, 0x80B, 0)
    assert hv.vps[1].isr == []
    hv.wrmsr(e, 0, 0x830, 0x42 | (3 << 18))         # all but self
    assert [0x42 in v.irr for v in hv.vps] == [False, True, True, True]
    with pytest.raises(GeneralProtection):
        hv.wrmsr(e, 0, 0x830, 0x42 | (5 << 8))      # INIT: no INIT-SIPI in this platform


def test_parse_vp_context_reads_what_the_sidecar_writes():
    import numpy as np
    from hclsim.sidecar import layout as sl
    ctx = np.zeros(1, sl.hv_initial_vp_context)[0]
    ctx["rip"], ctx["rsp"], ctx["rflags"] = 0x1111, 0x2222, 0x2
    ctx["cs"]["selector"], ctx["ss"]["selector"], ctx["gs"]["selector"] = 0x10, 0x18, 0x2B
    ctx["gdtr"]["base"], ctx["gdtr"]["limit"] = 0x5000, 0x1F
    ctx["idtr"]["base"], ctx["idtr"]["limit"] = 0x6000, 0x20F
    ctx["efer"], ctx["cr0"], ctx["cr3"], ctx["cr4"], ctx["msr_cr_pat"] = 0xD00, 0x80000021, 0x7000, 0x260, 0x0007040600070406
    parsed = hc.parse_vp_context(ctx.tobytes())
    assert parsed.rip == 0x1111 and parsed.rsp == 0x2222 and parsed.rflags == 2
    assert (parsed.cs.selector, parsed.ss.selector, parsed.gs.selector) == (0x10, 0x18, 0x2B)
    assert (parsed.gdtr.base, parsed.gdtr.limit, parsed.idtr.base, parsed.idtr.limit) == (0x5000, 0x1F, 0x6000, 0x20F)
    assert (parsed.efer, parsed.cr0, parsed.cr3, parsed.cr4) == (0xD00, 0x80000021, 0x7000, 0x260)
    assert parsed.msr_cr_pat == 0x0007040600070406


def test_the_reference_tsc_page_gives_100ns_units_of_the_instruction_clock(hv):
    """HV_X64_MSR_REFERENCE_TSC (TLFS 12.7): enabled, the page holds sequence, scale and offset
    such that (TSC * scale) >> 64 + offset counts 100 ns; the TSC ticks once an instruction."""
    page = 0x20000
    hv.wrmsr(hv.engine, 0, hvdef.HV_X64_MSR_REFERENCE_TSC, page | 1)
    assert hv.rdmsr(hv.engine, 0, hvdef.HV_X64_MSR_REFERENCE_TSC) == page | 1
    sequence, _reserved, scale, offset = struct.unpack("<IIQq", hv.mem.read(page, 24))
    assert sequence != 0 and offset == 0
    tsc = 12_345_678_900                                   # 12.3456789 s at 1 GHz
    assert (tsc * scale) >> 64 == tsc // 100 - 1           # 100 ns units (scale is 2^64/100, floored)
    with pytest.raises(GeneralProtection, match="reserved bits"):
        hv.wrmsr(hv.engine, 0, hvdef.HV_X64_MSR_REFERENCE_TSC, page | 0x10)
