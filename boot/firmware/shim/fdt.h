/* Flattened device tree (DTSpec v0.4, blob version 17): a validating reader
 * for the host's tree and a writer for the tree given to Linux. */
#ifndef SHIM_FDT_H
#define SHIM_FDT_H

#include <stddef.h>
#include <stdint.h>

#define FDT_MAGIC       0xd00dfeedu
#define FDT_BEGIN_NODE  1u
#define FDT_END_NODE    2u
#define FDT_PROP        3u
#define FDT_NOP         4u
#define FDT_END         9u
#define FDT_HEADER_SIZE 40u
#define FDT_MAX_DEPTH   32

/* ---- reader ---- */

struct fdt_view {
    const uint8_t *blob;
    uint32_t total;
    const uint8_t *st;      /* structure block */
    uint32_t st_size;
    const char *strs;       /* strings block */
    uint32_t strs_size;
};

/* Checks the whole blob; returns NULL when it is sound, else what is wrong.
 * Every other reader call assumes a validated view. */
const char *fdt_validate(struct fdt_view *v, const void *blob, uint64_t region_size);
/* Nodes are offsets of their FDT_BEGIN_NODE token in the structure block;
 * -1 means none. */
int fdt_root(const struct fdt_view *v);
const char *fdt_node_name(const struct fdt_view *v, int node);
int fdt_first_child(const struct fdt_view *v, int node);
int fdt_next_sibling(const struct fdt_view *v, int node);
/* Finds a direct child by exact name. */
int fdt_child(const struct fdt_view *v, int node, const char *name);
const void *fdt_getprop(const struct fdt_view *v, int node, const char *name, uint32_t *len);
/* The property as a NUL-terminated string, or NULL (absent or not a string). */
const char *fdt_getprop_str(const struct fdt_view *v, int node, const char *name);
/* Does a stringlist property contain s? */
int fdt_prop_has_string(const struct fdt_view *v, int node, const char *name, const char *s);

/* ---- writer ---- */

struct fdt_rsv {
    uint64_t addr, size;
};

#define FDTW_STRINGS_MAX 1024

struct fdtw {
    uint8_t *buf;
    uint32_t cap;
    uint32_t st_off;      /* structure block start */
    uint32_t pos;         /* end of structure written so far */
    int depth;
    int error;            /* sticky: out of space or misuse */
    uint32_t strs_len;
    char strs[FDTW_STRINGS_MAX];
    /* Property names are string literals: a direct-mapped cache keyed by
     * their address skips the strings-block scan for names seen before. */
    const char *name_ptr[64];
    uint32_t name_off[64];
};

void fdtw_begin(struct fdtw *w, void *buf, uint32_t cap, const struct fdt_rsv *rsv, unsigned nrsv);
void fdtw_node_begin(struct fdtw *w, const char *name);
void fdtw_node_end(struct fdtw *w);
void fdtw_prop(struct fdtw *w, const char *name, const void *data, uint32_t len);
void fdtw_prop_empty(struct fdtw *w, const char *name);
void fdtw_prop_u32(struct fdtw *w, const char *name, uint32_t v);
void fdtw_prop_u64(struct fdtw *w, const char *name, uint64_t v);
void fdtw_prop_u64_pair(struct fdtw *w, const char *name, uint64_t a, uint64_t b);
void fdtw_prop_str(struct fdtw *w, const char *name, const char *s);
/* Closes the blob; returns its total size, or 0 on any error. */
uint32_t fdtw_finish(struct fdtw *w, uint32_t boot_cpuid_phys);

#endif
