/* VP 0's measured boot on the vTPM, as VTL0 firmware does it: TPM2_Startup, the command
 * line into PCR 8 and the guest's own image into PCR 9 (SHA-256 bank), both PCRs read back,
 * TPM2_GetRandom, and a boot counter in an NV index that the TPM keeps across boots.
 *
 * Transport (the device's x86 layout): the IO ports map an 8 KiB buffer area in VTL0 RAM
 * (command, then response 4096 bytes on); each command is written there and run with the
 * CRB's START register.  Commands are TPM 2.0 Library Part 3 marshalling, big endian.
 * Every step prints one COM1 line; the formats are in docs/contracts.md. */
#include "console.h"
#include "measured_boot.h"
#include "sha256.h"

/* TPM 2.0 Library, Part 2 (structures) and Part 3 (commands): what this guest sends. */
#define TPM_ST_NO_SESSIONS     0x8001u
#define TPM_ST_SESSIONS        0x8002u
#define TPM_CC_NV_DEFINE_SPACE 0x012au
#define TPM_CC_NV_WRITE        0x0137u
#define TPM_CC_STARTUP         0x0144u
#define TPM_CC_NV_READ         0x014eu
#define TPM_CC_NV_READ_PUBLIC  0x0169u
#define TPM_CC_GET_RANDOM      0x017bu
#define TPM_CC_PCR_READ        0x017eu
#define TPM_CC_PCR_EXTEND      0x0182u
#define TPM_SU_CLEAR           0x0000u
#define TPM_ALG_SHA256         0x000bu
#define TPM_RH_OWNER           0x40000001u
#define TPM_RS_PW              0x40000009u     /* the password session: empty nonce, empty auth */
#define TPM_RC_SUCCESS         0x000u
#define TPM_RC_INITIALIZE      0x100u          /* TPM2_Startup: the TPM was already started */
/* A format-1 response code (bit 7) carries the error in bits 0..5; bit 6 clear means it names
 * a handle (or session) in bits 8..11 rather than a parameter. */
#define TPM_RC_FMT1            0x080u
#define TPM_RC_P               0x040u
#define TPM_RC_HANDLE          0x00bu          /* the handle is not loaded: an NV index undefined */
#define TPMA_NV_WRITTEN        (1u << 29)
#define TPM_HEADER_SIZE        10u             /* tag u16, size u32, command or response code u32 */
#define PASSWORD_SESSION_SIZE  9u              /* handle u32, nonce u16, attributes u8, hmac u16 */
#define NV_PUBLIC_SIZE         14u             /* index, nameAlg, attributes, empty policy, dataSize */
#define SHA256_PCR_SELECT_SIZE 3u              /* PCRs 0..23 */

/* The device completes a command within the START write; a few reads allow for one that
 * does not, but a VP never spins on a TPM that has stopped answering. */
#define START_POLL_LIMIT       1000u
#define IMAGE_MAX_SPAN         0x200000u       /* link.ld's limit: a larger R10 is not ours */

#define COMMAND  ((uint8_t *)VTL0_TPM_BUFFER_GPA)
#define RESPONSE ((const uint8_t *)(VTL0_TPM_BUFFER_GPA + VTL0_TPM_BUFFER_SIZE))

/* CRB registers: one 32-bit mov each, spelled out so gcc cannot fold a read into an
 * instruction the MMIO emulation does not take (test, and, ...). */
static inline void mmio_write32(uint64_t gpa, uint32_t v)
{
    __asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(gpa) : "memory");
}

static inline uint32_t mmio_read32(uint64_t gpa)
{
    uint32_t v;
    __asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(gpa) : "memory");
    return v;
}

/* ---- marshalling -------------------------------------------------------------------------- */

struct command {
    uint32_t size;         /* bytes so far; more than the buffer holds is caught before START */
};

static void put8(struct command *c, uint32_t v)
{
    if (c->size < VTL0_TPM_BUFFER_SIZE)
        COMMAND[c->size] = (uint8_t)v;
    c->size++;
}

static void put16(struct command *c, uint32_t v)
{
    put8(c, v >> 8);
    put8(c, v);
}

static void put32(struct command *c, uint32_t v)
{
    put16(c, v >> 16);
    put16(c, v);
}

static void put_bytes(struct command *c, const uint8_t *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        put8(c, p[i]);
}

/* The header with a size that tpm_run fills in. */
static struct command begin(uint32_t tag, uint32_t code)
{
    struct command c = { 0 };

    put16(&c, tag);
    put32(&c, 0);
    put32(&c, code);
    return c;
}

/* The authorization area of one password session with an empty password (an empty owner
 * auth, the NV index's empty auth). */
static void put_password_session(struct command *c)
{
    put32(c, PASSWORD_SESSION_SIZE);
    put32(c, TPM_RS_PW);
    put16(c, 0);           /* nonceCaller */
    put8(c, 0);            /* sessionAttributes */
    put16(c, 0);           /* hmac: the password */
}

struct response {
    uint32_t size, off;
    int short_read;        /* a field ran past the response's size */
};

static uint32_t get(struct response *r, uint32_t bytes)
{
    uint32_t v = 0;

    if (r->off + bytes > r->size) {
        r->short_read = 1;
        return 0;
    }
    while (bytes--)
        v = v << 8 | RESPONSE[r->off++];
    return v;
}

static void get_bytes(struct response *r, uint8_t *out, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        out[i] = (uint8_t)get(r, 1);
}

/* ---- transport ---------------------------------------------------------------------------- */

static void error_line(const char *name, const char *why)
{
    com1_puts("tpm: error ");
    com1_puts(name);
    com1_puts(" ");
    com1_puts(why);
    com1_puts("\n");
}

static void error_rc(const char *name, uint32_t rc)
{
    com1_puts("tpm: error ");
    com1_puts(name);
    com1_puts(" rc=");
    com1_put_hex(rc, 1);
    com1_puts("\n");
}

/* Maps the buffers and requests locality 0; -1 (printed) when the device is not there. */
static int tpm_connect(void)
{
    outl(VTL0_TPM_CONTROL_PORT, VTL0_TPM_IO_VERSION);
    if (inl(VTL0_TPM_DATA_PORT) == 0xffffffffu) {
        com1_puts("tpm: io error: data port read 0xffffffff (interface version)\n");
        return -1;
    }
    outl(VTL0_TPM_CONTROL_PORT, VTL0_TPM_IO_MAP_SHARED_MEMORY);
    outl(VTL0_TPM_DATA_PORT, (uint32_t)VTL0_TPM_BUFFER_GPA);
    mmio_write32(VTL0_TPM_CRB_BASE + VTL0_TPM_LOC_CTRL, 1);
    return 0;
}

/* Runs the command in c.  0 with the response code in *rc and r just past the header (and,
 * for a successful command with sessions, past parameterSize: at its parameters); -1 once a
 * line says why there is no response (an I/O error, START stuck, no valid response). */
static int tpm_run(const char *name, struct command *c, struct response *r, uint32_t *rc)
{
    uint32_t start = 1, tag;

    if (c->size > VTL0_TPM_BUFFER_SIZE) {
        error_line(name, "command too large");
        return -1;
    }
    COMMAND[2] = (uint8_t)(c->size >> 24);
    COMMAND[3] = (uint8_t)(c->size >> 16);
    COMMAND[4] = (uint8_t)(c->size >> 8);
    COMMAND[5] = (uint8_t)c->size;
    /* A failed START leaves the buffer alone: clear the old header so it cannot pass for
     * this command's response. */
    for (uint32_t i = 0; i < TPM_HEADER_SIZE; i++)
        ((volatile uint8_t *)RESPONSE)[i] = 0;
    mmio_write32(VTL0_TPM_CRB_BASE + VTL0_TPM_START, 1);
    for (uint32_t i = 0; i < START_POLL_LIMIT && (start & 1); i++) {
        start = mmio_read32(VTL0_TPM_CRB_BASE + VTL0_TPM_START);
        if (start == 0xffffffffu) {
            com1_puts("tpm: io error: START read 0xffffffff (");
            com1_puts(name);
            com1_puts(")\n");
            return -1;
        }
        if (start & 1)
            cpu_relax();
    }
    if (start & 1) {
        error_line(name, "timeout (START still set)");
        return -1;
    }
    r->size = VTL0_TPM_BUFFER_SIZE;
    r->off = 0;
    r->short_read = 0;
    tag = get(r, 2);
    r->size = get(r, 4);
    *rc = get(r, 4);
    if ((tag != TPM_ST_NO_SESSIONS && tag != TPM_ST_SESSIONS) || r->size < TPM_HEADER_SIZE
        || r->size > VTL0_TPM_BUFFER_SIZE) {
        error_line(name, "no response");
        return -1;
    }
    if (*rc == TPM_RC_SUCCESS && tag == TPM_ST_SESSIONS)
        get(r, 4);                                   /* parameterSize */
    return 0;
}

/* tpm_run for a command that must succeed: -1 (printed) unless rc is TPM_RC_SUCCESS. */
static int tpm_call(const char *name, struct command *c, struct response *r)
{
    uint32_t rc;

    if (tpm_run(name, c, r, &rc))
        return -1;
    if (rc != TPM_RC_SUCCESS) {
        error_rc(name, rc);
        return -1;
    }
    return 0;
}

/* The response was shorter than its fields: -1 (printed). */
static int check_read(const char *name, const struct response *r)
{
    if (r->short_read) {
        error_line(name, "short response");
        return -1;
    }
    return 0;
}

/* ---- the commands ------------------------------------------------------------------------- */

static int tpm_startup(void)
{
    struct command c = begin(TPM_ST_NO_SESSIONS, TPM_CC_STARTUP);
    struct response r;
    uint32_t rc;

    put16(&c, TPM_SU_CLEAR);
    if (tpm_run("TPM2_Startup", &c, &r, &rc))
        return -1;
    if (rc != TPM_RC_SUCCESS && rc != TPM_RC_INITIALIZE) {
        error_rc("TPM2_Startup", rc);
        return -1;
    }
    com1_puts("tpm: startup rc=");
    com1_put_hex(rc, 1);
    com1_puts("\n");
    return 0;
}

/* One event: SHA-256 of n bytes at data, extended into pcr, then logged on COM1. */
static int measure(uint32_t pcr, const uint8_t *data, uint64_t n, const char *what)
{
    struct sha256 s;
    uint8_t digest[SHA256_DIGEST_SIZE];
    struct command c = begin(TPM_ST_SESSIONS, TPM_CC_PCR_EXTEND);
    struct response r;

    sha256_init(&s);
    sha256_update(&s, data, n);
    sha256_final(&s, digest);
    put32(&c, pcr);
    put_password_session(&c);
    put32(&c, 1);                                    /* TPML_DIGEST_VALUES: one digest */
    put16(&c, TPM_ALG_SHA256);
    put_bytes(&c, digest, SHA256_DIGEST_SIZE);
    if (tpm_call("TPM2_PCR_Extend", &c, &r))
        return -1;
    com1_puts("tpm: event pcr=");
    com1_put_dec(pcr);
    com1_puts(" sha256=");
    com1_put_bytes(digest, SHA256_DIGEST_SIZE);
    com1_puts(" ");
    com1_puts(what);
    com1_puts("\n");
    return 0;
}

static int pcr_read(uint32_t pcr)
{
    static const char name[] = "TPM2_PCR_Read";
    struct command c = begin(TPM_ST_NO_SESSIONS, TPM_CC_PCR_READ);
    struct response r;
    uint8_t select[SHA256_PCR_SELECT_SIZE] = { 0 }, got[SHA256_PCR_SELECT_SIZE];
    uint8_t digest[SHA256_DIGEST_SIZE];
    uint32_t count, alg, select_size, digests, size;

    select[pcr / 8] = (uint8_t)(1u << (pcr % 8));
    put32(&c, 1);                                    /* TPML_PCR_SELECTION: one bank */
    put16(&c, TPM_ALG_SHA256);
    put8(&c, SHA256_PCR_SELECT_SIZE);
    put_bytes(&c, select, SHA256_PCR_SELECT_SIZE);
    if (tpm_call(name, &c, &r))
        return -1;
    get(&r, 4);                                      /* pcrUpdateCounter */
    count = get(&r, 4);
    alg = get(&r, 2);
    select_size = get(&r, 1);
    get_bytes(&r, got, SHA256_PCR_SELECT_SIZE);
    digests = get(&r, 4);
    size = get(&r, 2);
    get_bytes(&r, digest, SHA256_DIGEST_SIZE);
    if (check_read(name, &r))
        return -1;
    /* A bank that is not allocated reads as an empty selection and no digests. */
    if (count != 1 || alg != TPM_ALG_SHA256 || select_size != SHA256_PCR_SELECT_SIZE
        || got[0] != select[0] || got[1] != select[1] || got[2] != select[2]
        || digests != 1 || size != SHA256_DIGEST_SIZE) {
        error_line(name, "no SHA-256 digest");
        return -1;
    }
    com1_puts("tpm: pcr ");
    com1_put_dec(pcr);
    com1_puts(" sha256=");
    com1_put_bytes(digest, SHA256_DIGEST_SIZE);
    com1_puts("\n");
    return 0;
}

/* The bytes are not printed: the same image and configuration give the same serial log. */
static int get_random(void)
{
    static const char name[] = "TPM2_GetRandom";
    struct command c = begin(TPM_ST_NO_SESSIONS, TPM_CC_GET_RANDOM);
    struct response r;
    uint8_t bytes[VTL0_TPM_RANDOM_BYTES];
    uint32_t size, any = 0;

    put16(&c, VTL0_TPM_RANDOM_BYTES);
    if (tpm_call(name, &c, &r))
        return -1;
    size = get(&r, 2);
    get_bytes(&r, bytes, VTL0_TPM_RANDOM_BYTES);
    if (check_read(name, &r))
        return -1;
    if (size != VTL0_TPM_RANDOM_BYTES) {
        error_line(name, "short random");
        return -1;
    }
    for (uint32_t i = 0; i < VTL0_TPM_RANDOM_BYTES; i++)
        any |= bytes[i];
    com1_puts("tpm: random ");
    com1_put_dec(VTL0_TPM_RANDOM_BYTES);
    com1_puts(any ? " bytes nonzero\n" : " bytes all-zero\n");
    return 0;
}

static int nv_define(void)
{
    struct command c = begin(TPM_ST_SESSIONS, TPM_CC_NV_DEFINE_SPACE);
    struct response r;

    put32(&c, TPM_RH_OWNER);                         /* authHandle */
    put_password_session(&c);
    put16(&c, 0);                                    /* auth: the index's, empty */
    put16(&c, NV_PUBLIC_SIZE);                       /* TPM2B_NV_PUBLIC */
    put32(&c, VTL0_TPM_NV_INDEX);
    put16(&c, TPM_ALG_SHA256);                       /* nameAlg */
    put32(&c, VTL0_TPM_NV_ATTRIBUTES);
    put16(&c, 0);                                    /* authPolicy: none */
    put16(&c, VTL0_TPM_NV_SIZE);
    return tpm_call("TPM2_NV_DefineSpace", &c, &r);
}

/* The previous boot count, read with the index's own (empty) auth (TPMA_NV_AUTHREAD). */
static int nv_read(uint64_t *count)
{
    static const char name[] = "TPM2_NV_Read";
    struct command c = begin(TPM_ST_SESSIONS, TPM_CC_NV_READ);
    struct response r;
    uint32_t size, hi, lo;

    put32(&c, VTL0_TPM_NV_INDEX);                    /* authHandle */
    put32(&c, VTL0_TPM_NV_INDEX);                    /* nvIndex */
    put_password_session(&c);
    put16(&c, VTL0_TPM_NV_SIZE);
    put16(&c, 0);                                    /* offset */
    if (tpm_call(name, &c, &r))
        return -1;
    size = get(&r, 2);
    hi = get(&r, 4);
    lo = get(&r, 4);
    if (check_read(name, &r))
        return -1;
    if (size != VTL0_TPM_NV_SIZE) {
        error_line(name, "wrong size");
        return -1;
    }
    *count = (uint64_t)hi << 32 | lo;
    return 0;
}

/* The boot count, written with owner auth (TPMA_NV_OWNERWRITE). */
static int nv_write(uint64_t count)
{
    struct command c = begin(TPM_ST_SESSIONS, TPM_CC_NV_WRITE);
    struct response r;

    put32(&c, TPM_RH_OWNER);                         /* authHandle */
    put32(&c, VTL0_TPM_NV_INDEX);
    put_password_session(&c);
    put16(&c, VTL0_TPM_NV_SIZE);                     /* TPM2B_MAX_NV_BUFFER */
    put32(&c, (uint32_t)(count >> 32));
    put32(&c, (uint32_t)count);
    put16(&c, 0);                                    /* offset */
    return tpm_call("TPM2_NV_Write", &c, &r);
}

static void nv_line_start(void)
{
    com1_puts("tpm: nv ");
    com1_put_hex(VTL0_TPM_NV_INDEX, 8);
    com1_puts(" ");
}

/* The boot counter: defined (count 1) on the first boot of this TPM state, else read and
 * incremented. */
static int nv_boot_counter(void)
{
    static const char name[] = "TPM2_NV_ReadPublic";
    struct command c = begin(TPM_ST_NO_SESSIONS, TPM_CC_NV_READ_PUBLIC);
    struct response r;
    uint32_t rc, index, attributes, policy, size;
    uint64_t previous = 0;

    put32(&c, VTL0_TPM_NV_INDEX);
    if (tpm_run(name, &c, &r, &rc))
        return -1;
    if ((rc & (TPM_RC_FMT1 | TPM_RC_P)) == TPM_RC_FMT1 && (rc & 0x3f) == TPM_RC_HANDLE) {
        if (nv_define() || nv_write(1))
            return -1;
        nv_line_start();
        com1_puts("defined, boot 1\n");
        return 0;
    }
    if (rc != TPM_RC_SUCCESS) {
        error_rc(name, rc);
        return -1;
    }
    get(&r, 2);                                      /* TPM2B_NV_PUBLIC's size */
    index = get(&r, 4);
    get(&r, 2);                                      /* nameAlg */
    attributes = get(&r, 4);
    policy = get(&r, 2);
    r.off += policy;
    size = get(&r, 2);
    if (check_read(name, &r))
        return -1;
    if (index != VTL0_TPM_NV_INDEX || size != VTL0_TPM_NV_SIZE) {
        error_line(name, "not the boot counter's index");
        return -1;
    }
    /* Defined but never written (a boot stopped in between): the count starts again. */
    if ((attributes & TPMA_NV_WRITTEN) && nv_read(&previous))
        return -1;
    if (nv_write(previous + 1))
        return -1;
    nv_line_start();
    if (attributes & TPMA_NV_WRITTEN) {
        com1_puts("read boot ");
        com1_put_dec(previous);
        com1_puts(", boot ");
        com1_put_dec(previous + 1);
        com1_puts("\n");
    } else {
        com1_puts("empty, boot 1\n");
    }
    return 0;
}

__attribute__((noinline)) void step_measured_boot(uint64_t cmdline_gpa, uint64_t image_span)
{
    const uint8_t *cmdline = (const uint8_t *)cmdline_gpa;
    uint32_t cmdline_len = 0;

    while (cmdline_len < VTL0_CMDLINE_MAX && cmdline[cmdline_len])
        cmdline_len++;
    if (image_span == 0 || image_span > IMAGE_MAX_SPAN) {
        com1_puts("tpm: error image span out of range\n");
        return;
    }
    if (tpm_connect() || tpm_startup()
        || measure(VTL0_TPM_PCR_CMDLINE, cmdline, cmdline_len, "cmdline")
        || measure(VTL0_TPM_PCR_IMAGE, (const uint8_t *)VTL0_LOAD_GPA, image_span, "image")
        || pcr_read(VTL0_TPM_PCR_CMDLINE) || pcr_read(VTL0_TPM_PCR_IMAGE)
        || get_random() || nv_boot_counter())
        return;
    com1_puts("tpm: measured boot done\n");
}
