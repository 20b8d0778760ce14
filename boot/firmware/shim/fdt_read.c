/* Validating FDT reader.  The host's tree is not measured, so nothing in it
 * is used before fdt_validate has checked every offset, size and token: it
 * refuses at least every blob libfdt's fdt_check_full refuses (header and
 * block bounds, versions, tokens, names, property lengths and name offsets,
 * nesting, nothing after the root node) and a few more (no root node,
 * misaligned blocks, deep nesting, properties outside a node). */
#include "fdt.h"
#include "util.h"

#define ALIGN4(x) (((x) + 3u) & ~3u)

static uint32_t hdr(const uint8_t *b, unsigned field)
{
    return be32_load(b + 4 * field);
}

static uint32_t tok(const struct fdt_view *v, uint32_t off)
{
    return be32_load(v->st + off);
}

/* Checks a string-table entry is NUL-terminated inside the strings block. */
static int string_ok(const struct fdt_view *v, uint32_t nameoff)
{
    if (nameoff >= v->strs_size)
        return 0;
    return str_nlen(v->strs + nameoff, v->strs_size - nameoff) < v->strs_size - nameoff;
}

const char *fdt_validate(struct fdt_view *v, const void *blob, uint64_t region_size)
{
    const uint8_t *b = blob;
    memset(v, 0, sizeof(*v));

    if (region_size < FDT_HEADER_SIZE)
        return "region smaller than the header";
    if (hdr(b, 0) != FDT_MAGIC)
        return "bad magic";
    uint32_t total = hdr(b, 1);
    uint32_t off_st = hdr(b, 2), off_strs = hdr(b, 3), off_rsv = hdr(b, 4);
    uint32_t version = hdr(b, 5), last_comp = hdr(b, 6);
    uint32_t strs_size = hdr(b, 8), st_size = hdr(b, 9);

    if (total < FDT_HEADER_SIZE)
        return "totalsize smaller than the header";
    if (total > region_size)
        return "totalsize larger than the parameter region";
    if (version < 16)
        return "version older than 16";
    if (last_comp > 17)
        return "last_comp_version newer than 17";
    if (version < last_comp)
        return "version older than its last_comp_version";
    if (version < 17)
        st_size = off_st <= total ? total - off_st : 0; /* v16 has no size_dt_struct */
    if (off_st < FDT_HEADER_SIZE || (uint64_t)off_st + st_size > total)
        return "structure block out of bounds";
    if (off_st % 4 || st_size % 4)
        return "structure block misaligned";
    if (off_strs < FDT_HEADER_SIZE || (uint64_t)off_strs + strs_size > total)
        return "strings block out of bounds";
    if (off_rsv < FDT_HEADER_SIZE || off_rsv % 8 || off_rsv >= total)
        return "memory reservation block out of bounds";

    /* The reservation map ends with an all-zero entry, inside the blob. */
    for (uint32_t o = off_rsv;; o += 16) {
        if ((uint64_t)o + 16 > total)
            return "memory reservation block not terminated";
        if (be64_load(b + o) == 0 && be64_load(b + o + 8) == 0)
            break;
    }

    v->blob = b;
    v->total = total;
    v->st = b + off_st;
    v->st_size = st_size;
    v->strs = (const char *)b + off_strs;
    v->strs_size = strs_size;

    /* Walk every token once. */
    int depth = 0, seen_root = 0;
    uint32_t off = 0;
    for (;;) {
        if (off + 4 > st_size)
            return "structure block has no FDT_END";
        uint32_t t = tok(v, off);
        off += 4;
        /* Like libfdt's fdt_check_full: once the root node has closed, only FDT_END. */
        if (seen_root && depth == 0 && t != FDT_END)
            return "data after the root node";
        switch (t) {
        case FDT_BEGIN_NODE: {
            uint32_t room = st_size - off;
            size_t n = str_nlen((const char *)v->st + off, room);
            if (n >= room)
                return "unterminated node name";
            if (depth == 0 && n != 0)
                return "root node has a name";
            if (depth > 0 && n == 0)
                return "empty node name";
            if (++depth > FDT_MAX_DEPTH)
                return "nodes nested too deeply";
            seen_root = 1;
            off = ALIGN4(off + (uint32_t)n + 1);
            break;
        }
        case FDT_END_NODE:
            if (depth == 0)
                return "unbalanced FDT_END_NODE";
            depth--;
            break;
        case FDT_PROP: {
            if (depth == 0)
                return "property outside any node";
            if (off + 8 > st_size)
                return "truncated property";
            uint32_t len = tok(v, off), nameoff = tok(v, off + 4);
            off += 8;
            if (len > st_size - off)
                return "property value out of bounds";
            if (!string_ok(v, nameoff))
                return "property name out of bounds";
            off = ALIGN4(off + len);
            break;
        }
        case FDT_NOP:
            break;
        case FDT_END:
            if (depth != 0)
                return "FDT_END inside a node";
            if (!seen_root)
                return "no root node";
            return NULL;
        default:
            return "unknown structure token";
        }
        if (off > st_size)
            return "structure block overrun";
    }
}

/* Offset just past the token at off (validated input only). */
static uint32_t skip_token(const struct fdt_view *v, uint32_t off, uint32_t *t)
{
    *t = tok(v, off);
    off += 4;
    switch (*t) {
    case FDT_BEGIN_NODE:
        return ALIGN4(off + (uint32_t)strlen((const char *)v->st + off) + 1);
    case FDT_PROP:
        return ALIGN4(off + 8 + tok(v, off));
    default:
        return off;
    }
}

int fdt_root(const struct fdt_view *v)
{
    uint32_t off = 0, t;
    for (;;) {
        uint32_t next = skip_token(v, off, &t);
        if (t == FDT_BEGIN_NODE)
            return (int)off;
        if (t != FDT_NOP)
            return -1;
        off = next;
    }
}

const char *fdt_node_name(const struct fdt_view *v, int node)
{
    return (const char *)v->st + node + 4;
}

/* Scans forward from off (inside a node, after its name) over properties and
 * NOPs; returns the next child's offset or -1 at the parent's END_NODE. */
static int next_child_from(const struct fdt_view *v, uint32_t off)
{
    uint32_t t;
    for (;;) {
        uint32_t next = skip_token(v, off, &t);
        if (t == FDT_BEGIN_NODE)
            return (int)off;
        if (t == FDT_END_NODE || t == FDT_END)
            return -1;
        off = next;
    }
}

int fdt_first_child(const struct fdt_view *v, int node)
{
    uint32_t t;
    return next_child_from(v, skip_token(v, (uint32_t)node, &t));
}

int fdt_next_sibling(const struct fdt_view *v, int node)
{
    uint32_t off = (uint32_t)node, t;
    int depth = 0;
    do {
        off = skip_token(v, off, &t);
        if (t == FDT_BEGIN_NODE)
            depth++;
        else if (t == FDT_END_NODE)
            depth--;
        else if (t == FDT_END)
            return -1;
    } while (depth > 0);
    return next_child_from(v, off);
}

int fdt_child(const struct fdt_view *v, int node, const char *name)
{
    for (int c = fdt_first_child(v, node); c >= 0; c = fdt_next_sibling(v, c)) {
        if (str_eq(fdt_node_name(v, c), name))
            return c;
    }
    return -1;
}

const void *fdt_getprop(const struct fdt_view *v, int node, const char *name, uint32_t *len)
{
    uint32_t t;
    uint32_t off = skip_token(v, (uint32_t)node, &t);
    for (;;) {
        uint32_t next = skip_token(v, off, &t);
        if (t == FDT_PROP) {
            if (str_eq(v->strs + tok(v, off + 8), name)) {
                if (len)
                    *len = tok(v, off + 4);
                return v->st + off + 12;
            }
        } else if (t != FDT_NOP) {
            return NULL; /* properties come before subnodes */
        }
        off = next;
    }
}

const char *fdt_getprop_str(const struct fdt_view *v, int node, const char *name)
{
    uint32_t len;
    const char *s = fdt_getprop(v, node, name, &len);
    if (!s || len == 0 || s[len - 1] != '\0')
        return NULL;
    return s;
}

int fdt_prop_has_string(const struct fdt_view *v, int node, const char *name, const char *s)
{
    uint32_t len;
    const char *p = fdt_getprop(v, node, name, &len);
    if (!p)
        return 0;
    uint32_t i = 0;
    while (i < len) {
        size_t n = str_nlen(p + i, len - i);
        if (n == len - i)
            return 0; /* last entry unterminated */
        if (str_eq(p + i, s))
            return 1;
        i += (uint32_t)n + 1;
    }
    return 0;
}
