"""Binary layouts shared with the firmware: the Python side of boot/firmware/include/hclsim_abi.h.

Declared once here (ctypes) and checked against the C header by tests/test_abi.py, which
compiles the header and compares every size and offset.
"""
import ctypes
from ctypes import c_int64 as i64, c_uint8 as u8, c_uint16 as u16, c_uint32 as u32, c_uint64 as u64

from hclsim.defs.platform import MEMORY_VTL_TYPE  # noqa: F401  (layout users read it here)


PAGE_SIZE = 4096

CMDLINE_POLICY_STATIC, CMDLINE_POLICY_APPEND_CHOSEN = 0, 1
CMDLINE_POLICY_BY_NAME = {"static": CMDLINE_POLICY_STATIC, "append-chosen": CMDLINE_POLICY_APPEND_CHOSEN}

STACK_COOKIE = 0x30405060
HOST_DT_MAX_SIZE = 256 * 1024
MAX_CPU_COUNT = 2048
MAX_NUMA_NODES = 64

E820_RAM, E820_RESERVED = 1, 2
E820_MAX_ENTRIES_ZEROPAGE = 128
SETUP_NONE, SETUP_E820_EXT, SETUP_DTB = 0, 1, 2

SHIM_LOG_MAGIC = 0x474F4C53

# MemoryVtlType: defs/platform.py MEMORY_VTL_TYPE (the VM worker's inspect reads it too).
IGVM_MEMORY_TYPE_RAM, IGVM_MEMORY_TYPE_VTL2 = 0, 1



class ShimParamsRaw(ctypes.LittleEndianStructure):
    """Offsets (i64) are relative to the shim's load base."""
    _fields_ = [
        ("kernel_entry_offset", i64),
        ("cmdline_offset", i64),
        ("initrd_offset", i64),
        ("initrd_size", u64),
        ("initrd_crc", u32),
        ("supported_isolation_type", u32),
        ("memory_start_offset", i64),
        ("memory_size", u64),
        ("parameter_region_offset", i64),
        ("parameter_region_size", u64),
        ("vtl2_reserved_region_offset", i64),
        ("vtl2_reserved_region_size", u64),
        ("sidecar_offset", i64),
        ("sidecar_size", u64),
        ("sidecar_entry_offset", i64),
        ("used_start", i64),
        ("used_end", i64),
        ("bounce_buffer_start", i64),
        ("bounce_buffer_size", u64),
        ("log_buffer_start", i64),
        ("log_buffer_size", u64),
        ("heap_start_offset", i64),
        ("heap_size", u64),
        ("persisted_state_region_offset", i64),
        ("persisted_state_region_size", u64),
    ]


PARAVISOR_CMDLINE_MAX = 4092


class ParavisorCommandLine(ctypes.LittleEndianStructure):
    _fields_ = [
        ("policy", u16),
        ("static_command_line_len", u16),
        ("static_command_line", u8 * PARAVISOR_CMDLINE_MAX),
    ]


class ShimLogHeader(ctypes.LittleEndianStructure):
    _fields_ = [("magic", u32), ("capacity", u32), ("written", u64)]


class BootE820Entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", u64), ("size", u64), ("type", u32)]


class SetupHeader(ctypes.LittleEndianStructure):
    """Linux x86 setup header, at 0x1f1 in the zero page and in a bzImage."""
    _pack_ = 1
    _fields_ = [
        ("setup_sects", u8), ("root_flags", u16), ("syssize", u32), ("ram_size", u16),
        ("vid_mode", u16), ("root_dev", u16), ("boot_flag", u16), ("jump", u16),
        ("header", u32), ("version", u16), ("realmode_swtch", u32), ("start_sys_seg", u16),
        ("kernel_version", u16), ("type_of_loader", u8), ("loadflags", u8),
        ("setup_move_size", u16), ("code32_start", u32), ("ramdisk_image", u32),
        ("ramdisk_size", u32), ("bootsect_kludge", u32), ("heap_end_ptr", u16),
        ("ext_loader_ver", u8), ("ext_loader_type", u8), ("cmd_line_ptr", u32),
        ("initrd_addr_max", u32), ("kernel_alignment", u32), ("relocatable_kernel", u8),
        ("min_alignment", u8), ("xloadflags", u16), ("cmdline_size", u32),
        ("hardware_subarch", u32), ("hardware_subarch_data", u64), ("payload_offset", u32),
        ("payload_length", u32), ("setup_data", u64), ("pref_address", u64),
        ("init_size", u32), ("handover_offset", u32), ("kernel_info_offset", u32),
    ]


SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"


class BootParams(ctypes.LittleEndianStructure):
    """The zero page (4096 bytes)."""
    _pack_ = 1
    _fields_ = [
        ("screen_info", u8 * 0x40), ("apm_bios_info", u8 * 0x14), ("_pad2", u8 * 4),
        ("tboot_addr", u64), ("ist_info", u8 * 0x10), ("acpi_rsdp_addr", u64), ("_pad3", u8 * 8),
        ("hd0_info", u8 * 16), ("hd1_info", u8 * 16), ("sys_desc_table", u8 * 0x10),
        ("olpc_ofw_header", u8 * 0x10), ("ext_ramdisk_image", u32), ("ext_ramdisk_size", u32),
        ("ext_cmd_line_ptr", u32), ("_pad4", u8 * 112), ("cc_blob_address", u32),
        ("edid_info", u8 * 0x80), ("efi_info", u8 * 0x20), ("alt_mem_k", u32), ("scratch", u32),
        ("e820_entries", u8), ("eddbuf_entries", u8), ("edd_mbr_sig_buf_entries", u8),
        ("kbd_status", u8), ("secure_boot", u8), ("_pad5", u8 * 2), ("sentinel", u8),
        ("_pad6", u8 * 1), ("hdr", SetupHeader),
        ("_pad7", u8 * (0x290 - 0x1F1 - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", u32 * 16),
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),
        ("_pad8", u8 * 48), ("eddbuf", u8 * (0xEEC - 0xD00)), ("_pad9", u8 * 276),
    ]


class SetupData(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("next", u64), ("type", u32), ("len", u32)]


# Python name -> C struct name, for the layout test.
SHARED_STRUCTS = {
    "shim_params_raw": ShimParamsRaw,
    "paravisor_command_line": ParavisorCommandLine,
    "shim_log_header": ShimLogHeader,
    "boot_e820_entry": BootE820Entry,
    "setup_header": SetupHeader,
    "boot_params": BootParams,
    "setup_data": SetupData,
}


def from_bytes(struct_type, data, offset=0):
    """A copy of struct_type decoded from data[offset:]; raises ValueError if data is too short."""
    size = ctypes.sizeof(struct_type)
    if offset < 0 or offset + size > len(data):
        raise ValueError(f"{struct_type.__name__}: need {size} bytes at offset {offset:#x}, have {len(data)}")
    return struct_type.from_buffer_copy(bytes(data[offset:offset + size]))
