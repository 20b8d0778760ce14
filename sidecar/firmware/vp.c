/* Sidecar AP: start-up, the dispatch loop and the commands. */
#include "sidecar.h"

#define APIC_BASE_ADDRESS 0xFEE00000ull
#define APIC_BASE_BSP     (1ull << 8)
#define SVR_ENABLED       0x1FFu  /* spurious vector 0xFF + software enable */
#define SVR_DISABLED      0x0FFu

static volatile uint8_t *my_status(void)
{
    struct sidecar_control_page *ctrl = pa_ptr(me()->control_page);
    return &ctrl->cpu_status[me()->node_cpu];
}

static void cmd_error(struct sidecar_command_page *cmd, const char *msg, uint32_t name, uint64_t status)
{
    struct sbuf b = { (char *)cmd->error.buf, sizeof(cmd->error.buf), 0 };
    sb_str(&b, msg);
    if (name) {
        sb_str(&b, " register ");
        sb_hex(&b, name);
    }
    if (status != ~0ull) {
        sb_str(&b, ": status ");
        sb_hex(&b, status);
    }
    cmd->error.len = (uint8_t)b.len;
    cmd->has_error = 1;
}

/* ---- GET/SET_VP_REGISTERS: one rep-1 hypercall per register ---- */
static void get_set_registers(struct sidecar_command_page *cmd, int set)
{
    struct vp_globals *g = me();
    struct sidecar_get_set_vp_registers_request *req = (void *)cmd->request_data;
    struct hv_register_assoc *regs = (void *)(req + 1);
    struct hv_get_set_vp_registers_input *in = pa_ptr(g->hc_in);
    uint16_t code = set ? HVCALL_SET_VP_REGISTERS : HVCALL_GET_VP_REGISTERS;

    req->status = HV_STATUS_SUCCESS;
    if (req->count > SIDECAR_MAX_REGISTERS_PER_COMMAND) {
        cmd_error(cmd, "too many registers in request", 0, ~0ull);
        return;
    }
    for (uint32_t i = 0; i < req->count; i++) {
        memset(in, 0, sizeof(*in) + sizeof(struct hv_register_assoc));
        in->partition_id = HV_PARTITION_ID_SELF;
        in->vp_index = HV_VP_INDEX_SELF;
        in->input_vtl = (uint8_t)(0x10u | (req->target_vtl & 0xfu));
        if (set)
            *(struct hv_register_assoc *)(in + 1) = regs[i];
        else
            *(uint32_t *)(in + 1) = regs[i].name;
        uint64_t r = hv_call(code | (1ull << HV_HYPERCALL_REP_COUNT_SHIFT), g->hc_in, set ? 0 : g->hc_out);
        uint16_t status = (uint16_t)r;
        if (status != HV_STATUS_SUCCESS) {
            req->status = status;
            cmd_error(cmd, set ? "SetVpRegisters failed for" : "GetVpRegisters failed for", regs[i].name, status);
            return;
        }
        if (!set) {
            const uint64_t *out = pa_ptr(g->hc_out);
            regs[i].value_low = out[0];
            regs[i].value_high = out[1];
        }
    }
}

/* ---- TRANSLATE_GVA: HvCallTranslateVirtualAddressEx ---- */
struct hv_translate_va_input {
    uint64_t partition_id;
    uint32_t vp_index;
    uint32_t reserved;
    uint64_t control_flags;
    uint64_t gva_page;
};

static void translate_gva(struct sidecar_command_page *cmd)
{
    struct vp_globals *g = me();
    struct sidecar_translate_gva_request req = *(struct sidecar_translate_gva_request *)cmd->request_data;
    struct sidecar_translate_gva_response *resp = (void *)cmd->request_data;
    struct hv_translate_va_input *in = pa_ptr(g->hc_in);
    uint64_t *out = pa_ptr(g->hc_out);

    memset(in, 0, sizeof(*in));
    in->partition_id = HV_PARTITION_ID_SELF;
    in->vp_index = HV_VP_INDEX_SELF;
    in->control_flags = req.control_flags;
    in->gva_page = req.gvn;
    memset(out, 0, 0x40);
    uint16_t status = (uint16_t)hv_call(HVCALL_TRANSLATE_VIRTUAL_ADDRESS_EX, g->hc_in, g->hc_out);
    memset(resp, 0, sizeof(*resp));
    resp->status = status;
    if (status == HV_STATUS_SUCCESS) {
        resp->result = out[0];
        resp->gpa_page = out[6]; /* +0x30 */
    }
}

/* ---- RUN_VP: VTL return until STOP or an intercept ---- */
static void run_vp(struct sidecar_command_page *cmd)
{
    struct vp_globals *g = me();
    struct sidecar_run_vp_response *resp = (void *)cmd->request_data;
    uint8_t *assist = pa_ptr(g->assist_page);
    volatile uint8_t *st = my_status();

    if (!g->assist_enabled) {
        zero_page(assist);
        wrmsr(HV_X64_MSR_VP_ASSIST_PAGE, g->assist_page | 1);
        g->assist_enabled = 1;
    }
    uint64_t stub = (uint64_t)(uintptr_t)hypercall_page_copy + vtl_return_offset;
    resp->intercept = 0;
    for (;;) {
        if (status_load(st) == SIDECAR_CPU_STOP)
            return;
        *(volatile uint64_t *)(assist + HV_VP_ASSIST_VTL0_RAX_OFFSET) = cmd->cpu_context.gps[0];
        *(volatile uint64_t *)(assist + HV_VP_ASSIST_VTL0_RCX_OFFSET) = cmd->cpu_context.gps[1];
        vtl_return(&cmd->cpu_context, stub);
        uint32_t reason = *(volatile uint32_t *)(assist + HV_VP_ASSIST_ENTRY_REASON_OFFSET);
        if (reason == HV_VTL_ENTRY_REASON_INTERRUPT) {
            /* Take the pending request IPI (it preempted VTL0) so it does not
             * preempt the next VTL return at once; then look at the status. */
            __asm__ volatile("sti; nop; cli" ::: "memory");
            continue;
        }
        if (reason == HV_VTL_ENTRY_REASON_INTERCEPT) {
            memcpy(cmd->intercept_message, assist + HV_VP_ASSIST_INTERCEPT_MSG_OFFSET,
                   sizeof(cmd->intercept_message));
            resp->intercept = 1;
            return;
        }
        cmd_error(cmd, "unexpected VTL entry reason", 0, reason);
        return;
    }
}

static void run_command(struct sidecar_command_page *cmd, uint32_t command)
{
    cmd->has_error = 0;
    cmd->error.len = 0;
    switch (command) {
    case SIDECAR_COMMAND_NONE:
        break;
    case SIDECAR_COMMAND_RUN_VP:
        run_vp(cmd);
        break;
    case SIDECAR_COMMAND_GET_VP_REGISTERS:
        get_set_registers(cmd, 0);
        break;
    case SIDECAR_COMMAND_SET_VP_REGISTERS:
        get_set_registers(cmd, 1);
        break;
    case SIDECAR_COMMAND_TRANSLATE_GVA:
        translate_gva(cmd);
        break;
    default:
        cmd_error(cmd, "unknown command", 0, command);
        break;
    }
}

static void notify(struct sidecar_control_page *ctrl)
{
    __atomic_store_n(&ctrl->needs_attention, 1, __ATOMIC_RELEASE);
    uint32_t vector = __atomic_load_n(&ctrl->response_vector, __ATOMIC_ACQUIRE);
    if (vector != 0) {
        uint32_t cpu = __atomic_load_n(&ctrl->response_cpu, __ATOMIC_ACQUIRE);
        wrmsr(X2APIC_MSR_ICR, (vector & 0xffu) | ((uint64_t)cpu << 32));
    }
}

__attribute__((noreturn)) static void remove_self(struct sidecar_control_page *ctrl, volatile uint8_t *st)
{
    wrmsr(HV_X64_MSR_VP_ASSIST_PAGE, 0);
    me()->assist_enabled = 0;
    wrmsr(X2APIC_MSR_SVR, SVR_DISABLED);
    status_store(st, SIDECAR_CPU_REMOVED);
    notify(ctrl);
    halt_forever();
}

void ap_main(void)
{
    /* Help start the remaining VPs first (fan-out); we stay RUN meanwhile,
     * so the BSP keeps waiting. */
    start_aps();

    struct vp_globals *g = me();
    uint64_t apic_base = rdmsr(X86_MSR_APIC_BASE);
    wrmsr(X86_MSR_APIC_BASE,
          (apic_base & APIC_BASE_BSP) | APIC_BASE_ADDRESS | APIC_BASE_ENABLE | APIC_BASE_X2APIC_ENABLE);
    wrmsr(X2APIC_MSR_SVR, SVR_ENABLED);
    zero_page(pa_ptr(g->register_page));
    zero_page(pa_ptr(g->command_page));

    struct sidecar_control_page *ctrl = pa_ptr(g->control_page);
    struct sidecar_command_page *cmd = pa_ptr(g->command_page);
    volatile uint8_t *st = my_status();
    if (!status_cas(st, SIDECAR_CPU_RUN, SIDECAR_CPU_IDLE))
        sidecar_panic("sidecar AP started with status other than RUN");

    for (;;) {
        uint8_t s;
        while ((s = status_load(st)) == SIDECAR_CPU_IDLE) {
            __asm__ volatile("sti; hlt; cli" ::: "memory");
            cpu_relax();
        }
        if (s == SIDECAR_CPU_REMOVE)
            break;
        if (s != SIDECAR_CPU_RUN && s != SIDECAR_CPU_STOP)
            sidecar_panic("sidecar AP: invalid cpu status");

        uint32_t command = __atomic_exchange_n(&cmd->command, SIDECAR_COMMAND_NONE, __ATOMIC_ACQ_REL);
        run_command(cmd, command);

        /* Done: RUN or STOP -> IDLE (the host may turn RUN into STOP meanwhile). */
        for (;;) {
            s = status_load(st);
            if ((s == SIDECAR_CPU_RUN || s == SIDECAR_CPU_STOP) && status_cas(st, s, SIDECAR_CPU_IDLE))
                break;
            if (s != SIDECAR_CPU_RUN && s != SIDECAR_CPU_STOP)
                sidecar_panic("sidecar AP: cpu status changed during a command");
            cpu_relax();
        }
        notify(ctrl);
    }
    remove_self(ctrl, st);
}
