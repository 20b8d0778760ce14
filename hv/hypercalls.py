"""Hypercall ABI checks and handlers (hyperv-essentials.md sections 3-6).

dispatch() validates the control word and the input/output GPAs the way hv1_hypercall does,
then calls the handler for the code. Handlers get the input bytes and return
(status, reps completed, output bytes).
"""
import ctypes
import struct
from dataclasses import dataclass

from hclsim.defs.hvdef import (CONTROL_NAMES, GPR_NAMES, HV_PARTITION_ID_SELF, HV_STATUS_ACCESS_DENIED,
                               HV_STATUS_INVALID_ALIGNMENT, HV_STATUS_INVALID_HYPERCALL_CODE,
                               HV_STATUS_INVALID_HYPERCALL_INPUT, HV_STATUS_INVALID_PARAMETER,
                               HV_STATUS_INVALID_VP_INDEX, HV_STATUS_INVALID_VP_STATE, HV_STATUS_SUCCESS,
                               HV_STATUS_VTL_ALREADY_ENABLED, HV_VP_INDEX_SELF, MSR_REGISTERS, VTL0_REGISTERS,
                               VTL2, HvCall, HvEnableVpVtlInput, HvInitialVpContext, HvRegister)

VSM_VP_STATUS_VTL2 = VTL2 | (1 << 16) | (1 << 18)   # active VTL 2; VTL0 and VTL2 enabled
VSM_CAPABILITIES = 0x18000000


@dataclass(frozen=True)
class CallSpec:
    rep: bool
    header: int         # fixed input header bytes
    in_element: int     # rep input element size
    out_element: int    # rep output element size (or simple output size)
    handler: object


def _u32(data, off):
    return struct.unpack_from("<I", data, off)[0]


def _u64(data, off):
    return struct.unpack_from("<Q", data, off)[0]


def _check_self(header: bytes, vp: int) -> int | None:
    partition, vp_index = _u64(header, 0), _u32(header, 8)
    if partition != HV_PARTITION_ID_SELF or vp_index not in (HV_VP_INDEX_SELF, vp):
        return HV_STATUS_INVALID_PARAMETER
    input_vtl = header[12]
    if input_vtl & 0xE0 or (input_vtl & 0x10 and (input_vtl & 0xF) > VTL2):
        return HV_STATUS_INVALID_PARAMETER
    return None


# Where the hypercall page (hypervisor.hypercall_page_bytes) has its 64-bit VTL call/return stubs.
VTL_CALL_OFFSET, VTL_RETURN_OFFSET = 0x0F, 0x26
VSM_REGISTERS = {HvRegister.VsmCodePageOffsets: VTL_CALL_OFFSET | (VTL_RETURN_OFFSET << 12), HvRegister.VsmVpStatus: VSM_VP_STATUS_VTL2,
                 HvRegister.VsmPartitionStatus: (1 << 0) | (1 << 2) | (VTL2 << 16),
                 HvRegister.VsmCapabilities: VSM_CAPABILITIES}


def _register_value(hv, engine, vp: int, name: int) -> int | None:
    if name in VSM_REGISTERS:
        return VSM_REGISTERS[name]
    if name in MSR_REGISTERS:
        return hv.rdmsr(engine, vp, MSR_REGISTERS[name])
    if name in GPR_NAMES:
        return engine.reg(GPR_NAMES[name])
    if name in CONTROL_NAMES:
        return engine.reg(CONTROL_NAMES[name])
    return None


def _target_vtl(header: bytes) -> int:
    """The VTL an HvInputVtl byte names (its own when 'use target VTL' is clear)."""
    return header[12] & 0xF if header[12] & 0x10 else VTL2


def _lower_vtl_value(hv, vp: int, name: int) -> int | None:
    regs = hv.vps[vp].vtl0_registers
    return regs.get(name) if name in VTL0_REGISTERS else None


def get_vp_registers(hv, engine, vp, header, elements, rep_count):
    status = _check_self(header, vp)
    if status is not None:
        return status, 0, b""
    lower = _target_vtl(header) == 0
    out = bytearray()
    for i in range(rep_count):
        name = _u32(elements, 4 * i)
        value = _lower_vtl_value(hv, vp, name) if lower else _register_value(hv, engine, vp, name)
        if value is None:
            return HV_STATUS_INVALID_PARAMETER, i, bytes(out)
        out += struct.pack("<QQ", value & (2**64 - 1), 0)
    return HV_STATUS_SUCCESS, rep_count, bytes(out)


def set_vp_registers(hv, engine, vp, header, elements, rep_count):
    status = _check_self(header, vp)
    if status is not None:
        return status, 0, b""
    lower = _target_vtl(header) == 0
    for i in range(rep_count):
        name, value = _u32(elements, 32 * i), _u64(elements, 32 * i + 16)
        if lower:
            if name not in VTL0_REGISTERS:
                return HV_STATUS_INVALID_PARAMETER, i, b""
            hv.vps[vp].vtl0_registers[name] = value
        elif name in GPR_NAMES:
            engine.set_reg(GPR_NAMES[name], value)
        elif name == HvRegister.GuestOsId:
            hv.guest_os_id = value
        else:  # read-only or unknown: as virt_whp, INVALID_PARAMETER at the failing index
            return HV_STATUS_INVALID_PARAMETER, i, b""
    return HV_STATUS_SUCCESS, rep_count, b""


def get_vp_index_from_apic_id(hv, engine, vp, header, elements, rep_count):
    if _u64(header, 0) != HV_PARTITION_ID_SELF or header[8] > VTL2 or any(header[9:16]):
        return HV_STATUS_INVALID_PARAMETER, 0, b""
    out = bytearray()
    for i in range(rep_count):
        index = hv.vp_by_apic.get(_u32(elements, 4 * i))
        if index is None:
            return HV_STATUS_INVALID_PARAMETER, i, bytes(out)
        out += struct.pack("<I", index)
    return HV_STATUS_SUCCESS, rep_count, bytes(out)


VP_CONTEXT_SIZE = ctypes.sizeof(HvInitialVpContext)
VP_CONTEXT_CR3 = HvInitialVpContext.cr3.offset
_CONTEXT_OFFSET = HvEnableVpVtlInput.context.offset


def parse_vp_context(raw: bytes) -> HvInitialVpContext:
    """The HvInitialVpContext a StartVp or EnableVpVtl carried (raw: its 0xE0 bytes)."""
    return HvInitialVpContext.from_buffer_copy(bytes(raw[:VP_CONTEXT_SIZE]).ljust(VP_CONTEXT_SIZE, b"\0"))


def _context(header: bytes) -> bytes:
    return bytes(header[_CONTEXT_OFFSET:_CONTEXT_OFFSET + VP_CONTEXT_SIZE])


def _target_vp(hv, header: bytes):
    if _u64(header, 0) != HV_PARTITION_ID_SELF:
        return HV_STATUS_INVALID_PARAMETER, None
    index = _u32(header, 8)
    if index >= len(hv.vps):
        return HV_STATUS_INVALID_VP_INDEX, None
    return None, hv.vps[index]


def enable_vp_vtl(hv, engine, vp, header, elements, rep_count):
    status, target = _target_vp(hv, header)
    if status is not None:
        return status, 0, b""
    if target.index == vp or header[12] != VTL2 or any(header[13:16]):
        return HV_STATUS_INVALID_PARAMETER, 0, b""
    if target.vtl2_enabled:
        return HV_STATUS_VTL_ALREADY_ENABLED, 0, b""
    target.vtl2_enabled = True
    target.vtl2_context = _context(header)  # kept raw: parsed only if ever used
    return HV_STATUS_SUCCESS, 0, b""


def start_virtual_processor(hv, engine, vp, header, elements, rep_count):
    status, target = _target_vp(hv, header)
    if status is not None:
        return status, 0, b""
    if target.index == vp:
        return HV_STATUS_INVALID_PARAMETER, 0, b""
    if header[12] > VTL2:
        return HV_STATUS_ACCESS_DENIED, 0, b""
    if header[12] == VTL2 and not target.vtl2_enabled or target.started:
        return HV_STATUS_INVALID_VP_STATE, 0, b""
    target.started = True
    target.start_context = _context(header)   # parsed when the scheduler starts it
    return HV_STATUS_SUCCESS, 0, b""


TRANSLATE_SUCCESS, TRANSLATE_PAGE_NOT_PRESENT, TRANSLATE_PRIVILEGE_VIOLATION = 0, 1, 2
TRANSLATE_GPA_UNMAPPED = 4
FLAG_VALIDATE_WRITE, FLAG_VALIDATE_EXECUTE, FLAG_PRIVILEGE_EXEMPT, FLAG_USER = 1 << 1, 1 << 2, 1 << 3, 1 << 7


def translate_virtual_address_ex(hv, engine, vp, header, elements, rep_count):
    """Walk the target VTL's page tables for one GVA page (virt_whp semantics: a failed walk is
    status SUCCESS with a result code)."""
    if _u64(header, 0) != HV_PARTITION_ID_SELF or _u32(header, 8) not in (HV_VP_INDEX_SELF, vp):
        return HV_STATUS_INVALID_PARAMETER, 0, b""
    flags, gvn = _u64(header, 0x10), _u64(header, 0x18)
    input_vtl = flags >> 56
    if input_vtl & 0xE0:
        return HV_STATUS_INVALID_PARAMETER, 0, b""
    vtl = input_vtl & 0xF if input_vtl & 0x10 else VTL2
    if vtl == 0:
        regs = hv.vps[vp].vtl0_registers
        cr0, cr3 = regs.get(HvRegister.Cr0, 0), regs.get(HvRegister.Cr3, 0)
    else:
        cr0, cr3 = engine.reg("cr0"), engine.reg("cr3")
    code, gpa_page = _translate(hv.mem, cr0, cr3, gvn << 12, flags)
    return HV_STATUS_SUCCESS, 0, struct.pack("<I4x8x32xQQ", code, gpa_page, 0)


def _translate(mem, cr0: int, cr3: int, gva: int, flags: int) -> tuple[int, int]:
    from hclsim.cpu.pagetable import PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US, walk_steps
    if not cr0 & 0x80000000:  # paging off: GVA = GPA
        return (TRANSLATE_SUCCESS, gva >> 12) if mem.contains(gva) else (TRANSLATE_GPA_UNMAPPED, 0)
    steps = walk_steps(mem.array(), cr3, gva)
    writable = user = executable = True
    for name, _gpa, entry in steps:
        if entry < 0 or not entry & PTE_P:
            return TRANSLATE_PAGE_NOT_PRESENT, 0
        writable &= bool(entry & PTE_RW)
        user &= bool(entry & PTE_US)
        executable &= not entry & PTE_NX
    name, _gpa, leaf = steps[-1]
    if not flags & FLAG_PRIVILEGE_EXEMPT and ((flags & FLAG_VALIDATE_WRITE and not writable)
                                             or (flags & FLAG_VALIDATE_EXECUTE and not executable)
                                             or (flags & FLAG_USER and not user)):
        return TRANSLATE_PRIVILEGE_VIOLATION, 0
    size = {"PDPTE": 1 << 30, "PDE": 1 << 21}.get(name, 1 << 12) if leaf & PTE_PS or name == "PTE" else 1 << 12
    gpa = (leaf & 0x000FFFFFFFFFF000 & ~(size - 1)) | (gva & (size - 1))
    if not mem.contains(gpa):
        return TRANSLATE_GPA_UNMAPPED, 0
    return TRANSLATE_SUCCESS, gpa >> 12


CALLS = {
    HvCall.TranslateVirtualAddressEx: CallSpec(False, 0x20, 0, 0x40, translate_virtual_address_ex),
    HvCall.EnableVpVtl: CallSpec(False, ctypes.sizeof(HvEnableVpVtlInput), 0, 0, enable_vp_vtl),
    HvCall.StartVirtualProcessor: CallSpec(False, ctypes.sizeof(HvEnableVpVtlInput), 0, 0, start_virtual_processor),
    HvCall.GetVpRegisters: CallSpec(True, 0x10, 4, 16, get_vp_registers),
    HvCall.SetVpRegisters: CallSpec(True, 0x10, 32, 0, set_vp_registers),
    HvCall.GetVpIndexFromApicId: CallSpec(True, 0x10, 4, 4, get_vp_index_from_apic_id),
}


def result(status: int, reps: int = 0) -> int:
    return (status & 0xFFFF) | ((reps & 0xFFF) << 32)


def dispatch(hv, engine, vp: int, control: int, in_gpa: int, out_gpa: int) -> int:
    """Validate and run one hypercall; the RAX result value."""
    code = control & 0xFFFF
    fast = (control >> 16) & 1
    var_size = (control >> 17) & 0x3FF
    rep_count = (control >> 32) & 0xFFF
    rep_start = (control >> 48) & 0xFFF
    spec = CALLS.get(code)
    if spec is None:
        return result(HV_STATUS_INVALID_HYPERCALL_CODE)
    if control & ((0xF << 27) | (0xF << 44) | (0xF << 60)) or fast:
        return result(HV_STATUS_INVALID_HYPERCALL_INPUT)
    if spec.rep:
        if rep_count == 0 or rep_start >= rep_count:
            return result(HV_STATUS_INVALID_HYPERCALL_INPUT)
    elif rep_count or rep_start or var_size:
        return result(HV_STATUS_INVALID_HYPERCALL_INPUT)
    in_len = spec.header + 8 * var_size + spec.in_element * rep_count
    out_len = spec.out_element * rep_count if spec.rep else spec.out_element
    for gpa, length in ((in_gpa, in_len), (out_gpa, out_len)):
        if length == 0:
            continue
        if gpa & 7:
            return result(HV_STATUS_INVALID_ALIGNMENT)
        if (gpa & 0xFFF) + length > 0x1000 or not hv.mem.contains(gpa, length):
            return result(HV_STATUS_INVALID_HYPERCALL_INPUT)
    data = hv.mem.read(in_gpa, in_len)
    header, elements = data[:spec.header], data[spec.header + 8 * var_size:]
    # Rep calls resume at rep_start: elements before it are already done.
    skip = rep_start * spec.in_element
    status, done, output = spec.handler(hv, engine, vp, header, elements[skip:], rep_count - rep_start)
    if output and (spec.rep or status == HV_STATUS_SUCCESS):
        hv.mem.write(out_gpa + rep_start * spec.out_element, output)
    return result(status, rep_start + done)
