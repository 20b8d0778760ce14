"""Mutated ShimParamsRaw: one to three fields set to values a broken loader could write (0, -1,
the extremes, a page off, another field's value, an address inside the shim's code). The shim
checks them before it writes anything (params.c): a clean panic, or a handoff whose e820 is what
the shim should build from those parameters.

Not tried: a kernel or sidecar entry moved to another byte *inside* its own image. The shim is
told where each image starts executing and cannot tell a wrong offset in it from a right one
(those are measured IGVM inputs); such a jump runs the image from that byte, as hardware would.
"""
import ctypes
import dataclasses

from hypothesis import given, strategies as st

from hclsim.boot import layout as L
from hclsim.config import BootConfig
from hclsim.machine import Machine

from .harness import ShimInputs, boot_case, check_handoff, fuzz_settings, run_then_check_pristine

CONFIG = BootConfig(cpus=4)
FIELDS = [name for name, _type in L.ShimParamsRaw._fields_]
_BASE = {}


def base():
    """The pristine ShimParamsRaw, the shim base, the kernel and sidecar regions, shim symbols."""
    if not _BASE:
        m = Machine(CONFIG)
        try:
            _BASE.update(params=m.mem.read_struct(L.ShimParamsRaw, m.image.params_gpa), shim_base=m.image.shim_base,
                         kernel=m.layout.region("kernel"), sidecar=m.layout.region("sidecar"),
                         symbols=sorted({addr for addr, size, _ in m.shim.symbols if size}))
        finally:
            m.close()
    return _BASE


def _fit(name: str, value: int) -> int:
    ctype = dict(L.ShimParamsRaw._fields_)[name]
    bits = 8 * ctypes.sizeof(ctype)
    value &= (1 << bits) - 1
    signed = ctype in (ctypes.c_int64, ctypes.c_int32, ctypes.c_int16, ctypes.c_int8)
    return value - (1 << bits) if signed and value >> (bits - 1) else value


@st.composite
def mutation(draw):
    b = base()
    p = b["params"]
    out = {}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(FIELDS))
        cur = getattr(p, name)
        value = draw(st.one_of(
            st.sampled_from([0, 1, -1, 0x1000, -0x1000, 1 << 63, (1 << 63) - 1, 1 << 40]),
            st.sampled_from([cur + 1, cur - 1, cur + 0x1000, cur - 0x1000, cur * 2, cur + 0x200000]),
            st.sampled_from(FIELDS).map(lambda other: getattr(p, other)),
            st.sampled_from(b["symbols"]).flatmap(lambda a: st.integers(a, a + 64)),  # into the shim's code
            st.integers(-(1 << 63), (1 << 64) - 1)))
        out[name] = _fit(name, value)
    return out


def _entry_inside_its_image(params: dict) -> bool:
    b = base()
    for field, region, real in (("kernel_entry_offset", b["kernel"], b["params"].kernel_entry_offset),
                                ("sidecar_entry_offset", b["sidecar"], b["params"].sidecar_entry_offset)):
        if field in params and params[field] != real and region.start <= b["shim_base"] + params[field] < region.end:
            return True
    return False


@given(params=mutation())
@fuzz_settings(200)
def _shim_params(params):
    if _entry_inside_its_image(params):
        return  # see the module docstring
    out = boot_case(CONFIG, params=params)
    if out.kind == "handoff":  # with sidecar_size 0 the shim has no sidecar to start
        check_handoff(out, dataclasses.replace(ShimInputs.of(CONFIG), sidecar_image=out.params.sidecar_size > 0))
    else:
        assert out.kind == "panic", out


def test_mutated_shim_params():
    run_then_check_pristine(_shim_params)
