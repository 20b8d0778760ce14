/* Small vsnprintf work-alike for log and panic messages. */
#include "util.h"

size_t str_nlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

int str_eq(const char *a, const char *b)
{
    return strcmp(a, b) == 0;
}

int str_starts_with(const char *s, const char *prefix)
{
    while (*prefix) {
        if (*s++ != *prefix++)
            return 0;
    }
    return 1;
}

struct out {
    char *buf;
    size_t cap;
    size_t len;
};

static void put(struct out *o, char c)
{
    if (o->len + 1 < o->cap)
        o->buf[o->len] = c;
    o->len++;
}

static void put_padded(struct out *o, const char *s, size_t n, int width, int left, char pad)
{
    int fill = width > (int)n ? width - (int)n : 0;
    if (!left) {
        /* Zero padding goes after a sign so "-0005" comes out right. */
        if (pad == '0' && n && s[0] == '-') {
            put(o, '-');
            s++;
            n--;
        }
        while (fill-- > 0)
            put(o, pad);
    }
    for (size_t i = 0; i < n; i++)
        put(o, s[i]);
    if (left) {
        while (fill-- > 0)
            put(o, ' ');
    }
}

size_t fmt_v(char *buf, size_t cap, const char *f, va_list ap)
{
    struct out o = { buf, cap, 0 };
    char tmp[24];

    for (; *f; f++) {
        if (*f != '%') {
            put(&o, *f);
            continue;
        }
        f++;
        int left = 0, width = 0, prec = -1, lng = 0;
        char pad = ' ';
        for (;; f++) {
            if (*f == '-')
                left = 1;
            else if (*f == '0')
                pad = '0';
            else
                break;
        }
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        if (*f == '.') {
            f++;
            prec = 0;
            if (*f == '*') {
                prec = va_arg(ap, int);
                f++;
            } else {
                while (*f >= '0' && *f <= '9')
                    prec = prec * 10 + (*f++ - '0');
            }
        }
        for (;; f++) {
            if (*f == 'l' || *f == 'z')
                lng = 1;
            else if (*f != 'h')
                break;
        }
        if (!*f)
            break;

        uint64_t v;
        int neg = 0;
        unsigned base = 10;
        int upper = 0;
        switch (*f) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            size_t n = prec >= 0 ? str_nlen(s, (size_t)prec) : strlen(s);
            put_padded(&o, s, n, width, left, ' ');
            continue;
        }
        case 'c':
            tmp[0] = (char)va_arg(ap, int);
            put_padded(&o, tmp, 1, width, left, ' ');
            continue;
        case '%':
            put(&o, '%');
            continue;
        case 'd':
        case 'i': {
            int64_t sv = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            neg = sv < 0;
            v = neg ? (uint64_t)0 - (uint64_t)sv : (uint64_t)sv;
            break;
        }
        case 'u':
            v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            break;
        case 'X':
            upper = 1;
            /* fallthrough */
        case 'x':
            v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            base = 16;
            break;
        case 'p':
            v = (uint64_t)(uintptr_t)va_arg(ap, void *);
            base = 16;
            put(&o, '0');
            put(&o, 'x');
            break;
        default:
            put(&o, '%');
            put(&o, *f);
            continue;
        }

        const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
        size_t n = sizeof(tmp);
        do {
            tmp[--n] = digits[v % base];
            v /= base;
        } while (v);
        if (neg)
            tmp[--n] = '-';
        put_padded(&o, tmp + n, sizeof(tmp) - n, width, left, pad);
    }
    if (cap)
        buf[o.len < cap ? o.len : cap - 1] = '\0';
    return o.len;
}

size_t fmt(char *buf, size_t cap, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    size_t n = fmt_v(buf, cap, f, ap);
    va_end(ap);
    return n;
}
