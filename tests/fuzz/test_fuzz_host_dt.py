"""Mutated host device trees, fed to the real shim: what the host says (CPUs and their APIC ids
and NUMA nodes, memory ranges, COM3, entropy) changed within the format, and the blob itself
damaged byte by byte. A blob libfdt's fdt_check_full refuses must be a shim panic; any other
outcome is a clean panic or a handoff the oracles agree with."""
import dataclasses
import struct

from hypothesis import given, strategies as st

from hclsim.boot.host_dt import HostCpu, HostMemory
from hclsim.config import BootConfig
from hclsim.machine import Machine

from .harness import (ShimInputs, boot_case, check_cpus, check_handoff, expected_e820, fdt_check_full, fuzz_settings,
                      host_dt_for, run_then_check_pristine)
from hclsim.sidecar.partition import partition

_LAYOUTS = {}


def layout(config: BootConfig):
    key = (config.cpus, config.numa_nodes, config.isolation)
    if key not in _LAYOUTS:
        m = Machine(config)
        _LAYOUTS[key] = m.layout
        m.close()
    return _LAYOUTS[key]


configs = st.builds(BootConfig, cpus=st.sampled_from([1, 2, 4, 8, 12]),
                    isolation=st.sampled_from(["none", "none", "none", "snp", "vbs"]))


@st.composite
def host_cpus(draw, count: int):
    """CPUs in VP order, now and then with APIC ids moved, repeated or made up, NUMA ids mixed."""
    n = draw(st.one_of(st.just(count), st.integers(1, 40)))
    apic = st.one_of(st.integers(0, n + 1), st.integers(0, 2**32 - 1))
    numa = st.one_of(st.just(0), st.integers(0, 3), st.integers(0, 70))
    cpus = []
    for i in range(n):
        moved = draw(st.integers(0, 9)) == 0
        cpus.append(HostCpu(draw(apic) if moved else i, draw(numa) if draw(st.booleans()) else 0))
    return tuple(cpus)


@st.composite
def host_memory(draw, memory):
    mem = list(memory)
    i = draw(st.integers(0, len(mem) - 1))
    m = mem[i]
    field = draw(st.sampled_from(["base", "size", "numa_node", "igvm_type", "extra", "drop"]))
    if field == "base":
        mem[i] = dataclasses.replace(m, base=draw(st.sampled_from([0, m.base + 0x200000, max(0, m.base - 0x1000),
                                                                   1 << 40])))
    elif field == "size":
        mem[i] = dataclasses.replace(m, size=draw(st.sampled_from([0, m.size // 2, m.size + 0x200000, 1 << 45])))
    elif field == "numa_node":
        mem[i] = dataclasses.replace(m, numa_node=draw(st.integers(0, 70)))
    elif field == "igvm_type":
        mem[i] = dataclasses.replace(m, igvm_type=draw(st.integers(0, 5)))
    elif field == "extra":
        mem.append(HostMemory(draw(st.integers(0, 1 << 36)) & ~0xFFF, draw(st.integers(0, 1 << 30)) & ~0xFFF, 0, 0))
    elif len(mem) > 1:
        del mem[i]
    return tuple(mem)


@st.composite
def host_changes(draw, config: BootConfig, host):
    changes = {}
    for what in draw(st.sets(st.sampled_from(["cpus", "memory", "com3", "entropy"]), min_size=1)):
        if what == "cpus":
            changes["cpus"] = draw(host_cpus(config.cpus))
        elif what == "memory":
            changes["memory"] = draw(host_memory(host.memory))
        elif what == "com3":
            changes["com3"] = draw(st.booleans())
            changes["com3_speed"] = draw(st.sampled_from([0, 9600, 115200, 2**32 - 1]))
        else:
            changes["entropy"] = bytes(draw(st.sampled_from([0, 1, 64, 256, 257, 4000])))
    return changes


def _apic_ids_repeat(host) -> bool:
    ids = [c.apic_id for c in host.cpus]
    return len(set(ids)) != len(ids)


@given(data=st.data())
@fuzz_settings(100)
def _structured(data):
    config = data.draw(configs)
    lay = layout(config)
    base, _ = host_dt_for(config, lay)
    changes = data.draw(host_changes(config, base))
    host, blob = host_dt_for(config, lay, **changes)
    out = boot_case(config, host_dt=blob)
    if _apic_ids_repeat(host):  # two cpu nodes for one processor: never handed to Linux
        assert out.kind == "panic", out
    if out.kind == "handoff":
        check_handoff(out, ShimInputs.of(config, host))
    else:
        assert out.kind == "panic", out


def test_structured_host_device_trees():
    run_then_check_pristine(_structured)


@st.composite
def damaged(draw, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "word", "header", "truncate", "insert", "delete"]))
        if not b:
            break
        at = draw(st.integers(0, len(b) - 1))
        if kind == "flip":
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "word":
            at &= ~3
            value = draw(st.sampled_from([0, 1, 2, 3, 4, 9, 0xFFFFFFFF, 0x7FFFFFFF, len(b), len(b) + 4]))
            b[at:at + 4] = struct.pack(">I", value)
        elif kind == "header":
            word = draw(st.integers(0, 9))
            b[4 * word:4 * word + 4] = struct.pack(">I", draw(st.sampled_from(
                [0, 1, 2, 15, 16, 17, 18, 40, 0xFFFFFFFF, len(b), len(b) + 8, len(b) - 4])))
        elif kind == "truncate":
            del b[at:]
        elif kind == "insert":
            b[at & ~3:at & ~3] = draw(st.sampled_from([b"\0\0\0\x04", b"\0\0\0\x09", b"\0\0\0\x02", b"\0\0\0\x01x\0\0\0"]))
        else:
            del b[at & ~3:(at & ~3) + 4]
    return bytes(b)


@given(data=st.data())
@fuzz_settings(150)
def _damaged(data):
    config = data.draw(configs)
    lay = layout(config)
    _host, blob = host_dt_for(config, lay)
    bad = data.draw(damaged(blob))
    libfdt_verdict = fdt_check_full(bad, lay.region("parameters").size)
    out = boot_case(config, host_dt=bad)
    if libfdt_verdict != 0:
        assert out.kind == "panic" and out.message.startswith("malformed host device tree"), (libfdt_verdict, out)
    if out.kind == "handoff":
        # Whatever the damaged tree still says, the shim's own invariants hold: the e820 it
        # built from ShimParams and the CPU split of the CPUs it handed to Linux.
        numa = [n for _apic, n in out.result.handoff.dt["cpus"]]
        nodes = partition(numa) if out.result.linux.sidecar is not None else []
        e820 = [(e.addr, e.size, e.type) for e in out.result.handoff.e820]
        assert e820 == expected_e820(out.params, out.shim_base, nodes)
        check_cpus(out.result, nodes)
    else:
        assert out.kind == "panic", out


def test_damaged_host_device_tree_blobs():
    run_then_check_pristine(_damaged)
