"""Helpers for the pseudo file system tests: open a node, read it whole, write it, the errno."""
import threading

import pytest

from hclsim.defs import kabi
from hclsim.kernel_stub.vfs import Caller, Dir, KernelError, walk

CALLER = Caller(4242, "underhill-init")


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeCpus:
    """cpus for procfs/sysfs: present CPUs, which are online, and the online() calls made."""

    def __init__(self, present, online, fail=None):
        self.present, self._online, self.calls, self.fail = list(present), set(online), [], fail

    def is_online(self, n: int) -> bool:
        return n in self._online

    def online(self, n: int) -> None:
        self.calls.append(n)
        if self.fail is not None:
            raise self.fail
        self._online.add(n)


def node(root: Dir, path: str):
    return walk(root, [p for p in path.split("/") if p])


def read(root: Dir, path: str) -> bytes:
    f = node(root, path).open(kabi.O_RDONLY, CALLER)
    out = b""
    while chunk := f.read(65536):
        out += chunk
    return out


def write(root: Dir, path: str, data, flags: int = kabi.O_WRONLY) -> int:
    raw = data.encode() if isinstance(data, str) else data
    return node(root, path).open(flags, CALLER).write(raw)


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(KernelError) as exc:
        fn(*args, **kwargs)
    return exc.value.errno


def no_threads_left(prefix: str) -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith(prefix)]
