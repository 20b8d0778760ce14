/* Sidecar kernel: internal declarations.
 *
 * Address space (every CPU, BSP included, once sidecar_entry has switched):
 *   PML4[0]   identity map of the first 512 GiB with 1 GiB pages (one PDPT
 *             in the image's BSS, shared by every CPU): node memory, the
 *             shim's params/output/stack and all hypercall GPAs are used
 *             through it (VA == GPA).
 *   PML4[511] per CPU: PDPT[0] -> PD; PD[0] = 2 MiB page holding the image
 *             (linked at 0, relocated for SIDECAR_IMAGE_VA); PD[1] -> PT,
 *             the per-CPU window at SIDECAR_IMAGE_VA + 2 MiB (see PERCPU_*).
 * APs get their PML4/PDPT/PD/PT from their 11 private node pages; the BSP
 * uses tables in the image's BSS and keeps the shim's stack and GDT.
 */
#ifndef SIDECAR_SIDECAR_H
#define SIDECAR_SIDECAR_H

#include <stddef.h>
#include <stdint.h>
#include "hclsim_abi.h"
#include "x86_insn.h"

/* Everything is local to the image: direct RIP-relative references, no GOT
 * (code that runs before the switch to the high alias depends on it). */
#pragma GCC visibility push(hidden)

#define PAGE 4096ull
#define IMAGE_MAX_SIZE (2ull << 20)          /* one 2 MiB page maps the image */

/* Private pages of a VP (index in its 11-page block). */
#define PRIV_PML4    0u
#define PRIV_PDPT    1u
#define PRIV_PD      2u
#define PRIV_PT      3u
#define PRIV_STACK   4u   /* 3 pages */
#define PRIV_GLOBALS 7u
#define PRIV_ASSIST  8u
#define PRIV_HC_IN   9u
#define PRIV_HC_OUT  10u

/* The per-CPU window: PT slot n maps VA PERCPU_VA + n * 4 KiB. */
#define PERCPU_VA        (SIDECAR_IMAGE_VA + IMAGE_MAX_SIZE)
#define PT_SLOT_GLOBALS  0u
#define PT_SLOT_ASSIST   1u
#define PT_SLOT_HC_IN    2u
#define PT_SLOT_HC_OUT   3u
#define PT_SLOT_COMMAND  4u
#define PT_SLOT_REGISTER 5u
#define PT_SLOT_CONTROL  6u
#define PT_SLOT_STACK    509u /* 3 pages: 509..511 */
#define GLOBALS_VA       (PERCPU_VA + PT_SLOT_GLOBALS * PAGE)
#define AP_STACK_TOP     (PERCPU_VA + 512u * PAGE)           /* 0xffffff8000400000 */
#define AP_INITIAL_RSP   (AP_STACK_TOP - 8u)                 /* 0xffffff80003ffff8 */

/* Page table entry bits. */
#define PTE_P   0x001ull
#define PTE_RW  0x002ull
#define PTE_A   0x020ull
#define PTE_D   0x040ull
#define PTE_PS  0x080ull
#define PTE_TABLE (PTE_P | PTE_RW | PTE_A)
#define PTE_NX  (1ull << 63)
#define PTE_LEAF  (PTE_P | PTE_RW | PTE_A | PTE_D)
/* Data pages are mapped no-execute: besides being right, the simulator's
 * stores to executable pages all take a slow self-modifying-code check. */
#define PTE_DATA  (PTE_LEAF | PTE_NX)

#define SIDECAR_IRQ_VECTOR SIDECAR_DEFAULT_REQUEST_VECTOR
#define IDT_ENTRIES (SIDECAR_IRQ_VECTOR + 1u)

#define HV_CRASH_P1_SIDECARK 0x534944454341524Bull /* "SIDECARK" */
#define HV_X64_REGISTER_MASK_VTL_RETURN_SHIFT 12

/* Per-CPU data at GLOBALS_VA (each CPU maps its own page there). Addresses
 * are GPAs, usable as pointers through the identity map. */
struct vp_globals {
    uint64_t hc_in;          /* hypercall input page */
    uint64_t hc_out;         /* hypercall output page */
    uint64_t assist_page;
    uint64_t command_page;
    uint64_t register_page;
    uint64_t control_page;
    uint32_t node_index;
    uint32_t node_cpu;       /* index in the node (VP = base_vp + node_cpu) */
    uint32_t vp_index;
    uint32_t assist_enabled;
};

static inline struct vp_globals *me(void)
{
    return (struct vp_globals *)GLOBALS_VA;
}

static inline void *pa_ptr(uint64_t pa)
{
    return (void *)(uintptr_t)pa;
}

/* Node bookkeeping shared by every CPU (image .bss). */
struct node_state {
    uint64_t memory_base;
    uint64_t control_page;
    uint64_t shmem_base;
    uint64_t private_base;
    uint32_t base_vp;
    uint32_t vp_count;
    uint32_t next_vp;        /* atomic: next node CPU index to start */
    uint32_t pad;
};


static inline uint8_t status_load(volatile uint8_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void status_store(volatile uint8_t *p, uint8_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline int status_cas(volatile uint8_t *p, uint8_t from, uint8_t to)
{
    return __atomic_compare_exchange_n(p, &from, to, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* ---- entry.S ---- */
uint64_t hv_call(uint64_t control, uint64_t in_gpa, uint64_t out_gpa);
/* Loads the shared registers from ctx, enters VTL0 through the hypercall
 * page's VTL-return entry, and saves them back when VTL2 is entered again. */
void vtl_return(struct sidecar_cpu_context *ctx, uint64_t stub);
void ap_entry(void);
void irq_entry(void);
void unexpected_entry(void);
extern uint8_t hypercall_page_copy[];
extern uint8_t __image_base[], __image_end[];

/* ---- util.c ---- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void zero_page(void *page);

struct sbuf {
    char *buf;
    uint32_t cap;   /* bytes usable (no NUL kept) */
    uint32_t len;
};
void sb_str(struct sbuf *b, const char *s);
void sb_dec(struct sbuf *b, uint64_t v);
void sb_hex(struct sbuf *b, uint64_t v);
void log_line(const char *s, uint32_t len);
__attribute__((noreturn)) void sidecar_panic(const char *msg);

/* ---- init.c ---- */
extern uint64_t image_pa;       /* GPA of the image (2 MiB aligned) */
extern uint32_t vtl_return_offset;
extern uint64_t vsm_capabilities;
extern uint32_t node_count;
extern struct node_state nodes[SIDECAR_MAX_NODES];
uint64_t image_va_to_pa(const void *p);
uint16_t hv_get_register(uint32_t name, uint8_t input_vtl, uint64_t *value);
void start_aps(void);

/* ---- vp.c ---- */
__attribute__((noreturn)) void ap_main(void);

#pragma GCC visibility pop

#endif
