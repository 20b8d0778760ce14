#ifndef SHIM_SERIAL_H
#define SHIM_SERIAL_H

#include <stddef.h>
#include <stdint.h>

void serial_init(uint16_t port, uint32_t baud);
void serial_write(uint16_t port, const char *s, size_t n);

#endif
