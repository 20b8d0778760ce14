"""The rootfs's file and process tools (hcl/tools.py dispatches to them): cat, ls, ps, env, kill."""
import os
import posixpath
import signal
import stat as _stat

from hclsim.defs import kabi
from hclsim.hcl import linux
from hclsim.hcl.tools import (DEFAULT_PATH, Fail, STDIN, STDOUT, absolute, cwd, find_program, follow, is_dir, lstat,
                              out, parse_flags, stat, strerror, wait_child, warn, write_fd)

# ---- cat ----------------------------------------------------------------------------------
def cat(argv: list[str]) -> int:
    """cat [-nu] [FILE...]: FILE '-' or none is stdin. Files are opened O_NONBLOCK, so a
    character device that would block (/dev/kmsg after its last record) ends like a file."""
    flags, names = parse_flags(argv[1:], "nu")
    numberer = _Numberer() if "n" in flags else None
    status = 0
    for name in names or ["-"]:
        try:
            if name == "-":
                _copy(lambda: os.read(STDIN, kabi.MAX_READ), numberer, kernel=False)
            else:
                with linux.open_file(absolute(name), kabi.O_RDONLY | kabi.O_NONBLOCK) as f:
                    _copy(lambda: f.read(kabi.MAX_READ), numberer, kernel=f.kfd is not None)
        except OSError as exc:
            if isinstance(exc, linux.KernelGone):
                raise
            warn("cat", f"{name}: {strerror(exc)}")
            status = 1
    return status


def _copy(read, numberer, kernel: bool) -> None:
    while True:
        try:
            chunk = read()
        except OSError as exc:
            if exc.errno == kabi.EAGAIN:          # nothing more now: the end, for cat
                return
            if exc.errno == kabi.EINTR or exc.errno == kabi.EPIPE and kernel:
                continue                          # kmsg: records were dropped; go on
            raise
        if not chunk:
            return
        try:
            write_fd(STDOUT, numberer(chunk) if numberer else chunk)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise Fail(f"write error: {strerror(exc)}") from None


class _Numberer:
    """cat -n: each line prefixed with its number, right-aligned in six columns and a tab."""

    def __init__(self):
        self.line, self.at_start = 0, True

    def __call__(self, chunk: bytes) -> bytes:
        out = bytearray()
        for piece in chunk.splitlines(keepends=True):
            if self.at_start:
                self.line += 1
                out += f"{self.line:6d}\t".encode()
            out += piece
            self.at_start = piece.endswith(b"\n")
        return bytes(out)


# ---- ls -----------------------------------------------------------------------------------
_KIND_BITS = {kabi.KIND_FILE: _stat.S_IFREG, kabi.KIND_DIR: _stat.S_IFDIR, kabi.KIND_SYMLINK: _stat.S_IFLNK,
              kabi.KIND_CHARDEV: _stat.S_IFCHR, kabi.KIND_BLOCKDEV: _stat.S_IFBLK}


def ls(argv: list[str]) -> int:
    """ls [-1aAdl] [PATH...]: names one a line (columns on a terminal); -l: mode, size and name
    (and -> target for a link), from the kernel's STAT and READLINK (the kernel has no owners,
    link counts or times to show)."""
    flags, operands = parse_flags(argv[1:], "1aAdl", usage_status=2)
    long = "l" in flags
    status, files, dirs = 0, [], []
    for name in operands or ["."]:
        path = absolute(name)
        try:
            if name.endswith("/"):                        # a trailing slash follows the link
                path = follow(path)
            info = lstat(path) if long or "d" in flags else (*stat(path), None)
        except OSError as exc:
            if isinstance(exc, linux.KernelGone):
                raise
            warn("ls", f"cannot access '{name}': {strerror(exc)}")
            status = 2
            continue
        if "d" not in flags and (info[0] == kabi.KIND_DIR or info[0] == kabi.KIND_SYMLINK and not long
                                 and is_dir(path)):
            dirs.append((name, path))
        else:
            files.append((name, path, info))
    if files:
        _print_entries(files, long)
    for i, (name, path) in enumerate(dirs):
        if files or i:
            out("\n")
        if files or len(dirs) > 1 or status:
            out(f"{name}:\n")
        try:
            path = follow(path)
            names = linux.listdir(path)
        except OSError as exc:
            if isinstance(exc, linux.KernelGone):
                raise
            warn("ls", f"cannot open directory '{name}': {strerror(exc)}")
            status = 2
            continue
        if "a" in flags:
            names = [".", ".."] + names
        elif "A" not in flags:
            names = [n for n in names if not n.startswith(".")]
        entries = []
        for n in names:
            entry_path = path if n == "." else posixpath.dirname(path) if n == ".." else posixpath.join(path, n)
            info = None
            if long:
                try:
                    info = lstat(entry_path)
                except OSError as exc:
                    if isinstance(exc, linux.KernelGone):
                        raise
                    warn("ls", f"cannot access '{posixpath.join(name, n)}': {strerror(exc)}")
                    status = 1
            entries.append((n, entry_path, info))
        _print_entries(entries, long)
    return status


def _print_entries(entries: list, long: bool) -> None:
    if long:
        width = max((len(str(info[2])) for _n, _p, info in entries if info), default=1)
        lines = []
        for name, _path, info in entries:
            if info is None:
                lines.append(f"?????????? {'?':>{width}} {name}\n")
                continue
            kind, mode, size, target = info
            mode_text = _stat.filemode(_KIND_BITS.get(kind, _stat.S_IFREG) | (mode & 0o7777))
            lines.append(f"{mode_text} {size:>{width}} {name}" + (f" -> {target}" if target is not None else "") + "\n")
        out("".join(lines))
        return
    names = [name for name, _p, _i in entries]
    if not os.isatty(STDOUT) or not names:
        out("".join(f"{n}\n" for n in names))
        return
    try:
        columns = os.get_terminal_size(STDOUT).columns
    except OSError:
        columns = 80
    cell = max(len(n) for n in names) + 2
    per_row = max(1, columns // cell)
    rows = -(-len(names) // per_row)
    lines = []
    for r in range(rows):
        row = [names[c * rows + r] for c in range(per_row) if c * rows + r < len(names)]
        lines.append("".join(n.ljust(cell) for n in row[:-1]) + row[-1] + "\n")
    out("".join(lines))


# ---- ps -----------------------------------------------------------------------------------
PS_FIELDS = {"pid": "PID", "ppid": "PPID", "stat": "S", "s": "S", "state": "S", "comm": "COMM",
             "ucomm": "COMM", "args": "ARGS", "cmd": "ARGS", "command": "ARGS"}
PS_DEFAULT = ("pid", "ppid", "comm", "args")


def ps(argv: list[str]) -> int:
    """ps [-eAfal] [-o FIELD,...] [-p PID,...]: the VM's processes (every one: the selection
    options are accepted and mean all), from /proc/<pid>/{stat,cmdline}. Fields: pid, ppid,
    stat, comm, args. When the kernel's /proc has no per-process directories, ps shows what
    the kernel interface does tell: itself and the processes named by the pid files in /run."""
    fields, only, headers, args = list(PS_DEFAULT), None, True, argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-o", "-p") or a.startswith(("-o", "-p")) and len(a) > 2:
            value = a[2:] if len(a) > 2 else (args[i + 1] if i + 1 < len(args) else None)
            if value is None:
                raise Fail(f"option requires an argument -- '{a[1]}'")
            i += 1 if len(a) > 2 else 2
            items = [v for v in value.replace(",", " ").split() if v]
            if a[1] == "o":
                for item in items:
                    name = item.split("=", 1)[0].lower()
                    if name not in PS_FIELDS:
                        raise Fail(f"unknown field '{name}' (one of {', '.join(sorted(set(PS_FIELDS)))})")
                fields = [item.split("=", 1)[0].lower() for item in items]
            else:
                try:
                    only = {int(v) for v in items}
                except ValueError:
                    raise Fail(f"process ID list syntax error: {value}") from None
            continue
        if a in ("--no-headers", "--no-heading"):
            headers = False
        elif a.lstrip("-") and set(a.lstrip("-")) <= set("eAfalxuwT"):
            pass                                       # every process is shown anyway
        else:
            raise Fail(f"unsupported option {a!r} (ps [-ef] [-o FIELD,...] [-p PID,...])")
        i += 1
    procs = _proc_processes()
    if procs is None:
        procs = _known_processes(argv)
        warn("ps", "the kernel's /proc has no per-process directories: showing this process and the "
                   "processes of the pid files in /run")
    if only is not None:
        procs = [p for p in procs if p["pid"] in only]
    rows = [[PS_FIELDS[f] for f in fields]] if headers else []
    rows += [[str(p[_field_key(f)]) for f in fields] for p in sorted(procs, key=lambda p: p["pid"])]
    if rows:
        widths = [max(len(r[c]) for r in rows) for c in range(len(fields))]
        right = {"pid", "ppid"}
        lines = []
        for r in rows:
            cells = [r[c].rjust(widths[c]) if fields[c] in right else r[c].ljust(widths[c])
                     for c in range(len(fields))]
            lines.append(" ".join(cells).rstrip() + "\n")
        out("".join(lines))
    return 0 if only is None or procs else 1


def _field_key(field: str) -> str:
    return {"s": "stat", "state": "stat", "ucomm": "comm", "cmd": "args", "command": "args"}.get(field, field)


def _proc_processes() -> list[dict] | None:
    """The processes of /proc/<pid>, or None if the kernel's /proc has none."""
    try:
        pids = [int(n) for n in linux.listdir("/proc") if n.isdigit()]
    except OSError as exc:
        if isinstance(exc, linux.KernelGone):
            raise
        raise Fail(f"/proc: {strerror(exc)}") from None
    if not pids:
        return None
    procs = []
    for pid in pids:
        try:
            text = linux.read_file(f"/proc/{pid}/stat").decode("utf-8", "replace")
            comm = text[text.index("(") + 1:text.rindex(")")]
            state, ppid = text[text.rindex(")") + 1:].split()[:2]
            cmdline = linux.read_file(f"/proc/{pid}/cmdline").split(b"\0")
        except (OSError, ValueError):
            continue                                    # gone meanwhile
        words = [w.decode("utf-8", "replace") for w in (cmdline[:-1] if cmdline[-1:] == [b""] else cmdline)]
        procs.append({"pid": pid, "ppid": int(ppid), "stat": state, "comm": comm,
                      "args": " ".join(words) if words else f"[{comm}]"})
    return procs


def _known_processes(argv: list[str]) -> list[dict]:
    procs = {os.getpid(): {"pid": os.getpid(), "ppid": os.getppid(), "stat": "R", "comm": "ps",
                           "args": " ".join(argv)}}
    for path, pid in pid_files():
        if pid not in procs and _alive(pid):
            procs[pid] = {"pid": pid, "ppid": "?", "stat": "?", "comm": "?", "args": f"(pid file {path})"}
    return list(procs.values())


def pid_files() -> list[tuple[str, int]]:
    """(path, pid) of the pid files in /run (/run/underhill.pid: openvmm_hcl's)."""
    try:
        names = [n for n in linux.listdir("/run") if n.endswith(".pid")]
    except OSError as exc:
        if isinstance(exc, linux.KernelGone):
            raise
        return []
    out = []
    for name in names:
        try:
            pid = int(linux.read_file(f"/run/{name}").split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid > 0:
            out.append((f"/run/{name}", pid))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- env ----------------------------------------------------------------------------------
def env(argv: list[str]) -> int:
    """env [-i] [-u NAME] [NAME=VALUE...] [CMD [ARG...]]: print the environment, or run CMD
    (a rootfs program found on PATH) with it and exit with its status (125: env's own error,
    126: CMD cannot run, 127: CMD not found)."""
    environ = dict(os.environ)
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-i", "--ignore-environment", "-"):
            environ = {}
        elif a == "-u" or a.startswith("-u") or a.startswith("--unset="):
            name = a.split("=", 1)[1] if a.startswith("--unset=") else a[2:] if len(a) > 2 else None
            if name is None:
                if i + 1 >= len(argv):
                    raise Fail("option requires an argument -- 'u'", 125)
                i += 1
                name = argv[i]
            environ.pop(name, None)
        elif a == "--":
            i += 1
            break
        elif a.startswith("-") and len(a) > 1:
            raise Fail(f"invalid option -- '{a[1:]}'", 125)
        else:
            break
        i += 1
    while i < len(argv) and "=" in argv[i] and not argv[i].startswith("="):
        name, value = argv[i].split("=", 1)
        environ[name] = value
        i += 1
    if i == len(argv):
        out("".join(f"{k}={v}\n" for k, v in environ.items()))
        return 0
    command = argv[i:]
    path = find_program(command[0], environ.get("PATH") or DEFAULT_PATH, cwd())
    if path is None:
        raise Fail(f"'{command[0]}': No such file or directory", 127)
    try:
        pid = linux.spawn(path, command, environ)
    except OSError as exc:
        if isinstance(exc, linux.KernelGone):
            raise
        raise Fail(f"'{command[0]}': {strerror(exc)}", 127 if exc.errno == kabi.ENOENT else 126) from None
    return wait_child(pid)


# ---- kill ---------------------------------------------------------------------------------
SIGNAL_NAMES = ("HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
                "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
                "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "POLL", "PWR", "SYS")     # 1..31, Linux x86_64
SIGNAL_ALIASES = {"IOT": 6, "CLD": 17, "IO": 29}
SIGRTMIN, SIGRTMAX = 34, 64                      # glibc's (the kernel's 32, 33 are the C library's)


def signal_number(text: str) -> int | None:
    """A signal by number (0-64) or name (KILL, SIGKILL, kill, RTMIN+3); None if unknown."""
    if text.isdigit():
        n = int(text)
        return n if n <= SIGRTMAX else None
    name = text.upper().removeprefix("SIG")
    if name in SIGNAL_NAMES:
        return SIGNAL_NAMES.index(name) + 1
    if name in SIGNAL_ALIASES:
        return SIGNAL_ALIASES[name]
    for base, start, sign in (("RTMIN", SIGRTMIN, 1), ("RTMAX", SIGRTMAX, -1)):
        if name == base:
            return start
        if name.startswith(base + ("+" if sign > 0 else "-")) and name[len(base) + 1:].isdigit():
            n = start + sign * int(name[len(base) + 1:])
            return n if SIGRTMIN <= n <= SIGRTMAX else None
    return None


def signal_name(n: int) -> str | None:
    if 1 <= n <= len(SIGNAL_NAMES):
        return SIGNAL_NAMES[n - 1]
    if n == SIGRTMIN:
        return "RTMIN"
    if n == SIGRTMAX:
        return "RTMAX"
    if SIGRTMIN < n < SIGRTMAX:
        return f"RTMIN+{n - SIGRTMIN}" if n - SIGRTMIN <= (SIGRTMAX - SIGRTMIN) // 2 else f"RTMAX-{SIGRTMAX - n}"
    return None


def kill(argv: list[str]) -> int:
    """kill [-SIGNAL | -s SIGNAL | -n NUM] PID...; kill -l [SIGNAL|STATUS...]; kill -L.
    The VM's processes are host processes and the kernel interface has no kill, so kill(2) goes
    to the host: only a process of the VM's session (PID 1's, which openvmm_hcl's pid file
    names) or of kill's own (a diag shell on a pty has its own) is signalled, never another
    host process; process groups (0, -PGID) are refused."""
    args = argv[1:]
    sig, pids, i, sig_given = signal.SIGTERM, [], 0, False
    if args[:1] in (["-l"], ["--list"]):
        return _kill_list(args[1:])
    if args[:1] in (["-L"], ["--table"]):
        cells = [f"{n:2d} {signal_name(n):<8}" for n in range(1, SIGRTMAX + 1) if n not in (32, 33)]
        out("".join(" ".join(cells[r:r + 7]).rstrip() + "\n" for r in range(0, len(cells), 7)))
        return 0
    while i < len(args):
        a = args[i]
        if a == "--":
            pids += args[i + 1:]
            break
        if a in ("-s", "-n"):
            if i + 1 >= len(args):
                raise Fail(f"option requires an argument -- '{a[1]}'")
            sig, sig_given = _signal_arg(args[i + 1]), True
            i += 2
            continue
        if a.startswith("-") and len(a) > 1 and not pids and not sig_given:    # -9, -KILL, -SIGKILL
            sig, sig_given = _signal_arg(a[1:]), True
        else:
            pids.append(a)
        i += 1
    if not pids:
        raise Fail("not enough arguments (kill [-s SIGNAL | -SIGNAL] PID... or kill -l)")
    status, sessions = 0, _vm_sessions()
    for text in pids:
        try:
            pid = int(text)
        except ValueError:
            warn("kill", f"{text}: arguments must be process IDs")
            status = 1
            continue
        if pid <= 0:
            warn("kill", f"({pid}) - process groups are not supported (the VM's processes are host processes)")
            status = 1
            continue
        try:
            if os.getsid(pid) not in sessions:
                warn("kill", f"({pid}) - not a process of this VM")
                status = 1
                continue
            os.kill(pid, sig)
        except OSError as exc:
            warn("kill", f"({pid}) - {strerror(exc)}")
            status = 1
    return status


def _vm_sessions() -> set[int]:
    sessions = {os.getsid(0)}
    for _path, pid in pid_files():
        try:
            sessions.add(os.getsid(pid))
        except OSError:
            pass
    return sessions


def _signal_arg(text: str) -> int:
    n = signal_number(text)
    if n is None:
        raise Fail(f"unknown signal: {text}; valid signals: kill -l")
    return n


def _kill_list(args: list[str]) -> int:
    if not args:
        lines, line = [], ""
        for name in SIGNAL_NAMES:
            if len(line) + len(name) + 1 > 79:
                lines.append(line + "\n")
                line = ""
            line = f"{line} {name}" if line else name
        out("".join(lines) + line + "\n")
        return 0
    status = 0
    for a in args:
        if a.isdigit():
            n = int(a)
            name = signal_name(n - 128 if n > 128 else n)   # an exit status 128 + N names signal N
            if name is None:
                warn("kill", f"unknown signal: {a}")
                status = 1
            else:
                out(f"{name}\n")
        else:
            n = signal_number(a)
            if n is None:
                warn("kill", f"unknown signal: {a}")
                status = 1
            else:
                out(f"{n}\n")
    return status
