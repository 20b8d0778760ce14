/* Sidecar start on the BSP: page tables, node set-up and the fan-out start
 * of the APs (reference section 2 "Sidecar behaviour"). */
#include "sidecar.h"

#define PAT_DEFAULT 0x0007040600070406ull
#define CR0_VALUE   0x80000021ull     /* PG | NE | PE */
#define CR4_VALUE   0x260ull          /* PAE | MCE | OSFXSR */
#define EFER_VALUE  0xD00ull          /* NXE | LMA | LME */
#define CODE64_ATTR 0xA09Bu
#define DATA_ATTR   0xC093u
#define TSS_BUSY_ATTR 0x008Bu

uint64_t image_pa;
uint32_t vtl_return_offset;
uint64_t vsm_capabilities;
uint32_t node_count;
struct node_state nodes[SIDECAR_MAX_NODES];

static uint8_t enable_log;
static uint64_t image_pde;
extern uint8_t __text_end[];

/* Shared identity map (1 GiB pages for the first 512 GiB, 2 MiB pages in the
 * GiB holding the image, 4 KiB pages in the image's 2 MiB: only the sidecar's
 * text is executable, for the BSP's way in and out), the image's 4 KiB PT
 * (text executable, the rest not), BSP tables and the BSP's per-CPU pages. */
static uint64_t ident_pdpt[512] __attribute__((aligned(PAGE)));
static uint64_t ident_pd[512] __attribute__((aligned(PAGE)));
static uint64_t image_pt[512] __attribute__((aligned(PAGE)));
static uint64_t bsp_pml4[512] __attribute__((aligned(PAGE)));
static uint64_t bsp_pdpt[512] __attribute__((aligned(PAGE)));
static uint64_t bsp_pd[512] __attribute__((aligned(PAGE)));
static uint64_t bsp_pt[512] __attribute__((aligned(PAGE)));
static uint8_t bsp_globals[PAGE] __attribute__((aligned(PAGE)));
static uint8_t bsp_hc_in[PAGE] __attribute__((aligned(PAGE)));
static uint8_t bsp_hc_out[PAGE] __attribute__((aligned(PAGE)));

/* 64-bit interrupt gates for vectors 0..SIDECAR_IRQ_VECTOR, shared. */
struct idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
};
static struct idt_gate idt[IDT_ENTRIES] __attribute__((aligned(16)));

/* null, null, code64 0x10, data 0x18 (same selectors as the shim/Linux). */
static const uint64_t gdt[4] __attribute__((aligned(16))) = {
    0, 0, 0x00AF9B000000FFFFull, 0x00CF93000000FFFFull,
};

/* First start error wins (any CPU may report one). */
static uint32_t error_taken;
static volatile uint32_t error_ready;
static char error_text[255];
static uint32_t error_len;

uint64_t image_va_to_pa(const void *p)
{
    return (uint64_t)(uintptr_t)p - SIDECAR_IMAGE_VA + image_pa;
}

/* Runs at the identity alias, before the image is usable at SIDECAR_IMAGE_VA:
 * only RIP-relative references (no pointers from relocated data).  Returns
 * the BSP's PML4 GPA. */
uint64_t build_bsp_page_tables(uint64_t pa);
uint64_t build_bsp_page_tables(uint64_t pa)
{
    image_pa = pa;
    uint64_t image_gib = pa >> 30, image_2m = (pa >> 21) & 511;
    for (uint64_t i = 0; i < 512; i++) {
        ident_pdpt[i] = (i << 30) | PTE_LEAF | PTE_PS | PTE_NX;
        ident_pd[i] = (image_gib << 30) | (i << 21) | PTE_LEAF | PTE_PS | PTE_NX;
    }
    ident_pdpt[image_gib] = (uint64_t)(uintptr_t)ident_pd | PTE_TABLE;
    uint64_t text_size = (uint64_t)(__text_end - __image_base);
    for (uint64_t i = 0; i < 512; i++)
        image_pt[i] = (pa + i * PAGE) | PTE_LEAF | (i * PAGE < text_size ? 0 : PTE_NX);
    image_pde = (uint64_t)(uintptr_t)image_pt | PTE_TABLE;
    /* The identity alias of the image's 2 MiB (the shim's stack and data
     * live there too) uses the same PT: only the sidecar's text executes. */
    ident_pd[image_2m] = image_pde;
    bsp_pml4[0] = (uint64_t)(uintptr_t)ident_pdpt | PTE_TABLE;
    bsp_pml4[511] = (uint64_t)(uintptr_t)bsp_pdpt | PTE_TABLE;
    bsp_pdpt[0] = (uint64_t)(uintptr_t)bsp_pd | PTE_TABLE;
    bsp_pd[0] = image_pde;
    bsp_pd[1] = (uint64_t)(uintptr_t)bsp_pt | PTE_TABLE;
    bsp_pt[PT_SLOT_GLOBALS] = (uint64_t)(uintptr_t)bsp_globals | PTE_DATA;
    bsp_pt[PT_SLOT_HC_IN] = (uint64_t)(uintptr_t)bsp_hc_in | PTE_DATA;
    bsp_pt[PT_SLOT_HC_OUT] = (uint64_t)(uintptr_t)bsp_hc_out | PTE_DATA;
    return (uint64_t)(uintptr_t)bsp_pml4;
}

static void set_error(const char *what, uint64_t vp, uint64_t status)
{
    uint32_t expected = 0;
    if (!__atomic_compare_exchange_n(&error_taken, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return;
    struct sbuf b = { error_text, sizeof(error_text), 0 };
    sb_str(&b, what);
    if (vp != ~0ull) {
        sb_str(&b, " ");
        sb_dec(&b, vp);
    }
    sb_str(&b, ": status ");
    sb_hex(&b, status);
    error_len = b.len;
    __atomic_store_n(&error_ready, 1, __ATOMIC_RELEASE);
}

static void logf_node(uint32_t i, const struct node_state *n)
{
    char line[160];
    struct sbuf b = { line, sizeof(line), 0 };
    sb_str(&b, "node ");
    sb_dec(&b, i);
    sb_str(&b, ": ");
    sb_dec(&b, n->vp_count);
    sb_str(&b, " VPs starting at VP ");
    sb_dec(&b, n->base_vp);
    sb_str(&b, ", memory ");
    sb_hex(&b, n->memory_base);
    sb_str(&b, ", control page ");
    sb_hex(&b, n->control_page);
    log_line(line, b.len);
}

uint16_t hv_get_register(uint32_t name, uint8_t input_vtl, uint64_t *value)
{
    struct vp_globals *g = me();
    struct hv_get_set_vp_registers_input *in = pa_ptr(g->hc_in);
    memset(in, 0, sizeof(*in) + 8);
    in->partition_id = HV_PARTITION_ID_SELF;
    in->vp_index = HV_VP_INDEX_SELF;
    in->input_vtl = input_vtl;
    *(uint32_t *)(in + 1) = name;
    uint64_t r = hv_call(HVCALL_GET_VP_REGISTERS | (1ull << HV_HYPERCALL_REP_COUNT_SHIFT), g->hc_in, g->hc_out);
    uint16_t status = (uint16_t)r;
    if (status == HV_STATUS_SUCCESS)
        *value = *(const uint64_t *)pa_ptr(g->hc_out);
    return status;
}

static void set_gate(uint32_t vector, void (*handler)(void))
{
    uint64_t h = (uint64_t)(uintptr_t)handler;
    idt[vector] = (struct idt_gate){
        .offset_low = (uint16_t)h,
        .selector = 0x10,
        .ist = 0,
        .type_attr = 0x8E, /* present, DPL 0, 64-bit interrupt gate */
        .offset_mid = (uint16_t)(h >> 16),
        .offset_high = (uint32_t)(h >> 32),
        .reserved = 0,
    };
}

static struct hv_segment seg(uint16_t selector, uint32_t limit, uint16_t attr)
{
    return (struct hv_segment){ .base = 0, .limit = limit, .selector = selector, .attributes = attr };
}

/* Builds VP node_cpu's page tables and globals in its private pages. */
static uint64_t prepare_vp(const struct node_state *n, uint32_t node_index, uint32_t node_cpu)
{
    uint64_t priv = n->private_base + (uint64_t)node_cpu * SIDECAR_PRIVATE_PAGES_PER_VP * PAGE;
    uint64_t shmem = n->shmem_base + (uint64_t)node_cpu * SIDECAR_SHMEM_PAGES_PER_VP * PAGE;
    uint64_t pml4_pa = priv + PRIV_PML4 * PAGE, pdpt_pa = priv + PRIV_PDPT * PAGE;
    uint64_t pd_pa = priv + PRIV_PD * PAGE, pt_pa = priv + PRIV_PT * PAGE;
    uint64_t globals_pa = priv + PRIV_GLOBALS * PAGE;
    uint64_t *pml4 = pa_ptr(pml4_pa), *pdpt = pa_ptr(pdpt_pa), *pd = pa_ptr(pd_pa), *pt = pa_ptr(pt_pa);

    zero_page(pml4);
    zero_page(pdpt);
    zero_page(pd);
    zero_page(pt);
    zero_page(pa_ptr(globals_pa));
    pml4[0] = image_va_to_pa(ident_pdpt) | PTE_TABLE;
    pml4[511] = pdpt_pa | PTE_TABLE;
    pdpt[0] = pd_pa | PTE_TABLE;
    pd[0] = image_pde;
    pd[1] = pt_pa | PTE_TABLE;
    pt[PT_SLOT_GLOBALS] = globals_pa | PTE_DATA;
    pt[PT_SLOT_ASSIST] = (priv + PRIV_ASSIST * PAGE) | PTE_DATA;
    pt[PT_SLOT_HC_IN] = (priv + PRIV_HC_IN * PAGE) | PTE_DATA;
    pt[PT_SLOT_HC_OUT] = (priv + PRIV_HC_OUT * PAGE) | PTE_DATA;
    pt[PT_SLOT_COMMAND] = shmem | PTE_DATA;
    pt[PT_SLOT_REGISTER] = (shmem + PAGE) | PTE_DATA;
    pt[PT_SLOT_CONTROL] = n->control_page | PTE_DATA;
    for (uint32_t i = 0; i < 3; i++)
        pt[PT_SLOT_STACK + i] = (priv + (PRIV_STACK + i) * PAGE) | PTE_DATA;

    struct vp_globals *g = pa_ptr(globals_pa);
    g->hc_in = priv + PRIV_HC_IN * PAGE;
    g->hc_out = priv + PRIV_HC_OUT * PAGE;
    g->assist_page = priv + PRIV_ASSIST * PAGE;
    g->command_page = shmem;
    g->register_page = shmem + PAGE;
    g->control_page = n->control_page;
    g->node_index = node_index;
    g->node_cpu = node_cpu;
    g->vp_index = n->base_vp + node_cpu;
    g->assist_enabled = 0;
    return pml4_pa;
}

static void fill_start_input(struct hv_enable_vp_vtl_input *in, uint32_t vp, uint64_t cr3)
{
    memset(in, 0, sizeof(*in));
    in->partition_id = HV_PARTITION_ID_SELF;
    in->vp_index = vp;
    in->target_vtl = 2;
    struct hv_initial_vp_context *c = &in->context;
    c->rip = (uint64_t)(uintptr_t)ap_entry;
    c->rsp = AP_INITIAL_RSP;
    c->rflags = 0x2;
    c->cs = seg(0x10, 0xFFFFFFFFu, CODE64_ATTR);
    c->ds = c->es = c->fs = c->gs = c->ss = seg(0x18, 0xFFFFFFFFu, DATA_ATTR);
    c->tr = seg(0, 0xFFFF, TSS_BUSY_ATTR);
    c->ldtr = seg(0, 0, 0);
    c->idtr.limit = sizeof(idt) - 1;
    c->idtr.base = (uint64_t)(uintptr_t)idt;
    c->gdtr.limit = sizeof(gdt) - 1;
    c->gdtr.base = (uint64_t)(uintptr_t)gdt;
    c->efer = EFER_VALUE;
    c->cr0 = CR0_VALUE;
    c->cr3 = cr3;
    c->cr4 = CR4_VALUE;
    c->msr_cr_pat = PAT_DEFAULT;
}

/* EnableVpVtl(2) then StartVirtualProcessor(2), same context. */
static int start_vp(const struct node_state *n, uint32_t node_index, uint32_t node_cpu)
{
    uint32_t vp = n->base_vp + node_cpu;
    uint64_t cr3 = prepare_vp(n, node_index, node_cpu);
    uint64_t in_gpa = me()->hc_in;
    struct hv_enable_vp_vtl_input *in = pa_ptr(in_gpa);

    fill_start_input(in, vp, cr3);
    uint16_t status = (uint16_t)hv_call(HVCALL_ENABLE_VP_VTL, in_gpa, 0);
    if (status != HV_STATUS_SUCCESS && status != HV_STATUS_VTL_ALREADY_ENABLED) {
        set_error("failed to enable VTL2 on VP", vp, status);
        return 0;
    }
    fill_start_input(in, vp, cr3);
    status = (uint16_t)hv_call(HVCALL_START_VIRTUAL_PROCESSOR, in_gpa, 0);
    if (status != HV_STATUS_SUCCESS) {
        set_error("failed to start VP", vp, status);
        return 0;
    }
    return 1;
}

/* Fan-out: every started CPU claims the next VP of each node until none are
 * left. A VP that fails to start is marked REMOVED so nobody waits for it. */
void start_aps(void)
{
    for (uint32_t ni = 0; ni < node_count; ni++) {
        struct node_state *n = &nodes[ni];
        struct sidecar_control_page *ctrl = pa_ptr(n->control_page);
        for (;;) {
            uint32_t i = __atomic_fetch_add(&n->next_vp, 1, __ATOMIC_RELAXED);
            if (i >= n->vp_count)
                break;
            volatile uint8_t *st = &ctrl->cpu_status[i];
            if (status_load(st) == SIDECAR_CPU_REMOVED)
                continue;
            if (!start_vp(n, ni, i))
                status_store(st, SIDECAR_CPU_REMOVED);
        }
    }
}

static int fail(struct sidecar_output *out, const char *msg, uint64_t value)
{
    struct sbuf b = { (char *)out->error_buf, sizeof(out->error_buf), 0 };
    sb_str(&b, msg);
    if (value != ~0ull) {
        sb_str(&b, " ");
        sb_hex(&b, value);
    }
    out->error_len = (uint8_t)b.len;
    return 0;
}

/* The BSP's work, at the high alias with the sidecar's page tables. */
_Bool sidecar_main(const struct sidecar_params *params, struct sidecar_output *out);
_Bool sidecar_main(const struct sidecar_params *params, struct sidecar_output *out)
{
    struct vp_globals *g = me();
    g->hc_in = image_va_to_pa(bsp_hc_in);
    g->hc_out = image_va_to_pa(bsp_hc_out);
    g->vp_index = 0;

    memset(out, 0, sizeof(*out));
    enable_log = params->enable_logging;

    if (image_pa & (IMAGE_MAX_SIZE - 1))
        return fail(out, "sidecar image not 2 MiB aligned:", image_pa);
    if (params->node_count == 0 || params->node_count > SIDECAR_MAX_NODES)
        return fail(out, "bad node count", params->node_count);
    if (params->hypercall_page & (PAGE - 1))
        return fail(out, "hypercall page not page aligned:", params->hypercall_page);

    /* The shim disables its page before Linux runs: keep our own copy. */
    memcpy(hypercall_page_copy, pa_ptr(params->hypercall_page), PAGE);

    for (uint32_t v = 0; v < IDT_ENTRIES; v++)
        set_gate(v, unexpected_entry);
    set_gate(SIDECAR_IRQ_VECTOR, irq_entry);

    uint64_t value = 0;
    uint16_t status = hv_get_register(HV_REGISTER_VSM_CODE_PAGE_OFFSETS, 0, &value);
    if (status != HV_STATUS_SUCCESS)
        return fail(out, "failed to get vsm code page offset: status", status);
    vtl_return_offset = (uint32_t)(value >> HV_X64_REGISTER_MASK_VTL_RETURN_SHIFT) & 0xfff;
    status = hv_get_register(HV_REGISTER_VSM_CAPABILITIES, 0, &vsm_capabilities);
    if (status != HV_STATUS_SUCCESS)
        return fail(out, "failed to get vsm capabilities: status", status);

    node_count = params->node_count;
    for (uint32_t i = 0; i < node_count; i++) {
        const struct sidecar_node_params *np = &params->nodes[i];
        struct node_state *n = &nodes[i];
        if (np->vp_count == 0 || np->vp_count > sizeof(((struct sidecar_control_page *)0)->cpu_status))
            return fail(out, "bad node vp count", np->vp_count);
        uint64_t need = (uint64_t)SIDECAR_NODE_PAGES(np->vp_count) * PAGE;
        if (np->memory_size < need)
            return fail(out, "failed to provide required memory:", need);
        if (np->memory_base & (PAGE - 1))
            return fail(out, "node memory not page aligned:", np->memory_base);

        n->memory_base = np->memory_base;
        n->base_vp = np->base_vp;
        n->vp_count = np->vp_count;
        n->control_page = np->memory_base;
        n->shmem_base = np->memory_base + PAGE;
        n->private_base = n->shmem_base + (uint64_t)np->vp_count * SIDECAR_SHMEM_PAGES_PER_VP * PAGE;
        n->next_vp = 1; /* the base VP is Linux's */

        out->nodes[i].control_page = n->control_page;
        out->nodes[i].shmem_pages_base = n->shmem_base;
        out->nodes[i].shmem_pages_size = (uint64_t)np->vp_count * SIDECAR_SHMEM_PAGES_PER_VP * PAGE;

        struct sidecar_control_page *ctrl = pa_ptr(n->control_page);
        zero_page(ctrl); /* cpu_status beyond vp_count: REMOVED (0) */
        ctrl->index = i;
        ctrl->base_cpu = np->base_vp;
        ctrl->cpu_count = np->vp_count;
        ctrl->request_vector = SIDECAR_IRQ_VECTOR;
        ctrl->response_cpu = 0;
        ctrl->response_vector = 0;
        ctrl->needs_attention = 0;
        ctrl->cpu_status[0] = SIDECAR_CPU_REMOVED;
        for (uint32_t c = 1; c < np->vp_count; c++)
            ctrl->cpu_status[c] = SIDECAR_CPU_RUN;
        if (enable_log)
            logf_node(i, n);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);

    start_aps();

    /* Wait until every AP left RUN (IDLE, or REMOVED after a failed start). */
    uint32_t started = 0;
    for (uint32_t i = 0; i < node_count; i++) {
        struct sidecar_control_page *ctrl = pa_ptr(nodes[i].control_page);
        for (uint32_t c = 0; c < nodes[i].vp_count; c++) {
            volatile uint8_t *st = &ctrl->cpu_status[c];
            while (status_load(st) == SIDECAR_CPU_RUN)
                cpu_relax();
            if (status_load(st) == SIDECAR_CPU_IDLE)
                started++;
        }
    }

    if (__atomic_load_n(&error_ready, __ATOMIC_ACQUIRE)) {
        memcpy(out->error_buf, error_text, error_len);
        out->error_len = (uint8_t)error_len;
        return 0;
    }
    if (enable_log) {
        char line[80];
        struct sbuf b = { line, sizeof(line), 0 };
        sb_str(&b, "started ");
        sb_dec(&b, started);
        sb_str(&b, " APs in ");
        sb_dec(&b, node_count);
        sb_str(&b, " nodes");
        log_line(line, b.len);
    }
    return 1;
}
