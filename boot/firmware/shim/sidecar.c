/* Sidecar start (reference sections 1.7 and 2 "Nodes and start"): decide
 * whether the sidecar runs, split the CPUs into nodes, give each node its
 * memory from the top of VTL2 RAM, and call sidecar_entry on the BSP. */
#include "shim.h"
#include "hw.h"
#include "hv.h"
#include "log.h"
#include "util.h"

#define CPUID1_ECX_X2APIC (1u << 21)

typedef _Bool (*sidecar_entry_fn)(const struct sidecar_params *, struct sidecar_output *);

struct sidecar_state sidecar;

/* Runs of consecutive CPUs (VP order) on the same NUMA node, each run cut
 * into ceil(n/32) chunks of ceil(n/chunks) CPUs (the last one shorter).
 * Returns the node count, 0 when the sidecar would not help (every node one
 * CPU) or there would be too many nodes. hclsim/sidecar/partition.py is the
 * simulator's twin of this. */
static uint32_t partition(const struct host_info *h, struct sidecar_node_params *nodes)
{
    uint32_t n = 0;
    int multi = 0;
    for (uint32_t i = 0; i < h->cpu_count;) {
        uint32_t j = i + 1;
        while (j < h->cpu_count && h->cpus[j].numa == h->cpus[i].numa)
            j++;
        uint32_t len = j - i;
        uint32_t chunks = (len + SIDECAR_MAX_NODE_CPUS - 1) / SIDECAR_MAX_NODE_CPUS;
        uint32_t chunk = (len + chunks - 1) / chunks;
        for (uint32_t k = i; k < j; k += chunk) {
            if (n >= SIDECAR_MAX_NODES)
                return 0;
            uint32_t c = j - k < chunk ? j - k : chunk;
            nodes[n].base_vp = k;
            nodes[n].vp_count = c;
            if (c > 1)
                multi = 1;
            n++;
        }
        i = j;
    }
    return multi ? n : 0;
}

int sidecar_plan(struct vtl2_map *m, const struct host_info *host, const struct sidecar_plan_inputs *in)
{
    memset(&sidecar, 0, sizeof(sidecar));
    const char *why = NULL;
    if (in->image_size == 0)
        why = "no sidecar image";
    else if (in->isolated)
        why = "isolated VM";
    else if (in->disabled_by_cmdline)
        why = "OPENHCL_SIDECAR=off";
    else if (!in->vtl2)
        why = "not running in VTL2";
    else if (!(cpuid(1, 0).ecx & CPUID1_ECX_X2APIC))
        why = "no x2APIC";
    uint32_t count = 0;
    if (!why) {
        count = partition(host, sidecar.params.nodes);
        if (!count)
            why = "every node would hold one CPU";
    }
    if (why) {
        log_info("sidecar: off (%s)", why);
        return 0;
    }

    /* Node memory from the top of VTL2 RAM downward, contiguous per node. */
    uint64_t top = m->end, total = 0;
    for (uint32_t i = 0; i < count; i++) {
        struct sidecar_node_params *np = &sidecar.params.nodes[i];
        uint64_t size = (uint64_t)SIDECAR_NODE_PAGES(np->vp_count) * HCL_PAGE_SIZE;
        if (top < in->free_start || top - in->free_start < size)
            panic("sidecar: node memory does not fit in VTL2: node %u needs 0x%llx bytes below 0x%llx, "
                  "free RAM starts at 0x%llx (%u nodes, 0x%llx bytes so far)",
                  i, (unsigned long long)size, (unsigned long long)top, (unsigned long long)in->free_start, count,
                  (unsigned long long)total);
        top -= size;
        total += size;
        np->memory_base = top;
        np->memory_size = size;
    }
    vtl2_map_add(m, top, total, MEMORY_VTL_TYPE_SIDECAR_NODE, "sidecar nodes");

    sidecar.params.hypercall_page = (uint64_t)(uintptr_t)hypercall_page;
    sidecar.params.node_count = count;
    sidecar.entry = in->entry;
    sidecar.running = 1;
    log_info("sidecar: %u nodes for %u cpus, node memory [0x%llx, 0x%llx)", count, host->cpu_count,
             (unsigned long long)top, (unsigned long long)(top + total));
    for (uint32_t i = 0; i < count; i++)
        log_info("  node %u: vp %u..%u, memory 0x%llx (0x%llx bytes)", i, sidecar.params.nodes[i].base_vp,
                 sidecar.params.nodes[i].base_vp + sidecar.params.nodes[i].vp_count - 1,
                 (unsigned long long)sidecar.params.nodes[i].memory_base,
                 (unsigned long long)sidecar.params.nodes[i].memory_size);
    return 1;
}

void sidecar_start(int enable_logging)
{
    if (!sidecar.running)
        return;
    sidecar.params.enable_logging = enable_logging ? 1 : 0;
    sidecar_entry_fn entry = (sidecar_entry_fn)(uintptr_t)sidecar.entry;
    log_info("sidecar: calling sidecar_entry at 0x%llx", (unsigned long long)sidecar.entry);
    if (!entry(&sidecar.params, &sidecar.output)) {
        uint32_t n = sidecar.output.error_len;
        panic("sidecar start failed: %.*s", (int)n, (const char *)sidecar.output.error_buf);
    }
    uint32_t aps = 0;
    for (uint32_t i = 0; i < sidecar.params.node_count; i++)
        aps += sidecar.params.nodes[i].vp_count - 1;
    log_info("sidecar: started, %u nodes, %u APs idle", sidecar.params.node_count, aps);
}

void sidecar_boot_cpus(char *buf, uint32_t cap)
{
    struct cmdline_buf c = { buf, cap, 0 };
    char tmp[16];
    buf[0] = '\0';
    if (!sidecar.running)
        return;
    cmdline_append_str(&c, "boot_cpus=");
    for (uint32_t i = 0; i < sidecar.params.node_count; i++) {
        fmt(tmp, sizeof(tmp), i ? ",%u" : "%u", sidecar.params.nodes[i].base_vp);
        cmdline_append_str(&c, tmp);
    }
}
