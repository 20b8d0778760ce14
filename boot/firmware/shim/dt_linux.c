/* The device tree handed to the OpenHCL kernel (and, via /proc/device-tree,
 * to usermode): CPUs, VTL2 memory, vmbus and the /openhcl memory map. */
#include "shim.h"
#include "fdt.h"
#include "log.h"
#include "util.h"

#define MAX_OPENHCL_RANGES (2 * MAX_HOST_MEM_RANGES + MAX_VTL2_PIECES)

struct ohcl_range {
    uint64_t start, end;
    uint32_t numa, igvm_type, vtl_type;
};

static struct ohcl_range ranges[MAX_OPENHCL_RANGES];
static struct fdtw writer;

static const char *isolation_name(uint32_t iso)
{
    switch (iso) {
    case ISOLATION_VBS: return "vbs";
    case ISOLATION_SNP: return "snp";
    case ISOLATION_TDX: return "tdx";
    default:            return "none";
    }
}

static uint32_t add_range(uint32_t n, uint64_t start, uint64_t end, uint32_t numa, uint32_t igvm, uint32_t vtl)
{
    if (start >= end)
        return n;
    if (n >= MAX_OPENHCL_RANGES)
        panic("too many memory ranges for /openhcl");
    ranges[n] = (struct ohcl_range){ start, end, numa, igvm, vtl };
    return n + 1;
}

/* The whole partition's RAM labelled by use: host RAM outside VTL2 is VTL0,
 * VTL2 pieces carry their MemoryVtlType. */
static uint32_t collect_ranges(const struct host_info *host, const struct vtl2_map *m)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < host->mem_count; i++) {
        const struct host_mem_range *h = &host->mem[i];
        uint64_t s = h->start, e = h->start + h->size;
        n = add_range(n, s, e < m->start ? e : m->start, h->numa, h->igvm_type, MEMORY_VTL_TYPE_VTL0);
        n = add_range(n, s > m->end ? s : m->end, e, h->numa, h->igvm_type, MEMORY_VTL_TYPE_VTL0);
    }
    for (uint32_t i = 0; i < m->npieces; i++)
        n = add_range(n, m->pieces[i].start, m->pieces[i].end, m->numa, m->igvm_type, m->pieces[i].type);

    for (uint32_t i = 1; i < n; i++) {
        struct ohcl_range t = ranges[i];
        uint32_t j = i;
        while (j > 0 && ranges[j - 1].start > t.start) {
            ranges[j] = ranges[j - 1];
            j--;
        }
        ranges[j] = t;
    }
    for (uint32_t i = 1; i < n; i++) {
        if (ranges[i].start < ranges[i - 1].end)
            panic("malformed host device tree: memory ranges overlap at 0x%llx", (unsigned long long)ranges[i].start);
    }
    return n;
}

uint32_t write_linux_dt(void *buf, uint32_t cap, const struct host_info *host, const struct vtl2_map *m,
                        uint32_t isolation, const struct boot_times *t, const struct sidecar_state *sc)
{
    struct fdtw *w = &writer;
    struct fdt_rsv rsv[MAX_VTL2_REGIONS];
    char name[40];

    /* Everything in VTL2 that is not RAM is reserved for Linux. */
    for (uint32_t i = 0; i < m->nreserved; i++)
        rsv[i] = (struct fdt_rsv){ m->reserved[i].start, m->reserved[i].end - m->reserved[i].start };
    fdtw_begin(w, buf, cap, rsv, m->nreserved);

    fdtw_node_begin(w, "");
    fdtw_prop_u32(w, "#address-cells", 2);
    fdtw_prop_u32(w, "#size-cells", 2);
    fdtw_prop_str(w, "compatible", "microsoft,openvmm");
    fdtw_prop_u64(w, "reftime_boot_start", t->boot_start);
    fdtw_prop_u64(w, "reftime_boot_end", t->boot_end);
    fdtw_prop_u64(w, "reftime_sidecar_start", t->sidecar_start);
    fdtw_prop_u64(w, "reftime_sidecar_end", t->sidecar_end);

    fdtw_node_begin(w, "hypervisor");
    fdtw_prop_str(w, "compatible", "microsoft,hyperv");
    fdtw_node_end(w);

    fdtw_node_begin(w, "cpus");
    fdtw_prop_u32(w, "#address-cells", 1);
    fdtw_prop_u32(w, "#size-cells", 0);
    for (uint32_t i = 0; i < host->cpu_count; i++) {
        fmt(name, sizeof(name), "cpu@%x", host->cpus[i].apic_id);   /* the unit address is reg, in hex */
        fdtw_node_begin(w, name);
        fdtw_prop_str(w, "device_type", "cpu");
        fdtw_prop_u32(w, "reg", host->cpus[i].apic_id);
        fdtw_prop_u32(w, "numa-node-id", host->cpus[i].numa);
        fdtw_prop_str(w, "status", "okay");
        fdtw_node_end(w);
    }
    fdtw_node_end(w);

    /* VTL2 RAM as one node; the reserved parts are in /memreserve/. */
    fmt(name, sizeof(name), "memory@%llx", (unsigned long long)m->start);
    fdtw_node_begin(w, name);
    fdtw_prop_str(w, "device_type", "memory");
    fdtw_prop_u64_pair(w, "reg", m->start, m->end - m->start);
    fdtw_prop_u32(w, "numa-node-id", m->numa);
    fdtw_node_end(w);

    /* Linux only probes vmbus under a simple-bus. */
    fdtw_node_begin(w, "bus");
    fdtw_prop_str(w, "compatible", "simple-bus");
    fdtw_prop_u32(w, "#address-cells", 2);
    fdtw_prop_u32(w, "#size-cells", 2);
    fdtw_prop_empty(w, "ranges");
    fdtw_node_begin(w, "vmbus");
    fdtw_prop_u32(w, "#address-cells", 2);
    fdtw_prop_u32(w, "#size-cells", 2);
    fdtw_prop_empty(w, "dma-coherent");
    fdtw_prop_str(w, "compatible", "microsoft,vmbus");
    fdtw_prop_u32(w, "microsoft,vtl", 2);
    if (host->has_vmbus_conn_id)
        fdtw_prop_u32(w, "microsoft,message-connection-id", host->vmbus_conn_id);
    fdtw_prop_empty(w, "ranges");
    fdtw_node_end(w);
    /* One node per sidecar node: its control page and command/register pages. */
    for (uint32_t i = 0; sc && sc->running && i < sc->params.node_count; i++) {
        static const char reg_names[] = "ctrl\0shmem";
        const struct sidecar_node_output *o = &sc->output.nodes[i];
        uint8_t reg[32];
        be64_store(reg, o->control_page);
        be64_store(reg + 8, HCL_PAGE_SIZE);
        be64_store(reg + 16, o->shmem_pages_base);
        be64_store(reg + 24, o->shmem_pages_size);
        fmt(name, sizeof(name), "sidecar@%llx", (unsigned long long)o->control_page);
        fdtw_node_begin(w, name);
        fdtw_prop_str(w, "compatible", "microsoft,openhcl-sidecar");
        fdtw_prop(w, "reg", reg, sizeof(reg));
        fdtw_prop(w, "reg-names", reg_names, sizeof(reg_names));
        fdtw_node_end(w);
    }
    fdtw_node_end(w);

    fdtw_node_begin(w, "openhcl");
    /* Cells for the memory@ children's reg (dtc checks them). */
    fdtw_prop_u32(w, "#address-cells", 2);
    fdtw_prop_u32(w, "#size-cells", 2);
    fdtw_prop_str(w, "isolation-type", isolation_name(isolation));
    fdtw_prop_str(w, "memory-allocation-mode", "host");
    if (host->has_alias_map)
        fdtw_prop_u64(w, "vtl0-alias-map", host->alias_map);
    uint32_t n = collect_ranges(host, m);
    for (uint32_t i = 0; i < n; i++) {
        const struct ohcl_range *r = &ranges[i];
        fmt(name, sizeof(name), "memory@%llx", (unsigned long long)r->start);
        fdtw_node_begin(w, name);
        fdtw_prop_str(w, "device_type", "memory-openhcl");
        fdtw_prop_u64_pair(w, "reg", r->start, r->end - r->start);
        fdtw_prop_u32(w, "numa-node-id", r->numa);
        fdtw_prop_u32(w, "microsoft,igvm-type", r->igvm_type);
        fdtw_prop_u32(w, "openhcl,memory-type", r->vtl_type);
        fdtw_node_end(w);
    }
    /* Host entropy seeds the kernel RNG (underhill_init reads it back). */
    if (host->entropy) {
        fdtw_node_begin(w, "entropy");
        fdtw_prop(w, "reg", host->entropy, host->entropy_len);
        fdtw_node_end(w);
    }
    fdtw_node_end(w);

    fdtw_node_end(w);
    uint32_t size = fdtw_finish(w, host->cpus[0].apic_id);
    if (!size)
        panic("device tree for the kernel does not fit in %u bytes", cap);
    return size;
}
