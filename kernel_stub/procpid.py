"""/proc/<pid> for the VM's processes, from the kernel's process table (the processes that
introduced themselves, kernel_stub/syscalls.py): stat (Linux's "pid (comm) S ppid ..." line,
as ps reads it), cmdline (NUL-separated argv), comm, status. A process its parent has reaped
is gone from /proc, as on Linux."""
import os

from hclsim.kernel_stub.vfs import Dir, GeneratedFile


def host_state(pid: int, gone: str = "?") -> str:
    """The host's view of the process's state letter (R, S, D, Z, T, ...), gone when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return gone



def _stat(proc) -> bytes:
    # pid (comm) state ppid pgrp session tty_nr tpgid flags: the fields ps uses come first.
    return f"{proc.pid} ({proc.comm}) {host_state(proc.pid)} {proc.ppid} {os.getpgid(proc.pid) if _alive(proc.pid) else 0} " \
           f"0 0 -1 0\n".encode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _status(proc) -> bytes:
    return (f"Name:\t{proc.comm}\nState:\t{host_state(proc.pid)}\nPid:\t{proc.pid}\nPPid:\t{proc.ppid}\n").encode()


def pid_dirs(server) -> dict:
    out = {}
    for pid in list(server.order):
        proc = server.processes.get(pid)
        if proc is None or proc.exit_status is not None or not _alive(pid):
            continue
        out[str(pid)] = Dir({
            "stat": GeneratedFile(lambda p=proc: _stat(p)),
            "cmdline": GeneratedFile(lambda p=proc: b"".join(a.encode() + b"\0" for a in p.argv)),
            "comm": GeneratedFile(lambda p=proc: f"{p.comm}\n".encode()),
            "status": GeneratedFile(lambda p=proc: _status(p)),
        })
    return out
