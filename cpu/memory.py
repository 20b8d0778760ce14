"""Guest physical memory: one memfd ("hclsim-guest-ram") mapped MAP_SHARED, mapped into every
engine with mem_map_ptr, and mappable by other OS processes (the VM worker, device workers).

Plain data access only (vm-memory style); no knowledge of what lives where.

Another process maps the same RAM with GuestMemory.attach(fd, size), given the fd one of two ways:
- inherited: subprocess.Popen(..., pass_fds=[mem.fd]) (the fd is CLOEXEC otherwise; the child
  gets the same number), or sent over a Unix socket with SCM_RIGHTS (socket.send_fds; the receiver
  attaches the number socket.recv_fds returns);
- opened by path: os.open(f"/proc/{pid}/fd/{mem.fd}", os.O_RDWR) (same user, ptrace read access).
Both sides see every store at once (one page cache); the size is sealed (F_SEAL_GROW/SHRINK), so
no process can truncate the RAM under another (which would SIGBUS every mapping).

HCLSIM_GUEST_RAM=private (or GuestMemory(size, shared=False)) gives the old private anonymous
mapping instead, for benches/ to compare; it has no fd.
"""
import ctypes
import fcntl
import mmap
import os
import stat
import struct
import weakref

import numpy as np

from hclsim import HclsimError
from hclsim.cpu.ram_pages import present_pages

MEMFD_NAME = "hclsim-guest-ram"
PAGE = 4096
SCRUB_LIMIT = 256 << 20          # allocated bytes reset() zeroes in place rather than frees
ENV_KIND = "HCLSIM_GUEST_RAM"    # "shared" (default) or "private"


class GuestMemoryError(HclsimError):
    pass


def default_shared() -> bool:
    """Whether new guest RAM is a shared memfd ($HCLSIM_GUEST_RAM, default "shared")."""
    kind = os.environ.get(ENV_KIND, "shared")
    if kind not in ("shared", "private"):
        raise GuestMemoryError(f"{ENV_KIND}={kind!r}: must be 'shared' or 'private'")
    return kind == "shared"


def _check_size(size: int) -> None:
    if size <= 0 or size % 4096:
        raise GuestMemoryError(f"guest memory size {size:#x} must be a positive multiple of 4 KiB")


def _cannot_map(size: int, err: OSError) -> GuestMemoryError:
    return GuestMemoryError(f"guest RAM of {size:#x} bytes ({size / (1 << 30):g} GiB) cannot be mapped on this "
                            f"host: {err.strerror or err}; ask for less (--memory)")


class GuestMemory:
    """Guest RAM [0, size). Reads and writes by guest physical address (GPA)."""

    def __init__(self, size: int, *, shared: bool | None = None):
        _check_size(size)
        shared = default_shared() if shared is None else shared
        if not shared:
            try:
                self._setup(None, size, mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
            except OSError as e:
                raise _cannot_map(size, e) from None
            return
        try:
            fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise GuestMemoryError(f"cannot create guest RAM (memfd_create): {e.strerror}") from None
        try:
            os.ftruncate(fd, size)   # sparse: shmem commits a page only when it is first touched
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            self._setup(fd, size, self._map_shared(fd, size))
        except OSError as e:
            os.close(fd)
            raise _cannot_map(size, e) from None

    @classmethod
    def attach(cls, fd: int, size: int) -> "GuestMemory":
        """The guest RAM of another GuestMemory, from its fd (see the module docstring), which
        must be a read-write memfd of exactly size bytes. The caller keeps fd: this maps a dup,
        closed by close() or when the GuestMemory is collected."""
        _check_size(size)
        try:
            st = os.fstat(fd)
            target = os.readlink(f"/proc/self/fd/{fd}")
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError as e:
            raise GuestMemoryError(f"cannot attach guest RAM: fd {fd}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode) or not target.startswith("/memfd:"):
            raise GuestMemoryError(f"cannot attach guest RAM: fd {fd} is {target}, not a memfd")
        if st.st_size != size:
            raise GuestMemoryError(f"cannot attach guest RAM: fd {fd} ({target}) holds {st.st_size:#x} bytes, "
                                   f"not {size:#x}")
        if mode != os.O_RDWR:
            raise GuestMemoryError(f"cannot attach guest RAM: fd {fd} ({target}) is not open read-write")
        mem = cls.__new__(cls)
        own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        try:
            mem._setup(own, size, cls._map_shared(own, size))
        except OSError as e:
            os.close(own)
            raise _cannot_map(size, e) from None
        return mem

    @property
    def fd(self) -> int | None:
        """The memfd (None for private RAM): what a process is given to map guest RAM."""
        return self._fd

    @staticmethod
    def _map_shared(fd: int, size: int) -> mmap.mmap:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def _setup(self, fd: int | None, size: int, mapping: mmap.mmap) -> None:
        self.size = size
        self.shared = fd is not None
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd) if fd is not None else None
        self._map = mapping
        # Transparent huge pages where the host allows them: a first touch of fresh guest RAM
        # (1024 APs set up ~7 pages each) then costs one fault per 2 MiB instead of per 4 KiB,
        # which was a third of AP bring-up; RSS rounds up to the 2 MiB pages touched. On the memfd
        # only with /sys/kernel/mm/transparent_hugepage/shmem_enabled "advise" (or always) when
        # this maps it (the kernel 2 MiB-aligns the mapping only then); hosts ship "never": 4 KiB
        # shmem faults, 1024-vCPU bring-up ~1.5x slower (benches/bench_sidecar.py -k guest_ram).
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # no THP in this kernel: 4 KiB pages, same behaviour
            pass
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    @property
    def fd(self) -> int:
        """The memfd holding the RAM (CLOEXEC: pass it with pass_fds or SCM_RIGHTS)."""
        if self._fd is None:
            raise GuestMemoryError("private guest RAM has no fd to share (it was made with shared=False "
                                   f"or {ENV_KIND}=private)")
        return self._fd

    def close(self) -> None:
        """Close the fd and unmap (once no numpy view from array() is alive). Engines mapping this
        RAM must be closed first."""
        if self._closer is not None:
            self._closer()
        self._array = None
        try:
            self._map.close()
        except BufferError:          # views still alive: the mapping goes with the last of them
            pass

    def reset(self) -> None:
        """All of RAM reads zero again, for the next machine of the pool (cpu/pool.py)."""
        if not self.shared:
            self._map.madvise(mmap.MADV_DONTNEED, 0, self.size)   # frees and zeroes private pages
            return
        # MADV_DONTNEED zeroes only private memory: on shmem it drops this process's PTEs and the
        # data stays in the page cache. Up to SCRUB_LIMIT of allocated pages are zeroed in place
        # and kept: without shmem huge pages each first touch of a shmem page costs ~3 us (a
        # 1024-vCPU bring-up touches ~7,000: 1.5x slower), and a pooled machine's next boot
        # touches the same pages again. Beyond it, MADV_REMOVE punches the memfd (pages freed,
        # every process mapping it reads zero).
        present = present_pages(self)
        if int(present.sum()) * PAGE > SCRUB_LIMIT:
            self._map.madvise(mmap.MADV_REMOVE, 0, self.size)
            return
        edges = np.flatnonzero(np.diff(np.concatenate(([0], present.view(np.int8), [0]))))
        for first, end in zip(edges[::2], edges[1::2]):
            self._array[first * PAGE:end * PAGE] = 0

    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"guest access [{gpa:#x}, {gpa + length:#x}) outside RAM [0, {self.size:#x})")

    def contains(self, gpa: int, length: int = 1) -> bool:
        return 0 <= gpa and length >= 0 and gpa + length <= self.size

    def array(self, gpa: int = 0, length: int | None = None) -> np.ndarray:
        """A writable numpy view (no copy) of [gpa, gpa+length)."""
        length = self.size - gpa if length is None else length
        self._check(gpa, length)
        return self._array[gpa:gpa + length]

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        return self._map[gpa:gpa + length]

    def write(self, gpa: int, data) -> None:
        data = bytes(data)
        self._check(gpa, len(data))
        self._map[gpa:gpa + len(data)] = data

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        self._check(gpa, length)
        self._array[gpa:gpa + length] = value

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))

    def read_struct(self, struct_type, gpa: int):
        return struct_type.from_buffer_copy(self.read(gpa, ctypes.sizeof(struct_type)))

    def write_struct(self, gpa: int, value) -> None:
        self.write(gpa, bytes(value))

    def read_cstr(self, gpa: int, max_len: int) -> bytes:
        """Bytes up to (not including) the first NUL within max_len; GuestMemoryError if none."""
        data = self.read(gpa, min(max_len, self.size - gpa))
        end = data.find(b"\0")
        if end < 0:
            raise GuestMemoryError(f"no NUL terminator within {max_len} bytes at {gpa:#x}")
        return data[:end]
