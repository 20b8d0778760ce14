"""The sidecar's numpy layouts (hclsim/sidecar/layout.py) agree with the firmware header."""
import subprocess

import numpy as np
import pytest

from hclsim.boot.firmware import INCLUDE_DIR
from hclsim.sidecar import layout


def _fields(dtype, prefix=""):
    for name in dtype.names:
        ftype, offset = dtype.fields[name][:2]
        path = prefix + name
        yield path, offset, ftype.itemsize
        base = ftype.base if ftype.subdtype is None else ftype.subdtype[0]
        if base.names and ftype.subdtype is None:
            for sub, off, size in _fields(base, path + "."):
                yield sub, offset + off, size


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "hclsim_abi.h"', "int main(void) {"]
    for cname, dtype in layout.SHARED_DTYPES.items():
        lines.append(f'printf("{cname} sizeof %zu\\n", sizeof(struct {cname}));')
        for path, _, _ in _fields(dtype):
            lines.append(f'printf("{cname} {path} %zu %zu\\n", offsetof(struct {cname}, {path}), '
                         f'sizeof(((struct {cname} *)0)->{path}));')
    lines += ["return 0;", "}"]
    tmp = tmp_path_factory.mktemp("sidecar_layout")
    (tmp / "l.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-I", str(INCLUDE_DIR), str(tmp / "l.c"), "-o", str(tmp / "l")], check=True)
    out = subprocess.run([str(tmp / "l")], check=True, capture_output=True, text=True).stdout
    return {(p[0], p[1]): tuple(int(x) for x in p[2:]) for p in (l.split() for l in out.splitlines())}


@pytest.mark.parametrize("cname", sorted(layout.SHARED_DTYPES))
def test_dtype_matches_header(c_layout, cname):
    dtype = layout.SHARED_DTYPES[cname]
    assert c_layout[(cname, "sizeof")] == (dtype.itemsize,)
    for path, offset, size in _fields(dtype):
        assert c_layout[(cname, path)] == (offset, size), f"{cname}.{path}"


def test_reference_offsets():
    cp, cmd = layout.control_page, layout.command_page
    assert cp.itemsize == cmd.itemsize == 4096
    assert cp.fields["needs_attention"][1] == 24 and cp.fields["cpu_status"][1] == 64
    assert cmd.fields["cpu_context"][1] == 0x10 and cmd.fields["intercept_message"][1] == 0x410
    assert cmd.fields["error"][1] == 0x510 and cmd.fields["request_data"][1] == 0x610
    assert layout.hv_initial_vp_context.itemsize == 0xE0
    assert layout.hv_enable_vp_vtl_input.itemsize == 0xF0
    assert layout.node_pages(32) == 1 + 13 * 32


def test_constants_match_header():
    text = (INCLUDE_DIR / "hclsim_abi.h").read_text()
    for cname, value in (("SIDECAR_MAX_NODES", layout.MAX_NODES), ("SIDECAR_CPU_REMOVE", layout.CPU_REMOVE),
                         ("SIDECAR_COMMAND_TRANSLATE_GVA", layout.COMMAND_TRANSLATE_GVA),
                         ("SIDECAR_IMAGE_VA", layout.IMAGE_VA),
                         ("SIDECAR_MAX_REGISTERS_PER_COMMAND", layout.MAX_REGISTERS_PER_COMMAND)):
        line = next(l for l in text.splitlines() if l.startswith(f"#define {cname} "))
        assert int(line.split()[2].rstrip("uUlL"), 0) == value, cname


def test_view_writes_through():
    from hclsim.cpu.memory import GuestMemory
    mem = GuestMemory(1 << 20)
    cp = layout.view(mem, 0x1000, layout.control_page)
    cp["cpu_status"][3] = layout.CPU_IDLE
    cp["needs_attention"] = 1
    assert mem.read(0x1000 + 64 + 3, 1) == b"\x01"
    assert mem.read_u32(0x1000 + 24) == 1
    assert np.asarray(cp["cpu_status"]).base is not None
