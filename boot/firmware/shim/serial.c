/* Polled 16550 UART output. */
#include "serial.h"
#include "hw.h"

#define UART_THR 0  /* transmit holding (DLAB=0) / divisor low (DLAB=1) */
#define UART_IER 1  /* interrupt enable / divisor high (DLAB=1) */
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20
#define UART_CLOCK_BAUD 115200u

void serial_init(uint16_t port, uint32_t baud)
{
    uint32_t div = baud ? UART_CLOCK_BAUD / baud : 1;
    if (div == 0)
        div = 1;
    if (div > 0xffff)
        div = 0xffff;
    outb(port + UART_IER, 0x00);          /* polled: no interrupts */
    outb(port + UART_LCR, 0x80);          /* DLAB on to reach the divisor */
    outb(port + UART_THR, (uint8_t)div);
    outb(port + UART_IER, (uint8_t)(div >> 8));
    outb(port + UART_LCR, 0x03);          /* 8N1, DLAB off */
    outb(port + UART_FCR, 0xC7);          /* FIFO on, cleared, 14-byte trigger */
    outb(port + UART_MCR, 0x0B);          /* DTR, RTS, OUT2 */
}

static void put_byte(uint16_t port, uint8_t c)
{
    /* Bounded wait: a UART that never reports empty must not hang the boot. */
    for (unsigned spins = 0; spins < 100000; spins++) {
        if (inb(port + UART_LSR) & LSR_THRE)
            break;
        cpu_relax();
    }
    outb(port + UART_THR, c);
}

void serial_write(uint16_t port, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        put_byte(port, (uint8_t)s[i]);
}
