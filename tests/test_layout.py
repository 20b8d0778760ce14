"""The Python layout declarations (boot/layout.py) agree with the firmware's C header."""
import ctypes
import shutil
import subprocess

import pytest

from hclsim.boot import layout
from hclsim.boot.firmware import INCLUDE_DIR


def _fields(struct_type, prefix=""):
    """(C member path, offset, size) of every named field, nested structs flattened."""
    for name, ftype, *_ in struct_type._fields_:
        desc = getattr(struct_type, name)
        path = prefix + name
        yield path, desc.offset, desc.size
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            for sub, off, size in _fields(ftype, path + "."):
                yield sub, desc.offset + off, size


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.fail("gcc is required to check the firmware header")
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "hclsim_abi.h"', "int main(void) {"]
    for cname, pytype in layout.SHARED_STRUCTS.items():
        lines.append(f'printf("{cname} sizeof %zu\\n", sizeof(struct {cname}));')
        for path, _, _ in _fields(pytype):
            if path.split(".")[-1].startswith("_pad"):
                continue
            lines.append(f'printf("{cname} {path} %zu %zu\\n", offsetof(struct {cname}, {path}), '
                         f'sizeof(((struct {cname} *)0)->{path}));')
    lines += ["return 0;", "}"]
    tmp = tmp_path_factory.mktemp("layout")
    src = tmp / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp / "layout"
    subprocess.run(["gcc", "-I", str(INCLUDE_DIR), str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        parts = line.split()
        result[(parts[0], parts[1])] = tuple(int(p) for p in parts[2:])
    return result


@pytest.mark.parametrize("cname", sorted(layout.SHARED_STRUCTS))
def test_struct_matches_header(c_layout, cname):
    pytype = layout.SHARED_STRUCTS[cname]
    assert c_layout[(cname, "sizeof")] == (ctypes.sizeof(pytype),)
    for path, offset, size in _fields(pytype):
        if path.split(".")[-1].startswith("_pad"):
            continue
        assert c_layout[(cname, path)] == (offset, size), f"{cname}.{path}"


def test_known_linux_offsets():
    # Offsets fixed by Documentation/arch/x86/zero-page.rst and boot.rst.
    assert ctypes.sizeof(layout.BootParams) == 4096
    assert layout.BootParams.hdr.offset == 0x1F1
    assert layout.BootParams.e820_entries.offset == 0x1E8
    assert layout.BootParams.e820_table.offset == 0x2D0
    assert layout.BootParams.ext_cmd_line_ptr.offset == 0x0C8
    assert layout.BootParams.hdr.offset + layout.SetupHeader.cmd_line_ptr.offset == 0x228
    assert layout.BootParams.hdr.offset + layout.SetupHeader.setup_data.offset == 0x250
    assert ctypes.sizeof(layout.BootE820Entry) == 20
    assert ctypes.sizeof(layout.ParavisorCommandLine) == 4096


def test_constants_match_header():
    text = (INCLUDE_DIR / "hclsim_abi.h").read_text()
    for name in ("STACK_COOKIE", "MAX_CPU_COUNT", "SHIM_LOG_MAGIC", "E820_RAM", "SETUP_DTB", "ISOLATION_TDX"):
        value = getattr(layout, name)
        assert f"#define {name} " in text
        line = next(l for l in text.splitlines() if l.startswith(f"#define {name} "))
        assert int(line.split()[2].rstrip("u").split("/")[0], 0) == value, name
