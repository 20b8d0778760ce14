/* Memory/string primitives.  String instructions keep these short and stop
 * the compiler from turning a byte loop back into a call to itself. */
#include "util.h"

/* Keep GCC from recognising the loops below as calls to themselves. */
#pragma GCC optimize("no-tree-loop-distribute-patterns")

/* Eight bytes per string iteration: an emulator runs each REP iteration
 * separately, so quadword steps make large clears and copies 8x cheaper. */
void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    size_t quads = n / 8, tail = n % 8;
    uint64_t pattern = (uint8_t)c * 0x0101010101010101ull;
    __asm__ volatile("rep stosq" : "+D"(d), "+c"(quads) : "a"(pattern) : "memory");
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(tail) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    size_t quads = n / 8, tail = n % 8;
    __asm__ volatile("rep movsq" : "+D"(d), "+S"(src), "+c"(quads) : : "memory");
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(tail) : : "memory");
    return dst;
}

/* Overlap allowed: forwards when the destination is below the source (each load comes
 * before the store that could overwrite it), else backwards a byte at a time. */
void *memmove(void *dst, const void *src, size_t n)
{
    if ((uintptr_t)dst <= (uintptr_t)src)
        return memcpy(dst, src, n);
    uint8_t *d = dst;
    const uint8_t *s = src;
    while (n--)
        d[n] = s[n];
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    for (size_t i = 0; i < n; i++) {
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    }
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}
