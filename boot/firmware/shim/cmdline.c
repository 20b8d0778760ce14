/* Command-line handling: token lookup in the measured static line and the
 * kernel command line assembled from fixed options plus the static/host
 * lines (Linux lets later options win). */
#include "shim.h"
#include "log.h"
#include "util.h"

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

int cmdline_has_token(const char *line, uint32_t len, const char *token)
{
    uint32_t tlen = (uint32_t)strlen(token);
    uint32_t i = 0;
    while (i < len && line[i]) {
        while (i < len && is_space(line[i]))
            i++;
        uint32_t s = i;
        while (i < len && line[i] && !is_space(line[i]))
            i++;
        if (i - s == tlen && memcmp(line + s, token, tlen) == 0)
            return 1;
    }
    return 0;
}

void cmdline_append(struct cmdline_buf *c, const char *s, uint32_t n)
{
    /* Keep room for the terminating NUL. */
    if ((uint64_t)c->len + n + 1 > c->cap)
        panic("kernel command line too long (more than %u bytes)", c->cap - 1);
    memcpy(c->buf + c->len, s, n);
    c->len += n;
    c->buf[c->len] = '\0';
}

void cmdline_append_str(struct cmdline_buf *c, const char *s)
{
    cmdline_append(c, s, (uint32_t)strlen(s));
}

/* openhcl_boot's fixed kernel parameters (general, then x86-specific). */
static const char *const fixed_options[] = {
    "loglevel=8",
    "log_buf_len=128K",
    "printk.time=1",
    "console_msg_format=syslog",
    "uio_hv_generic.send_buf_size=0",
    "uio_hv_generic.recv_buf_size=0",
    "uio_hv_generic.ring_size=0x11000",
    "uio_hv_generic.no_mask=1",
    "coredump_filter=0x33",
    "cpufreq.off=1",
    "cpuidle.off=1",
    "cryptomgr.notests",
    "idle=halt",
    "initcall_blacklist=init_real_mode,sbf_init",
    "lpj=3000000",
    "no_timer_check",
    "noxsave",
    "oops=panic",
    "panic_on_warn=0",
    "panic_print=0",
    "panic=-1",
    "print_fatal_signals=1",
    "printk.devkmsg=on",
    "reboot=t",
    "rootfstype=tmpfs",
    "sysctl.vm.compaction_proactiveness=0",
    "tsc=reliable",
    "unknown_nmi_panic=1",
    "swiotlb=1",
    "vfio_pci.ids=1414:00ba",
    "vfio.enable_unsafe_noiommu_mode=1",
    "rdinit=/underhill-init",
    "OPENHCL_NVME_VFIO=1",
    "hv_storvsc.storvsc_vcpus_per_sub_channel=2048",
    "hv_storvsc.storvsc_max_hw_queues=2",
    "hv_storvsc.storvsc_ringbuffer_size=0x8000",
    "MIMALLOC_ARENA_EAGER_COMMIT=0",
    /* x86_64 only */
    "clearcpuid=pcid",
    "iommu=off",
    "pci=off",
};

/* Appends a line's text (up to len or a NUL), trimmed, space-separated. */
static void append_line(struct cmdline_buf *c, const char *s, uint32_t len)
{
    uint32_t n = (uint32_t)str_nlen(s, len);
    while (n && is_space(s[0])) {
        s++;
        n--;
    }
    while (n && is_space(s[n - 1]))
        n--;
    if (!n)
        return;
    if (c->len)
        cmdline_append(c, " ", 1);
    cmdline_append(c, s, n);
}

/* How Linux reads its command line (lib/cmdline.c next_arg, lib/ctype.c): spaces are
 * isspace() bytes, 0xA0 included; a '"' starts or ends a quoted stretch, a leading one
 * quotes the whole parameter; the name ends at the first '=' after its first byte. */
static int linux_isspace(unsigned char ch)
{
    return ch == ' ' || (ch >= '\t' && ch <= '\r') || ch == 0xa0;
}

struct kparam {
    uint32_t start, end;        /* the parameter's bytes in the line, quotes included */
    uint32_t name, name_len;    /* its name (after a leading quote, before '=') */
    int has_value;
};

/* The parameter starting at line[i] (not a space, i < n). */
static void next_param(const char *line, uint32_t i, uint32_t n, struct kparam *k)
{
    int quoted = line[i] == '"', in_quote = quoted;
    uint32_t args = i + (uint32_t)quoted, equals = 0, j;
    k->start = i;
    for (j = args; j < n; j++) {
        if (linux_isspace((unsigned char)line[j]) && !in_quote)
            break;
        if (equals == 0 && j > args && line[j] == '=')
            equals = j;
        if (line[j] == '"')
            in_quote = !in_quote;
    }
    k->end = j;
    k->name = args;
    k->has_value = equals != 0;
    if (equals)
        k->name_len = equals - args;
    else
        k->name_len = j - args - (quoted && j > args && line[j - 1] == '"');
}

/* parameq(): names compare with '-' and '_' the same. */
static int param_is(const char *line, const struct kparam *k, const char *name)
{
    uint32_t n = (uint32_t)strlen(name);
    if (k->name_len != n)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        char a = line[k->name + i] == '-' ? '_' : line[k->name + i];
        if (a != (name[i] == '-' ? '_' : name[i]))
            return 0;
    }
    return 1;
}

/* Drops every boot_cpus parameter (and the spaces before it) from buf[from..len), up to a
 * "--" (after which the rest goes to init): which CPUs Linux brings up is the shim's decision
 * (the sidecar holds the others), whatever the static or host lines say. Everything else is
 * kept byte for byte. Returns the new length. */
static uint32_t drop_boot_cpus(char *buf, uint32_t from, uint32_t len)
{
    uint32_t out = from, copied = from, i = from, dropped = 0;
    while (i < len) {
        uint32_t gap = i;
        while (i < len && linux_isspace((unsigned char)buf[i]))
            i++;
        if (i == len)
            break;
        struct kparam k;
        next_param(buf, i, len, &k);
        if (!k.has_value && k.name_len == 2 && buf[k.name] == '-' && buf[k.name + 1] == '-')
            break;
        if (param_is(buf, &k, "boot_cpus")) {
            memmove(buf + out, buf + copied, gap - copied);
            out += gap - copied;
            copied = k.end;
            dropped++;
        }
        i = k.end;
    }
    memmove(buf + out, buf + copied, len - copied);
    out += len - copied;
    buf[out] = '\0';
    if (dropped)
        log_info("kernel command line: %u boot_cpus= dropped from the static/host lines (the shim decides the "
                 "boot CPUs)", dropped);
    return out;
}

uint32_t build_kernel_cmdline(char *buf, uint32_t cap, const struct kcmd_inputs *in)
{
    struct cmdline_buf c = { buf, cap, 0 };
    char tmp[48];
    buf[0] = '\0';

    for (uint32_t i = 0; i < ARRAY_SIZE(fixed_options); i++)
        append_line(&c, fixed_options[i], 0xffffffffu);

    /* ttyS2 is COM3.  Without it (or for an untrusted host) pick ttynull so
     * the kernel does not fall back to COM1; a later console= still wins. */
    if (in->com3_console)
        fmt(tmp, sizeof(tmp), "console=ttyS2,%u", in->com3_speed);
    else
        fmt(tmp, sizeof(tmp), "console=ttynull");
    append_line(&c, tmp, sizeof(tmp));

    if (in->isolated)
        append_line(&c, "OPENHCL_CONFIDENTIAL=1", 0xffffffffu);
    if (in->boot_cpus)
        append_line(&c, in->boot_cpus, 0xffffffffu);

    uint32_t shim_part = c.len;
    append_line(&c, in->static_line, in->static_len);
    if (in->host_line)
        append_line(&c, in->host_line, 0xffffffffu);
    c.len = drop_boot_cpus(buf, shim_part, c.len);
    return c.len;
}
