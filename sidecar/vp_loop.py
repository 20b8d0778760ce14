"""Running a VP's VTL0 from the host, the way the VM worker's VP loop does it (reference
section 5): run until an intercept, emulate the intercepted instruction, write the VP's registers
back, run again. On a sidecar CPU each run is a RUN_VP command through the sidecar (VpRunner);
on a Linux CPU (the BSP, onlined CPUs) the host runs VTL0 directly, as mshv_vtl's RUN_VP does
(LinuxVpRunner). vtl0_runner() picks the right one.

The devices here are the VTL0 test guest's: COM1 output, the test port (0x440) and the MMIO test
range at 0xFED00000. Shared registers travel in the command page's cpu_context; RIP is private to
VTL0 and is set with SET_VP_REGISTERS.
"""
from dataclasses import dataclass, field

import numpy as np

from hclsim.hv import intercepts
from hclsim.cpu.cpuid import cpuid_lookup
from hclsim.hv.scheduler import VpRunError
from hclsim.defs.hvdef import GPR_NAMES, REGISTER_BY_NAME as HV_REGISTERS, HvRegister
from hclsim.sidecar import layout as sl
from hclsim.sidecar.client import registers_request

GPS = sl.CPU_CONTEXT_GPS
TEST_PORT, MMIO_BASE = 0x440, 0xFED00000
TEST_PORT_VALUE = 0x1234ABCD


@dataclass
class TestDevices:
    """What the VTL0 test guest talks to; records every access."""
    com1: bytearray = field(default_factory=bytearray)
    port_writes: list = field(default_factory=list)
    mmio_writes: list = field(default_factory=list)

    def port_in(self, port: int, size: int) -> int:
        return TEST_PORT_VALUE if port == TEST_PORT else (1 << (8 * size)) - 1

    def port_out(self, port: int, size: int, value: int) -> None:
        if port == 0x3F8:
            self.com1.append(value & 0xFF)
        else:
            self.port_writes.append((port, value))

    def mmio_read(self, gpa: int, size: int) -> int:
        return (0xF00D0000 | (gpa - MMIO_BASE)) if MMIO_BASE <= gpa < MMIO_BASE + 0x1000 else 0xFFFFFFFF

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        self.mmio_writes.append((gpa, value))


class VpRunner:
    """Runs VTL0 of one sidecar CPU until it halts (its last intercept is handled)."""

    def __init__(self, machine, sidecar, cpu: int, devices: TestDevices):
        self.machine, self.sidecar, self.cpu, self.devices = machine, sidecar, cpu, devices
        self.intercepts: list[dict] = []
        # GPRs are shared between the VTLs: the sidecar loads VTL0's from the command page on
        # every VTL return, so the VP's initial values start there (as the VMM sets a VP's
        # registers before its first run).
        initial = machine.hv.vps[cpu].vtl0_registers
        self._set_gps(sidecar.node_of(cpu).command_page(cpu),
                      {reg: initial.get(name, 0) for name, reg in GPR_NAMES.items() if reg in GPS})

    def _gps(self, page) -> dict:
        return dict(zip(GPS, (int(v) for v in np.asarray(page["cpu_context"]["gps"]))))

    def _set_gps(self, page, values: dict) -> None:
        gps = np.asarray(page["cpu_context"]["gps"])
        for name, value in values.items():
            gps[GPS.index(name)] = value & 0xFFFFFFFFFFFFFFFF

    def _set_rip(self, rip: int) -> None:
        page = self.sidecar.run(self.cpu, sl.COMMAND_SET_VP_REGISTERS, registers_request([(HvRegister.Rip, rip)]))
        if page["has_error"]:
            raise VpRunError(f"SET_VP_REGISTERS on CPU {self.cpu}: {self.sidecar.error_text(page)}")

    def step(self, done=None) -> dict | None:
        """One RUN_VP; handles its intercept. Returns the parsed intercept, or None if RUN_VP ended
        without one: done() became true while VTL0 ran (it then halts), so the host STOPped it."""
        sc = self.sidecar
        sc.start(self.cpu, sl.COMMAND_RUN_VP)
        finished = done or (lambda: False)

        def returned():
            sc._poll()
            return self.cpu in sc.completed or finished()
        self.machine.run_sidecar(until=returned)
        if self.cpu not in sc.completed:
            sc.stop(self.cpu)  # VTL0 is done (halted): preempt it with the request IPI
        sc.wait(self.cpu)
        page = sc.node_of(self.cpu).command_page(self.cpu)
        if page["has_error"]:
            raise VpRunError(f"RUN_VP on CPU {self.cpu}: {self.sidecar.error_text(page)}")
        if not np.asarray(page["request_data"])[0]:
            return None
        msg = intercepts.parse(bytes(np.asarray(page["intercept_message"])))
        self.intercepts.append(msg)
        regs = self._gps(page)
        updates = emulate(self.machine, self.cpu, self.devices, msg, regs)
        self._set_gps(page, updates)
        self._set_rip(msg["rip"] + msg["instruction_length"])
        return msg

    def run_until_halted(self, done, limit: int = 100) -> list[dict]:
        """step() until done() (the guest finished its work), then STOP the halted VTL0."""
        for _ in range(limit):
            if done():
                break
            if self.step(done) is None:
                break
        else:
            raise VpRunError(f"CPU {self.cpu}: VTL0 not finished after {limit} intercepts")
        return self.intercepts


class LinuxVpRunner:
    """Runs VTL0 of a Linux CPU until it halts: the host enters VTL0 itself and gets each
    intercept straight back (no sidecar in between); the VP's VTL0 registers are the
    hypervisor's copy (HvRegister names, as GET/SET_VP_REGISTERS see them)."""

    def __init__(self, machine, cpu: int, devices: TestDevices):
        self.machine, self.cpu, self.devices = machine, cpu, devices
        self.intercepts: list[dict] = []

    def step(self, done=None) -> dict | None:
        """One run of VTL0; handles its intercept. None if VTL0 halted instead."""
        m = self.machine
        raw = m.scheduler.run_external_vtl0(m.vps[self.cpu])
        if raw is None:
            return None
        msg = intercepts.parse(raw)
        self.intercepts.append(msg)
        regs = m.hv.vps[self.cpu].vtl0_registers
        values = {name: regs.get(reg, 0) for reg, name in GPR_NAMES.items()}
        for name, value in emulate(m, self.cpu, self.devices, msg, values).items():
            regs[HV_REGISTERS[name]] = value & 0xFFFFFFFFFFFFFFFF
        regs[HvRegister.Rip] = msg["rip"] + msg["instruction_length"]
        return msg

    run_until_halted = VpRunner.run_until_halted


def vtl0_runner(machine, cpu: int, devices: TestDevices):
    """The VP loop for cpu: through the sidecar if it is a sidecar CPU, directly on Linux CPUs."""
    linux = machine.linux
    if linux is None:
        raise VpRunError("the kernel has not taken the handoff yet")
    if cpu in linux.cpus.online:
        return LinuxVpRunner(machine, cpu, devices)
    if linux.sidecar is None or not any(n.owns(cpu) for n in linux.sidecar.nodes):
        raise VpRunError(f"no CPU {cpu}")
    return VpRunner(machine, linux.sidecar, cpu, devices)


def emulate(machine, cpu: int, devices: TestDevices, msg: dict, regs: dict) -> dict:
    """The register updates that complete the intercepted instruction (regs: GPRs by name)."""
    kind = msg["type"]
    if kind == intercepts.MSG_CPUID:
        table = machine.engine.state.cpuid_table
        a, b, c, d = cpuid_lookup(table, regs["rax"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF,
                                  machine.vps[cpu].apic_id)
        return {"rax": int(a), "rbx": int(b), "rcx": int(c), "rdx": int(d)}
    if kind == intercepts.MSG_IO_PORT:
        size = msg["size"]
        if msg["access"] == intercepts.ACCESS_READ:
            mask = (1 << (8 * size)) - 1
            return {"rax": (regs["rax"] & ~mask) | (devices.port_in(msg["port"], size) & mask)}
        devices.port_out(msg["port"], size, regs["rax"] & ((1 << (8 * size)) - 1))
        return {}
    if kind == intercepts.MSG_MSR:
        value = machine.hv.rdmsr(machine.engine, cpu, msg["msr"])
        return {"rax": value & 0xFFFFFFFF, "rdx": value >> 32}
    if kind == intercepts.MSG_UNMAPPED_GPA:
        # The test guest's MMIO instructions: `mov eax, [rax]` and `mov [rax], edi`.
        if msg["access"] == intercepts.ACCESS_READ:
            return {"rax": devices.mmio_read(msg["gpa"], 4)}
        devices.mmio_write(msg["gpa"], 4, regs["rdi"] & 0xFFFFFFFF)
        return {}
    raise VpRunError(f"unhandled intercept {kind:#x} on CPU {cpu}")

