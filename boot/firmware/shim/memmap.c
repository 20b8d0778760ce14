/* VTL2 memory map: the VTL2 range split into RAM and the regions the shim's
 * loader set aside (parameter region, log buffer, ...). */
#include "shim.h"
#include "log.h"
#include "util.h"

void vtl2_map_init(struct vtl2_map *m, uint64_t start, uint64_t size)
{
    memset(m, 0, sizeof(*m));
    if (size == 0 || start + size < start || (start | size) & (HCL_PAGE_SIZE - 1))
        panic("bad VTL2 memory range: start 0x%llx size 0x%llx", (unsigned long long)start,
              (unsigned long long)size);
    m->start = start;
    m->end = start + size;
}

void vtl2_map_add(struct vtl2_map *m, uint64_t start, uint64_t size, uint32_t type, const char *what)
{
    if (size == 0)
        return;
    uint64_t end = start + size;
    if (end < start || start < m->start || end > m->end)
        panic("VTL2 %s region [0x%llx, 0x%llx) is outside VTL2 memory [0x%llx, 0x%llx)", what,
              (unsigned long long)start, (unsigned long long)end, (unsigned long long)m->start,
              (unsigned long long)m->end);
    if (m->nreserved >= MAX_VTL2_REGIONS)
        panic("too many VTL2 regions");
    /* Reserve whole pages: Linux works in pages. */
    start &= ~(HCL_PAGE_SIZE - 1);
    end = ALIGN_UP(end, HCL_PAGE_SIZE);
    struct vtl2_piece *r = &m->reserved[m->nreserved++];
    r->start = start;
    r->end = end;
    r->type = type;
}

void vtl2_map_finish(struct vtl2_map *m, const struct host_info *host)
{
    /* Insertion sort: a handful of entries. */
    for (uint32_t i = 1; i < m->nreserved; i++) {
        struct vtl2_piece t = m->reserved[i];
        uint32_t j = i;
        while (j > 0 && m->reserved[j - 1].start > t.start) {
            m->reserved[j] = m->reserved[j - 1];
            j--;
        }
        m->reserved[j] = t;
    }
    for (uint32_t i = 1; i < m->nreserved; i++) {
        if (m->reserved[i].start < m->reserved[i - 1].end)
            panic("VTL2 regions overlap at 0x%llx (types %u and %u)", (unsigned long long)m->reserved[i].start,
                  m->reserved[i - 1].type, m->reserved[i].type);
    }

    uint64_t cur = m->start;
    m->npieces = 0;
    for (uint32_t i = 0; i < m->nreserved; i++) {
        const struct vtl2_piece *r = &m->reserved[i];
        if (r->start > cur)
            m->pieces[m->npieces++] = (struct vtl2_piece){ cur, r->start, MEMORY_VTL_TYPE_VTL2_RAM };
        m->pieces[m->npieces++] = *r;
        cur = r->end;
    }
    if (cur < m->end)
        m->pieces[m->npieces++] = (struct vtl2_piece){ cur, m->end, MEMORY_VTL_TYPE_VTL2_RAM };

    /* The host must describe the VTL2 range as memory. */
    for (uint32_t i = 0; i < host->mem_count; i++) {
        const struct host_mem_range *h = &host->mem[i];
        if (m->start >= h->start && m->end <= h->start + h->size) {
            m->numa = h->numa;
            m->igvm_type = h->igvm_type;
            return;
        }
    }
    panic("VTL2 range [0x%llx, 0x%llx) is not inside a host device tree memory node", (unsigned long long)m->start,
          (unsigned long long)m->end);
}
