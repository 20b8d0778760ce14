/* Hypervisor interface of the boot shim. */
#include "hv.h"
#include "hw.h"
#include "log.h"
#include "util.h"

#define HV_CPUID_VENDOR       0x40000000u
#define HV_CPUID_FEATURES     0x40000003u
#define HV_CPUID_ISOLATION    0x4000000Cu
#define HV_FEATURE_ISOLATION  (1u << 22)   /* 0x40000003 EBX */
#define HV_HYPERCALL_GPN_MASK (~0xfffull)
#define HV_HYPERCALL_RSVD     0xffeull      /* locked + reserved bits kept as read */

/* Hypercall input/output must not cross a page: give each its own page.
 * GPA = address (identity map). */
static uint8_t hc_in[HCL_PAGE_SIZE] __attribute__((aligned(HCL_PAGE_SIZE)));
static uint8_t hc_out[HCL_PAGE_SIZE] __attribute__((aligned(HCL_PAGE_SIZE)));

uint64_t hv_reftime(void)
{
    return rdmsr(HV_X64_MSR_TIME_REF_COUNT);
}

static const char *iso_name(uint32_t iso)
{
    static const char *const names[] = { "none", "vbs", "snp", "tdx" };
    return iso < ARRAY_SIZE(names) ? names[iso] : "unknown";
}

void hv_confirm_isolation(uint32_t iso)
{
    uint32_t max = cpuid(HV_CPUID_VENDOR, 0).eax;
    if (max < HV_CPUID_VENDOR || max > HV_CPUID_VENDOR + 0xff)
        max = 0; /* no hypervisor leaves */
    uint32_t hw_iso = max >= HV_CPUID_ISOLATION ? cpuid(HV_CPUID_ISOLATION, 0).ebx & 0xf : 0;
    int vbs = max >= HV_CPUID_FEATURES && (cpuid(HV_CPUID_FEATURES, 0).ebx & HV_FEATURE_ISOLATION);

    int ok;
    switch (iso) {
    case ISOLATION_NONE:
        ok = hw_iso == ISOLATION_NONE && !vbs;
        break;
    case ISOLATION_VBS:
        ok = vbs;
        break;
    case ISOLATION_SNP:
    case ISOLATION_TDX:
        ok = hw_iso == iso;
        break;
    default:
        panic("unknown isolation type %u in shim parameters", iso);
    }
    if (!ok)
        panic("isolation type mismatch: image built for %s, hypervisor reports isolation %u (%s), VBS bit %d",
              iso_name(iso), hw_iso, iso_name(hw_iso), vbs ? 1 : 0);
    log_info("isolation: %s (confirmed by CPUID)", iso_name(iso));
}

void hv_enable_hypercalls(void)
{
    wrmsr(HV_X64_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_OPENHCL);
    uint64_t v = rdmsr(HV_X64_MSR_HYPERCALL);
    if (v & HV_HYPERCALL_ENABLE)
        panic("hypercall page already enabled (HYPERCALL MSR 0x%llx)", (unsigned long long)v);
    uint64_t gpa = (uint64_t)(uintptr_t)hypercall_page;
    wrmsr(HV_X64_MSR_HYPERCALL, (v & HV_HYPERCALL_RSVD) | (gpa & HV_HYPERCALL_GPN_MASK) | HV_HYPERCALL_ENABLE);
    log_info("hypercalls: page at 0x%llx enabled", (unsigned long long)gpa);
}

void hv_disable_hypercalls(void)
{
    wrmsr(HV_X64_MSR_HYPERCALL, 0);
    wrmsr(HV_X64_MSR_GUEST_OS_ID, 0);
}

static uint64_t rep_call(uint16_t code, uint32_t reps)
{
    uint64_t control = code | ((uint64_t)reps << HV_HYPERCALL_REP_COUNT_SHIFT);
    return hv_hypercall(control, (uint64_t)(uintptr_t)hc_in, (uint64_t)(uintptr_t)hc_out);
}

uint16_t hv_get_vp_register(uint32_t name, uint64_t *value)
{
    struct hv_get_set_vp_registers_input *in = (void *)hc_in;
    memset(hc_in, 0, 32);
    in->partition_id = HV_PARTITION_ID_SELF;
    in->vp_index = HV_VP_INDEX_SELF;
    in->input_vtl = 0; /* the caller's own VTL */
    *(uint32_t *)(hc_in + sizeof(*in)) = name;
    memset(hc_out, 0, 16);
    uint16_t status = (uint16_t)rep_call(HVCALL_GET_VP_REGISTERS, 1);
    if (status == HV_STATUS_SUCCESS)
        *value = *(const uint64_t *)hc_out;
    return status;
}

/* Per call: header plus u32 APIC ids must fit the input page. */
#define VP_INDEX_BATCH ((HCL_PAGE_SIZE - sizeof(struct hv_get_vp_index_from_apic_id_input)) / 4)

void hv_check_vp_indexes(const struct host_info *host)
{
    struct hv_get_vp_index_from_apic_id_input *hdr = (void *)hc_in;
    uint32_t *ids = (uint32_t *)(hc_in + sizeof(*hdr));
    const uint32_t *out = (const uint32_t *)hc_out;

    for (uint32_t base = 0; base < host->cpu_count; base += VP_INDEX_BATCH) {
        uint32_t n = host->cpu_count - base;
        if (n > VP_INDEX_BATCH)
            n = VP_INDEX_BATCH;
        memset(hdr, 0, sizeof(*hdr));
        hdr->partition_id = HV_PARTITION_ID_SELF;
        hdr->target_vtl = 0;
        for (uint32_t i = 0; i < n; i++)
            ids[i] = host->cpus[base + i].apic_id;
        uint64_t r = rep_call(HVCALL_GET_VP_INDEX_FROM_APIC_ID, n);
        uint16_t status = (uint16_t)r;
        uint32_t done = (uint32_t)(r >> 32) & 0xfff;
        if (status != HV_STATUS_SUCCESS || done != n) {
            uint32_t bad = base + (done < n ? done : n - 1);
            panic("GetVpIndexFromApicId failed: status 0x%x for cpu %u apic %u (%u of %u done)", status, bad,
                  host->cpus[bad].apic_id, done, n);
        }
        for (uint32_t i = 0; i < n; i++) {
            if (out[i] != base + i)
                panic("VP index mismatch: cpu %u apic %u has vp index %u", base + i, host->cpus[base + i].apic_id,
                      out[i]);
        }
    }
    log_info("vp index check: %u cpus match", host->cpu_count);
}
