/* Boot log: an in-memory ring (always) plus COM3 once serial is allowed. */
#ifndef SHIM_LOG_H
#define SHIM_LOG_H

#include "util.h"

enum log_level { LOG_INFO, LOG_WARN, LOG_ERROR, LOG_PANIC };

/* Start the ring in [buf, buf + size) (ShimParamsRaw's log buffer: checked against the other
 * regions before the first write); too small a region leaves it off. */
void log_init(void *buf, uint64_t size);
void log_msg(enum log_level level, const char *fmt, ...) PRINTF_LIKE(2, 3);
/* Serial is allowed from now on: set up the UART and replay the ring. */
void log_enable_serial(uint16_t port, uint32_t baud);
int log_serial_enabled(void);
/* Isolation allows serial: a panic before log_enable_serial may use port. */
void log_allow_panic_serial(uint16_t port);

#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

/* Logs "[PANIC] msg", reports an enlightened crash and halts. */
__attribute__((noreturn)) void panic(const char *fmt, ...) PRINTF_LIKE(1, 2);

#endif
