/* State shared between the boot shim's stages. */
#ifndef SHIM_SHIM_H
#define SHIM_SHIM_H

#include <stdint.h>
#include "hclsim_abi.h"

#define KERNEL_CMDLINE_SIZE 4096u
/* Per-NUMA-node RAM plus the VTL2 range and its split neighbours, with room. */
#define MAX_HOST_MEM_RANGES 256u
#define MAX_ENTROPY_SIZE    256u
#define MAX_VTL2_REGIONS    8u     /* non-RAM VTL2 regions we carve out */
#define MAX_VTL2_PIECES     (2u * MAX_VTL2_REGIONS + 1u)

struct cpu_entry {
    uint32_t apic_id;
    uint32_t numa;
};

struct host_mem_range {
    uint64_t start, size;
    uint32_t numa;
    uint32_t igvm_type;
};

/* What the shim takes from the host device tree. */
struct host_info {
    uint32_t cpu_count;
    struct cpu_entry cpus[MAX_CPU_COUNT];
    uint32_t mem_count;
    struct host_mem_range mem[MAX_HOST_MEM_RANGES];
    const char *bootargs;            /* NULL when /chosen has none */
    int com3_present;
    uint32_t com3_speed;
    const uint8_t *entropy;          /* points into the host tree */
    uint32_t entropy_len;
    int vtl2_alloc_requested;        /* memory-allocation-mode = "vtl2" */
    int has_alias_map;
    uint64_t alias_map;
    int has_vmbus_conn_id;
    uint32_t vmbus_conn_id;
};

/* One piece of the VTL2 range: [start, end) with its MemoryVtlType. */
struct vtl2_piece {
    uint64_t start, end;
    uint32_t type;
};

struct vtl2_map {
    uint64_t start, end;             /* the whole VTL2 range */
    uint32_t numa;                   /* from the host memory node holding it */
    uint32_t igvm_type;
    uint32_t nreserved;              /* non-RAM regions, sorted */
    struct vtl2_piece reserved[MAX_VTL2_REGIONS];
    uint32_t npieces;                /* the full range split, sorted */
    struct vtl2_piece pieces[MAX_VTL2_PIECES];
};

/* params.c: panics unless every region ShimParamsRaw names lies in the used
 * VTL2 range, clear of the shim image and of each other (before anything is
 * written; a panic this early reports through the crash MSRs). The log
 * buffer is left to shim_params_check_log, which log_init calls before its
 * first write. */
struct shim_params_raw;
void shim_params_check(const struct shim_params_raw *p, uint64_t base);
void shim_params_check_log(uint64_t start, uint64_t size);

/* host_dt.c: parses the (validated) host tree; panics on bad content. */
struct fdt_view;
void host_dt_parse(const struct fdt_view *v, struct host_info *out);

/* memmap.c */
void vtl2_map_init(struct vtl2_map *m, uint64_t start, uint64_t size);
void vtl2_map_add(struct vtl2_map *m, uint64_t start, uint64_t size, uint32_t type, const char *what);
/* Sorts, checks and splits; binds the range to its host memory node. */
void vtl2_map_finish(struct vtl2_map *m, const struct host_info *host);
/* params.c: panics unless [start, start + size) lies in one piece of VTL2 RAM (what the e820
 * map calls RAM). */
void check_ram(const struct vtl2_map *m, uint64_t start, uint64_t size, const char *what);

/* cmdline.c */
int cmdline_has_token(const char *line, uint32_t len, const char *token);
struct cmdline_buf {
    char *buf;
    uint32_t cap;
    uint32_t len;
};
void cmdline_append(struct cmdline_buf *c, const char *s, uint32_t n);
void cmdline_append_str(struct cmdline_buf *c, const char *s);
struct kcmd_inputs {
    int com3_console;                /* COM3 present and host trusted */
    uint32_t com3_speed;
    int isolated;
    const char *static_line;
    uint32_t static_len;
    const char *host_line;           /* NULL unless appended */
    const char *boot_cpus;           /* "boot_cpus=..." when the sidecar runs, else NULL */
};
/* Builds the kernel command line; returns its length (no NUL). */
uint32_t build_kernel_cmdline(char *buf, uint32_t cap, const struct kcmd_inputs *in);

/* sidecar.c */
struct sidecar_state {
    int running;                     /* sidecar_plan said yes */
    uint64_t entry;                  /* sidecar_entry's address */
    struct sidecar_params params;
    struct sidecar_output output;
};
extern struct sidecar_state sidecar;
struct sidecar_plan_inputs {
    uint64_t image_size;             /* ShimParamsRaw.sidecar_size (0: no image) */
    uint64_t entry;
    int isolated;
    int disabled_by_cmdline;         /* OPENHCL_SIDECAR=off */
    int vtl2;                        /* running in VTL2 with hypercalls */
    uint64_t free_start;             /* VTL2 RAM above it is free (used_end) */
};
/* Decides whether the sidecar runs; if so partitions the CPUs, places the
 * node memory at the top of VTL2 RAM and marks it in the map (before
 * vtl2_map_finish). Returns sidecar.running. */
int sidecar_plan(struct vtl2_map *m, const struct host_info *host, const struct sidecar_plan_inputs *in);
/* Calls sidecar_entry (panics on failure); no-op when not running. */
void sidecar_start(int enable_logging);
/* "boot_cpus=<base VPs>" or "" when not running. */
void sidecar_boot_cpus(char *buf, uint32_t cap);

/* dt_linux.c */
struct boot_times {
    uint64_t boot_start, boot_end, sidecar_start, sidecar_end;
};
/* Writes the tree for Linux; returns the blob size (panics on failure). */
/* sidecar: NULL when the sidecar does not run (then no /bus/sidecar@ nodes). */
uint32_t write_linux_dt(void *buf, uint32_t cap, const struct host_info *host, const struct vtl2_map *map,
                        uint32_t isolation, const struct boot_times *times, const struct sidecar_state *sidecar);

/* bootparams.c */
struct boot_params;
struct setup_data;
/* Fills e820 (zero page, then ext's entries); returns the number in ext. */
uint32_t build_e820(struct boot_params *bp, struct setup_data *ext, uint32_t ext_max, const struct vtl2_map *m);
struct boot_inputs {
    uint64_t cmdline, cmdline_len;
    uint64_t initrd, initrd_size;
    uint64_t setup_data;             /* head of the setup_data chain */
};
/* Zeroes bp and fills the setup header (e820 is left to build_e820). */
void fill_boot_params(struct boot_params *bp, const struct boot_inputs *in);

/* crc32.c */
uint32_t crc32_ieee(const void *data, uint64_t len);

#endif
