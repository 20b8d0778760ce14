/* hclsim's real /init: PID 1 of a test initrd for booting a real Linux kernel (a distribution
 * bzImage) after the boot shim's handoff.  It shows, on its stdout (/dev/console), what Linux
 * tells userspace about the machine it was handed, then powers the machine off.
 *
 * Freestanding and static: no libc, raw system calls (syscall.h), linked at 0x400000.
 *
 * Steps:
 *   1. If /dev/console is missing: mkdir /dev, mount devtmpfs there, and if stdout is not open
 *      (the kernel found no console to give PID 1), open /dev/console as fds 0, 1 and 2.
 *   2. mkdir and mount proc at /proc and sysfs at /sys (nosuid, nodev, noexec).
 *   3. Print the lines below, one write(2) per line.
 *   4. tcdrain the console, sync, then reboot(LINUX_REBOOT_CMD_POWER_OFF); if that returns, reboot(..._HALT); if that
 *      returns too, pause() for ever.  PID 1 never exits (the kernel would panic).
 *
 * Output format, every line "init: KEY VALUE", in this order:
 *
 *   init: devtmpfs /dev                       only if /dev/console was missing (step 1)
 *   init: pid 1                               getpid()
 *   init: release 6.1.0-57-cloud-amd64        uname(2) release
 *   init: version #1 SMP PREEMPT_DYNAMIC ...  uname(2) version
 *   init: machine x86_64                      uname(2) machine
 *   init: cmdline TEXT                        /proc/cmdline, its trailing newline removed
 *   init: memtotal N kB                       the MemTotal line of /proc/meminfo
 *   init: memmap I START END TYPE             one per /sys/firmware/memmap/I, I ascending:
 *                                             the start, end and type files as Linux writes
 *                                             them (START/END "0x..." hex, END inclusive;
 *                                             TYPE e.g. "System RAM", "Reserved")
 *   init: memmap-entries N                    how many memmap lines came before
 *   init: cpus-online LIST                    /sys/devices/system/cpu/online, e.g. "0-3"
 *   init: poweroff                            just before sync and reboot(2)
 *
 * Whatever fails is one line "init: error OPERATION [PATH] errno=N" (N positive) in place of the
 * line it would have given, e.g. "init: error mount /proc errno=16", "init: error open
 * /sys/firmware/memmap errno=2"; a MemTotal line missing from /proc/meminfo is
 * "init: error memtotal not in /proc/meminfo".  Values are copied as read, with control
 * characters (an embedded newline, say) shown as '?' so each stays on its line, and cut at
 * 4095 bytes (a memmap field at 63).
 */
#include "syscall.h"

#define BUF_SIZE    4096
#define FIELD_SIZE  64
#define MAX_MEMMAP  4096

/* gcc may emit calls to these even when freestanding. */
void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

static int starts_with(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

/* --- one output line at a time ---------------------------------------------------------- */

static char line[BUF_SIZE + 256];
static size_t line_len;

static void put(const char *s)
{
    while (*s && line_len < sizeof(line) - 1)
        line[line_len++] = *s++;
}

/* A value read from the kernel: control characters shown as '?'. */
static void put_value(const char *s)
{
    for (; *s && line_len < sizeof(line) - 1; s++) {
        unsigned char c = (unsigned char)*s;
        line[line_len++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
}

/* v in decimal at out (no NUL): how many digits. */
static size_t fmt_uint(char *out, unsigned long v)
{
    char digits[24];
    size_t n = 0, len;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (len = 0; n; len++)
        out[len] = digits[--n];
    return len;
}

static void put_uint(unsigned long v)
{
    char digits[24];
    size_t n = fmt_uint(digits, v);
    for (size_t i = 0; i < n && line_len < sizeof(line) - 1; i++)
        line[line_len++] = digits[i];
}

static void begin(const char *key)
{
    line_len = 0;
    put("init: ");
    put(key);
}

static void end(void)
{
    line[line_len++] = '\n';
    const char *p = line;
    size_t left = line_len;
    while (left) {
        long n = syscall3(SYS_write, 1, (long)p, (long)left);
        if (n == -4)        /* EINTR */
            continue;
        if (n <= 0)
            break;          /* no console: nothing to tell anyone */
        p += n;
        left -= (size_t)n;
    }
    line_len = 0;
}

static void error(const char *operation, const char *path, long err)
{
    begin("error ");
    put(operation);
    if (path) {
        put(" ");
        put(path);
    }
    put(" errno=");
    put_uint((unsigned long)-err);
    end();
}

/* --- files -------------------------------------------------------------------------------- */

/* path's contents (up to size - 1 bytes, NUL-terminated, trailing newlines removed) into buf:
 * its length, or -errno after printing the error line. */
static long read_file(const char *path, char *buf, size_t size)
{
    long fd = syscall3(SYS_open, (long)path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) {
        error("open", path, fd);
        return fd;
    }
    size_t len = 0;
    while (len < size - 1) {
        long n = syscall3(SYS_read, fd, (long)(buf + len), (long)(size - 1 - len));
        if (n == -4)
            continue;
        if (n < 0) {
            syscall1(SYS_close, fd);
            error("read", path, n);
            return n;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    syscall1(SYS_close, fd);
    while (len && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
        len--;
    buf[len] = 0;
    return (long)len;
}

static char buf[BUF_SIZE];

static void show_file(const char *key, const char *path)
{
    if (read_file(path, buf, sizeof(buf)) < 0)
        return;
    begin(key);
    put(" ");
    put_value(buf);
    end();
}

/* --- what Linux shows userspace ----------------------------------------------------------- */

static void show_uname(void)
{
    static struct new_utsname uts;
    long r = syscall1(SYS_uname, (long)&uts);
    if (r < 0) {
        error("uname", 0, r);
        return;
    }
    uts.release[64] = uts.version[64] = uts.machine[64] = 0;
    begin("release ");
    put_value(uts.release);
    end();
    begin("version ");
    put_value(uts.version);
    end();
    begin("machine ");
    put_value(uts.machine);
    end();
}

static void show_memtotal(void)
{
    if (read_file("/proc/meminfo", buf, sizeof(buf)) < 0)
        return;
    const char *p = buf;
    while (*p) {
        if (starts_with(p, "MemTotal:")) {
            p += 9;
            while (*p == ' ' || *p == '\t')
                p++;
            const char *value = p;
            while (*p && *p != '\n')
                p++;
            begin("memtotal ");
            while (value < p && line_len < sizeof(line) - 1) {
                unsigned char c = (unsigned char)*value++;
                line[line_len++] = c < 0x20 ? '?' : (char)c;
            }
            end();
            return;
        }
        while (*p && *p != '\n')
            p++;
        if (*p)
            p++;
    }
    begin("error memtotal not in /proc/meminfo");
    end();
}

static unsigned int memmap_index[MAX_MEMMAP];

/* The numbered subfolders of /sys/firmware/memmap, ascending: how many, or -errno. */
static long memmap_entries(void)
{
    static char dents[8192];
    const char *dir = "/sys/firmware/memmap";
    long fd = syscall3(SYS_open, (long)dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (fd < 0) {
        error("open", dir, fd);
        return fd;
    }
    long count = 0;
    for (;;) {
        long n = syscall3(SYS_getdents64, fd, (long)dents, sizeof(dents));
        if (n < 0) {
            syscall1(SYS_close, fd);
            error("getdents64", dir, n);
            return n;
        }
        if (n == 0)
            break;
        for (long off = 0; off < n;) {
            const struct linux_dirent64 *d = (const void *)(dents + off);
            off += d->d_reclen;
            const char *s = d->d_name;
            unsigned long v = 0;
            if (!*s)
                continue;
            for (; *s >= '0' && *s <= '9' && v < 0x10000000; s++)
                v = v * 10 + (unsigned long)(*s - '0');
            if (*s || count == MAX_MEMMAP)
                continue;   /* not a number ("." and ".."), or past what we keep */
            /* insertion sort: the list is short and getdents order is nearly sorted */
            long i = count++;
            while (i > 0 && memmap_index[i - 1] > v) {
                memmap_index[i] = memmap_index[i - 1];
                i--;
            }
            memmap_index[i] = (unsigned int)v;
        }
    }
    syscall1(SYS_close, fd);
    return count;
}

/* "/sys/firmware/memmap/INDEX/LEAF" into out (64 bytes is plenty). */
static void path_of(char *out, unsigned int index, const char *leaf)
{
    const char *prefix = "/sys/firmware/memmap/";
    char *p = out;
    while (*prefix)
        *p++ = *prefix++;
    p += fmt_uint(p, index);
    *p++ = '/';
    while (*leaf)
        *p++ = *leaf++;
    *p = 0;
}

static void show_memmap(void)
{
    static const char leaves[3][6] = {"start", "end", "type"};
    char path[64];
    char field[3][FIELD_SIZE];
    long count = memmap_entries();
    if (count < 0)
        return;
    long shown = 0;
    for (long i = 0; i < count; i++) {
        int ok = 1;
        for (int f = 0; f < 3 && ok; f++) {
            path_of(path, memmap_index[i], leaves[f]);
            ok = read_file(path, field[f], FIELD_SIZE) >= 0;
        }
        if (!ok)
            continue;
        begin("memmap ");
        put_uint(memmap_index[i]);
        for (int f = 0; f < 3; f++) {
            put(" ");
            put_value(field[f]);
        }
        end();
        shown++;
    }
    begin("memmap-entries ");
    put_uint((unsigned long)shown);
    end();
}

/* --- setup and power-off ------------------------------------------------------------------ */

static void make_dir(const char *path)
{
    long r = syscall2(SYS_mkdir, (long)path, 0755);
    if (r < 0 && r != -EEXIST)
        error("mkdir", path, r);
}

static void mount_fs(const char *fstype, const char *target, unsigned long flags, const char *data)
{
    make_dir(target);
    long r = syscall5(SYS_mount, (long)fstype, (long)target, (long)fstype, (long)flags, (long)data);
    if (r < 0)
        error("mount", target, r);
}

/* Before anything is printed: a console for stdio if the initrd had no /dev/console. */
static void ensure_console(void)
{
    if (syscall2(SYS_access, (long)"/dev/console", F_OK) == 0)
        return;
    syscall2(SYS_mkdir, (long)"/dev", 0755);
    long mounted = syscall5(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", MS_NOSUID,
                            (long)"mode=0755");
    if (syscall2(SYS_fcntl, 1, F_GETFD) < 0) {
        long fd = syscall3(SYS_open, (long)"/dev/console", O_RDWR | O_NOCTTY, 0);
        if (fd >= 0) {
            for (long i = 0; i < 3; i++)
                if (fd != i)
                    syscall2(SYS_dup2, fd, i);
            if (fd > 2)
                syscall1(SYS_close, fd);
        }
    }
    if (mounted < 0) {
        error("mount", "/dev", mounted);
        return;
    }
    begin("devtmpfs /dev");
    end();
}

static __attribute__((noreturn)) void power_off(void)
{
    begin("poweroff");
    end();
    /* The console's tty sends what write() queued from its interrupts, and power off does not
       wait for them: tcdrain (TCSBRK with 1) does, as shutdown programs do before reboot(2). */
    syscall3(SYS_ioctl, 1, TCSBRK, 1);
    syscall0(SYS_sync);
    long r = syscall4(SYS_reboot, (long)LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                      (long)LINUX_REBOOT_CMD_POWER_OFF, 0);
    error("reboot poweroff", 0, r);
    r = syscall4(SYS_reboot, (long)LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                 (long)LINUX_REBOOT_CMD_HALT, 0);
    error("reboot halt", 0, r);
    for (;;)
        syscall0(SYS_pause);
}

__attribute__((noreturn)) void init_main(long *stack)
{
    ensure_console();
    begin("pid ");
    put_uint((unsigned long)syscall0(SYS_getpid));
    end();
    show_uname();
    mount_fs("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
    mount_fs("sysfs", "/sys", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
    show_file("cmdline", "/proc/cmdline");
    show_memtotal();
    show_memmap();
    show_file("cpus-online", "/sys/devices/system/cpu/online");
    power_off();
}
