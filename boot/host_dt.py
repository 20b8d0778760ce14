"""The host's device tree: what the (simulated) host tells the boot shim about the partition.

Format in docs/contracts.md ("Host device tree"); the shim parses it in firmware/shim/host_dt.c.
Written with libfdt's sequential writer, read back with libfdt (kernel_stub.fdt).
"""
import hashlib
from dataclasses import dataclass, field

import libfdt

from hclsim import HclsimError
from hclsim.boot import fdt as fdtr
from hclsim.boot.layout import HOST_DT_MAX_SIZE, IGVM_MEMORY_TYPE_RAM, IGVM_MEMORY_TYPE_VTL2, MAX_CPU_COUNT, MAX_NUMA_NODES
from hclsim.defs.platform import COM3_PORT

ALIGN_2M = 2 << 20
HOST_COMPATIBLE = "microsoft,hclsim-host"
ENTROPY_SEED = b"hclsim host entropy"
DEFAULT_COM3_SPEED = 115200


class HostDtError(HclsimError):
    pass


def _default_entropy() -> bytes:
    # Deterministic so runs are reproducible; two hashes give the 64 bytes OpenHCL's host offers.
    return b"".join(hashlib.sha256(ENTROPY_SEED + bytes([i])).digest() for i in range(2))


@dataclass(frozen=True)
class HostCpu:
    apic_id: int
    numa_node: int


@dataclass(frozen=True)
class HostMemory:
    base: int
    size: int
    numa_node: int
    igvm_type: int  # IGVM_MEMORY_TYPE_RAM / IGVM_MEMORY_TYPE_VTL2


@dataclass(frozen=True)
class HostConfig:
    cpus: tuple[HostCpu, ...]
    memory: tuple[HostMemory, ...]
    bootargs: str = ""
    com3: bool = True
    com3_speed: int = DEFAULT_COM3_SPEED
    entropy: bytes = field(default_factory=_default_entropy)


# ---- building a config -------------------------------------------------------------------------

def _validate(cpus, numa_nodes, memory_size, vtl2_base, vtl2_size):
    if not 1 <= cpus <= MAX_CPU_COUNT:
        raise HostDtError(f"host: {cpus} cpus, must be 1..{MAX_CPU_COUNT}")
    if not 1 <= numa_nodes <= min(MAX_NUMA_NODES, cpus):
        raise HostDtError(f"host: {numa_nodes} NUMA nodes, must be 1..{min(MAX_NUMA_NODES, cpus)} "
                          f"(at most {MAX_NUMA_NODES} and at most one per cpu)")
    if memory_size <= 0 or memory_size % ALIGN_2M:
        raise HostDtError(f"host: memory size {memory_size:#x} must be a positive multiple of 2 MiB")
    if memory_size < numa_nodes * ALIGN_2M:
        raise HostDtError(f"host: memory size {memory_size:#x} too small to give each of {numa_nodes} "
                          f"NUMA nodes 2 MiB")
    if vtl2_base % ALIGN_2M or vtl2_size % ALIGN_2M or vtl2_size <= 0:
        raise HostDtError(f"host: VTL2 range base {vtl2_base:#x} size {vtl2_size:#x} must be 2 MiB aligned "
                          f"and non-empty")
    if vtl2_base < 0 or vtl2_base + vtl2_size > memory_size:
        raise HostDtError(f"host: VTL2 range [{vtl2_base:#x}, {vtl2_base + vtl2_size:#x}) is outside guest "
                          f"RAM [0, {memory_size:#x})")


def _node_ranges(memory_size: int, numa_nodes: int) -> list[tuple[int, int, int]]:
    """(start, end, node): RAM cut into contiguous per-node slices on 2 MiB boundaries."""
    cuts = [memory_size * k // numa_nodes // ALIGN_2M * ALIGN_2M for k in range(numa_nodes)] + [memory_size]
    return [(cuts[n], cuts[n + 1], n) for n in range(numa_nodes)]


def _carve_vtl2(slices, vtl2_base: int, vtl2_end: int) -> list[HostMemory]:
    """Per-node RAM with the VTL2 range cut out as its own node (on the node holding its base)."""
    vtl2_node = next(n for s, e, n in slices if s <= vtl2_base < e)
    out = [HostMemory(vtl2_base, vtl2_end - vtl2_base, vtl2_node, IGVM_MEMORY_TYPE_VTL2)]
    for start, end, n in slices:
        for s, e in ((start, min(end, vtl2_base)), (max(start, vtl2_end), end)):
            if s < e:
                out.append(HostMemory(s, e - s, n, IGVM_MEMORY_TYPE_RAM))
    return sorted(out, key=lambda m: m.base)


def build_host_config(cpus: int, numa_nodes: int, memory_size: int, vtl2_base: int, vtl2_size: int,
                      bootargs: str = "", com3: bool = True) -> HostConfig:
    """A host offering cpus split contiguously across NUMA nodes and RAM [0, memory_size)."""
    _validate(cpus, numa_nodes, memory_size, vtl2_base, vtl2_size)
    host_cpus = tuple(HostCpu(apic_id=i, numa_node=i * numa_nodes // cpus) for i in range(cpus))
    memory = _carve_vtl2(_node_ranges(memory_size, numa_nodes), vtl2_base, vtl2_base + vtl2_size)
    return HostConfig(cpus=host_cpus, memory=tuple(memory), bootargs=bootargs, com3=com3)


# ---- writing -----------------------------------------------------------------------------------

def _write_cpus(sw: libfdt.FdtSw, cpus) -> None:
    with sw.add_node("cpus"):
        sw.property_u32("#address-cells", 1)
        sw.property_u32("#size-cells", 0)
        for cpu in cpus:  # order is VP-index order (the shim checks it)
            if not (0 <= cpu.apic_id < 1 << 32 and 0 <= cpu.numa_node < 1 << 32):
                raise HostDtError(f"host cpu APIC id {cpu.apic_id:#x} NUMA node {cpu.numa_node}: reg and "
                                  f"numa-node-id are 32-bit cells")
            with sw.add_node(f"cpu@{cpu.apic_id:x}"):
                sw.property_string("device_type", "cpu")
                sw.property_u32("reg", cpu.apic_id)
                sw.property_u32("numa-node-id", cpu.numa_node)
                sw.property_string("status", "okay")


def _write_memory(sw: libfdt.FdtSw, mem: HostMemory) -> None:
    if not (0 <= mem.base < 1 << 64 and 0 <= mem.size < 1 << 64):
        raise HostDtError(f"host memory range base {mem.base:#x} size {mem.size:#x}: reg holds 64-bit cells")
    with sw.add_node(f"memory@{mem.base:x}"):
        sw.property_string("device_type", "memory")
        sw.property("reg", mem.base.to_bytes(8, "big") + mem.size.to_bytes(8, "big"))
        sw.property_u32("numa-node-id", mem.numa_node)
        sw.property_u32("microsoft,igvm-type", mem.igvm_type)


def _write_buses(sw: libfdt.FdtSw, config: HostConfig) -> None:
    with sw.add_node("bus"):
        sw.property_string("compatible", "simple-bus")
        sw.property_u32("#address-cells", 2)
        sw.property_u32("#size-cells", 2)
        sw.property("ranges", b"")
        with sw.add_node("vmbus"):
            sw.property_string("compatible", "microsoft,vmbus")
            sw.property_u32("#address-cells", 2)
            sw.property_u32("#size-cells", 1)
            sw.property("ranges", b"")
    if config.com3:
        with sw.add_node("x86-pio-bus"):
            sw.property_string("compatible", "x86-pio-bus")
            sw.property_u32("#address-cells", 1)
            sw.property_u32("#size-cells", 1)
            sw.property("ranges", b"")
            with sw.add_node(f"serial@{COM3_PORT:x}"):
                sw.property_string("compatible", "ns16550")
                sw.property("reg", COM3_PORT.to_bytes(4, "big") + (8).to_bytes(4, "big"))
                sw.property_u32("current-speed", config.com3_speed)


def bootargs_bytes(bootargs: str) -> bytes:
    """/chosen/bootargs as stored: the text's UTF-8, where a surrogate escape (an undecodable byte
    of a command-line argument, as Python passes them) stands for that byte. A device-tree string
    ends at its NUL, so a NUL inside is refused rather than cutting the line short."""
    raw = bootargs.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise HostDtError(f"host bootargs: NUL byte at offset {raw.find(0)} (a device-tree string "
                          f"cannot hold one)")
    return raw


def _finished(sw: libfdt.FdtSw):
    """sw.as_fdt(), growing the buffer when fdt_finish has no room for FDT_END (pylibfdt retries
    every other call itself, but not that one: a property that fills the buffer to the byte
    gave FDT_ERR_NOSPACE)."""
    while True:
        try:
            return sw.as_fdt()
        except libfdt.FdtException as exc:
            if exc.err != -libfdt.NOSPACE:
                raise
            sw.resize(len(sw.as_bytearray()) + sw.INC_SIZE)


def write_host_dt(config: HostConfig, max_size: int = HOST_DT_MAX_SIZE) -> bytes:
    """The packed host device tree blob; HostDtError if it is bigger than max_size."""
    bootargs = bootargs_bytes(config.bootargs)
    if len(bootargs) > max_size:  # cannot fit: say so before building (the writer grows 1 KiB a step)
        raise HostDtError(f"host bootargs are {len(bootargs)} bytes, more than the {max_size} bytes of the "
                          f"parameter region")
    # Room for everything up front: pylibfdt grows a full buffer by 1 KiB and copies it each time.
    sw = libfdt.FdtSw(4096 + 160 * len(config.cpus) + 160 * len(config.memory) + len(bootargs)
                      + len(config.entropy))
    sw.finish_reservemap()
    with sw.add_node(""):
        sw.property_u32("#address-cells", 2)
        sw.property_u32("#size-cells", 2)
        sw.property_string("compatible", HOST_COMPATIBLE)
        _write_cpus(sw, config.cpus)
        for mem in config.memory:
            _write_memory(sw, mem)
        with sw.add_node("chosen"):
            sw.property("bootargs", bootargs + b"\0")
        with sw.add_node("openhcl"):
            sw.property_string("compatible", "microsoft,openhcl")
            sw.property_string("memory-allocation-mode", "host")
            with sw.add_node("entropy"):
                sw.property("reg", bytes(config.entropy))
        _write_buses(sw, config)
    tree = _finished(sw)
    tree.pack()
    blob = bytes(tree.as_bytearray())
    if len(blob) > max_size:
        raise HostDtError(f"host device tree is {len(blob)} bytes, more than the {max_size} bytes of the "
                          f"parameter region ({len(config.cpus)} cpus, {len(config.memory)} memory ranges)")
    return blob


# ---- reading -----------------------------------------------------------------------------------

def _read_cpus(tree) -> tuple[HostCpu, ...]:
    cpus_off = fdtr.node(tree, "/cpus")
    if cpus_off is None:
        raise fdtr.FdtError("no /cpus node")
    cpus = []
    for off, name in fdtr.subnodes(tree, cpus_off):
        if name.startswith("cpu@"):
            cpus.append(HostCpu(fdtr.prop_u32(tree, off, "reg"), fdtr.prop_u32(tree, off, "numa-node-id", 0)))
    return tuple(cpus)


def _read_memory(tree) -> tuple[HostMemory, ...]:
    ac = fdtr.prop_u32(tree, 0, "#address-cells")
    sc = fdtr.prop_u32(tree, 0, "#size-cells")
    memory = []
    for off, name in fdtr.subnodes(tree, 0):
        if not name.startswith("memory@"):
            continue
        numa = fdtr.prop_u32(tree, off, "numa-node-id", 0)
        igvm = fdtr.prop_u32(tree, off, "microsoft,igvm-type", IGVM_MEMORY_TYPE_RAM)
        memory.extend(HostMemory(base, size, numa, igvm) for base, size in fdtr.prop_reg(tree, off, ac, sc))
    return tuple(memory)


def _read_com3_speed(tree) -> int | None:
    bus = fdtr.node(tree, "/x86-pio-bus")
    serial = None if bus is None else fdtr.node(tree, f"/x86-pio-bus/serial@{COM3_PORT:x}")
    if serial is None:
        return None
    return fdtr.prop_u32(tree, serial, "current-speed", DEFAULT_COM3_SPEED)


def read_host_dt(blob) -> HostConfig:
    """The HostConfig a host device tree blob describes (inverse of write_host_dt)."""
    try:
        tree = fdtr.open_fdt(blob)
        chosen = fdtr.node(tree, "/chosen")
        raw = None if chosen is None else fdtr.prop(tree, chosen, "bootargs", required=False)
        if raw is not None and not raw.endswith(b"\0"):
            raise fdtr.FdtError("/chosen bootargs is not a NUL-terminated string")
        bootargs = "" if raw is None else raw[:-1].decode("utf-8", "surrogateescape")
        entropy_off = fdtr.node(tree, "/openhcl/entropy")
        entropy = b"" if entropy_off is None else fdtr.prop(tree, entropy_off, "reg")
        speed = _read_com3_speed(tree)
        return HostConfig(cpus=_read_cpus(tree), memory=_read_memory(tree), bootargs=bootargs,
                          com3=speed is not None, com3_speed=speed or DEFAULT_COM3_SPEED, entropy=entropy)
    except fdtr.FdtError as e:
        raise HostDtError(f"host device tree: {e}") from None
