/* hclsim_abi.h - binary layouts shared by the firmware (boot shim) and the
 * simulator.  The Python side declares the same structures once in
 * hclsim/boot/layout.py; tests/test_layout.py compiles this header and checks
 * that every size and offset agrees.  Change both together.
 *
 * Everything is little-endian, packed where the real ABI is packed.
 */
#ifndef HCLSIM_ABI_H
#define HCLSIM_ABI_H

#include <stdint.h>

#define HCL_PAGE_SIZE 4096ull

/* ---- Isolation (ShimParamsRaw.supported_isolation_type) ---- */
#define ISOLATION_NONE 0u
#define ISOLATION_VBS  1u
#define ISOLATION_SNP  2u
#define ISOLATION_TDX  3u

/* ---- ParavisorCommandLine.policy ---- */
#define CMDLINE_POLICY_STATIC        0u
#define CMDLINE_POLICY_APPEND_CHOSEN 1u

/* ---- Image layout facts ---- */
#define STACK_COOKIE       0x30405060u
#define SHIM_STACK_SIZE    (32u * 1024u)
#define HOST_DT_MAX_SIZE   (256u * 1024u)
#define MAX_CPU_COUNT      2048u
#define MAX_NUMA_NODES     64u

/* ShimParamsRaw: i64 offsets are relative to the shim's load base. */
struct shim_params_raw {
    int64_t  kernel_entry_offset;
    int64_t  cmdline_offset;
    int64_t  initrd_offset;
    uint64_t initrd_size;
    uint32_t initrd_crc;
    uint32_t supported_isolation_type;
    int64_t  memory_start_offset;
    uint64_t memory_size;
    int64_t  parameter_region_offset;
    uint64_t parameter_region_size;
    int64_t  vtl2_reserved_region_offset;
    uint64_t vtl2_reserved_region_size;
    int64_t  sidecar_offset;
    uint64_t sidecar_size;
    int64_t  sidecar_entry_offset;
    int64_t  used_start;
    int64_t  used_end;
    int64_t  bounce_buffer_start;
    uint64_t bounce_buffer_size;
    int64_t  log_buffer_start;
    uint64_t log_buffer_size;
    int64_t  heap_start_offset;
    uint64_t heap_size;
    int64_t  persisted_state_region_offset;
    uint64_t persisted_state_region_size;
};

/* ParavisorCommandLine: the measured (trusted) static command line. */
#define PARAVISOR_CMDLINE_MAX 4092u
struct paravisor_command_line {
    uint16_t policy;
    uint16_t static_command_line_len;
    uint8_t  static_command_line[PARAVISOR_CMDLINE_MAX];
};

/* Boot-shim log buffer (ShimParamsRaw.log_buffer_*): a ring the simulator
 * can read even when serial output is not allowed. */
#define SHIM_LOG_MAGIC 0x474f4c53u /* "SLOG" */
struct shim_log_header {
    uint32_t magic;
    uint32_t capacity;  /* bytes of data[] */
    uint64_t written;   /* total bytes ever written; data[written % capacity] is next */
};

/* ---- Linux x86 boot protocol (Documentation/arch/x86/boot.rst) ---- */
#define E820_RAM      1u
#define E820_RESERVED 2u
#define E820_MAX_ENTRIES_ZEROPAGE 128u

#define SETUP_NONE     0u
#define SETUP_E820_EXT 1u
#define SETUP_DTB      2u

struct __attribute__((packed)) boot_e820_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
};

struct __attribute__((packed)) setup_header {
    uint8_t  setup_sects;            /* 0x1f1 */
    uint16_t root_flags;
    uint32_t syssize;
    uint16_t ram_size;
    uint16_t vid_mode;
    uint16_t root_dev;
    uint16_t boot_flag;              /* 0x1fe: 0xAA55 */
    uint16_t jump;
    uint32_t header;                 /* 0x202: "HdrS" */
    uint16_t version;
    uint32_t realmode_swtch;
    uint16_t start_sys_seg;
    uint16_t kernel_version;
    uint8_t  type_of_loader;         /* 0x210 */
    uint8_t  loadflags;
    uint16_t setup_move_size;
    uint32_t code32_start;
    uint32_t ramdisk_image;          /* 0x218 */
    uint32_t ramdisk_size;
    uint32_t bootsect_kludge;
    uint16_t heap_end_ptr;
    uint8_t  ext_loader_ver;
    uint8_t  ext_loader_type;
    uint32_t cmd_line_ptr;           /* 0x228 */
    uint32_t initrd_addr_max;
    uint32_t kernel_alignment;
    uint8_t  relocatable_kernel;
    uint8_t  min_alignment;
    uint16_t xloadflags;
    uint32_t cmdline_size;
    uint32_t hardware_subarch;       /* 0x23c */
    uint64_t hardware_subarch_data;
    uint32_t payload_offset;
    uint32_t payload_length;
    uint64_t setup_data;             /* 0x250 */
    uint64_t pref_address;
    uint32_t init_size;
    uint32_t handover_offset;
    uint32_t kernel_info_offset;
};

struct __attribute__((packed)) boot_params {
    uint8_t  screen_info[0x40];      /* 0x000 */
    uint8_t  apm_bios_info[0x14];    /* 0x040 */
    uint8_t  _pad2[4];               /* 0x054 */
    uint64_t tboot_addr;             /* 0x058 */
    uint8_t  ist_info[0x10];         /* 0x060 */
    uint64_t acpi_rsdp_addr;         /* 0x070 */
    uint8_t  _pad3[8];               /* 0x078 */
    uint8_t  hd0_info[16];           /* 0x080 */
    uint8_t  hd1_info[16];           /* 0x090 */
    uint8_t  sys_desc_table[0x10];   /* 0x0a0 */
    uint8_t  olpc_ofw_header[0x10];  /* 0x0b0 */
    uint32_t ext_ramdisk_image;      /* 0x0c0 */
    uint32_t ext_ramdisk_size;       /* 0x0c4 */
    uint32_t ext_cmd_line_ptr;       /* 0x0c8 */
    uint8_t  _pad4[112];             /* 0x0cc */
    uint32_t cc_blob_address;        /* 0x13c */
    uint8_t  edid_info[0x80];        /* 0x140 */
    uint8_t  efi_info[0x20];         /* 0x1c0 */
    uint32_t alt_mem_k;              /* 0x1e0 */
    uint32_t scratch;                /* 0x1e4 */
    uint8_t  e820_entries;           /* 0x1e8 */
    uint8_t  eddbuf_entries;         /* 0x1e9 */
    uint8_t  edd_mbr_sig_buf_entries;/* 0x1ea */
    uint8_t  kbd_status;             /* 0x1eb */
    uint8_t  secure_boot;            /* 0x1ec */
    uint8_t  _pad5[2];               /* 0x1ed */
    uint8_t  sentinel;               /* 0x1ef */
    uint8_t  _pad6[1];               /* 0x1f0 */
    struct setup_header hdr;         /* 0x1f1 */
    uint8_t  _pad7[0x290 - 0x1f1 - sizeof(struct setup_header)];
    uint32_t edd_mbr_sig_buffer[16]; /* 0x290 */
    struct boot_e820_entry e820_table[E820_MAX_ENTRIES_ZEROPAGE]; /* 0x2d0 */
    uint8_t  _pad8[48];              /* 0xcd0 */
    uint8_t  eddbuf[0xeec - 0xd00];  /* 0xd00 */
    uint8_t  _pad9[276];             /* 0xeec */
};

struct __attribute__((packed)) setup_data {
    uint64_t next;
    uint32_t type;
    uint32_t len;
    /* uint8_t data[len] follows */
};

/* ---- Device tree memory types (reference: MemoryVtlType) ---- */
#define MEMORY_VTL_TYPE_VTL0                    0u
#define MEMORY_VTL_TYPE_VTL2_RAM                1u
#define MEMORY_VTL_TYPE_VTL2_CONFIG             2u
#define MEMORY_VTL_TYPE_SIDECAR_IMAGE           3u
#define MEMORY_VTL_TYPE_SIDECAR_NODE            4u
#define MEMORY_VTL_TYPE_VTL0_MMIO               5u
#define MEMORY_VTL_TYPE_VTL2_MMIO               6u
#define MEMORY_VTL_TYPE_VTL2_RESERVED           7u
#define MEMORY_VTL_TYPE_GPA_POOL                8u
#define MEMORY_VTL_TYPE_BOOTSHIM_LOG_BUFFER     10u
#define MEMORY_VTL_TYPE_PERSISTED_STATE_HEADER  11u
#define MEMORY_VTL_TYPE_PERSISTED_STATE_PROTOBUF 12u

/* Host device tree /memory@ "microsoft,igvm-type" values (hclsim's subset). */
#define IGVM_MEMORY_TYPE_RAM  0u
#define IGVM_MEMORY_TYPE_VTL2 1u  /* hclsim: marks the VTL2 range in the host DT */

/* ---- Hyper-V interface (see shared/design/hyperv-essentials.md) ---- */
#define HV_X64_MSR_GUEST_OS_ID      0x40000000u
#define HV_X64_MSR_HYPERCALL        0x40000001u
#define HV_X64_MSR_VP_INDEX         0x40000002u
#define HV_X64_MSR_TIME_REF_COUNT   0x40000020u
#define HV_X64_MSR_VP_ASSIST_PAGE   0x40000073u
#define HV_X64_MSR_CRASH_P0         0x40000100u
#define HV_X64_MSR_CRASH_CTL        0x40000105u
#define X86_MSR_APIC_BASE           0x0000001Bu

#define HV_GUEST_OS_ID_OPENHCL      0x0000010000000000ull
#define HV_HYPERCALL_ENABLE         0x1ull

#define HV_CRASH_P0_BOOTSHIM        0x4D494853544F4F42ull /* "BOOTSHIM" */
#define HV_CRASH_P1_OHCLBOOT        0x4F48434C424F4F54ull /* "OHCLBOOT" big-endian */
#define HV_CRASH_CTL_WITH_MESSAGE   0xF400000000000000ull
#define HV_CRASH_CTL_NO_MESSAGE     0xB400000000000000ull

#define HVCALL_ENABLE_VP_VTL              0x000Fu
#define HVCALL_VTL_CALL                   0x0011u
#define HVCALL_VTL_RETURN                 0x0012u
#define HVCALL_GET_VP_REGISTERS           0x0050u
#define HVCALL_SET_VP_REGISTERS           0x0051u
#define HVCALL_START_VIRTUAL_PROCESSOR    0x0099u
#define HVCALL_GET_VP_INDEX_FROM_APIC_ID  0x009Au
#define HVCALL_TRANSLATE_VIRTUAL_ADDRESS_EX 0x00ACu

#define HV_STATUS_SUCCESS                 0x0000u
#define HV_STATUS_INVALID_HYPERCALL_CODE  0x0002u
#define HV_STATUS_INVALID_HYPERCALL_INPUT 0x0003u
#define HV_STATUS_INVALID_ALIGNMENT       0x0004u
#define HV_STATUS_INVALID_PARAMETER       0x0005u
#define HV_STATUS_ACCESS_DENIED           0x0006u
#define HV_STATUS_INVALID_VP_INDEX        0x000Eu
#define HV_STATUS_INVALID_VP_STATE        0x0015u
#define HV_STATUS_VTL_ALREADY_ENABLED     0x0086u
#define HV_STATUS_UNKNOWN_REGISTER_NAME   0x0087u

#define HV_PARTITION_ID_SELF 0xFFFFFFFFFFFFFFFFull
#define HV_VP_INDEX_SELF     0xFFFFFFFEu

#define HV_REGISTER_VSM_CODE_PAGE_OFFSETS 0x000D0002u
#define HV_REGISTER_VSM_VP_STATUS         0x000D0003u
#define HV_REGISTER_VSM_CAPABILITIES      0x000D0006u

/* Hypercall control word (RCX) fields. */
#define HV_HYPERCALL_REP_COUNT_SHIFT 32

struct hv_get_vp_index_from_apic_id_input {
    uint64_t partition_id;
    uint8_t  target_vtl;
    uint8_t  reserved[7];
    /* uint32_t apic_ids[rep_count] follows */
};

struct hv_get_set_vp_registers_input {
    uint64_t partition_id;
    uint32_t vp_index;
    uint8_t  input_vtl;
    uint8_t  reserved[3];
    /* names (get) or hv_register_assoc (set) follow */
};

struct hv_register_assoc {
    uint32_t name;
    uint8_t  pad[12];
    uint64_t value_low;
    uint64_t value_high;
};

/* ---- Platform ---- */
#define COM1_PORT 0x3F8u
#define COM3_PORT 0x3E8u

#endif /* HCLSIM_ABI_H */

/* ======================================================================
 * Sidecar (reference section 2): shared by the boot shim, the sidecar
 * kernel and the simulator (hclsim/sidecar/layout.py mirrors it).
 * ====================================================================== */
#ifndef HCLSIM_SIDECAR_ABI
#define HCLSIM_SIDECAR_ABI

#define SIDECAR_MAX_NODES        128u
#define SIDECAR_MAX_NODE_CPUS    32u
#define SIDECAR_PRIVATE_PAGES_PER_VP 11u  /* PML4, PDPT, PD, PT, 3 stack, globals, VP assist, hc in, hc out */
#define SIDECAR_SHMEM_PAGES_PER_VP   2u   /* command page, register page */
#define SIDECAR_NODE_PAGES(n) (1u + 13u * (n))
#define SIDECAR_IMAGE_VA         0xffffff8000000000ull  /* PML4 slot 511 */
#define SIDECAR_DEFAULT_REQUEST_VECTOR 0x20u

/* CpuStatus (control page cpu_status[]) */
#define SIDECAR_CPU_REMOVED 0u
#define SIDECAR_CPU_IDLE    1u
#define SIDECAR_CPU_RUN     2u
#define SIDECAR_CPU_STOP    3u
#define SIDECAR_CPU_REMOVE  4u

/* SidecarCommand (command page .command) */
#define SIDECAR_COMMAND_NONE              0u
#define SIDECAR_COMMAND_RUN_VP            1u
#define SIDECAR_COMMAND_GET_VP_REGISTERS  2u
#define SIDECAR_COMMAND_SET_VP_REGISTERS  3u
#define SIDECAR_COMMAND_TRANSLATE_GVA     4u
#define SIDECAR_MAX_REGISTERS_PER_COMMAND 31u

struct sidecar_node_params {
    uint64_t memory_base;   /* GPA of the node's (1 + 13 n) pages */
    uint64_t memory_size;
    uint32_t base_vp;       /* booted by Linux; the node's other VPs by the sidecar */
    uint32_t vp_count;      /* including base_vp */
};

struct sidecar_params {
    uint64_t hypercall_page;        /* GPA of the shim's (enabled) hypercall page */
    uint8_t  enable_logging;
    uint8_t  reserved[3];
    uint32_t node_count;
    struct sidecar_node_params nodes[SIDECAR_MAX_NODES];
};

struct sidecar_node_output {
    uint64_t control_page;          /* GPA */
    uint64_t shmem_pages_base;      /* GPA of the command/register pages */
    uint64_t shmem_pages_size;
};

struct sidecar_output {
    uint8_t  error_len;
    uint8_t  error_buf[255];
    struct sidecar_node_output nodes[SIDECAR_MAX_NODES];
};

/* One per node, first page of the node's memory. */
struct sidecar_control_page {
    uint32_t index;
    uint32_t base_cpu;
    uint32_t cpu_count;
    uint32_t request_vector;
    uint32_t response_cpu;      /* APIC id that gets the response IPI */
    uint32_t response_vector;   /* 0: no IPI */
    uint32_t needs_attention;
    uint8_t  reserved[36];
    uint8_t  cpu_status[4032];  /* indexed by cpu - base_cpu */
};

struct sidecar_cpu_context {
    uint64_t gps[16];           /* rax rcx rdx rbx cr2(in rsp's slot) rbp rsi rdi r8..r15 */
    uint8_t  fx_state[1024 - 0x80];  /* fxsave area at +0x80 */
};

struct sidecar_error {
    uint8_t len;
    uint8_t buf[255];
};

struct sidecar_command_page {
    uint32_t command;
    uint8_t  has_error;
    uint8_t  padding[11];
    struct sidecar_cpu_context cpu_context;  /* 0x010 */
    uint8_t  intercept_message[256];         /* 0x410: HvMessage */
    struct sidecar_error error;              /* 0x510 */
    uint8_t  request_data[1024];             /* 0x610 */
    uint8_t  reserved[4096 - 0xa10];         /* 0xa10 */
};

/* request_data of GET/SET_VP_REGISTERS, followed by count hv_register_assoc */
struct sidecar_get_set_vp_registers_request {
    uint16_t count;
    uint8_t  target_vtl;
    uint8_t  rsvd;
    uint16_t status;            /* HV status of the failing hypercall, if any */
    uint8_t  rsvd2[10];
};

/* request_data of TRANSLATE_GVA */
struct sidecar_translate_gva_request {
    uint64_t gvn;
    uint64_t control_flags;
};
struct sidecar_translate_gva_response {
    uint16_t status;
    uint8_t  rsvd[6];
    uint64_t result;            /* translation result code | cache type << 32 | overlay << 40 */
    uint64_t gpa_page;
};

/* request_data of RUN_VP on completion */
struct sidecar_run_vp_response {
    uint8_t intercept;          /* 1: intercept_message holds the intercept */
};

/* HV initial VP context (HvCallEnableVpVtl / HvCallStartVirtualProcessor) */
struct hv_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint16_t attributes;
};
struct hv_table {
    uint8_t  pad[6];
    uint16_t limit;
    uint64_t base;
};
struct hv_initial_vp_context {
    uint64_t rip, rsp, rflags;
    struct hv_segment cs, ds, es, fs, gs, ss, tr, ldtr;
    struct hv_table idtr, gdtr;
    uint64_t efer, cr0, cr3, cr4, msr_cr_pat;
};
struct hv_enable_vp_vtl_input {          /* also HvCallStartVirtualProcessor */
    uint64_t partition_id;
    uint32_t vp_index;
    uint8_t  target_vtl;
    uint8_t  reserved[3];
    struct hv_initial_vp_context context;
};

/* HvVpAssistPage fields the sidecar uses */
#define HV_VP_ASSIST_ENTRY_REASON_OFFSET   0x008u
#define HV_VP_ASSIST_VTL0_RAX_OFFSET       0x010u
#define HV_VP_ASSIST_VTL0_RCX_OFFSET       0x018u
#define HV_VP_ASSIST_INTERCEPT_MSG_OFFSET  0x070u
#define HV_VTL_ENTRY_REASON_VTL_CALL   1u
#define HV_VTL_ENTRY_REASON_INTERRUPT  2u
#define HV_VTL_ENTRY_REASON_INTERCEPT  3u

/* x2APIC MSRs */
#define X2APIC_MSR_ID   0x802u
#define X2APIC_MSR_EOI  0x80Bu
#define X2APIC_MSR_SVR  0x80Fu
#define X2APIC_MSR_ICR  0x830u
#define APIC_BASE_X2APIC_ENABLE (1ull << 10)
#define APIC_BASE_ENABLE        (1ull << 11)

#endif /* HCLSIM_SIDECAR_ABI */
