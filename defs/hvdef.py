"""The Hyper-V interface, declared once (TLFS; shared/design/hyperv-essentials.md): synthetic MSRs,
hypercall codes and statuses, register names, the VP assist page, HvMessage and the x64 intercept
messages, and the initial VP context. The C side is boot/firmware/include/hclsim_abi.h;
tests/test_abi.py compiles it and checks every constant and layout both sides declare.

Names follow the C header (and so the TLFS): `HV_X64_MSR_HYPERCALL`, `HVCALL_START_VIRTUAL_PROCESSOR`,
`HV_STATUS_INVALID_PARAMETER`; the enums give the same numbers their TLFS names for reports.
"""
import ctypes
import enum
import struct
from ctypes import c_uint8 as u8, c_uint16 as u16, c_uint32 as u32, c_uint64 as u64

# ---- CPUID leaves (section 1) ----------------------------------------------------------------


class HvCpuidLeaf(enum.IntEnum):
    VendorAndMaxFunctions = 0x40000000
    Interface = 0x40000001
    Version = 0x40000002
    Features = 0x40000003
    EnlightenmentInfo = 0x40000004
    ImplementationLimits = 0x40000005
    HardwareFeatures = 0x40000006
    IsolationConfiguration = 0x4000000C


# ---- synthetic MSRs (section 2) -------------------------------------------------------------
HV_X64_MSR_GUEST_OS_ID = 0x40000000
HV_X64_MSR_HYPERCALL = 0x40000001
HV_X64_MSR_VP_INDEX = 0x40000002
HV_X64_MSR_TIME_REF_COUNT = 0x40000020
HV_X64_MSR_REFERENCE_TSC = 0x40000021
HV_X64_MSR_TSC_FREQUENCY = 0x40000022
HV_X64_MSR_APIC_FREQUENCY = 0x40000023
HV_X64_MSR_VP_ASSIST_PAGE = 0x40000073
HV_X64_MSR_CRASH_P0 = 0x40000100
HV_X64_MSR_CRASH_CTL = 0x40000105
HV_HYPERCALL_ENABLE = 0x1
HV_CRASH_CTL_NOTIFY = 1 << 63
HV_CRASH_CTL_CRASH_MESSAGE = 1 << 62
HV_CRASH_MESSAGE_MAX = 4096
# What the shim writes to CRASH_CTL: notify, crash message, and the pre-OS/no-further-dump bits.
HV_CRASH_CTL_WITH_MESSAGE = 0xF400000000000000
HV_CRASH_CTL_NO_MESSAGE = 0xB400000000000000
HV_GUEST_OS_ID_OPENHCL = 0x0000010000000000
HV_CRASH_P0_BOOTSHIM = 0x4D494853544F4F42   # "BOOTSHIM"
HV_CRASH_P1_OHCLBOOT = 0x4F48434C424F4F54

# ---- hypercalls (sections 3 and 4) ----------------------------------------------------------


class HvCall(enum.IntEnum):
    EnableVpVtl = 0x000F
    VtlCall = 0x0011
    VtlReturn = 0x0012
    GetVpRegisters = 0x0050
    SetVpRegisters = 0x0051
    StartVirtualProcessor = 0x0099
    GetVpIndexFromApicId = 0x009A
    TranslateVirtualAddressEx = 0x00AC
    PostMessage = 0x005C                 # VMBus: VTL2 intercepts these from VTL0
    SignalEvent = 0x005D


HVCALL_ENABLE_VP_VTL = HvCall.EnableVpVtl
HVCALL_VTL_CALL = HvCall.VtlCall
HVCALL_VTL_RETURN = HvCall.VtlReturn
HVCALL_GET_VP_REGISTERS = HvCall.GetVpRegisters
HVCALL_SET_VP_REGISTERS = HvCall.SetVpRegisters
HVCALL_START_VIRTUAL_PROCESSOR = HvCall.StartVirtualProcessor
HVCALL_GET_VP_INDEX_FROM_APIC_ID = HvCall.GetVpIndexFromApicId
HVCALL_TRANSLATE_VIRTUAL_ADDRESS_EX = HvCall.TranslateVirtualAddressEx
HV_HYPERCALL_REP_COUNT_SHIFT = 32


def hypercall_name(code: int) -> str:
    """'HvCallStartVirtualProcessor' for 0x99; the number for a code nobody defines."""
    try:
        return "HvCall" + HvCall(code).name
    except ValueError:
        return f"{code:#06x}"


class HvStatus(enum.IntEnum):
    Success = 0x0000
    InvalidHypercallCode = 0x0002
    InvalidHypercallInput = 0x0003
    InvalidAlignment = 0x0004
    InvalidParameter = 0x0005
    AccessDenied = 0x0006
    InvalidVpIndex = 0x000E
    InvalidVpState = 0x0015
    VtlAlreadyEnabled = 0x0086
    UnknownRegisterName = 0x0087
    InvalidConnectionId = 0x0012


HV_STATUS_SUCCESS = HvStatus.Success
HV_STATUS_INVALID_HYPERCALL_CODE = HvStatus.InvalidHypercallCode
HV_STATUS_INVALID_HYPERCALL_INPUT = HvStatus.InvalidHypercallInput
HV_STATUS_INVALID_ALIGNMENT = HvStatus.InvalidAlignment
HV_STATUS_INVALID_PARAMETER = HvStatus.InvalidParameter
HV_STATUS_ACCESS_DENIED = HvStatus.AccessDenied
HV_STATUS_INVALID_VP_INDEX = HvStatus.InvalidVpIndex
HV_STATUS_INVALID_VP_STATE = HvStatus.InvalidVpState
HV_STATUS_VTL_ALREADY_ENABLED = HvStatus.VtlAlreadyEnabled
HV_STATUS_UNKNOWN_REGISTER_NAME = HvStatus.UnknownRegisterName


def status_name(status: int) -> str:
    try:
        return "HV_STATUS_" + _snake(HvStatus(status).name)
    except ValueError:
        return f"{status:#06x}"


def _snake(name: str) -> str:
    return "".join("_" + c if c.isupper() and i else c for i, c in enumerate(name)).upper()


HV_PARTITION_ID_SELF = 0xFFFFFFFFFFFFFFFF
HV_VP_INDEX_SELF = 0xFFFFFFFE
VTL0, VTL2 = 0, 2

# ---- register names (section 6) -------------------------------------------------------------


class HvRegister(enum.IntEnum):
    Rax, Rcx, Rdx, Rbx, Rsp, Rbp, Rsi, Rdi = range(0x20000, 0x20008)
    R8, R9, R10, R11, R12, R13, R14, R15, Rip, Rflags = range(0x20008, 0x20012)
    Cr0, Cr2, Cr3, Cr4, Cr8 = range(0x40000, 0x40005)
    Es, Cs, Ss, Ds, Fs, Gs, Ldtr, Tr = range(0x60000, 0x60008)
    Idtr, Gdtr = 0x70000, 0x70001
    Tsc, Efer, KernelGsBase, ApicBase, Pat = range(0x80000, 0x80005)
    Hypercall, GuestOsId, VpIndex, TimeRefCount = range(0x90001, 0x90005)
    VpAssistPage = 0x90013
    VsmCodePageOffsets, VsmVpStatus, VsmPartitionStatus = range(0xD0002, 0xD0005)
    VsmCapabilities = 0xD0006


HV_REGISTER_VSM_CODE_PAGE_OFFSETS = HvRegister.VsmCodePageOffsets
HV_REGISTER_VSM_VP_STATUS = HvRegister.VsmVpStatus
HV_REGISTER_VSM_CAPABILITIES = HvRegister.VsmCapabilities

# HvRegister -> the engine's register name, by kind.
GPR_NAMES = {HvRegister.Rax + i: name for i, name in enumerate(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
     "r14", "r15", "rip", "rflags"))}
CONTROL_NAMES = {HvRegister.Cr0: "cr0", HvRegister.Cr2: "cr2", HvRegister.Cr3: "cr3", HvRegister.Cr4: "cr4"}
SEGMENT_NAMES = {HvRegister.Es: "es", HvRegister.Cs: "cs", HvRegister.Ss: "ss", HvRegister.Ds: "ds",
                 HvRegister.Fs: "fs", HvRegister.Gs: "gs"}
TABLE_NAMES = {HvRegister.Idtr: "idtr", HvRegister.Gdtr: "gdtr"}
# Engine register name -> HvRegister, for every register a VTL0 context keeps by name.
REGISTER_BY_NAME = {**{n: r for r, n in {**GPR_NAMES, **CONTROL_NAMES, **SEGMENT_NAMES, **TABLE_NAMES}.items()},
                    "efer": HvRegister.Efer}
# Shared between the VTLs (section 3, VTL switch): the GPRs but RSP, and CR2.
SHARED_REGISTERS = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
                    "r13", "r14", "r15", "cr2")
# Registers of the lower VTL that Get/SetVpRegisters reach.
VTL0_REGISTERS = frozenset([*GPR_NAMES, *CONTROL_NAMES, HvRegister.Cr8, HvRegister.Efer, HvRegister.Pat])
# Synthetic registers that are the VP's view of a synthetic MSR.
MSR_REGISTERS = {HvRegister.GuestOsId: HV_X64_MSR_GUEST_OS_ID, HvRegister.Hypercall: HV_X64_MSR_HYPERCALL,
                 HvRegister.VpIndex: HV_X64_MSR_VP_INDEX, HvRegister.TimeRefCount: HV_X64_MSR_TIME_REF_COUNT,
                 HvRegister.VpAssistPage: HV_X64_MSR_VP_ASSIST_PAGE}

# ---- VP assist page and VTL entry (section 7) -----------------------------------------------
HV_VP_ASSIST_ENTRY_REASON_OFFSET = 0x008
HV_VP_ASSIST_VTL0_RAX_OFFSET = 0x010
HV_VP_ASSIST_VTL0_RCX_OFFSET = 0x018
HV_VP_ASSIST_INTERCEPT_MSG_OFFSET = 0x070
HV_VTL_ENTRY_REASON_VTL_CALL = 1
HV_VTL_ENTRY_REASON_INTERRUPT = 2
HV_VTL_ENTRY_REASON_INTERCEPT = 3

# ---- HvMessage and the x64 intercept messages (section 7) -----------------------------------


class HvMessageType(enum.IntEnum):
    UnmappedGpa = 0x80000000
    GpaIntercept = 0x80000001
    X64IoPortIntercept = 0x80010000
    X64MsrIntercept = 0x80010001
    X64CpuidIntercept = 0x80010002
    X64Halt = 0x80010007
    HypercallIntercept = 0x80000050


# The short names reports and the CLI print for them.
MESSAGE_SHORT_NAMES = {HvMessageType.UnmappedGpa: "unmapped-gpa", HvMessageType.X64IoPortIntercept: "io-port",
                       HvMessageType.X64MsrIntercept: "msr", HvMessageType.X64CpuidIntercept: "cpuid",
                       HvMessageType.X64Halt: "halt", HvMessageType.HypercallIntercept: "hypercall"}


def message_name(message_type: int) -> str:
    return MESSAGE_SHORT_NAMES.get(message_type, hex(message_type))


HV_INTERCEPT_ACCESS_READ, HV_INTERCEPT_ACCESS_WRITE, HV_INTERCEPT_ACCESS_EXECUTE = 0, 1, 2
HV_MESSAGE_SIZE, HV_MESSAGE_PAYLOAD_SIZE = 0x100, 0xF0


class HvX64SegmentRegister(ctypes.LittleEndianStructure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("attributes", u16)]


class HvMessageHeader(ctypes.LittleEndianStructure):
    _fields_ = [("message_type", u32), ("payload_size", u8), ("message_flags", u8), ("reserved", u16),
                ("sender", u64)]


class HvMessage(ctypes.LittleEndianStructure):
    _fields_ = [("header", HvMessageHeader), ("payload", u8 * HV_MESSAGE_PAYLOAD_SIZE)]


class HvX64InterceptMessageHeader(ctypes.LittleEndianStructure):
    _fields_ = [("vp_index", u32), ("instruction_length_cr8", u8), ("intercept_access_type", u8),
                ("execution_state", u16), ("cs_segment", HvX64SegmentRegister), ("rip", u64), ("rflags", u64)]


class HvX64IoPortInterceptMessage(ctypes.LittleEndianStructure):
    _fields_ = [("header", HvX64InterceptMessageHeader), ("port_number", u16), ("access_info", u8),
                ("instruction_byte_count", u8), ("reserved", u32), ("rax", u64), ("instruction_bytes", u8 * 16),
                ("ds_segment", HvX64SegmentRegister), ("es_segment", HvX64SegmentRegister),
                ("rcx", u64), ("rsi", u64), ("rdi", u64)]


class HvX64MemoryInterceptMessage(ctypes.LittleEndianStructure):
    _fields_ = [("header", HvX64InterceptMessageHeader), ("cache_type", u32), ("instruction_byte_count", u8),
                ("memory_access_info", u8), ("tpr_priority", u8), ("reserved", u8), ("guest_virtual_address", u64),
                ("guest_physical_address", u64), ("instruction_bytes", u8 * 16)]


class HvX64MsrInterceptMessage(ctypes.LittleEndianStructure):
    _fields_ = [("header", HvX64InterceptMessageHeader), ("msr_number", u32), ("reserved", u32),
                ("rdx", u64), ("rax", u64)]


class HvX64CpuidInterceptMessage(ctypes.LittleEndianStructure):
    _fields_ = [("header", HvX64InterceptMessageHeader), ("rax", u64), ("rcx", u64), ("rdx", u64), ("rbx", u64),
                ("default_result_rax", u64), ("default_result_rcx", u64), ("default_result_rdx", u64),
                ("default_result_rbx", u64)]


class HvX64HypercallInterceptMessage(ctypes.LittleEndianStructure):
    _fields_ = [("header", HvX64InterceptMessageHeader), ("rax", u64), ("rbx", u64), ("rcx", u64), ("rdx", u64),
                ("r8", u64), ("rsi", u64), ("rdi", u64), ("xmm_registers", u64 * 12), ("flags", u32),
                ("reserved", u32 * 3)]


INTERCEPT_MESSAGES = {HvMessageType.X64IoPortIntercept: HvX64IoPortInterceptMessage,
                      HvMessageType.UnmappedGpa: HvX64MemoryInterceptMessage,
                      HvMessageType.X64MsrIntercept: HvX64MsrInterceptMessage,
                      HvMessageType.X64CpuidIntercept: HvX64CpuidInterceptMessage,
                      HvMessageType.X64Halt: HvX64InterceptMessageHeader,
                      HvMessageType.HypercallIntercept: HvX64HypercallInterceptMessage}

# ---- the initial VP context (HvCallEnableVpVtl / HvCallStartVirtualProcessor) ---------------


class HvTable(ctypes.LittleEndianStructure):
    _fields_ = [("pad", u8 * 6), ("limit", u16), ("base", u64)]


class HvInitialVpContext(ctypes.LittleEndianStructure):
    _fields_ = [("rip", u64), ("rsp", u64), ("rflags", u64),
                *((name, HvX64SegmentRegister) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")),
                ("idtr", HvTable), ("gdtr", HvTable),
                ("efer", u64), ("cr0", u64), ("cr3", u64), ("cr4", u64), ("msr_cr_pat", u64)]


class HvEnableVpVtlInput(ctypes.LittleEndianStructure):
    """Also HvCallStartVirtualProcessor's input."""
    _fields_ = [("partition_id", u64), ("vp_index", u32), ("target_vtl", u8), ("reserved", u8 * 3),
                ("context", HvInitialVpContext)]


class HvGetVpIndexFromApicIdInput(ctypes.LittleEndianStructure):
    _fields_ = [("partition_id", u64), ("target_vtl", u8), ("reserved", u8 * 7)]


class HvGetSetVpRegistersInput(ctypes.LittleEndianStructure):
    _fields_ = [("partition_id", u64), ("vp_index", u32), ("input_vtl", u8), ("reserved", u8 * 3)]


class HvRegisterAssoc(ctypes.LittleEndianStructure):
    _fields_ = [("name", u32), ("pad", u8 * 12), ("value_low", u64), ("value_high", u64)]


# Python struct -> C struct name, for tests/test_abi.py.
C_STRUCTS = {
    "hv_segment": HvX64SegmentRegister,
    "hv_table": HvTable,
    "hv_initial_vp_context": HvInitialVpContext,
    "hv_enable_vp_vtl_input": HvEnableVpVtlInput,
    "hv_get_vp_index_from_apic_id_input": HvGetVpIndexFromApicIdInput,
    "hv_get_set_vp_registers_input": HvGetSetVpRegistersInput,
    "hv_register_assoc": HvRegisterAssoc,
}


# The fields of an I/O intercept parse_intercept reads (vp_index, instruction_length_cr8,
# intercept_access_type, rip, rflags, port_number, access_info, rax), checked against the ctypes
# layouts by tests/test_abi.py.
_IO_FIELDS = struct.Struct("<IBB18xQQHB5xQ")


def parse_intercept(message: bytes) -> dict:
    """The fields a VMM needs from an intercept HvMessage, by their TLFS names' short forms:
    type, vp, instruction_length, access, rip, and per kind port/size/rax (I/O), rax/rcx and
    the default results (CPUID), msr (MSR), gpa/instruction_bytes (unmapped GPA)."""
    raw = bytes(message)
    if len(raw) < HV_MESSAGE_SIZE:
        raw = raw.ljust(HV_MESSAGE_SIZE, b"\0")
    kind = int.from_bytes(raw[:4], "little")                   # HvMessageHeader.message_type
    if kind == HvMessageType.X64IoPortIntercept:               # the common exit, without ctypes
        vp, length, access, rip, rflags, port, info, rax = _IO_FIELDS.unpack_from(raw, 16)
        return {"type": kind, "vp": vp, "instruction_length": length & 0xF, "access": access, "rip": rip,
                "rflags": rflags, "port": port, "size": info & 7, "rax": rax}
    layout = INTERCEPT_MESSAGES.get(kind, HvX64InterceptMessageHeader)
    p = layout.from_buffer_copy(raw, ctypes.sizeof(HvMessageHeader))   # the payload, in place
    h = p if layout is HvX64InterceptMessageHeader else p.header
    out = {"type": kind, "vp": h.vp_index, "instruction_length": h.instruction_length_cr8 & 0xF,
           "access": h.intercept_access_type, "rip": h.rip, "rflags": h.rflags}
    if kind == HvMessageType.X64IoPortIntercept:
        out.update(port=p.port_number, size=p.access_info & 7, rax=p.rax)
    elif kind == HvMessageType.X64CpuidIntercept:
        out.update(rax=p.rax, rcx=p.rcx, default=(p.default_result_rax, p.default_result_rbx,
                                                  p.default_result_rcx, p.default_result_rdx))
    elif kind == HvMessageType.X64MsrIntercept:
        out.update(msr=p.msr_number)
    elif kind == HvMessageType.HypercallIntercept:
        out.update(control=p.rcx, input_gpa=p.rdx, output_gpa=p.r8)
    elif kind == HvMessageType.UnmappedGpa:
        out.update(gpa=p.guest_physical_address, instruction_length=p.instruction_byte_count,
                   instruction_bytes=bytes(p.instruction_bytes))
    return out
