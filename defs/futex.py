"""futex(2) on a 32-bit word of shared memory (a memfd both processes map): the doorbell of the
run page. FUTEX_WAIT sleeps while the word holds the expected value; FUTEX_WAKE wakes the
sleepers. Shared (not FUTEX_PRIVATE) because the word lives in memory two processes map."""
import ctypes
import os

SYS_FUTEX = 202                    # x86_64
FUTEX_WAIT, FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def address(buffer, offset: int) -> int:
    """The address of buffer[offset] (an mmap or a ctypes-compatible writable buffer)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer, offset))


def wait(addr: int, expected: int, timeout: float | None = None) -> bool:
    """Sleep while *addr == expected (False on timeout; True when woken or the value differs)."""
    ts = None
    if timeout is not None:
        ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
    r = _syscall(SYS_FUTEX, ctypes.c_void_p(addr), FUTEX_WAIT, ctypes.c_uint32(expected & 0xFFFFFFFF),
                 ctypes.byref(ts) if ts is not None else None, None, 0)
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err == 110:                 # ETIMEDOUT
        return False
    if err in (11, 4):             # EAGAIN: the value already differs; EINTR
        return True
    raise OSError(err, os.strerror(err))


def wake(addr: int, count: int = 2**31 - 1) -> int:
    return _syscall(SYS_FUTEX, ctypes.c_void_p(addr), FUTEX_WAKE, count, None, None, 0)
