/* openhcl_boot work-alike: the first code that runs in VTL2.  It checks the
 * environment, reads the host's device tree, and hands Linux its command
 * line, device tree, e820 map and initrd through boot_params. */
#include "shim.h"
#include "fdt.h"
#include "hv.h"
#include "hw.h"
#include "log.h"
#include "util.h"

#define FDT_AREA_SIZE (512u * 1024u)  /* room for MAX_CPU_COUNT cpu nodes */
#define E820_EXT_MAX  512u

/* start.S */
extern uint64_t shim_stack_bottom[];
__attribute__((noreturn)) void enter_kernel(uint64_t entry, uint64_t boot_params);
__attribute__((noreturn)) void shim_main(const struct shim_params_raw *p, uint64_t base);

/* setup_data header immediately followed by the DTB, as SETUP_DTB wants. */
/* Scratch that is fully written before it is read: kept out of BSS so the
 * entry code does not spend time zeroing half a megabyte. */
static uint8_t fdt_area[FDT_AREA_SIZE] __attribute__((aligned(HCL_PAGE_SIZE), section(".noinit")));
static struct boot_params boot_params __attribute__((aligned(HCL_PAGE_SIZE)));
static struct {
    struct setup_data hdr;
    struct boot_e820_entry entries[E820_EXT_MAX];
} e820_ext __attribute__((aligned(8)));
static char kernel_cmdline[KERNEL_CMDLINE_SIZE] __attribute__((aligned(16)));
static char boot_cpus[16 + 6 * SIDECAR_MAX_NODES];
static struct host_info host;
static struct vtl2_map vtl2;
static struct fdt_view host_view;

static const char *iso_names[] = { "none", "vbs", "snp", "tdx" };

static void *at(uint64_t base, int64_t off)
{
    return (void *)(uintptr_t)(base + (uint64_t)off);
}

static void check_inside(const struct vtl2_map *m, uint64_t start, uint64_t size, const char *what)
{
    if (start < m->start || start + size < start || start + size > m->end)
        panic("%s [0x%llx, 0x%llx) is outside VTL2 memory", what, (unsigned long long)start,
              (unsigned long long)(start + size));
}

void shim_main(const struct shim_params_raw *p, uint64_t base)
{
    struct boot_times times = { 0, 0, 0, 0 };
    shim_params_check(p, base); /* before anything is written through it (log_init checks its ring) */
    log_init(at(base, p->log_buffer_start), p->log_buffer_size);
    times.boot_start = hv_reftime();
    log_info("openhcl boot shim: base 0x%llx, params 0x%llx, reftime %llu", (unsigned long long)base,
             (unsigned long long)(uintptr_t)p, (unsigned long long)times.boot_start);

    /* ---- isolation and hypercalls ---- */
    uint32_t iso = p->supported_isolation_type;
    hv_confirm_isolation(iso);
    int hw_isolated = iso == ISOLATION_SNP || iso == ISOLATION_TDX;
    if (iso == ISOLATION_NONE || iso == ISOLATION_VBS)
        log_allow_panic_serial(COM3_PORT);
    int hypercalls = 0;
    uint32_t vtl = 0;
    uint64_t vsm_caps = 0;
    if (hw_isolated) {
        /* The hypervisor cannot see our registers; hypercalls would need a
         * GHCB/GHCI page, which this shim does not set up. */
        log_info("hypercalls: skipped (hardware-isolated, %s)", iso_names[iso]);
    } else {
        hv_enable_hypercalls();
        hypercalls = 1;
        uint64_t st;
        uint16_t status = hv_get_vp_register(HV_REGISTER_VSM_VP_STATUS, &st);
        if (status == HV_STATUS_SUCCESS) {
            vtl = (uint32_t)(st & 0xf);
            log_info("vsm: VsmVpStatus 0x%llx, active VTL%u", (unsigned long long)st, vtl);
        } else {
            log_warn("vsm: GetVpRegisters(VsmVpStatus) failed with status 0x%x; assuming VTL0", status);
        }
        if (vtl == 2) {
            status = hv_get_vp_register(HV_REGISTER_VSM_CAPABILITIES, &vsm_caps);
            if (status == HV_STATUS_SUCCESS)
                log_info("vsm: capabilities 0x%llx", (unsigned long long)vsm_caps);
            else
                log_warn("vsm: GetVpRegisters(VsmCapabilities) failed with status 0x%x", status);
        }
    }

    /* ---- measured static command line ---- */
    const struct paravisor_command_line *pcl = at(base, p->cmdline_offset);
    if (pcl->static_command_line_len > PARAVISOR_CMDLINE_MAX)
        panic("malformed static command line: length %u > %u", pcl->static_command_line_len,
              PARAVISOR_CMDLINE_MAX);
    if (pcl->policy > CMDLINE_POLICY_APPEND_CHOSEN)
        panic("malformed static command line: unknown policy %u", pcl->policy);
    const char *static_line = (const char *)pcl->static_command_line;
    uint32_t static_len = (uint32_t)str_nlen(static_line, pcl->static_command_line_len);
    int confidential_debug = cmdline_has_token(static_line, static_len, "OPENHCL_CONFIDENTIAL_DEBUG=1");
    int can_trust_host = iso == ISOLATION_NONE || confidential_debug;
    log_info("static command line: policy %s, %u bytes, host %s",
             pcl->policy == CMDLINE_POLICY_APPEND_CHOSEN ? "append-chosen" : "static", static_len,
             can_trust_host ? (iso == ISOLATION_NONE ? "trusted" : "trusted (confidential debug)") : "not trusted");

    /* ---- host device tree ---- */
    const char *err = fdt_validate(&host_view, at(base, p->parameter_region_offset), p->parameter_region_size);
    if (err)
        panic("malformed host device tree: %s", err);
    host_dt_parse(&host_view, &host);
    log_info("host device tree: %u bytes, %u cpus, %u memory ranges, com3 %s, entropy %u bytes", host_view.total,
             host.cpu_count, host.mem_count, host.com3_present ? "yes" : "no", host.entropy_len);

    const char *host_line = NULL;
    if (host.bootargs && host.bootargs[0]) {
        if (pcl->policy != CMDLINE_POLICY_APPEND_CHOSEN)
            log_info("host /chosen/bootargs ignored: policy is static");
        else if (!can_trust_host)
            log_info("host /chosen/bootargs ignored: host not trusted");
        else
            host_line = host.bootargs;
    }
    /* The alias map is host input and needs VTL2 support for it. */
    if (host.has_alias_map && (!can_trust_host || !(vsm_caps & (1ull << 29)))) {
        log_info("host vtl0-alias-map ignored");
        host.has_alias_map = 0;
    }
    if (host.vtl2_alloc_requested)
        log_warn("memory-allocation-mode \"vtl2\" not supported; using the host's allocation");

    /* ---- serial ---- */
    if (host.com3_present && (iso == ISOLATION_NONE || iso == ISOLATION_VBS)) {
        log_enable_serial(COM3_PORT, host.com3_speed);
        log_info("serial: COM3 at %u baud", host.com3_speed);
    } else {
        log_info("serial: off (%s)", host.com3_present ? "isolated" : "no COM3 in host device tree");
    }

    /* ---- VTL2 memory map ---- */
    vtl2_map_init(&vtl2, base + (uint64_t)p->memory_start_offset, p->memory_size);
    vtl2_map_add(&vtl2, base + (uint64_t)p->persisted_state_region_offset, p->persisted_state_region_size,
                 MEMORY_VTL_TYPE_PERSISTED_STATE_HEADER, "persisted state");
    vtl2_map_add(&vtl2, base + (uint64_t)p->parameter_region_offset, p->parameter_region_size,
                 MEMORY_VTL_TYPE_VTL2_CONFIG, "parameter");
    vtl2_map_add(&vtl2, base + (uint64_t)p->vtl2_reserved_region_offset, p->vtl2_reserved_region_size,
                 MEMORY_VTL_TYPE_VTL2_RESERVED, "reserved");
    vtl2_map_add(&vtl2, base + (uint64_t)p->log_buffer_start, p->log_buffer_size,
                 MEMORY_VTL_TYPE_BOOTSHIM_LOG_BUFFER, "log buffer");
    vtl2_map_add(&vtl2, base + (uint64_t)p->sidecar_offset, p->sidecar_size, MEMORY_VTL_TYPE_SIDECAR_IMAGE,
                 "sidecar");

    /* ---- VP index check ---- */
    if (hw_isolated)
        log_info("vp index check: skipped (hardware-isolated)");
    else if (vtl != 2)
        log_warn("vp index check: skipped (not running in VTL2)");
    else
        hv_check_vp_indexes(&host);

    /* ---- sidecar plan: node memory joins the VTL2 map before it is final ---- */
    struct sidecar_plan_inputs sin = {
        .image_size = p->sidecar_size,
        .entry = base + (uint64_t)p->sidecar_entry_offset,
        .isolated = iso != ISOLATION_NONE,
        .disabled_by_cmdline = cmdline_has_token(static_line, static_len, "OPENHCL_SIDECAR=off") ||
                               (host_line && cmdline_has_token(host_line, (uint32_t)strlen(host_line),
                                                               "OPENHCL_SIDECAR=off")),
        .vtl2 = hypercalls && vtl == 2,
        .free_start = base + (uint64_t)p->used_end,
    };
    sidecar_plan(&vtl2, &host, &sin);

    vtl2_map_finish(&vtl2, &host);
    log_info("vtl2 memory: [0x%llx, 0x%llx) numa %u, %u reserved regions", (unsigned long long)vtl2.start,
             (unsigned long long)vtl2.end, vtl2.numa, vtl2.nreserved);
    for (uint32_t i = 0; i < vtl2.npieces; i++)
        log_info("  [0x%llx, 0x%llx) type %u", (unsigned long long)vtl2.pieces[i].start,
                 (unsigned long long)vtl2.pieces[i].end, vtl2.pieces[i].type);

    /* ---- sidecar start ---- */
    times.sidecar_start = hv_reftime();
    sidecar_start(log_serial_enabled());
    times.sidecar_end = hv_reftime();
    sidecar_boot_cpus(boot_cpus, sizeof(boot_cpus));

    /* ---- kernel command line ---- */
    struct kcmd_inputs kin = {
        .com3_console = host.com3_present && can_trust_host,
        .com3_speed = host.com3_speed,
        .isolated = iso != ISOLATION_NONE,
        .static_line = static_line,
        .static_len = static_len,
        .host_line = host_line,
        .boot_cpus = boot_cpus[0] ? boot_cpus : NULL,
    };
    uint32_t cmdline_len = build_kernel_cmdline(kernel_cmdline, sizeof(kernel_cmdline), &kin);
    log_info("kernel command line: %u bytes", cmdline_len);

    /* ---- initrd ---- */
    uint64_t initrd = base + (uint64_t)p->initrd_offset;
    check_inside(&vtl2, initrd, p->initrd_size, "initrd");
    uint32_t crc = crc32_ieee((const void *)(uintptr_t)initrd, p->initrd_size);
    if (crc != p->initrd_crc)
        panic("initrd CRC mismatch: expected 0x%08x got 0x%08x", p->initrd_crc, crc);
    log_info("initrd: 0x%llx, %llu bytes, crc 0x%08x ok", (unsigned long long)initrd,
             (unsigned long long)p->initrd_size, crc);

    /* ---- boot_params and setup_data chain (DTB first) ---- */
    struct setup_data *dtb_sd = (struct setup_data *)fdt_area;
    struct boot_inputs bin = {
        .cmdline = (uint64_t)(uintptr_t)kernel_cmdline,
        .cmdline_len = cmdline_len,
        .initrd = initrd,
        .initrd_size = p->initrd_size,
        .setup_data = (uint64_t)(uintptr_t)dtb_sd,
    };
    fill_boot_params(&boot_params, &bin);
    uint32_t in_ext = build_e820(&boot_params, &e820_ext.hdr, E820_EXT_MAX, &vtl2);
    dtb_sd->next = in_ext ? (uint64_t)(uintptr_t)&e820_ext.hdr : 0;
    dtb_sd->type = SETUP_DTB;

    /* The end time goes into the tree, so it is taken just before writing it. */
    times.boot_end = hv_reftime();
    uint32_t dtb_size = write_linux_dt(dtb_sd + 1, FDT_AREA_SIZE - sizeof(*dtb_sd), &host, &vtl2, iso, &times, &sidecar);
    dtb_sd->len = dtb_size;

    /* ---- hand-off ---- */
    if (shim_stack_bottom[0] != STACK_COOKIE)
        panic("stack cookie smashed: 0x%llx", (unsigned long long)shim_stack_bottom[0]);
    uint64_t entry = base + (uint64_t)p->kernel_entry_offset;
    check_inside(&vtl2, entry, 1, "kernel entry");
    /* Linux finds its own image and the initrd in e820 RAM. */
    check_ram(&vtl2, entry, 1, "kernel entry");
    check_ram(&vtl2, initrd, p->initrd_size, "initrd");
    log_info("boot: kernel entry 0x%llx, boot_params 0x%llx, %u cpus, e820 %u entries, dtb %u bytes, "
             "cmdline %u bytes, reftime %llu..%llu",
             (unsigned long long)entry, (unsigned long long)(uintptr_t)&boot_params, host.cpu_count,
             boot_params.e820_entries + in_ext, dtb_size, cmdline_len, (unsigned long long)times.boot_start,
             (unsigned long long)times.boot_end);
    if (hypercalls)
        hv_disable_hypercalls();
    enter_kernel(entry, (uint64_t)(uintptr_t)&boot_params);
}
