/* ShimParamsRaw checks, before anything is written through it.  The loader
 * (the IGVM file) lays out VTL2; a region the shim reads or writes must lie
 * inside the VTL2 range and inside the loader's used range, clear of the
 * shim's own image and of every other region, or a stray log ring or sidecar
 * node would land on code or data (docs/contracts.md, "VTL2 image layout").
 * Runs before the log ring exists and before serial is allowed: a panic here
 * reports through the crash MSRs. */
#include "shim.h"
#include "log.h"
#include "util.h"

extern char __image_base[], __image_end[];

#define MAX_PARAM_REGIONS 12u

struct span {
    const char *what;
    uint64_t start, size;
};

/* What shim_params_check found, for shim_params_check_log. */
static struct {
    uint64_t used_start, used_end;
    uint32_t n;
    struct span spans[MAX_PARAM_REGIONS];
} checked;

struct vtl2_bounds {
    uint64_t start, end, used_start, used_end;
};

static void check_span(const struct vtl2_bounds *b, const struct span *s)
{
    uint64_t end = s->start + s->size;
    if (end < s->start)
        panic("malformed ShimParams: %s [0x%llx, +0x%llx) wraps around", s->what, (unsigned long long)s->start,
              (unsigned long long)s->size);
    if (s->start < b->used_start || end > b->used_end)
        panic("malformed ShimParams: %s [0x%llx, 0x%llx) is outside the used VTL2 range [0x%llx, 0x%llx)",
              s->what, (unsigned long long)s->start, (unsigned long long)end, (unsigned long long)b->used_start,
              (unsigned long long)b->used_end);
}

static void check_disjoint(const struct span *spans, uint32_t n, const struct span *y)
{
    for (uint32_t i = 0; i < n; i++) {
        const struct span *x = &spans[i];
        if (x->size && y->size && x->start < y->start + y->size && y->start < x->start + x->size)
            panic("malformed ShimParams: %s [0x%llx, 0x%llx) overlaps %s [0x%llx, 0x%llx)", y->what,
                  (unsigned long long)y->start, (unsigned long long)(y->start + y->size), x->what,
                  (unsigned long long)x->start, (unsigned long long)(x->start + x->size));
    }
}

void shim_params_check_log(uint64_t start, uint64_t size)
{
    struct vtl2_bounds b = { 0, 0, checked.used_start, checked.used_end };
    struct span log = { "log buffer", start, size };
    if (!size)
        return;
    check_span(&b, &log);
    check_disjoint(checked.spans, checked.n, &log);
}

void shim_params_check(const struct shim_params_raw *p, uint64_t base)
{
    struct vtl2_bounds bounds, *b = &bounds;
    b->start = base + (uint64_t)p->memory_start_offset;
    b->end = b->start + p->memory_size;
    if (p->memory_size == 0 || b->end < b->start || ((b->start | p->memory_size) & (HCL_PAGE_SIZE - 1)))
        panic("malformed ShimParams: VTL2 memory start 0x%llx size 0x%llx (must be page aligned, not empty)",
              (unsigned long long)b->start, (unsigned long long)p->memory_size);
    b->used_start = base + (uint64_t)p->used_start;
    b->used_end = base + (uint64_t)p->used_end;
    if (b->used_start > b->used_end || b->used_start < b->start || b->used_end > b->end)
        panic("malformed ShimParams: used range [0x%llx, 0x%llx) is not inside VTL2 memory [0x%llx, 0x%llx)",
              (unsigned long long)b->used_start, (unsigned long long)b->used_end, (unsigned long long)b->start,
              (unsigned long long)b->end);

    struct span spans[MAX_PARAM_REGIONS];
    uint32_t n = 0;
    uint64_t image = (uint64_t)(uintptr_t)__image_base;
    spans[n++] = (struct span){ "shim image", image, (uint64_t)(uintptr_t)__image_end - image };
    spans[n++] = (struct span){ "ShimParams", (uint64_t)(uintptr_t)p, sizeof(*p) };
    spans[n++] = (struct span){ "command line", base + (uint64_t)p->cmdline_offset,
                                sizeof(struct paravisor_command_line) };
    spans[n++] = (struct span){ "initrd", base + (uint64_t)p->initrd_offset, p->initrd_size };
    spans[n++] = (struct span){ "parameter region", base + (uint64_t)p->parameter_region_offset,
                                p->parameter_region_size };
    spans[n++] = (struct span){ "VTL2 reserved region", base + (uint64_t)p->vtl2_reserved_region_offset,
                                p->vtl2_reserved_region_size };
    spans[n++] = (struct span){ "heap", base + (uint64_t)p->heap_start_offset, p->heap_size };
    spans[n++] = (struct span){ "persisted state region", base + (uint64_t)p->persisted_state_region_offset,
                                p->persisted_state_region_size };
    spans[n++] = (struct span){ "sidecar image", base + (uint64_t)p->sidecar_offset, p->sidecar_size };
    spans[n++] = (struct span){ "bounce buffer", base + (uint64_t)p->bounce_buffer_start, p->bounce_buffer_size };

    for (uint32_t i = 0; i < n; i++) {
        if (spans[i].size)
            check_span(b, &spans[i]);
    }
    for (uint32_t j = 1; j < n; j++)
        check_disjoint(spans, j, &spans[j]);
    /* The shim's loader places the kernel in the used range, clear of the rest. */
    uint64_t entry = base + (uint64_t)p->kernel_entry_offset;
    if (entry < b->used_start || entry >= b->used_end)
        panic("malformed ShimParams: kernel entry 0x%llx is outside the used VTL2 range [0x%llx, 0x%llx)",
              (unsigned long long)entry, (unsigned long long)b->used_start, (unsigned long long)b->used_end);
    for (uint32_t i = 0; i < n; i++) {
        if (entry - spans[i].start < spans[i].size)
            panic("malformed ShimParams: kernel entry 0x%llx is inside the %s [0x%llx, 0x%llx)",
                  (unsigned long long)entry, spans[i].what, (unsigned long long)spans[i].start,
                  (unsigned long long)(spans[i].start + spans[i].size));
    }
    checked.used_start = b->used_start;
    checked.used_end = b->used_end;
    checked.n = n;
    for (uint32_t i = 0; i < n; i++)
        checked.spans[i] = spans[i];
    if (p->sidecar_size) {
        uint64_t se = base + (uint64_t)p->sidecar_entry_offset;
        uint64_t ss = base + (uint64_t)p->sidecar_offset;
        if (se - ss >= p->sidecar_size)
            panic("malformed ShimParams: sidecar entry 0x%llx is outside the sidecar image [0x%llx, 0x%llx)",
                  (unsigned long long)se, (unsigned long long)ss, (unsigned long long)(ss + p->sidecar_size));
    }
}

/* [start, start + size) lies in one piece of VTL2 RAM (what the e820 map calls RAM). */
void check_ram(const struct vtl2_map *m, uint64_t start, uint64_t size, const char *what)
{
    if (size == 0)
        return;
    for (uint32_t i = 0; i < m->npieces; i++) {
        const struct vtl2_piece *r = &m->pieces[i];
        if (start >= r->start && start + size <= r->end) {
            if (r->type == MEMORY_VTL_TYPE_VTL2_RAM)
                return;
            panic("%s [0x%llx, 0x%llx) is in VTL2 memory of type %u, not RAM", what, (unsigned long long)start,
                  (unsigned long long)(start + size), r->type);
        }
    }
    panic("%s [0x%llx, 0x%llx) is not inside one VTL2 RAM range", what, (unsigned long long)start,
          (unsigned long long)(start + size));
}
