/* Extracts what the shim needs from the host device tree (format in
 * docs/contracts.md).  The tree is unmeasured host input: sizes and ranges
 * are checked and anything inconsistent is a panic. */
#include "shim.h"
#include "fdt.h"
#include "log.h"
#include "util.h"

#define BAD(...) panic("malformed host device tree: " __VA_ARGS__)

static uint64_t read_cells(const uint8_t *p, uint32_t cells)
{
    return cells == 2 ? be64_load(p) : be32_load(p);
}

static uint32_t cells_prop(const struct fdt_view *v, int node, const char *name, uint32_t dflt)
{
    uint32_t len;
    const uint8_t *p = fdt_getprop(v, node, name, &len);
    if (!p)
        return dflt;
    if (len != 4)
        BAD("%s of %s is not a u32", name, fdt_node_name(v, node));
    uint32_t c = be32_load(p);
    if (c > 2)
        BAD("%s = %u not supported", name, c);
    return c;
}

static int u32_prop(const struct fdt_view *v, int node, const char *name, uint32_t *out)
{
    uint32_t len;
    const uint8_t *p = fdt_getprop(v, node, name, &len);
    if (!p)
        return 0;
    if (len != 4)
        BAD("%s of %s is not a u32", name, fdt_node_name(v, node));
    *out = be32_load(p);
    return 1;
}

static int u64_prop(const struct fdt_view *v, int node, const char *name, uint64_t *out)
{
    uint32_t len;
    const uint8_t *p = fdt_getprop(v, node, name, &len);
    if (!p)
        return 0;
    if (len != 8)
        BAD("%s of %s is not a u64", name, fdt_node_name(v, node));
    *out = be64_load(p);
    return 1;
}

static uint32_t numa_of(const struct fdt_view *v, int node)
{
    uint32_t numa = 0;
    u32_prop(v, node, "numa-node-id", &numa);
    if (numa >= MAX_NUMA_NODES)
        panic("too many NUMA nodes: %s has numa-node-id %u (limit %u)", fdt_node_name(v, node), numa,
              MAX_NUMA_NODES);
    return numa;
}

static int is_type(const struct fdt_view *v, int node, const char *type, const char *prefix)
{
    const char *t = fdt_getprop_str(v, node, "device_type");
    if (t)
        return str_eq(t, type);
    return str_starts_with(fdt_node_name(v, node), prefix);
}

static void parse_cpus(const struct fdt_view *v, int cpus, struct host_info *h)
{
    uint32_t ac = cells_prop(v, cpus, "#address-cells", 1);
    if (ac == 0)
        BAD("/cpus #address-cells is 0");
    for (int c = fdt_first_child(v, cpus); c >= 0; c = fdt_next_sibling(v, c)) {
        if (!is_type(v, c, "cpu", "cpu@"))
            continue;
        uint32_t len;
        const uint8_t *reg = fdt_getprop(v, c, "reg", &len);
        if (!reg || len != 4 * ac)
            BAD("%s has no valid reg", fdt_node_name(v, c));
        uint64_t apic = read_cells(reg, ac);
        if (apic > 0xffffffffu)
            BAD("%s APIC id too large", fdt_node_name(v, c));
        if (h->cpu_count >= MAX_CPU_COUNT)
            panic("too many CPUs: host device tree lists more than %u", MAX_CPU_COUNT);
        h->cpus[h->cpu_count].apic_id = (uint32_t)apic;
        h->cpus[h->cpu_count].numa = numa_of(v, c);
        h->cpu_count++;
    }
}

static void parse_memory(const struct fdt_view *v, int node, uint32_t ac, uint32_t sc, struct host_info *h)
{
    uint32_t len;
    const uint8_t *reg = fdt_getprop(v, node, "reg", &len);
    uint32_t entry = 4 * (ac + sc);
    if (!reg || ac == 0 || sc == 0 || len == 0 || len % entry)
        BAD("%s has no valid reg", fdt_node_name(v, node));
    uint32_t numa = numa_of(v, node);
    uint32_t igvm = IGVM_MEMORY_TYPE_RAM;
    u32_prop(v, node, "microsoft,igvm-type", &igvm);
    for (uint32_t o = 0; o < len; o += entry) {
        uint64_t start = read_cells(reg + o, ac), size = read_cells(reg + o + 4 * ac, sc);
        if (size == 0)
            continue;
        if (start + size < start)
            BAD("%s range wraps", fdt_node_name(v, node));
        if (h->mem_count >= MAX_HOST_MEM_RANGES)
            BAD("more than %u memory ranges", MAX_HOST_MEM_RANGES);
        struct host_mem_range *m = &h->mem[h->mem_count++];
        m->start = start;
        m->size = size;
        m->numa = numa;
        m->igvm_type = igvm;
    }
}

static void parse_openhcl(const struct fdt_view *v, int node, struct host_info *h)
{
    uint32_t len;
    if (fdt_getprop(v, node, "memory-allocation-mode", &len)) {
        const char *mode = fdt_getprop_str(v, node, "memory-allocation-mode");
        if (!mode)
            BAD("/openhcl memory-allocation-mode is not a string");
        if (str_eq(mode, "vtl2"))
            h->vtl2_alloc_requested = 1;
        else if (!str_eq(mode, "host"))
            BAD("/openhcl memory-allocation-mode \"%s\" unknown", mode);
    }
    h->has_alias_map = u64_prop(v, node, "vtl0-alias-map", &h->alias_map);

    int e = fdt_child(v, node, "entropy");
    if (e >= 0) {
        const uint8_t *p = fdt_getprop(v, e, "reg", &len);
        if (!p)
            BAD("/openhcl/entropy has no reg");
        if (len > MAX_ENTROPY_SIZE)
            BAD("/openhcl/entropy larger than %u bytes", MAX_ENTROPY_SIZE);
        h->entropy = p;
        h->entropy_len = len;
    }
}

static void parse_pio_bus(const struct fdt_view *v, int bus, struct host_info *h)
{
    uint32_t ac = cells_prop(v, bus, "#address-cells", 1);
    if (ac == 0)
        return;
    for (int c = fdt_first_child(v, bus); c >= 0; c = fdt_next_sibling(v, c)) {
        if (!fdt_prop_has_string(v, c, "compatible", "ns16550") &&
            !fdt_prop_has_string(v, c, "compatible", "ns16550a"))
            continue;
        uint32_t len;
        const uint8_t *reg = fdt_getprop(v, c, "reg", &len);
        if (!reg || len < 4 * ac)
            BAD("%s has no valid reg", fdt_node_name(v, c));
        if (read_cells(reg, ac) != COM3_PORT)
            continue;
        uint32_t speed = 115200;
        u32_prop(v, c, "current-speed", &speed);
        h->com3_present = 1;
        h->com3_speed = speed ? speed : 115200;
    }
}

static void parse_bus(const struct fdt_view *v, int bus, struct host_info *h)
{
    for (int c = fdt_first_child(v, bus); c >= 0; c = fdt_next_sibling(v, c)) {
        if (fdt_prop_has_string(v, c, "compatible", "microsoft,vmbus"))
            h->has_vmbus_conn_id = u32_prop(v, c, "microsoft,message-connection-id", &h->vmbus_conn_id);
    }
}

/* Heapsort: the 2048-CPU case stays well under a millisecond of guest time. */
static void sift_down(uint64_t *a, uint32_t i, uint32_t n)
{
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n)
            return;
        if (c + 1 < n && a[c + 1] > a[c])
            c++;
        if (a[i] >= a[c])
            return;
        uint64_t t = a[i];
        a[i] = a[c];
        a[c] = t;
        i = c;
    }
}

static uint64_t apic_keys[MAX_CPU_COUNT];

/* Linux numbers its CPUs by the cpu nodes: two nodes with one APIC id would be
 * two CPUs for one processor (the VP index check cannot catch it on
 * hardware-isolated VMs, where it does not run). */
static void check_unique_apic_ids(const struct host_info *h)
{
    uint32_t n = h->cpu_count;
    for (uint32_t i = 0; i < n; i++)
        apic_keys[i] = (uint64_t)h->cpus[i].apic_id << 32 | i;
    for (uint32_t i = n / 2; i-- > 0;)
        sift_down(apic_keys, i, n);
    for (uint32_t end = n; end-- > 1;) {
        uint64_t t = apic_keys[0];
        apic_keys[0] = apic_keys[end];
        apic_keys[end] = t;
        sift_down(apic_keys, 0, end);
    }
    for (uint32_t i = 1; i < n; i++) {
        if (apic_keys[i] >> 32 == apic_keys[i - 1] >> 32)
            BAD("cpus %u and %u (in /cpus order) have the same APIC id %u", (uint32_t)apic_keys[i - 1],
                (uint32_t)apic_keys[i], (uint32_t)(apic_keys[i] >> 32));
    }
}

void host_dt_parse(const struct fdt_view *v, struct host_info *h)
{
    memset(h, 0, sizeof(*h));
    int root = fdt_root(v);
    uint32_t ac = cells_prop(v, root, "#address-cells", 2);
    uint32_t sc = cells_prop(v, root, "#size-cells", 1);

    for (int n = fdt_first_child(v, root); n >= 0; n = fdt_next_sibling(v, n)) {
        const char *name = fdt_node_name(v, n);
        if (str_eq(name, "cpus")) {
            parse_cpus(v, n, h);
        } else if (is_type(v, n, "memory", "memory@")) {
            parse_memory(v, n, ac, sc, h);
        } else if (str_eq(name, "chosen")) {
            uint32_t len;
            if (fdt_getprop(v, n, "bootargs", &len)) {
                h->bootargs = fdt_getprop_str(v, n, "bootargs");
                if (!h->bootargs)
                    BAD("/chosen/bootargs is not a string");
            }
        } else if (str_eq(name, "openhcl")) {
            parse_openhcl(v, n, h);
        } else if (str_starts_with(name, "x86-pio-bus")) {
            parse_pio_bus(v, n, h);
        } else if (str_eq(name, "bus") || fdt_prop_has_string(v, n, "compatible", "simple-bus")) {
            parse_bus(v, n, h);
        }
    }
    if (h->cpu_count == 0)
        BAD("no cpus");
    check_unique_apic_ids(h);
    if (h->mem_count == 0)
        BAD("no memory nodes");
}
