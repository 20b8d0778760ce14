"""VTL0's guest RAM as the paravisor's userspace reaches it: the memory map the boot shim gave the
kernel (the /openhcl memory nodes of the device tree, with their MemoryVtlType), and a mapping of
/dev/mshv_vtl_low limited to the VTL0 ranges (for the VM worker serving device workers' guest
memory requests, and for a device worker allowed to map it itself)."""
from hclsim.defs import kabi
from hclsim.hcl import linux


def memory_ranges() -> list[tuple[int, int, str]]:
    """The partition's memory map as the boot shim gave it to the kernel: (start, size,
    MemoryVtlType name) of each /openhcl memory node of the device tree, by base address."""
    from hclsim.defs.platform import MEMORY_VTL_TYPE
    names = {v: k for k, v in MEMORY_VTL_TYPE.items()}
    base = "/proc/device-tree/openhcl"
    try:
        nodes = sorted(n for n in linux.listdir(base) if n.startswith("memory@"))
    except OSError:
        return []
    out = []
    for node in nodes:
        try:
            reg = linux.read_file(f"{base}/{node}/reg")
            kind = int.from_bytes(linux.read_file(f"{base}/{node}/openhcl,memory-type")[:4], "big")
        except OSError:
            continue
        if len(reg) >= 16:
            out.append((int.from_bytes(reg[:8], "big"), int.from_bytes(reg[8:16], "big"), names.get(kind, str(kind))))
    return out


def memory_layout() -> dict:
    """memory_ranges() as an inspect directory, by base address."""
    from hclsim.hcl import inspect_tree as it
    return {f"{start:#x}": {"type": kind, "start": it.hex_(start), "size": it.hex_(size)}
            for start, size, kind in memory_ranges()}


def vtl0_ranges() -> list[tuple[int, int]]:
    return [(start, size) for start, size, kind in memory_ranges() if kind == "VTL0"]


def map_vtl0():
    """A GuestRam over VTL0's RAM, or None when the device tree names none; OSError if the
    kernel will not map it (guest RAM private to the machine process)."""
    ranges = vtl0_ranges()
    if not ranges:
        return None
    low = linux.open_file("/dev/mshv_vtl_low", kabi.O_RDWR)
    try:
        return GuestRam(low.mmap(0, max(a + n for a, n in ranges)), ranges)
    finally:
        low.close()


class GuestRam:
    """VTL0's RAM (mapped from /dev/mshv_vtl_low): reads and writes inside its VTL0 ranges only."""

    def __init__(self, mapping, ranges: list[tuple[int, int]]):
        self.map, self.ranges = mapping, ranges

    def _check(self, gpa: int, n: int) -> None:
        if n < 0 or not any(start <= gpa and gpa + n <= start + size for start, size in self.ranges):
            raise ValueError(f"{n} bytes at {gpa:#x} are not VTL0 RAM")

    def read(self, gpa: int, n: int) -> bytes:
        self._check(gpa, n)
        return bytes(self.map[gpa:gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        self.map[gpa:gpa + len(data)] = data
