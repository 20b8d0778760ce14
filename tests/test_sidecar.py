"""The sidecar kernel on the simulated platform: node partitioning, fan-out AP start to IDLE,
the dispatch loop's commands, and conversion of sidecar CPUs into Linux CPUs."""
import random
import struct

import numpy as np
import pytest


from hclsim.config import BootConfig
from hclsim.kernel_stub.cpus import CpuOnlineError
from hclsim.machine import Machine, boot
from hclsim.sidecar import layout as sl
from hclsim.sidecar.client import SidecarError
from hclsim.sidecar.partition import partition

from hclsim.defs.hvdef import HvRegister
from hclsim.defs.platform import VTL0_HYPERCALL_STATUS

REG_RIP, REG_RAX, REG_CR0, REG_CR3 = HvRegister.Rip, HvRegister.Rax, HvRegister.Cr0, HvRegister.Cr3


VTL0_ITERATIONS = 3   # the VTL0 test guest's workload loop, kept short: these tests are about its steps


@pytest.fixture
def machine():
    m = Machine(BootConfig(cpus=12, vtl0_iterations=VTL0_ITERATIONS))
    result = m.run_to_handoff()
    yield m, result
    m.close()


@pytest.mark.parametrize("cpus,numa", [(8, 1), (33, 1), (64, 2), (97, 1), (40, 3)])
def test_nodes_match_the_partition_and_every_ap_is_idle(cpus, numa):
    r = boot(BootConfig(cpus=cpus, numa_nodes=numa))
    sc = r.linux.sidecar
    expected = partition([i * numa // cpus for i in range(cpus)])
    assert [(n.base_cpu, n.cpu_count) for n in sc.nodes] == [(e.base_vp, e.vp_count) for e in expected]
    for node in sc.nodes:
        status = list(node.status)
        assert status[0] == sl.CPU_REMOVED and status[1:] == [sl.CPU_IDLE] * (node.cpu_count - 1)
        assert node.control["request_vector"] == sl.DEFAULT_REQUEST_VECTOR
    base_vps = [e.base_vp for e in expected]
    assert f"boot_cpus={','.join(map(str, base_vps))}" in r.handoff.cmdline.split()
    assert sorted(r.linux.cpus.online) == base_vps
    assert r.sidecar_summary["idle_cpus"] == cpus - len(expected)
    t = r.handoff.dt["reftimes"]
    assert t["reftime_sidecar_start"] < t["reftime_sidecar_end"]


def test_node_memory_is_reserved_from_linux(machine):
    m, r = machine
    reserved = [(e.addr, e.addr + e.size) for e in r.handoff.e820 if e.type == 2]
    for node in r.linux.sidecar.nodes:
        assert any(a <= node.control_gpa and node.shmem_base + node.shmem_size <= b for a, b in reserved)
        assert node.shmem_size == node.cpu_count * 2 * 4096


@pytest.mark.parametrize("config,reason", [
    (dict(isolation="snp"), "isolated"), (dict(isolation="vbs"), "isolated"),
    (dict(static_cmdline="OPENHCL_SIDECAR=off"), "command line"),
    (dict(host_bootargs="OPENHCL_SIDECAR=off"), "command line"),
    (dict(cpus=2, numa_nodes=2), "one CPU"), (dict(no_sidecar=True), "no image"),
])
def test_sidecar_off(config, reason):
    r = boot(BootConfig(**config))
    assert r.linux.sidecar is None and r.sidecar_summary is None
    assert not any(w.startswith("boot_cpus=") for w in r.handoff.cmdline.split())
    assert sorted(r.linux.cpus.online) == list(range(r.config.cpus))


def test_boot_with_sidecar_is_deterministic():
    a, b = boot(BootConfig(cpus=48, numa_nodes=2)), boot(BootConfig(cpus=48, numa_nodes=2))
    assert a.serial == b.serial and a.counters["instructions"] == b.counters["instructions"]
    assert a.handoff.dtb == b.handoff.dtb


def _registers_request(names, vtl=0, values=None):
    head = struct.pack("<HBBH10x", len(names), vtl, 0, 0)
    assocs = b"".join(struct.pack("<I12xQQ", n, (values or {}).get(n, 0), 0) for n in names)
    return head + assocs


def _assocs(page, count):
    raw = bytes(np.asarray(page["request_data"]))
    return [struct.unpack_from("<I12xQQ", raw, 16 + 32 * i) for i in range(count)]


def test_get_and_set_vp_registers(machine):
    m, r = machine
    sc = r.linux.sidecar
    page = sc.run(3, sl.COMMAND_GET_VP_REGISTERS, _registers_request([REG_RIP, REG_CR0]))
    assert not page["has_error"]
    assert [(n, v) for n, v, _ in _assocs(page, 2)] == [(REG_RIP, m.vtl0_guest.entry), (REG_CR0, 0x80000031)]
    page = sc.run(3, sl.COMMAND_SET_VP_REGISTERS, _registers_request([REG_RAX, REG_RIP], values={REG_RAX: 0x1234, REG_RIP: 0x5000}))
    assert not page["has_error"]
    page = sc.run(3, sl.COMMAND_GET_VP_REGISTERS, _registers_request([REG_RAX, REG_RIP]))
    assert [v for _, v, _ in _assocs(page, 2)] == [0x1234, 0x5000]
    assert m.hv.vps[3].vtl0_registers[REG_RAX] == 0x1234
    assert 3 in sc.read_stopped(0) and sc.read_stopped(0) == []
    assert sc.node_of(3).cpu_status(3) == sl.CPU_IDLE


def test_register_command_errors(machine):
    m, r = machine
    sc = r.linux.sidecar
    page = sc.run(4, sl.COMMAND_GET_VP_REGISTERS, _registers_request([REG_RIP, 0x7777777]))
    assert page["has_error"] and sc.error_text(page)
    status = struct.unpack_from("<H", bytes(np.asarray(page["request_data"])), 4)[0]
    assert status == 0x0005  # HV_STATUS_INVALID_PARAMETER
    too_many = _registers_request([REG_RIP] * 32)
    page = sc.run(4, sl.COMMAND_GET_VP_REGISTERS, too_many[:16] + too_many[16:16 + 31 * 32])
    assert page["has_error"]
    assert sc.node_of(4).cpu_status(4) == sl.CPU_IDLE  # the CPU survives bad requests


def test_translate_gva(machine):
    m, r = machine
    sc = r.linux.sidecar
    request = struct.pack("<QQ", 0x1234, (0x10 << 56))  # VTL0 with the test guest's identity map
    page = sc.run(5, sl.COMMAND_TRANSLATE_GVA, request)
    assert not page["has_error"]
    status, result, gpa_page = struct.unpack_from("<H6xQQ", bytes(np.asarray(page["request_data"])))
    assert (status, result & 0xFFFFFFFF, gpa_page) == (0, 0, 0x1234)
    # VTL0 with paging on and an empty PML4: page not present
    m.hv.vps[5].vtl0_registers.update({REG_CR0: 0x80000011, REG_CR3: 0x100000})
    page = sc.run(5, sl.COMMAND_TRANSLATE_GVA, request)
    status, result, _ = struct.unpack_from("<H6xQQ", bytes(np.asarray(page["request_data"])))
    assert status == 0 and result & 0xFFFFFFFF == 1
    # VTL0 paging off again: identity


def test_removed_cpu_rejects_commands(machine):
    m, r = machine
    with pytest.raises(SidecarError, match="REMOVED"):
        r.linux.sidecar.start(0, sl.COMMAND_GET_VP_REGISTERS, _registers_request([REG_RIP]))


def test_online_sidecar_cpus_in_random_order(machine):
    m, r = machine
    linux, sc = r.linux, r.linux.sidecar
    cpus = [c for c in range(1, 12)]
    random.Random(7).shuffle(cpus)
    for cpu in cpus:
        ms = linux.cpus.online_cpu(cpu)
        assert ms > 0 and cpu in linux.cpus.online
        assert sc.node_of(cpu).cpu_status(cpu) == sl.CPU_REMOVED
        assert m.hv.vps[cpu].svr == 0xFF  # the sidecar software-disabled its APIC
    assert sorted(linux.cpus.online) == list(range(12))
    with pytest.raises(CpuOnlineError, match="already online"):
        linux.cpus.online_cpu(5)
    with pytest.raises(SidecarError, match="REMOVED"):
        sc.start(5, sl.COMMAND_GET_VP_REGISTERS, _registers_request([REG_RIP]))
    with pytest.raises(CpuOnlineError, match="does not exist"):
        linux.cpus.online_cpu(99)


# The VTL0 test guest's MMIO steps (boot/firmware/vtl0), worked out from the x86 rules by hand
# here: what each load leaves in the record, and every access the test device sees, in order.
VTL0_MMIO_INTERCEPTS = 13   # 32-bit load and store, 6 other loads, 5 other stores


def vtl0_com1(cpu: int) -> str:
    """What VP cpu's test guest writes on COM1."""
    return f"hello from VTL0 vp {cpu}\nvp {cpu} done\n"


def vtl0_intercepts(cpu: int, iterations: int = VTL0_ITERATIONS) -> list[tuple[str, int | None]]:
    """(message name, port of an I/O intercept) of every intercept VP cpu's test guest causes,
    in order: COM1 hello, CPUID, test port OUT and IN, the MMIO forms, RDMSR, HvCallPostMessage,
    the workload loop,
    COM1 "done", the power-off write."""
    hello, done = f"hello from VTL0 vp {cpu}\n", f"vp {cpu} done\n"
    return ([("io-port", 0x3F8)] * len(hello) + [("cpuid", None), ("io-port", 0x440), ("io-port", 0x440)]
            + [("unmapped-gpa", None)] * VTL0_MMIO_INTERCEPTS + [("msr", None), ("hypercall", None)]
            + [("io-port", 0x444)] * iterations + [("io-port", 0x3F8)] * len(done) + [("io-port", 0x404)])


def intercept_kinds(seen: list[dict]) -> list[tuple[str, int | None]]:
    from hclsim.defs.hvdef import message_name
    return [(message_name(msg["type"]), msg.get("port")) for msg in seen]


def check_vtl0_workload(cpu: int, rec, devices, iterations: int = VTL0_ITERATIONS) -> None:
    """The loop's record fields (against the Python model), its port and the power-off report."""
    from hclsim.devices.vtl0_test import loop_checksum
    assert rec["iterations"] == iterations and rec["checksum"] == loop_checksum(iterations)
    assert rec["hypercall_status"] == VTL0_HYPERCALL_STATUS      # the VMM completed the intercepted call
    assert devices.loop.writes == iterations and devices.loop.last == max(iterations - 1, 0)
    assert bytes(devices.com1).decode() == vtl0_com1(cpu)
    assert devices.finished(cpu) and devices.power.reported == {cpu}


def vtl0_mmio_expected(cpu: int) -> tuple[dict, list]:
    """(record fields, TestDevices.mmio_accesses) of the guest's MMIO steps on VP cpu (< 64)."""
    from hclsim.boot import vtl0_guest as g
    slot = g.MMIO_TEST_BASE + g.MMIO_STRIDE * cpu

    def read(off, size):  # the test device: (0xF00D0000 | offset) truncated to the size
        return ("read", slot + off, size, (0xF00D0000 | (slot + off - g.MMIO_TEST_BASE)) & ((1 << 8 * size) - 1))

    def value(off, size):
        return read(off, size)[3]

    q = g.MMIO_PATTERN64 ^ cpu
    record = {"mmio_value": value(g.MMIO_READ_OFF, 4),
              "mmio_zx8": value(g.MMIO_ZX8_OFF, 1),                                           # movzx ecx, byte
              "mmio_hi8": (g.MMIO_PRELOAD & ~0xFF00) | value(g.MMIO_HI8_OFF, 1) << 8,          # mov ch, byte
              "mmio_sx16": value(g.MMIO_SX16_OFF, 2),         # movsx rcx, word: positive, upper bits cleared
              "mmio_sx32": 0xFFFFFFFF00000000 | value(g.MMIO_SX32_OFF, 4),  # movsxd: 0xF00D.... is negative
              "mmio_u16": (g.MMIO_PRELOAD & ~0xFFFF) | value(g.MMIO_U16_OFF, 2),               # mov cx, word
              "mmio_u64": value(g.MMIO_LOAD64_OFF, 8)}
    accesses = [read(g.MMIO_READ_OFF, 4), ("write", slot + g.MMIO_WRITE_OFF, 4, 0xA5A50000 | cpu),
                read(g.MMIO_ZX8_OFF, 1), read(g.MMIO_HI8_OFF, 1), read(g.MMIO_SX16_OFF, 2),
                read(g.MMIO_SX32_OFF, 4), read(g.MMIO_U16_OFF, 2), read(g.MMIO_LOAD64_OFF, 8),
                ("write", slot + g.MMIO_STORE8_OFF, 1, q & 0xFF),             # r9b
                ("write", slot + g.MMIO_HI8_STORE_OFF, 1, (q >> 8) & 0xFF),   # ch
                ("write", slot + g.MMIO_IMM16_OFF, 2, 0x5AA5),
                ("write", slot + g.MMIO_IMM64_OFF, 8, 0xFFFFFFFFA5A5A5A5),   # imm32, sign-extended
                ("write", slot + g.MMIO_STORE64_OFF, 8, q)]
    assert len(accesses) == VTL0_MMIO_INTERCEPTS
    return record, accesses


def check_vtl0_mmio(cpu: int, rec, devices) -> None:
    record, accesses = vtl0_mmio_expected(cpu)
    assert {name: int(rec[name]) for name in record} == record
    assert devices.mmio_accesses == accesses
    assert devices.mmio_writes == [(gpa, value) for kind, gpa, size, value in accesses if kind == "write"]


def test_run_vp_runs_vtl0_through_its_intercepts(machine):
    from hclsim.hv import intercepts as ic
    from hclsim.defs.platform import VTL0_TEST_PORT_VALUE as TEST_PORT_VALUE
    from hclsim.sidecar.vp_loop import VpRunner
    from hclsim.devices.vtl0_test import TestDevices
    m, r = machine
    cpu = 6
    results = m.vtl0_guest.results(m.mem)
    runner = VpRunner(m.partition, r.linux.sidecar, cpu, TestDevices())
    seen = runner.run_until_halted(lambda: results[cpu]["done"] == 1)
    assert intercept_kinds(seen) == vtl0_intercepts(cpu)
    assert all(msg["vp"] == cpu for msg in seen)
    assert [msg["access"] for msg in seen if msg["type"] == ic.MSG_IO_PORT].count(ic.ACCESS_READ) == 1
    rec = results[cpu]
    assert rec["magic"] == 0x564F544C and rec["vp_index"] == cpu and rec["done"] == 1
    vendor = struct.pack("<3I", rec["cpuid_ebx"], rec["cpuid_ecx"], rec["cpuid_edx"])
    assert vendor == b"Microsoft Hv"
    assert rec["in_value"] == TEST_PORT_VALUE
    assert rec["mmio_value"] == 0xF00D0000 | (64 * cpu)
    assert runner.devices.port_writes == [(0x440, 0xC0DE0000 | cpu)]
    assert runner.devices.mmio_writes[0] == (0xFED00004 + 64 * cpu, 0xA5A50000 | cpu)
    check_vtl0_mmio(cpu, rec, runner.devices)
    check_vtl0_workload(cpu, rec, runner.devices)
    assert r.linux.sidecar.node_of(cpu).cpu_status(cpu) == sl.CPU_IDLE


def test_online_a_cpu_that_is_running_vtl0(machine):
    m, r = machine
    sc = r.linux.sidecar
    results = m.vtl0_guest.results(m.mem)
    from hclsim.sidecar.vp_loop import VpRunner
    from hclsim.devices.vtl0_test import TestDevices
    VpRunner(m.partition, sc, 7, TestDevices()).run_until_halted(lambda: results[7]["done"] == 1)
    sc.start(7, sl.COMMAND_RUN_VP)       # VTL0 is halted: this RUN_VP only ends with STOP
    m.run_sidecar(until=lambda: False, timeout=5)
    assert sc.node_of(7).cpu_status(7) == sl.CPU_RUN
    r.linux.cpus.online_cpu(7)           # stops it first, then converts it
    assert 7 in r.linux.cpus.online and sc.node_of(7).cpu_status(7) == sl.CPU_REMOVED


def test_baseline_engine_per_vcpu_mode_boots_the_same():
    """The benchmark baseline (one engine per VP) reaches the same state as the pooled engine."""
    m = Machine(BootConfig(cpus=8))
    try:
        m.use_engine_per_vp()
        r = m.run_to_handoff()
        assert len(m.scheduler.vp_engines) == 8
        assert r.sidecar_summary["idle_cpus"] == 7
        m.close_vp_engines()
    finally:
        m.close()


def test_response_ipi_reaches_the_linux_cpu(machine):
    m, r = machine
    sc = r.linux.sidecar
    node = sc.node_of(2)
    node.control["response_cpu"], node.control["response_vector"] = 0, 0xF3  # Linux CPU 0 (APIC id 0)
    sc.run(2, sl.COMMAND_GET_VP_REGISTERS, _registers_request([REG_RIP]))
    assert 0xF3 in m.hv.vps[0].irr


def test_attention_scan_numba_matches_twin():
    from hclsim.cpu.memory import GuestMemory
    from hclsim.sidecar.dispatch import AttentionScanner
    from hclsim.sidecar.client import SidecarNode

    def build():
        mem = GuestMemory(1 << 20)
        nodes = []
        for i, (base, count) in enumerate(((0, 4), (4, 3))):
            gpa = 0x10000 * (i + 1)
            cp = sl.view(mem, gpa, sl.control_page)
            cp["base_cpu"], cp["cpu_count"] = base, count
            nodes.append(SidecarNode(mem, i, gpa, gpa + 0x1000, count * 2 * 4096))
        scanner = AttentionScanner(mem, nodes, 7)
        for cpu in (1, 2, 5, 6):
            scanner.expect(cpu)
        nodes[0].status[:] = [sl.CPU_REMOVED, sl.CPU_IDLE, sl.CPU_RUN, sl.CPU_IDLE]
        nodes[1].status[:] = [sl.CPU_REMOVED, sl.CPU_REMOVED, sl.CPU_IDLE]
        nodes[0].control["needs_attention"] = 1
        nodes[1].control["needs_attention"] = 1
        return scanner, nodes
    results = []
    for twin in (False, True):
        scanner, nodes = build()
        first = scanner.poll(twin=twin)
        attention = [int(n.control["needs_attention"]) for n in nodes]
        second = scanner.poll(twin=twin)  # attention cleared: nothing new
        nodes[0].status[2] = sl.CPU_IDLE
        nodes[0].control["needs_attention"] = 1
        third = scanner.poll(twin=twin)
        results.append((first, attention, second, third))
    assert results[0] == results[1]
    assert results[0] == ([1, 5, 6], [0, 0], [], [2])


def test_vtl0_runs_on_the_bsp_and_prints_on_com1(machine):
    """Linux CPUs run VTL0 directly (mshv_vtl's RUN_VP): the BSP's test guest says hello on COM1."""
    from hclsim.sidecar.vp_loop import LinuxVpRunner, vtl0_runner
    from hclsim.devices.vtl0_test import TestDevices
    m, r = machine
    results = m.vtl0_guest.results(m.mem)
    runner = vtl0_runner(m.linux, 0, TestDevices())
    assert isinstance(runner, LinuxVpRunner)
    seen = runner.run_until_halted(lambda: results[0]["done"] == 1)
    assert bytes(runner.devices.com1) == b"hello from VTL0 vp 0\nvp 0 done\n"
    assert intercept_kinds(seen) == vtl0_intercepts(0)
    assert runner.step() is None                     # halted for good
    rec = results[0]
    assert rec["done"] == 1 and rec["vp_index"] == 0 and rec["mmio_value"] == 0xF00D0000
    assert runner.devices.port_writes == [(0x440, 0xC0DE0000)]
    check_vtl0_mmio(0, rec, runner.devices)
    check_vtl0_workload(0, rec, runner.devices)
    assert m.hv.vps[0].vtl == 2 and 0 in r.linux.cpus.online


def test_vtl0_state_moves_with_a_cpu_onlined_mid_run(machine):
    """The COM1 hello and three intercepts through the sidecar, then the CPU becomes a Linux CPU
    and VTL0 goes on there: the IN result the host wrote into the command page's context reaches
    VTL0."""
    from hclsim.hv import intercepts as ic
    from hclsim.defs.platform import VTL0_TEST_PORT_VALUE as TEST_PORT_VALUE
    from hclsim.sidecar.vp_loop import LinuxVpRunner, VpRunner, vtl0_runner
    from hclsim.devices.vtl0_test import TestDevices
    m, r = machine
    cpu = 5
    results = m.vtl0_guest.results(m.mem)
    devices = TestDevices()
    through_sidecar = VpRunner(m.partition, r.linux.sidecar, cpu, devices)
    hello = len(f"hello from VTL0 vp {cpu}\n")
    steps = vtl0_intercepts(cpu)
    first = [through_sidecar.step() for _ in range(hello + 3)]   # hello, CPUID, OUT, IN: IN's value is pending
    assert intercept_kinds(first) == steps[:hello + 3]
    assert [msg["access"] for msg in first[-2:]] == [ic.ACCESS_WRITE, ic.ACCESS_READ]
    r.linux.cpus.online_cpu(cpu)
    on_linux = vtl0_runner(m.linux, cpu, devices)
    assert isinstance(on_linux, LinuxVpRunner)
    rest = on_linux.run_until_halted(lambda: results[cpu]["done"] == 1)
    assert intercept_kinds(rest) == steps[hello + 3:]
    rec = results[cpu]
    assert rec["in_value"] == TEST_PORT_VALUE and rec["vp_index"] == cpu and rec["done"] == 1
    vendor = struct.pack("<3I", rec["cpuid_ebx"], rec["cpuid_ecx"], rec["cpuid_edx"])
    assert vendor == b"Microsoft Hv"
    assert devices.port_writes == [(0x440, 0xC0DE0000 | cpu)]
    check_vtl0_mmio(cpu, rec, devices)   # the loads' registers came through the Linux CPU's copy
    check_vtl0_workload(cpu, rec, devices)
