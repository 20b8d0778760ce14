"""Guest physical memory: one anonymous private mapping, mapped into every engine with mem_map_ptr.

Plain data access only (vm-memory style); no knowledge of what lives where.
"""
import ctypes
import mmap
import struct

import numpy as np

from hclsim import HclsimError


class GuestMemoryError(HclsimError):
    pass


class GuestMemory:
    """Guest RAM [0, size). Reads and writes by guest physical address (GPA)."""

    def __init__(self, size: int):
        if size <= 0 or size % 4096:
            raise GuestMemoryError(f"guest memory size {size:#x} must be a positive multiple of 4 KiB")
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # Transparent huge pages where the host allows them: a first touch of fresh guest RAM
        # (1024 APs set up ~7 pages each) then costs one fault per 2 MiB instead of per 4 KiB,
        # which was a third of AP bring-up; RSS rounds up to the 2 MiB pages touched.
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # no THP in this kernel: 4 KiB pages, same behaviour
            pass
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def reset(self) -> None:
        """All of RAM reads zero again (frees the pages; cheap for untouched memory)."""
        self._map.madvise(mmap.MADV_DONTNEED, 0, self.size)

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
