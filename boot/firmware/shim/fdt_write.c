/* FDT writer: header, reservation map, structure block; the strings block
 * is collected on the side (deduplicated) and appended by fdtw_finish. */
#include "fdt.h"
#include "util.h"

static void put32(struct fdtw *w, uint32_t v)
{
    if (w->error || w->pos + 4 > w->cap) {
        w->error = 1;
        return;
    }
    be32_store(w->buf + w->pos, v);
    w->pos += 4;
}

static void put_bytes_padded(struct fdtw *w, const void *data, uint32_t len)
{
    uint32_t padded = (len + 3u) & ~3u;
    if (w->error || padded < len || w->pos + padded > w->cap) {
        w->error = 1;
        return;
    }
    if (len)
        memcpy(w->buf + w->pos, data, len);
    memset(w->buf + w->pos + len, 0, padded - len);
    w->pos += padded;
}

void fdtw_begin(struct fdtw *w, void *buf, uint32_t cap, const struct fdt_rsv *rsv, unsigned nrsv)
{
    w->buf = buf;
    w->cap = cap;
    w->depth = 0;
    w->error = 0;
    w->strs_len = 0;
    memset(w->name_ptr, 0, sizeof(w->name_ptr));
    uint64_t st = FDT_HEADER_SIZE + 16ull * (nrsv + 1);
    if (st > cap) {
        w->error = 1;
        w->pos = w->st_off = 0;
        return;
    }
    memset(w->buf, 0, FDT_HEADER_SIZE);
    uint8_t *r = w->buf + FDT_HEADER_SIZE;
    for (unsigned i = 0; i < nrsv; i++, r += 16) {
        be64_store(r, rsv[i].addr);
        be64_store(r + 8, rsv[i].size);
    }
    be64_store(r, 0);
    be64_store(r + 8, 0);
    w->st_off = w->pos = (uint32_t)st;
}

static uint32_t string_offset_scan(struct fdtw *w, const char *name)
{
    uint32_t n = (uint32_t)strlen(name);
    for (uint32_t o = 0; o < w->strs_len;) {
        uint32_t l = (uint32_t)strlen(w->strs + o);
        if (l == n && memcmp(w->strs + o, name, n) == 0)
            return o;
        o += l + 1;
    }
    if (w->strs_len + n + 1 > sizeof(w->strs)) {
        w->error = 1;
        return 0;
    }
    uint32_t o = w->strs_len;
    memcpy(w->strs + o, name, n + 1);
    w->strs_len += n + 1;
    return o;
}

static uint32_t string_offset(struct fdtw *w, const char *name)
{
    unsigned slot = (unsigned)(((uintptr_t)name >> 2) & 63u);
    if (w->name_ptr[slot] == name)
        return w->name_off[slot];
    uint32_t off = string_offset_scan(w, name);
    w->name_ptr[slot] = name;
    w->name_off[slot] = off;
    return off;
}

void fdtw_node_begin(struct fdtw *w, const char *name)
{
    put32(w, FDT_BEGIN_NODE);
    put_bytes_padded(w, name, (uint32_t)strlen(name) + 1);
    w->depth++;
}

void fdtw_node_end(struct fdtw *w)
{
    if (w->depth <= 0) {
        w->error = 1;
        return;
    }
    put32(w, FDT_END_NODE);
    w->depth--;
}

void fdtw_prop(struct fdtw *w, const char *name, const void *data, uint32_t len)
{
    if (w->depth <= 0)
        w->error = 1;
    uint32_t nameoff = string_offset(w, name);
    put32(w, FDT_PROP);
    put32(w, len);
    put32(w, nameoff);
    put_bytes_padded(w, data, len);
}

void fdtw_prop_empty(struct fdtw *w, const char *name)
{
    fdtw_prop(w, name, NULL, 0);
}

void fdtw_prop_u32(struct fdtw *w, const char *name, uint32_t v)
{
    uint8_t b[4];
    be32_store(b, v);
    fdtw_prop(w, name, b, sizeof(b));
}

void fdtw_prop_u64(struct fdtw *w, const char *name, uint64_t v)
{
    uint8_t b[8];
    be64_store(b, v);
    fdtw_prop(w, name, b, sizeof(b));
}

void fdtw_prop_u64_pair(struct fdtw *w, const char *name, uint64_t a, uint64_t b)
{
    uint8_t d[16];
    be64_store(d, a);
    be64_store(d + 8, b);
    fdtw_prop(w, name, d, sizeof(d));
}

void fdtw_prop_str(struct fdtw *w, const char *name, const char *s)
{
    fdtw_prop(w, name, s, (uint32_t)strlen(s) + 1);
}

uint32_t fdtw_finish(struct fdtw *w, uint32_t boot_cpuid_phys)
{
    if (w->depth != 0)
        w->error = 1;
    put32(w, FDT_END);
    if (w->error)
        return 0;
    uint32_t st_size = w->pos - w->st_off;
    uint32_t strs_off = w->pos;
    if (strs_off + w->strs_len > w->cap)
        return 0;
    memcpy(w->buf + strs_off, w->strs, w->strs_len);
    uint32_t total = strs_off + w->strs_len;

    uint8_t *h = w->buf;
    be32_store(h + 0, FDT_MAGIC);
    be32_store(h + 4, total);
    be32_store(h + 8, w->st_off);
    be32_store(h + 12, strs_off);
    be32_store(h + 16, FDT_HEADER_SIZE);
    be32_store(h + 20, 17);               /* version */
    be32_store(h + 24, 16);               /* last compatible version */
    be32_store(h + 28, boot_cpuid_phys);
    be32_store(h + 32, w->strs_len);
    be32_store(h + 36, st_size);
    return total;
}
