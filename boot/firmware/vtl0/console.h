/* COM1 output for the VTL0 test guest: one OUT per character; the simulated UART
 * never backs up, so there is no LSR polling (that would add an IN intercept per
 * character). */
#ifndef VTL0_CONSOLE_H
#define VTL0_CONSOLE_H

#include <stdint.h>

#include "vtl0_guest.h"
#include "x86_insn.h"

static inline void com1_puts(const char *s)
{
    for (; *s; s++)
        outb(VTL0_COM1_PORT, (uint8_t)*s);
}

static inline void com1_put_dec(uint64_t v)
{
    char digits[20];
    int n = 0;

    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        outb(VTL0_COM1_PORT, (uint8_t)digits[--n]);
}

/* v in lower-case hex after 0x, at least min_digits digits ("0x0" for 0 with 1). */
static inline void com1_put_hex(uint32_t v, int min_digits)
{
    int digits = 8;

    com1_puts("0x");
    while (digits > min_digits && digits > 1 && !(v >> (4 * (digits - 1))))
        digits--;
    while (digits--)
        outb(VTL0_COM1_PORT, (uint8_t)"0123456789abcdef"[(v >> (4 * digits)) & 0xf]);
}

/* n bytes as 2n lower-case hex digits, no prefix. */
static inline void com1_put_bytes(const uint8_t *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        outb(VTL0_COM1_PORT, (uint8_t)"0123456789abcdef"[p[i] >> 4]);
        outb(VTL0_COM1_PORT, (uint8_t)"0123456789abcdef"[p[i] & 0xf]);
    }
}

#endif
