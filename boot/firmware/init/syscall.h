/* Raw x86_64 Linux system calls for /init: no libc, each call is the `syscall` instruction
 * (number in rax, arguments in rdi rsi rdx r10 r8 r9; the kernel clobbers rcx and r11).
 * A negative return value in -4095..-1 is -errno. */
#ifndef INIT_SYSCALL_H
#define INIT_SYSCALL_H

typedef unsigned long size_t;
typedef long ssize_t;

#define SYS_read        0
#define SYS_write       1
#define SYS_open        2
#define SYS_close       3
#define SYS_pause       34
#define SYS_ioctl       16
#define SYS_dup2        33
#define SYS_getpid      39
#define SYS_exit        60
#define SYS_uname       63
#define SYS_fcntl       72
#define SYS_access      21
#define SYS_mkdir       83
#define SYS_sync        162
#define SYS_mount       165
#define SYS_reboot      169
#define SYS_getdents64  217

#define O_RDONLY        00
#define O_RDWR          02
#define O_NOCTTY        0400
#define O_DIRECTORY     0200000
#define O_CLOEXEC       02000000

#define F_GETFD         1
#define F_OK            0

#define MS_NOSUID       2
#define MS_NODEV        4
#define MS_NOEXEC       8

#define EEXIST          17
#define EBUSY           16

#define LINUX_REBOOT_MAGIC1         0xfee1dead
#define LINUX_REBOOT_MAGIC2         672274793
#define LINUX_REBOOT_CMD_POWER_OFF  0x4321FEDC
#define LINUX_REBOOT_CMD_HALT       0xCDEF0123
#define TCSBRK                      0x5409      /* ioctl: with 1, wait until output is sent (tcdrain) */

struct new_utsname {
    char sysname[65];
    char nodename[65];
    char release[65];
    char version[65];
    char machine[65];
    char domainname[65];
};

struct linux_dirent64 {
    unsigned long long d_ino;
    long long d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static inline long syscall0(long n)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "a"(n) : "rcx", "r11", "memory");
    return ret;
}

static inline long syscall1(long n, long a)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "a"(n), "D"(a) : "rcx", "r11", "memory");
    return ret;
}

static inline long syscall2(long n, long a, long b)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b) : "rcx", "r11", "memory");
    return ret;
}

static inline long syscall3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile ("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c)
                      : "rcx", "r11", "memory");
    return ret;
}

static inline long syscall4(long n, long a, long b, long c, long d)
{
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile ("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                      : "rcx", "r11", "memory");
    return ret;
}

static inline long syscall5(long n, long a, long b, long c, long d, long e)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile ("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                      : "rcx", "r11", "memory");
    return ret;
}

#endif
