"""boot.host_dt: the host device tree builds, survives dtc, and reads back to the same config."""
import subprocess

import pytest

from .tools import require

from hclsim.boot.host_dt import (HostConfig, HostCpu, HostDtError, HostMemory, build_host_config, read_host_dt,
                                 write_host_dt)
from hclsim.boot.layout import HOST_DT_MAX_SIZE, IGVM_MEMORY_TYPE_RAM, IGVM_MEMORY_TYPE_VTL2

MiB, GiB = 1 << 20, 1 << 30
VTL2_BASE, VTL2_SIZE = 128 * MiB, 64 * MiB


def dtc(args, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([require("dtc"), *args], input=data, capture_output=True, check=True)


def to_dts(blob: bytes) -> str:
    return dtc(["-I", "dtb", "-O", "dts"], blob).stdout.decode()


def test_dtc_decompiles_the_contract_format():
    config = build_host_config(4, 2, 1 * GiB, VTL2_BASE, VTL2_SIZE, bootargs="OPENHCL_X=1 quiet")
    text = to_dts(write_host_dt(config))
    for expected in (
        'compatible = "microsoft,hclsim-host";',
        "cpu@3 {", 'device_type = "cpu";', "reg = <0x03>;", 'status = "okay";',
        "memory@8000000 {", "reg = <0x00 0x8000000 0x00 0x4000000>;", "microsoft,igvm-type = <0x01>;",
        "memory@0 {", "memory@c000000 {", "memory@20000000 {",
        'bootargs = "OPENHCL_X=1 quiet";',
        'compatible = "microsoft,openhcl";', 'memory-allocation-mode = "host";', "entropy {",
        'compatible = "simple-bus";', 'compatible = "microsoft,vmbus";',
        'compatible = "x86-pio-bus";', "serial@3e8 {", 'compatible = "ns16550";', "reg = <0x3e8 0x08>;",
        "current-speed = <0x1c200>;",
    ):
        assert expected in text, expected


@pytest.mark.parametrize("cpus,numa", [(1, 1), (4, 1), (4, 2), (64, 2), (64, 64), (2048, 1), (2048, 2),
                                       (2048, 64)])
def test_round_trip(cpus, numa):
    config = build_host_config(cpus, numa, 1 * GiB, VTL2_BASE, VTL2_SIZE)
    blob = write_host_dt(config)
    assert len(blob) <= HOST_DT_MAX_SIZE
    assert read_host_dt(blob) == config
    text = to_dts(blob)
    assert text.count("\t\tcpu@") == cpus and f"cpu@{cpus - 1:x} {{" in text
    # dtc agrees: its decompile-recompile round trip reads back the same config.
    assert read_host_dt(dtc(["-q", "-I", "dts", "-O", "dtb"], to_dts(blob).encode()).stdout) == config


@pytest.mark.parametrize("cpus,numa", [(1, 1), (5, 2), (64, 64), (2048, 64), (2048, 3)])
def test_cpus_split_contiguously(cpus, numa):
    config = build_host_config(cpus, numa, 1 * GiB, VTL2_BASE, VTL2_SIZE)
    assert [c.apic_id for c in config.cpus] == list(range(cpus))
    nodes = [c.numa_node for c in config.cpus]
    assert nodes == sorted(nodes) and set(nodes) == set(range(numa))
    counts = [nodes.count(n) for n in range(numa)]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("numa,vtl2_node", [(1, 0), (2, 0), (3, 0), (64, 8)])
def test_memory_covers_ram_with_vtl2_carved_out(numa, vtl2_node):
    memory = 1 * GiB
    config = build_host_config(64, numa, memory, VTL2_BASE, VTL2_SIZE)
    ranges = sorted((m.base, m.base + m.size) for m in config.memory)
    assert ranges[0][0] == 0 and ranges[-1][1] == memory
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(m.base % (2 * MiB) == 0 and m.size % (2 * MiB) == 0 for m in config.memory)
    vtl2 = [m for m in config.memory if m.igvm_type == IGVM_MEMORY_TYPE_VTL2]
    assert [(m.base, m.size) for m in vtl2] == [(VTL2_BASE, VTL2_SIZE)]
    assert vtl2[0].numa_node == vtl2_node  # 64 nodes: 16 MiB each, 128 MiB is node 8's start
    assert {m.numa_node for m in config.memory} <= set(range(numa))


def test_vtl2_straddling_nodes_takes_the_node_of_its_base():
    config = build_host_config(2, 2, 256 * MiB, 126 * MiB, 4 * MiB)
    assert config.memory == (
        HostMemory(0, 126 * MiB, 0, IGVM_MEMORY_TYPE_RAM),
        HostMemory(126 * MiB, 4 * MiB, 0, IGVM_MEMORY_TYPE_VTL2),
        HostMemory(130 * MiB, 126 * MiB, 1, IGVM_MEMORY_TYPE_RAM),
    )


def test_no_com3_and_custom_fields_round_trip():
    config = HostConfig(cpus=(HostCpu(0, 0), HostCpu(8, 1)),
                        memory=(HostMemory(0, 64 * MiB, 0, IGVM_MEMORY_TYPE_VTL2),),
                        bootargs='a="b c" x=1', com3=False, entropy=b"\x01" * 32)
    blob = write_host_dt(config)
    assert "x86-pio-bus" not in to_dts(blob)
    assert "cpu@8 {" in to_dts(blob)  # unit address = APIC id
    assert read_host_dt(blob) == config
    fast = HostConfig(cpus=config.cpus, memory=config.memory, com3_speed=9600)
    assert read_host_dt(write_host_dt(fast)) == fast


def test_entropy_is_deterministic_64_bytes():
    a = build_host_config(1, 1, 256 * MiB, VTL2_BASE, VTL2_SIZE)
    b = build_host_config(1, 1, 256 * MiB, VTL2_BASE, VTL2_SIZE)
    assert len(a.entropy) == 64 and a.entropy == b.entropy and len(set(a.entropy)) > 16
    assert write_host_dt(a) == write_host_dt(b)


def test_too_big_for_the_parameter_region():
    config = build_host_config(2048, 64, 1 * GiB, VTL2_BASE, VTL2_SIZE)
    with pytest.raises(HostDtError, match="more than the 4096 bytes"):
        write_host_dt(config, max_size=4096)


@pytest.mark.parametrize("args,fragment", [
    ((0, 1, GiB, VTL2_BASE, VTL2_SIZE), "0 cpus"),
    ((2049, 1, GiB, VTL2_BASE, VTL2_SIZE), "2049 cpus"),
    ((4, 0, GiB, VTL2_BASE, VTL2_SIZE), "0 NUMA nodes"),
    ((128, 65, GiB, VTL2_BASE, VTL2_SIZE), "65 NUMA nodes"),
    ((4, 5, GiB, VTL2_BASE, VTL2_SIZE), "5 NUMA nodes"),
    ((4, 1, GiB + 4096, VTL2_BASE, VTL2_SIZE), "multiple of 2 MiB"),
    ((64, 64, 64 * MiB, 0, 2 * MiB), "too small"),
    ((4, 1, GiB, VTL2_BASE + 4096, VTL2_SIZE), "2 MiB aligned"),
    ((4, 1, GiB, VTL2_BASE, VTL2_SIZE + 4096), "2 MiB aligned"),
    ((4, 1, GiB, VTL2_BASE, 0), "2 MiB aligned"),
    ((4, 1, 128 * MiB, VTL2_BASE, VTL2_SIZE), "outside guest RAM"),
    ((4, 1, GiB, GiB - 2 * MiB, 4 * MiB), "outside guest RAM"),
])
def test_bad_configs_rejected(args, fragment):
    with pytest.raises(HostDtError) as exc:
        build_host_config(*args)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("blob", [b"", b"\0" * 64, b"\xd0\x0d\xfe\xed" + b"\0" * 60])
def test_read_rejects_garbage(blob):
    with pytest.raises(HostDtError, match="host device tree"):
        read_host_dt(blob)


def test_read_accepts_dtc_source():
    """A tree written by hand in DTS (not by write_host_dt) reads as expected."""
    dts = """/dts-v1/;
/ { #address-cells = <2>; #size-cells = <2>; compatible = "microsoft,hclsim-host";
  cpus { #address-cells = <1>; #size-cells = <0>;
    cpu@2 { device_type = "cpu"; reg = <2>; numa-node-id = <1>; status = "okay"; }; };
  memory@8000000 { device_type = "memory"; reg = <0 0x8000000 0 0x4000000>; numa-node-id = <1>;
                   microsoft,igvm-type = <1>; };
  chosen { bootargs = "x=y"; };
  openhcl { compatible = "microsoft,openhcl"; memory-allocation-mode = "host"; entropy { reg = [01 02 03]; }; };
};
"""
    config = read_host_dt(dtc(["-q", "-I", "dts", "-O", "dtb"], dts.encode()).stdout)
    assert config == HostConfig(cpus=(HostCpu(2, 1),), memory=(HostMemory(VTL2_BASE, VTL2_SIZE, 1, 1),),
                                bootargs="x=y", com3=False, entropy=b"\x01\x02\x03")
