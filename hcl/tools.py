"""The small programs of the VTL2 rootfs a paravisor developer runs through the diag server:
sh, cat, ls, ps, env, kill. One multi-call program (/usr/bin/hcltools, with the tools' names
linked to it), dispatched on basename(argv[0]) like busybox; `hcltools NAME ARGS...` works too.

Each tool is a real process started by the stand-in kernel's binfmt and sees the simulated
/proc, /sys, /dev and the rootfs through its kernel (hcl/linux.py), never the host's files.
A relative path is taken from $PWD (the shell's working directory; there is no per-process cwd
in the kernel interface). Errors are one line on stderr (`cat: /nope: No such file or
directory`) and a non-zero exit status, never a traceback (HCLSIM_TRACEBACK=1 shows one for
a bug).

Cheap to start (tens of milliseconds): the standard library's always-loaded modules, defs.kabi
and hcl.linux only.
"""
import errno
import os
import posixpath
import signal

from hclsim.defs import kabi
from hclsim.hcl import linux

DEFAULT_PATH = "/bin:/usr/bin"           # confstr(_CS_PATH), what sh and env use without a PATH
STDIN, STDOUT, STDERR = 0, 1, 2


class Fail(Exception):
    """A tool's error: one line on stderr (after "NAME: ") and the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# ---- helpers every tool uses ------------------------------------------------------------------
def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def out(text: str, fd: int = STDOUT) -> None:
    try:
        write_fd(fd, text.encode("utf-8", "surrogateescape"))
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise Fail(f"write error: {strerror(exc)}") from None


def warn(tool: str, message: str, fd: int = STDERR) -> None:
    try:
        write_fd(fd, f"{tool}: {message}\n".encode("utf-8", "surrogateescape"))
    except OSError:
        pass


def strerror(exc: OSError) -> str:
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def cwd() -> str:
    here = os.environ.get("PWD", "")
    return here if here.startswith("/") else "/"


def absolute(path: str, base: str | None = None) -> str:
    """path made absolute against base (default $PWD) and normalised (logically: '..' drops
    the previous component, as the shell's cd does)."""
    full = posixpath.normpath(posixpath.join(base or cwd(), path))
    return "/" + full.lstrip("/") if full.startswith("//") else full


def stat(path: str) -> tuple[int, int, int]:
    """(kind, mode, size) as the kernel's STAT gives them."""
    kind, mode, size = linux.syscall(kabi.Op.STAT, path)
    return kind, mode, size


def readlink(path: str) -> str:
    return linux.syscall(kabi.Op.READLINK, path)[0]


def lstat(path: str) -> tuple[int, int, int, str | None]:
    """(kind, mode, size, link target) of a rootfs symlink itself, as lstat(2) gives them (STAT
    gives the link's kind with its target's mode and size). A pseudo file system's symlink
    (/proc/device-tree) shows as its target: STAT follows it there, and asking READLINK of
    every entry would put a failed request into kmsg for each."""
    kind, mode, size = stat(path)
    if kind != kabi.KIND_SYMLINK:
        return kind, mode, size, None
    try:
        target = readlink(path)
    except OSError:
        return kind, mode, size, None
    return kabi.KIND_SYMLINK, 0o777, len(target.encode("utf-8", "surrogateescape")), target


def follow(path: str) -> str:
    """path with the symlinks of its last component followed. The kernel follows the links on
    the way to a rootfs file, but its LISTDIR (and STAT's kind) take a last one as it is."""
    for _ in range(40):                                # MAXSYMLINKS
        if stat(path)[0] != kabi.KIND_SYMLINK:
            return path
        path = absolute(readlink(path), posixpath.dirname(path))
    raise OSError(kabi.ELOOP, os.strerror(kabi.ELOOP))


def is_dir(path: str) -> bool:
    """Whether path is a directory, symlinks followed."""
    try:
        return stat(follow(path))[0] == kabi.KIND_DIR
    except OSError as exc:
        if isinstance(exc, linux.KernelGone):
            raise
        return False


def find_program(name: str, path_var: str, base: str) -> str | None:
    """The rootfs path of a command: name itself if it has a '/', else the first PATH entry
    holding it (an empty entry is the current directory)."""
    if "/" in name:
        return absolute(name, base)
    for entry in path_var.split(":"):
        candidate = absolute(posixpath.join(entry or ".", name), base)
        try:
            kind = linux.stat_kind(candidate)
        except OSError:
            continue
        if kind in (kabi.KIND_FILE, kabi.KIND_SYMLINK):
            return candidate
    return None


def exit_code(status: int) -> int:
    """A wait status as a shell's $?: the exit code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255


def wait_child(pid: int) -> int:
    """Wait for a child (Ctrl-C goes to it, not to us), tell the kernel, return its $?."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _pid, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, previous)
    linux.exited(pid, status)
    return exit_code(status)


def parse_flags(args: list[str], allowed: str, usage_status: int = 1) -> tuple[set, list[str]]:
    """Single-letter options (grouped: -la), '--' ends them, '-' alone is an operand."""
    flags, operands, i = set(), [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            operands += args[i + 1:]
            break
        if a.startswith("-") and a != "-":
            for ch in a[1:]:
                if ch not in allowed:
                    raise Fail(f"invalid option -- '{ch}'", usage_status)
                flags.add(ch)
        else:
            operands.append(a)
        i += 1
    return flags, operands


# ---- dispatch -----------------------------------------------------------------------------
USAGE = {"cat": "cat [-nu] [FILE...]", "ls": "ls [-1aAdl] [PATH...]",
         "ps": "ps [-ef] [-o pid,ppid,stat,comm,args] [-p PID,...]",
         "env": "env [-i] [-u NAME] [NAME=VALUE...] [CMD [ARG...]]",
         "kill": "kill [-s SIGNAL | -SIGNAL] PID...  |  kill -l [SIGNAL...]  |  kill -L",
         "sh": "sh [-c COMMAND [NAME [ARG...]] | FILE [ARG...]]"}
TOOLS = tuple(USAGE)                   # the names linked to /usr/bin/hcltools


def _tool(name: str):
    """The tool's function (imported here: the tools use this module's helpers)."""
    if name == "sh":
        from hclsim.hcl.shell import sh
        return sh
    if name in TOOLS:
        from hclsim.hcl import coreutils
        return getattr(coreutils, name)
    return None


def main(argv: list[str]) -> int:
    argv = list(argv) or ["hcltools"]
    name = os.path.basename(argv[0])
    if name == "hcltools":
        if len(argv) < 2 or argv[1] in ("-h", "--help", "--list"):
            out("hcltools: the rootfs's small programs (run as NAME, or as hcltools NAME ARGS...):\n"
                + "".join(f"  {USAGE[t]}\n" for t in sorted(USAGE)))
            return 0 if len(argv) >= 2 else 1
        argv, name = argv[1:], os.path.basename(argv[1])
    tool = _tool(name)
    if tool is None:
        warn("hcltools", f"{name}: applet not found (one of {', '.join(sorted(USAGE))})")
        return 127
    try:
        linux.start_process(name, argv)
    except OSError as exc:
        if exc.errno in (kabi.ENOENT, kabi.EBADF, kabi.ENOTDIR, errno.ECONNREFUSED, errno.ENOTSOCK):
            warn(name, f"cannot reach the kernel (descriptor {kabi.KERNEL_FD} must be a VM's run folder): "
                       f"{strerror(exc)}")
        else:
            warn(name, f"the kernel refused the process: {strerror(exc)}")
        return 1
    if name != "sh":                 # the shell keeps SIGPIPE ignored and takes Ctrl-C itself
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # a closed pipe ends the tool, as in C
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if argv[1:] == ["--help"]:
            out(f"usage: {USAGE[name]}\n")
            return 0
    try:
        return tool(argv)
    except Fail as exc:
        warn(name, str(exc))
        return exc.status
    except linux.KernelGone:
        warn(name, "the kernel has gone away")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:          # a bug: one line unless asked for the traceback
        if os.environ.get("HCLSIM_TRACEBACK") == "1":
            raise
        warn(name, f"internal error: {type(exc).__name__}: {exc}")
        return 70
