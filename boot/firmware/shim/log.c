/* Boot log ring and panic.
 *
 * The ring lives in the VTL2 log-buffer region so the host (here: the
 * simulator) can read it even when serial output is forbidden, as it is for
 * confidential VMs.  Serial output starts only once the host device tree and
 * the isolation type say it is allowed; everything logged before that is
 * replayed from the ring. */
#include "log.h"
#include "hw.h"
#include "shim.h"
#include "serial.h"
#include "hclsim_abi.h"

#define LINE_MAX 512

static struct shim_log_header *ring;
static uint8_t *ring_data;
static uint16_t serial_port;  /* 0 = serial not allowed (yet) */
static uint16_t panic_port;   /* where a panic before serial is set up may still report */

static char line_buf[LINE_MAX];
static char panic_msg[LINE_MAX];  /* stays put: its GPA goes to CRASH_P3 */
static int panicking;

static const char *const level_names[] = { "INFO", "WARN", "ERROR", "PANIC" };

void log_init(void *buf, uint64_t size)
{
    shim_params_check_log((uint64_t)(uintptr_t)buf, size);
    if (!buf || size < sizeof(struct shim_log_header) + 64)
        return;
    if (size - sizeof(struct shim_log_header) > 0xffffffffu)
        size = 0xffffffffu;
    ring = buf;
    ring->magic = SHIM_LOG_MAGIC;
    ring->capacity = (uint32_t)(size - sizeof(struct shim_log_header));
    ring->written = 0;
    ring_data = (uint8_t *)(ring + 1);
}

static void ring_write(const char *s, size_t n)
{
    if (!ring)
        return;
    uint64_t cap = ring->capacity;
    for (size_t i = 0; i < n; i++)
        ring_data[(ring->written + i) % cap] = (uint8_t)s[i];
    ring->written += n;
}

static void emit(enum log_level level, const char *msg)
{
    size_t n = fmt(line_buf, sizeof(line_buf), "[%s] %s\n", level_names[level], msg);
    if (n >= sizeof(line_buf)) {
        /* Truncated: keep the line terminated. */
        n = sizeof(line_buf) - 1;
        line_buf[n - 1] = '\n';
    }
    ring_write(line_buf, n);
    if (serial_port)
        serial_write(serial_port, line_buf, n);
}

void log_msg(enum log_level level, const char *f, ...)
{
    static char msg[LINE_MAX];
    va_list ap;
    va_start(ap, f);
    fmt_v(msg, sizeof(msg), f, ap);
    va_end(ap);
    emit(level, msg);
}

void log_enable_serial(uint16_t port, uint32_t baud)
{
    serial_init(port, baud);
    if (ring) {
        uint64_t cap = ring->capacity, w = ring->written;
        if (w <= cap) {
            serial_write(port, (const char *)ring_data, w);
        } else {
            /* Wrapped: oldest byte is at the write position. */
            uint64_t pos = w % cap;
            serial_write(port, (const char *)ring_data + pos, cap - pos);
            serial_write(port, (const char *)ring_data, pos);
        }
    }
    serial_port = port;
}

int log_serial_enabled(void)
{
    return serial_port != 0;
}

void log_allow_panic_serial(uint16_t port)
{
    panic_port = port;
}

void panic(const char *f, ...)
{
    size_t n;
    /* A panic while panicking (e.g. in the formatter) skips straight to the
     * crash report with whatever message is already there. */
    if (!panicking) {
        panicking = 1;
        va_list ap;
        va_start(ap, f);
        n = fmt_v(panic_msg, sizeof(panic_msg), f, ap);
        va_end(ap);
        emit(LOG_PANIC, panic_msg);
        /* Panicking before the host device tree said where serial is (e.g. the
         * tree itself is malformed): in a VM whose isolation allows serial,
         * the boot log, panic included, still goes to the standard port. */
        if (!serial_port && panic_port)
            log_enable_serial(panic_port, 115200);
    }
    n = str_nlen(panic_msg, sizeof(panic_msg));

    /* Enlightened panic: the CTL write is the crash notification. */
    wrmsr(HV_X64_MSR_CRASH_P0, HV_CRASH_P0_BOOTSHIM);
    wrmsr(HV_X64_MSR_CRASH_P0 + 1, HV_CRASH_P1_OHCLBOOT);
    wrmsr(HV_X64_MSR_CRASH_P0 + 2, ~0ull);
    wrmsr(HV_X64_MSR_CRASH_P0 + 3, (uint64_t)(uintptr_t)panic_msg);
    wrmsr(HV_X64_MSR_CRASH_P0 + 4, n);
    wrmsr(HV_X64_MSR_CRASH_CTL, HV_CRASH_CTL_WITH_MESSAGE);
    halt_forever();
}
