/* Memory helpers, a tiny string builder, BSP logging on COM3 and the
 * enlightened panic. */
#include "sidecar.h"

/* Keep GCC from turning the loops below into calls to themselves. */
#pragma GCC optimize("no-tree-loop-distribute-patterns")

/* Quadword loops, no string instructions: the simulator runs each REP
 * iteration separately. */
void *memset(void *dst, int c, size_t n)
{
    uint8_t *d = dst;
    uint64_t pattern = (uint8_t)c * 0x0101010101010101ull;
    /* 64 bytes a loop iteration: the simulator pays per translated block, not per store. */
    while (n >= 64 && !((uintptr_t)d & 7)) {
        volatile uint64_t *q = (volatile uint64_t *)d;
        q[0] = pattern; q[1] = pattern; q[2] = pattern; q[3] = pattern;
        q[4] = pattern; q[5] = pattern; q[6] = pattern; q[7] = pattern;
        d += 64;
        n -= 64;
    }
    while (n >= 8 && !((uintptr_t)d & 7)) {
        *(volatile uint64_t *)d = pattern;
        d += 8;
        n -= 8;
    }
    while (n--)
        *(volatile uint8_t *)d++ = (uint8_t)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    while (n >= 8 && !(((uintptr_t)d | (uintptr_t)s) & 7)) {
        *(volatile uint64_t *)d = *(const uint64_t *)s;
        d += 8;
        s += 8;
        n -= 8;
    }
    while (n--)
        *(volatile uint8_t *)d++ = *s++;
    return dst;
}

/* One page, 8 quadword stores per step. */
#define STORE8(p, i) (p)[(i) + 0] = 0, (p)[(i) + 1] = 0, (p)[(i) + 2] = 0, (p)[(i) + 3] = 0, \
                     (p)[(i) + 4] = 0, (p)[(i) + 5] = 0, (p)[(i) + 6] = 0, (p)[(i) + 7] = 0

/* 512 bytes a loop iteration (8 per page): the simulator pays per translated block, and a
 * REP STOS would be one block per element. */
void zero_page(void *page)
{
    volatile uint64_t *p = page;
    for (uint32_t i = 0; i < PAGE / 8; i += 64) {
        STORE8(p, i); STORE8(p, i + 8); STORE8(p, i + 16); STORE8(p, i + 24);
        STORE8(p, i + 32); STORE8(p, i + 40); STORE8(p, i + 48); STORE8(p, i + 56);
    }
}

static void sb_char(struct sbuf *b, char c)
{
    if (b->len < b->cap)
        b->buf[b->len++] = c;
}

void sb_str(struct sbuf *b, const char *s)
{
    while (*s)
        sb_char(b, *s++);
}

void sb_dec(struct sbuf *b, uint64_t v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        sb_char(b, tmp[--n]);
}

void sb_hex(struct sbuf *b, uint64_t v)
{
    char tmp[16];
    int n = 0;
    do {
        uint32_t d = (uint32_t)(v & 0xf);
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v >>= 4;
    } while (v);
    sb_str(b, "0x");
    while (n)
        sb_char(b, tmp[--n]);
}

/* COM3, no LSR polling (the simulator's UART is always ready). */
void log_line(const char *s, uint32_t len)
{
    static const char prefix[] = "[sidecar] ";
    for (uint32_t i = 0; i < sizeof(prefix) - 1; i++)
        outb(COM3_PORT, (uint8_t)prefix[i]);
    for (uint32_t i = 0; i < len; i++)
        outb(COM3_PORT, (uint8_t)s[i]);
    outb(COM3_PORT, '\n');
}

static char panic_msg[256];

/* Enlightened panic: P0 "BOOTSHIM" as the shim, P1 "SIDECARK", P3/P4 the
 * message (GPA, length); the CTL write is the crash. */
void sidecar_panic(const char *msg)
{
    uint32_t n = 0;
    while (msg[n] && n < sizeof(panic_msg) - 1) {
        panic_msg[n] = msg[n];
        n++;
    }
    panic_msg[n] = '\0';
    wrmsr(HV_X64_MSR_CRASH_P0, HV_CRASH_P0_BOOTSHIM);
    wrmsr(HV_X64_MSR_CRASH_P0 + 1, HV_CRASH_P1_SIDECARK);
    wrmsr(HV_X64_MSR_CRASH_P0 + 2, ~0ull);
    wrmsr(HV_X64_MSR_CRASH_P0 + 3, image_va_to_pa(panic_msg));
    wrmsr(HV_X64_MSR_CRASH_P0 + 4, n);
    wrmsr(HV_X64_MSR_CRASH_CTL, HV_CRASH_CTL_WITH_MESSAGE);
    halt_forever();
}

void unexpected_interrupt(void);
void unexpected_interrupt(void)
{
    sidecar_panic("unexpected interrupt or exception vector");
}
