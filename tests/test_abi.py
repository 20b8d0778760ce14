"""Every constant and binary layout the firmware's C headers and the Python declarations share,
checked in one place: a C program built from the headers prints each shared #define's value and
each shared struct's size and member offsets, and the Python side must agree.

Python declarations: boot/layout.py, sidecar/layout.py (names without the C's SIDECAR_ prefix),
defs/hvdef.py, defs/platform.py, cpu/apic.py and boot/vtl0_guest.py (without VTL0_; its vTPM
constants are also checked against devices/vtpm.py). A #define in a shared header that has no
Python counterpart must be listed in FIRMWARE_ONLY with why, so a constant added on one side
alone fails here.
"""
import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

from hclsim.boot import layout, vtl0_guest
from hclsim.boot.firmware import INCLUDE_DIR, VTL0_GUEST
from hclsim.cpu import apic
from hclsim.defs import hvdef, platform
from hclsim.sidecar import layout as sidecar_layout

HEADERS = (INCLUDE_DIR / "hclsim_abi.h", VTL0_GUEST.source_dir / "vtl0_guest.h")
# (module, prefix the C name has and the Python name drops)
PYTHON_SIDES = ((layout, ""), (hvdef, ""), (platform, ""), (apic, ""), (sidecar_layout, "SIDECAR_"),
                (vtl0_guest, "VTL0_"))
RENAMED = {"VTL0_LOAD_GPA": (vtl0_guest, "IMAGE_GPA"), "HCL_PAGE_SIZE": (layout, "PAGE_SIZE"),
           "SIDECAR_PRIVATE_PAGES_PER_VP": (sidecar_layout, "PRIVATE_PAGES_PER_VP")}
FIRMWARE_ONLY = {
    "HCLSIM_ABI_H": "include guard", "HCLSIM_SIDECAR_ABI": "include guard", "VTL0_GUEST_H": "include guard",
    "SHIM_STACK_SIZE": "the shim's own stack, inside its image",
    "APIC_BASE_X2APIC_ENABLE": "the sidecar's spelling of cpu.apic.APIC_BASE_X2APIC (checked below)",
    "VTL0_CPUID_LEAF": "the leaf the VTL0 guest asks; the simulator answers every leaf",
    "VTL0_MMIO_STRIDE": "the guest's per-VP spacing inside the MMIO test range",
    "VTL0_MMIO_READ_OFF": "offsets inside a VP's slot of the MMIO test range",
    "VTL0_MMIO_WRITE_OFF": "offsets inside a VP's slot of the MMIO test range",
    "VTL0_RESULT_SIZE": "checked as the size of struct vtl0_result",
}
ALIASES = {"APIC_BASE_X2APIC_ENABLE": apic.APIC_BASE_X2APIC}


def _c_defines() -> dict[str, str]:
    """NAME -> header of every object-like #define in the shared headers."""
    names = {}
    for header in HEADERS:
        for m in re.finditer(r"^#define\s+([A-Z_][A-Z0-9_]*)(\s|$)", header.read_text(), re.M):
            names[m.group(1)] = header.name
    return names


def _python_value(cname: str):
    if cname in RENAMED:
        module, name = RENAMED[cname]
        return getattr(module, name)
    if cname in ALIASES:
        return ALIASES[cname]
    for module, prefix in PYTHON_SIDES:
        if cname.startswith(prefix) and isinstance(getattr(module, cname[len(prefix):], None), int):
            return getattr(module, cname[len(prefix):])
        for table, values in vars(module).items():   # a table by name: MEMORY_VTL_TYPE["VTL2_RAM"]
            if isinstance(values, dict) and table.isupper() and cname.startswith(table + "_"):
                return values.get(cname[len(table) + 1:])
    return None


def _ctypes_fields(struct_type, prefix=""):
    """(C member path, offset, size) of every named field, nested structs flattened."""
    for name, ftype, *_ in struct_type._fields_:
        desc = getattr(struct_type, name)
        yield prefix + name, desc.offset, desc.size
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            for sub, off, size in _ctypes_fields(ftype, prefix + name + "."):
                yield sub, desc.offset + off, size


def _dtype_fields(dtype, prefix=""):
    for name in dtype.names:
        ftype, offset = dtype.fields[name][:2]
        yield prefix + name, offset, ftype.itemsize
        if ftype.names and ftype.subdtype is None:
            for sub, off, size in _dtype_fields(ftype, prefix + name + "."):
                yield sub, offset + off, size


def _structs() -> dict[str, list]:
    """C struct name -> [(member path, offset, size)] with ('sizeof', 0, size) first."""
    out = {}
    for table in (layout.SHARED_STRUCTS, hvdef.C_STRUCTS):
        for cname, struct_type in table.items():
            fields = [f for f in _ctypes_fields(struct_type) if not f[0].split(".")[-1].startswith("_pad")]
            out[cname] = [("sizeof", 0, ctypes.sizeof(struct_type))] + fields
    for cname, dtype in {**sidecar_layout.SHARED_DTYPES, "vtl0_result": vtl0_guest.result_dtype}.items():
        out[cname] = [("sizeof", 0, dtype.itemsize)] + list(_dtype_fields(dtype))
    return out


@pytest.fixture(scope="module")
def c_side(tmp_path_factory):
    """What the compiled headers say: {('define', NAME): value, (struct, member): (offset, size)}."""
    if not shutil.which("gcc"):
        pytest.fail("gcc is required to check the firmware headers")
    shared = [n for n in _c_defines() if _python_value(n) is not None]
    lines = ["#include <stdio.h>", "#include <stddef.h>", *(f'#include "{h}"' for h in HEADERS), "int main(void) {"]
    lines += [f'printf("define {n} %llu\\n", (unsigned long long)({n}));' for n in shared]
    for cname, fields in _structs().items():
        lines.append(f'printf("{cname} sizeof 0 %zu\\n", sizeof(struct {cname}));')
        lines += [f'printf("{cname} {path} %zu %zu\\n", offsetof(struct {cname}, {path}), '
                  f'sizeof(((struct {cname} *)0)->{path}));' for path, _, _ in fields[1:]]
    lines += ["return 0;", "}"]
    tmp = tmp_path_factory.mktemp("abi")
    (tmp / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-I", str(INCLUDE_DIR), str(tmp / "abi.c"), "-o", str(tmp / "abi")], check=True)
    result = {}
    for line in subprocess.run([str(tmp / "abi")], check=True, capture_output=True, text=True).stdout.splitlines():
        kind, name, *values = line.split()
        result[(kind, name)] = int(values[0]) if kind == "define" else tuple(int(v) for v in values)
    return result


def test_every_shared_constant_matches(c_side):
    defines = [k for k in c_side if k[0] == "define"]
    assert len(defines) >= 90, "the shared headers' constants were not found"
    for _, name in defines:
        assert c_side[("define", name)] == _python_value(name) & (2**64 - 1), name


def test_vtl0_workload_constants_are_shared(c_side):
    """The loop and power-off ports and the checksum's constants: declared in defs/platform.py,
    not firmware-only, and the record's new fields in the dtype (checked with the struct)."""
    for name in ("VTL0_LOOP_PORT", "VTL0_POWER_PORT", "VTL0_CHECKSUM_BASIS", "VTL0_CHECKSUM_PRIME",
                 "VTL0_HYPERCALL_CODE", "VTL0_HYPERCALL_CONNECTION", "VTL0_HYPERCALL_STATUS"):
        assert name not in FIRMWARE_ONLY and c_side[("define", name)] == getattr(platform, name), name
    assert c_side[("vtl0_result", "checksum")] == (88, 8) and c_side[("vtl0_result", "iterations")] == (96, 4)
    assert c_side[("vtl0_result", "hypercall_status")] == (104, 8)
    assert c_side[("vtl0_result", "post_message")] == (112, 16)


def test_vtl0_measured_boot_constants_are_the_devices_and_the_configs(c_side):
    """The vTPM registers the guest drives are the device's (x86 layout), its command line page
    holds what BootConfig allows, and its pages lie in VTL0 RAM nothing else of the guest uses."""
    from hclsim import config
    from hclsim.devices import vtpm
    g = vtl0_guest
    assert (g.TPM_CONTROL_PORT, g.TPM_DATA_PORT) == (vtpm.CONTROL_PORT, vtpm.DATA_PORT)
    assert (g.TPM_IO_VERSION, g.TPM_IO_MAP_SHARED_MEMORY) == (vtpm.IO_VERSION, vtpm.IO_MAP_SHARED_MEMORY)
    assert (g.TPM_CRB_BASE, g.TPM_LOC_CTRL, g.TPM_START) == (vtpm.CRB_BASE, vtpm.LOC_CTRL, vtpm.START)
    assert g.TPM_BUFFER_SIZE == vtpm.BUFFER_SIZE and g.TPM_BUFFER_GPA % 4096 == 0
    assert g.CMDLINE_MAX == config.VTL0_CMDLINE_MAX and g.CMDLINE_GPA % 4096 == 0
    pages = [(g.PML4_GPA, g.GDT_GPA + 0x1000), (g.CMDLINE_GPA, g.CMDLINE_GPA + g.CMDLINE_MAX + 1),
             (g.TPM_BUFFER_GPA, g.TPM_BUFFER_GPA + 2 * g.TPM_BUFFER_SIZE),
             (g.RESULTS_GPA, g.RESULTS_GPA + 2048 * g.RESULT_SIZE), (g.IMAGE_GPA, g.STACKS_GPA)]
    assert all(a_end <= b for (_, a_end), (b, _) in zip(pages, pages[1:]))
    for name in ("VTL0_FLAG_TPM", "VTL0_CMDLINE_GPA", "VTL0_TPM_BUFFER_GPA", "VTL0_TPM_NV_INDEX",
                 "VTL0_TPM_NV_ATTRIBUTES", "VTL0_TPM_PCR_CMDLINE", "VTL0_TPM_PCR_IMAGE"):
        assert name not in FIRMWARE_ONLY and ("define", name) in c_side, name


def test_every_header_constant_is_declared_in_python_or_firmware_only():
    missing = sorted(n for n in _c_defines() if _python_value(n) is None and n not in FIRMWARE_ONLY)
    assert not missing, f"declare these in Python (or list them in FIRMWARE_ONLY with why): {missing}"


@pytest.mark.parametrize("cname", sorted(_structs()))
def test_struct_matches_header(c_side, cname):
    for path, offset, size in _structs()[cname]:
        expected = (0, size) if path == "sizeof" else (offset, size)
        assert c_side[(cname, path)] == expected, f"{cname}.{path}"


def test_known_linux_and_hyperv_offsets():
    # Fixed by Documentation/arch/x86/zero-page.rst and boot.rst, and by the TLFS.
    assert ctypes.sizeof(layout.BootParams) == 4096
    assert layout.BootParams.hdr.offset == 0x1F1
    assert layout.BootParams.e820_entries.offset == 0x1E8 and layout.BootParams.e820_table.offset == 0x2D0
    assert layout.BootParams.hdr.offset + layout.SetupHeader.cmd_line_ptr.offset == 0x228
    assert ctypes.sizeof(layout.ParavisorCommandLine) == 4096
    assert ctypes.sizeof(hvdef.HvMessage) == 0x100 and ctypes.sizeof(hvdef.HvX64InterceptMessageHeader) == 0x28
    assert ctypes.sizeof(hvdef.HvX64IoPortInterceptMessage) == 0x80
    assert hvdef.HvX64IoPortInterceptMessage.rcx.offset == 0x68
    assert ctypes.sizeof(hvdef.HvX64MemoryInterceptMessage) == 0x50
    assert hvdef.HvX64MemoryInterceptMessage.guest_physical_address.offset == 0x38
    assert ctypes.sizeof(hvdef.HvX64MsrInterceptMessage) == 0x40
    assert ctypes.sizeof(hvdef.HvX64CpuidInterceptMessage) == 0x68
    assert ctypes.sizeof(hvdef.HvInitialVpContext) == 0xE0 and ctypes.sizeof(hvdef.HvEnableVpVtlInput) == 0xF0
    cp, cmd = sidecar_layout.control_page, sidecar_layout.command_page
    assert cp.itemsize == cmd.itemsize == 4096
    assert cmd.fields["intercept_message"][1] == 0x410 and cmd.fields["request_data"][1] == 0x610
    assert sidecar_layout.node_pages(32) == 1 + 13 * 32


def test_sidecar_views_write_through():
    from hclsim.cpu.memory import GuestMemory
    mem = GuestMemory(1 << 20)
    cp = sidecar_layout.view(mem, 0x1000, sidecar_layout.control_page)
    cp["cpu_status"][3] = sidecar_layout.CPU_IDLE
    cp["needs_attention"] = 1
    assert mem.read(0x1000 + 64 + 3, 1) == b"\x01" and mem.read_u32(0x1000 + 24) == 1
    assert np.asarray(cp["cpu_status"]).base is not None
