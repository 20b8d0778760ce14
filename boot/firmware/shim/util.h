/* Freestanding string/memory helpers and a small printf-style formatter. */
#ifndef SHIM_UTIL_H
#define SHIM_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((uint64_t)(a) - 1))
#define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))

/* mem.c: the compiler may emit calls to these, so they keep libc names. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* fmt.c */
size_t str_nlen(const char *s, size_t max);
int str_eq(const char *a, const char *b);
int str_starts_with(const char *s, const char *prefix);
/* Formats into buf (always NUL-terminated when cap > 0); returns the length
 * the full output would have had, like vsnprintf. Supports %d %i %u %x %X %s
 * %c %p %% with flags '0' '-', width, precision for %s and l/ll/z/h. */
size_t fmt_v(char *buf, size_t cap, const char *fmt, va_list ap);
size_t fmt(char *buf, size_t cap, const char *fmt, ...) PRINTF_LIKE(3, 4);

static inline uint32_t be32_load(const void *p)
{
    const uint8_t *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

static inline uint64_t be64_load(const void *p)
{
    const uint8_t *b = p;
    return ((uint64_t)be32_load(b) << 32) | be32_load(b + 4);
}

static inline void be32_store(void *p, uint32_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

static inline void be64_store(void *p, uint64_t v)
{
    be32_store(p, (uint32_t)(v >> 32));
    be32_store((uint8_t *)p + 4, (uint32_t)v);
}

#endif
