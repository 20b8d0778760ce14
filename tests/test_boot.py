"""The real boot shim on the simulated platform, through to a validated Linux handoff."""
import pytest

from hclsim.config import BootConfig
from hclsim.cpu.fault import GuestFaultError
from hclsim.machine import Machine, boot

FIXED_OPTIONS = ("rdinit=/underhill-init", "rootfstype=tmpfs", "panic=-1", "idle=halt")


@pytest.fixture(scope="module")
def default_boot():
    return boot(BootConfig())


def test_default_boot_reaches_a_valid_handoff(default_boot):
    r = default_boot
    h = r.handoff
    assert r.regs["rip"] == r.image.kernel_entry
    assert r.regs["rdi"] == 0 and r.regs["rsi"] == h.boot_params_gpa
    for option in FIXED_OPTIONS:
        assert option in h.cmdline.split()
    assert "console=ttyS2,115200" in h.cmdline.split()
    assert "OPENHCL_CONFIDENTIAL=1" not in h.cmdline
    assert len(h.dt["cpus"]) == 4
    assert h.initrd_size == len(r.initrd.data)
    serial = r.serial["COM3"].decode()
    assert serial.startswith("[INFO] ")
    assert all(line.startswith("[") for line in serial.splitlines())
    assert r.counters["instructions"] > 10_000
    assert r.counters["msr_exits"] >= 6
    assert any(code == 0x9A and status == 0 for _vp, code, status in r.hypercalls)
    # reference times are deterministic and ordered
    t = h.dt["reftimes"]
    assert t["reftime_boot_start"] <= t["reftime_sidecar_start"] <= t["reftime_sidecar_end"] <= t["reftime_boot_end"]
    # the shim's log ring holds what went to serial
    assert r.shim_log and r.shim_log.decode().splitlines()[0] == serial.splitlines()[0]


def test_e820_is_vtl2_only(default_boot):
    r = default_boot
    lay = r.image.layout
    ram = [e for e in r.handoff.e820 if e.type == 1]
    assert ram and all(lay.vtl2_base <= e.addr and e.addr + e.size <= lay.vtl2_base + lay.vtl2_size
                       for e in r.handoff.e820)
    reserved = {(e.addr, e.size) for e in r.handoff.e820 if e.type == 2}
    params = lay.region("parameters")
    assert any(a <= params.start and params.end <= a + s for a, s in reserved)


def test_boot_is_deterministic():
    a, b = boot(BootConfig(cpus=8)), boot(BootConfig(cpus=8))
    assert a.serial == b.serial
    assert a.counters["instructions"] == b.counters["instructions"]
    assert a.handoff.dtb == b.handoff.dtb
    assert a.handoff.boot_params == b.handoff.boot_params


@pytest.mark.parametrize("cpus,nodes", [(1, 1), (64, 2), (33, 3)])
def test_cpu_and_numa_layouts(cpus, nodes):
    r = boot(BootConfig(cpus=cpus, numa_nodes=nodes))
    dt_cpus = r.handoff.dt["cpus"]
    assert [apic for apic, _ in dt_cpus] == list(range(cpus))
    assert sorted({node for _, node in dt_cpus}) == list(range(nodes))


def _cmdline(**kw):
    return boot(BootConfig(**kw)).handoff.cmdline


def test_append_chosen_appends_host_bootargs_when_trusted():
    line = _cmdline(static_cmdline="OPENHCL_A=1", host_bootargs="OPENHCL_B=2")
    assert line.endswith("OPENHCL_A=1 OPENHCL_B=2")


def test_static_policy_ignores_host_bootargs():
    line = _cmdline(static_cmdline="OPENHCL_A=1", cmdline_policy="static", host_bootargs="OPENHCL_B=2")
    assert "OPENHCL_B" not in line and line.endswith("OPENHCL_A=1")


@pytest.mark.parametrize("isolation", ["vbs", "snp", "tdx"])
def test_isolated_vm_ignores_adversarial_host(isolation):
    hostile = "console=ttyS2 OPENHCL_CONFIDENTIAL_DEBUG=1"
    quiet = boot(BootConfig(isolation=isolation))
    attacked = boot(BootConfig(isolation=isolation, host_bootargs=hostile))
    assert attacked.handoff.cmdline == quiet.handoff.cmdline
    words = attacked.handoff.cmdline.split()
    assert "console=ttynull" in words and "OPENHCL_CONFIDENTIAL=1" in words
    assert not any(w.startswith("console=ttyS") for w in words)
    assert "OPENHCL_CONFIDENTIAL_DEBUG=1" not in words
    assert attacked.handoff.dt["isolation_type"] == isolation
    if isolation != "vbs":  # hardware-isolated: no shim serial output at all
        assert attacked.serial["COM3"] == b""


def test_confidential_debug_in_measured_line_trusts_host():
    r = boot(BootConfig(isolation="snp", static_cmdline="OPENHCL_CONFIDENTIAL_DEBUG=1", host_bootargs="OPENHCL_B=2"))
    assert r.handoff.cmdline.endswith("OPENHCL_CONFIDENTIAL_DEBUG=1 OPENHCL_B=2")


def test_no_com3_gives_console_ttynull():
    r = boot(BootConfig(com3=False))
    assert "console=ttynull" in r.handoff.cmdline.split()
    assert r.serial["COM3"] == b""
    assert r.shim_log  # the log ring still has everything


def _panic(machine) -> GuestFaultError:
    with pytest.raises(GuestFaultError) as info:
        machine.run_to_handoff()
    machine.close()
    return info.value


def test_initrd_crc_mismatch_panics():
    m = Machine(BootConfig())
    m.mem.write(m.image.initrd_gpa, b"\xff")
    err = _panic(m)
    assert "boot shim panic" in str(err) and "initrd CRC mismatch" in str(err)
    assert "[PANIC]" in err.report and "registers:" in err.report and "code:" in err.report


@pytest.mark.parametrize("isolation", ["none", "snp"])
def test_malformed_host_device_tree_panics(isolation):
    m = Machine(BootConfig(isolation=isolation))
    m.mem.write(m.image.host_dt_gpa, b"\xde\xad\xbe\xef")
    err = _panic(m)
    assert "malformed host device tree" in str(err)
    assert "[PANIC] malformed host device tree" in err.shim_log.decode()
    on_serial = "[PANIC] malformed host device tree" in err.serial["COM3"].decode()
    assert on_serial == (isolation == "none")  # a confidential VM's shim never writes serial


def test_vp_index_mismatch_panics():
    m = Machine(BootConfig(cpus=4, host_cpu_order=(0, 2, 1, 3)))
    assert "VP index" in str(_panic(m))


def test_boot_without_initrd():
    r = boot(BootConfig(no_initrd=True))
    assert (r.handoff.initrd_gpa, r.handoff.initrd_size) == (0, 0)


def test_64_numa_nodes_with_large_memory():
    r = boot(BootConfig(cpus=64, numa_nodes=64, memory=8 << 30))
    assert len({node for _, node in r.handoff.dt["cpus"]}) == 64


def test_real_distribution_kernel_and_initrd(real_kernel, real_initrd, real_kernel_version):
    """A Debian bzImage (compressed vmlinux inside) and its initramfs-tools initrd."""
    r = boot(BootConfig(kernel=str(real_kernel), initrd=str(real_initrd)))
    assert r.kernel.format == "bzimage" and real_kernel_version in (r.kernel.version or "")
    assert r.handoff.initrd_size == real_initrd.stat().st_size
    lay = r.image.layout
    assert lay.region("kernel").size >= r.kernel.span
    assert "initrd: " in r.serial["COM3"].decode() and "crc" in r.serial["COM3"].decode()


@pytest.mark.slow
def test_2048_vcpus_64_numa_nodes():
    r = boot(BootConfig(cpus=2048, numa_nodes=64, memory=4 << 30))
    cpus = r.handoff.dt["cpus"]
    assert len(cpus) == 2048 and len({n for _, n in cpus}) == 64
    assert "vp index check: 2048 cpus match" in r.serial["COM3"].decode()
    assert r.sidecar_summary["idle_cpus"] == 2048 - 64  # one base CPU per 32-CPU node is Linux's
    assert len(r.sidecar_summary["nodes"]) == 64


def test_too_many_cpus_in_host_device_tree_panics():
    from hclsim.boot.host_dt import HostCpu, read_host_dt, write_host_dt
    m = Machine(BootConfig())
    host = read_host_dt(m.host_dt)
    huge = type(host)(cpus=tuple(HostCpu(i, 0) for i in range(2049)), memory=host.memory, com3=True)
    m.mem.write(m.image.host_dt_gpa, write_host_dt(huge))
    err = _panic(m)
    assert "too many CPUs" in str(err)
    assert "[PANIC] too many CPUs" in err.serial["COM3"].decode()  # told on COM3 too


def test_smashed_stack_cookie_panics():
    from hclsim.boot.layout import STACK_COOKIE
    m = Machine(BootConfig())
    cookie_gpa = m.image.shim_base + m.shim.symbol("shim_stack_bottom")
    real_rdmsr = m.hv.rdmsr

    def rdmsr(engine, vp, index):  # the shim reads TIME_REF_COUNT once its stack is set up
        if m.mem.read_u32(cookie_gpa) == STACK_COOKIE:
            m.mem.write_u32(cookie_gpa, 0xBAD)
        return real_rdmsr(engine, vp, index)
    m.hv.rdmsr = rdmsr
    assert "stack cookie smashed" in str(_panic(m))
