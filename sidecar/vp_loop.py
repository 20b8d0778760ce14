"""Running a VP's VTL0 from the host, the way the VM worker's VP loop does it (reference
section 5): run until an intercept, emulate the intercepted instruction with the devices on the
VP loop's bus, write the VP's registers back, run again. On a sidecar CPU each run is a RUN_VP
command through the sidecar (VpRunner); on a Linux CPU (the BSP, onlined CPUs) the host runs VTL0
directly, as mshv_vtl's RUN_VP does (LinuxVpRunner). vtl0_runner() picks the right one.

The runners take the partition (hv/partition.py), not the machine, and the devices to complete
intercepts with: anything with a `bus` (devices/bus.py), e.g. devices/vtl0_test.TestDevices. Shared registers travel in
the command page's cpu_context; RIP is private to VTL0 and is set with SET_VP_REGISTERS.
"""
import numpy as np

from hclsim.cpu import mmio_emulate
from hclsim.defs.hvdef import GPR_NAMES, VTL0, HvCall, HvRegister, HvStatus
from hclsim.hv import intercepts
from hclsim.hv.scheduler import VpRunError
from hclsim.sidecar import layout as sl
from hclsim.sidecar.client import registers_request

GPS = sl.CPU_CONTEXT_GPS
VTL0_GPRS = tuple(GPR_NAMES.values())   # rax..r15, rip, rflags

class VpRunner:
    """Runs VTL0 of one sidecar CPU until it halts (its last intercept is handled)."""

    def __init__(self, partition, sidecar, cpu: int, devices):
        self.partition, self.sidecar, self.cpu, self.devices = partition, sidecar, cpu, devices
        self.intercepts: list[dict] = []
        # GPRs are shared between the VTLs: the sidecar loads VTL0's from the command page on
        # every VTL return, so the VP's initial values start there (as the VMM sets a VP's
        # registers before its first run).
        self._set_gps(sidecar.node_of(cpu).command_page(cpu),
                      partition.registers(cpu, VTL0, [n for n in GPS if n in VTL0_GPRS]))

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
            sc.poll()
            return self.cpu in sc.completed or finished()
        self.partition.run(until=returned)
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
        updates = emulate(self.partition, self.cpu, self.devices, msg, regs)
        self._set_gps(page, updates)
        self._set_rip(msg["rip"] + msg["instruction_length"])
        return msg

    def run_until_halted(self, done, limit: int | None = None) -> list[dict]:
        """step() until the guest has finished its work, then on until VTL0 halts (STOPped there
        on a sidecar CPU); every intercept on the way is handled. Finished: done() (the guest's
        word, e.g. its record's done flag) and, when the devices can tell (devices.finished(cpu):
        the VTL0 test guest's power-off write, its last intercept, which comes after its record's
        done), theirs. limit: VpRunError after that many intercepts (None: no limit). Returns
        every intercept this runner has handled."""
        reported = getattr(self.devices, "finished", None)
        finished = done if reported is None else (lambda: done() and reported(self.cpu))
        count = 0
        for until in (finished, None):        # to its end, then into its hlt loop
            while until is None or not until():
                if self.step(until) is None:
                    break
                count += 1
                if limit is not None and count > limit:
                    raise VpRunError(f"CPU {self.cpu}: VTL0 not halted after {limit} intercepts")
        return self.intercepts


class LinuxVpRunner:
    """Runs VTL0 of a Linux CPU until it halts: the host enters VTL0 itself and gets each
    intercept straight back (no sidecar in between); VTL0's registers are read and written
    through the partition."""

    def __init__(self, partition, cpu: int, devices):
        self.partition, self.cpu, self.devices = partition, cpu, devices
        self.intercepts: list[dict] = []

    def step(self, done=None) -> dict | None:
        """One run of VTL0; handles its intercept. None if VTL0 halted instead."""
        p = self.partition
        raw = p.run_vtl0(self.cpu)
        if raw is None:
            return None
        msg = intercepts.parse(raw)
        self.intercepts.append(msg)
        updates = emulate(p, self.cpu, self.devices, msg, p.registers(self.cpu, VTL0, VTL0_GPRS))
        updates["rip"] = msg["rip"] + msg["instruction_length"]
        p.set_registers(self.cpu, updates, vtl=VTL0)
        return msg

    run_until_halted = VpRunner.run_until_halted


def vtl0_runner(linux, cpu: int, devices):
    """The VP loop for cpu of the booted stand-in kernel (kernel_stub.kernel.Kernel, None before
    the handoff): through the sidecar if it is a sidecar CPU, directly on Linux CPUs."""
    if linux is None:
        raise VpRunError("the kernel has not taken the handoff yet")
    if cpu in linux.cpus.online:
        return LinuxVpRunner(linux.partition, cpu, devices)
    if linux.sidecar is None or not any(n.owns(cpu) for n in linux.sidecar.nodes):
        raise VpRunError(f"no CPU {cpu}")
    return VpRunner(linux.partition, linux.sidecar, cpu, devices)


def emulate(partition, cpu: int, devices, msg: dict, regs: dict) -> dict:
    """The register updates that complete the intercepted instruction (regs: GPRs by name), with
    the devices on devices.bus and the CPUID/MSR answers of the partition."""
    kind = msg["type"]
    bus = devices.bus
    if kind == intercepts.MSG_CPUID:
        a, b, c, d = partition.cpuid(cpu, regs["rax"], regs["rcx"])
        return {"rax": a, "rbx": b, "rcx": c, "rdx": d}
    if kind == intercepts.MSG_IO_PORT:
        size = msg["size"]
        mask = (1 << (8 * size)) - 1
        if msg["access"] == intercepts.ACCESS_READ:
            return {"rax": (regs["rax"] & ~mask) | bus.pio_read(msg["port"], size)}
        bus.pio_write(msg["port"], size, regs["rax"] & mask)
        return {}
    if kind == intercepts.MSG_MSR:
        value = partition.rdmsr(cpu, msg["msr"])
        return {"rax": value & 0xFFFFFFFF, "rdx": value >> 32}
    if kind == intercepts.MSG_HYPERCALL:     # a VMBus hypercall: no connection is open here
        code = msg["control"] & 0xFFFF
        vmbus = code in (HvCall.PostMessage, HvCall.SignalEvent)
        return {"rax": int(HvStatus.InvalidConnectionId if vmbus else HvStatus.InvalidHypercallCode)}
    if kind == intercepts.MSG_UNMAPPED_GPA:
        # Decode the intercepted instruction (mov/movzx/movsx/movsxd, any size and addressing).
        access = mmio_emulate.decode(msg["instruction_bytes"], msg["rip"])
        if access.write != (msg["access"] == intercepts.ACCESS_WRITE) or access.length != msg["instruction_length"]:
            raise mmio_emulate.MmioEmulationError(
                f"CPU {cpu}: {access.text!r} at {msg['rip']:#x} does not match its intercept message "
                f"(access {msg['access']}, {msg['instruction_length']} bytes)")
        if access.write:
            bus.mmio_write(msg["gpa"], access.size, mmio_emulate.store_value(access, regs))
            return {}
        return mmio_emulate.complete_read(access, bus.mmio_read(msg["gpa"], access.size), regs)
    raise VpRunError(f"unhandled intercept {kind:#x} on CPU {cpu}")

