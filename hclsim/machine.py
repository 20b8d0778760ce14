"""One simulated boot: builds the VTL2 image from a BootConfig, runs the boot shim on the BSP
until it jumps to the kernel, and hands over to the Linux stand-in's handoff check.
"""
import dataclasses
import hashlib
import time
from dataclasses import dataclass, field

from hclsim.boot import firmware, image as vtl_image
from hclsim.boot.elfimage import load_firmware_image
from hclsim.boot.host_dt import build_host_config, write_host_dt
from hclsim.boot.initrd import load_initrd
from hclsim.boot.kernel import load_kernel
from hclsim.config import BootConfig
from hclsim.cpu import engine as eng
from hclsim.cpu.cpuid import build_cpuid_table
from hclsim.cpu.fault import GuestFaultError, Symbolizer, fault_report
from hclsim.hv.hypervisor import INSTRUCTIONS_PER_100NS, Hypervisor
from hclsim.hv.partition import Partition
from hclsim.cpu import pool
from hclsim.cpu.exit_sites import VTL0_SITE_KINDS, find_exit_sites
from hclsim.boot.vtl0_guest import IMAGE_GPA, initial_state, load_vtl0_guest
from hclsim.hv.scheduler import STOP_ADDRESS, STOP_CRASH, STOP_IDLE, STOP_TIMEOUT, Scheduler
from hclsim.hv.vp import RUNNABLE, Vp
from hclsim.defs.platform import COM1_PORT, COM3_PORT
from hclsim.devices.bus import Bus
from hclsim.devices.uart16550 import Uart16550
from hclsim.kernel_stub import images as default_images
from hclsim.kernel_stub.handoff import HandoffRegs, check_handoff
from hclsim.kernel_stub.kernel import Kernel
from hclsim.sidecar import layout as sl
from hclsim.sidecar.partition import node_memory_bytes, partition

SERIAL_TAIL_LINES = 20


@dataclass
class BootResult:
    config: BootConfig
    image: object                    # boot.image.LoadedImage
    handoff: object                  # kernel_stub.handoff.Handoff
    regs: dict                       # BSP registers at the kernel entry
    serial: dict                     # UART name -> bytes
    shim_log: bytes
    counters: dict
    timings: dict
    hypercalls: list
    kernel: object
    initrd: object
    shim_path: str
    host_dt: bytes
    linux: object = None             # kernel_stub.kernel.Kernel: CPUs and the sidecar driver
    sidecar_summary: dict | None = None


@dataclass
class Machine:
    """Guest RAM, the hypervisor, one engine and the BSP, set up from a BootConfig."""
    config: BootConfig
    on_serial: object = None          # (uart name, bytes) -> None, for live console output
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        cfg = self.config.validated()
        t0 = time.perf_counter()
        self.kernel = load_kernel(cfg.kernel or default_images.default_kernel())
        self.initrd = None if cfg.no_initrd else load_initrd(cfg.initrd or default_images.default_initrd())
        self.shim_path = str(cfg.shim or firmware.build(firmware.SHIM))
        self.shim = load_firmware_image(self.shim_path, "boot shim")
        self.sidecar_path = None if cfg.no_sidecar else str(cfg.sidecar or firmware.build(firmware.SIDECAR))
        self.sidecar = None if self.sidecar_path is None else load_firmware_image(self.sidecar_path, "sidecar")
        self.timings["load_images_ms"] = (time.perf_counter() - t0) * 1e3

        t1 = time.perf_counter()
        initrd_bytes = self.initrd.data if self.initrd else b""
        nodes = partition([i * cfg.numa_nodes // cfg.cpus for i in range(cfg.cpus)]) if self.sidecar else []
        self.layout = vtl_image.plan_layout(cfg.vtl2_base, cfg.vtl2_size, self.kernel.span, self.kernel.alignment,
                                            self.shim.span, len(initrd_bytes),
                                            sidecar_size=self.sidecar.span if self.sidecar else 0,
                                            free_needed=node_memory_bytes(nodes))
        cfg.check_layout(self.layout.vtl2_base, self.layout.vtl2_size)   # RAM is never grown behind the user
        memory = cfg.memory
        host = build_host_config(cfg.cpus, cfg.numa_nodes, memory, self.layout.vtl2_base,
                                 self.layout.vtl2_size, bootargs=cfg.bootargs, com3=cfg.com3)
        if cfg.host_cpu_order is not None:
            host = dataclasses.replace(host, cpus=tuple(host.cpus[i] for i in cfg.host_cpu_order))
        self.host_dt = write_host_dt(host)
        self.hv = Hypervisor(None, list(range(cfg.cpus)), cfg.isolation_type)
        # The host's bus: what VTL2 code reaches by port I/O (the VTL0 guest's devices sit on the
        # VP loop's bus, sidecar/vp_loop.py). COM3 is the shim's console, there even with
        # --no-com3, which keeps it out of the host device tree only; COM1 takes what VTL2 code
        # writes to 0x3F8 (nothing shipped does).
        self.bus = Bus("host")
        self.serial = {}
        for name, port in (("COM3", COM3_PORT), ("COM1", COM1_PORT)):
            self.bus.add(Uart16550(name, port, sink=self._uart_output))
            self.serial[name] = bytearray()
        self.mem, self.engine = pool.acquire(
            memory, build_cpuid_table(cfg.isolation_type, cfg.cpus), io_handler=None,
            hypercall_handler=lambda e: self.hv.hypercall(e, e.current_vp.index))
        self.bus.attach(self.engine)
        self.hv.mem = self.mem
        self.engine.attach_hypervisor(self.hv)
        self.image = vtl_image.write_image(
            self.mem, self.layout, shim=self.shim, kernel=self.kernel, initrd=initrd_bytes,
            host_dt=self.host_dt, isolation=cfg.isolation_type, cmdline_policy=cfg.cmdline_policy_value,
            static_cmdline=cfg.static_cmdline, sidecar=self.sidecar)
        self.symbolize = Symbolizer()
        images = [("shim", self.image.shim_base, self.shim)]
        if self.sidecar is not None:
            # The sidecar runs from its high alias (PML4 slot 511) once it has switched page tables.
            images.append(("sidecar", sl.IMAGE_VA, self.sidecar))
        msr_sites, pause_sites, digest = {}, {}, hashlib.sha256()
        for name, base, img in images:
            self.symbolize.add(name, base, img)
            for seg in img.segments:
                digest.update(base.to_bytes(8, "little") + seg.vaddr.to_bytes(8, "little") + seg.data)
                if seg.executable:
                    for addr, kind in find_exit_sites(seg.data, base + seg.vaddr).items():
                        if kind in ("pause", "irq-window"):
                            pause_sites[addr] = kind
                        else:
                            msr_sites[addr] = kind
        vtl0_sites = {}
        self.vtl0_guest = None
        if cfg.vtl0_guest:
            vtl0_image = load_firmware_image(firmware.build(firmware.VTL0_GUEST), "VTL0 test guest")
            self.vtl0_guest = load_vtl0_guest(self.mem, vtl0_image, cfg.cpus, self.layout.vtl2_base,
                                              cmdline=cfg.vtl0_cmdline, tpm=cfg.tpm)
            self.symbolize.add("vtl0", IMAGE_GPA, vtl0_image)
            for seg in vtl0_image.segments:
                digest.update(b"vtl0" + seg.vaddr.to_bytes(8, "little") + seg.data)
                if seg.executable:
                    vtl0_sites.update(find_exit_sites(seg.data, IMAGE_GPA + seg.vaddr, VTL0_SITE_KINDS))
        self.engine.load_code(digest.hexdigest())
        self.vps = [Vp(i, apic) for i, apic in enumerate(self.hv.apic_ids)]
        self.bsp = self.vps[0]
        self.bsp.set_long_mode(self.engine, self.image.bsp_context(), self.image.bsp_registers())
        self.bsp.state = RUNNABLE
        self.scheduler = Scheduler(self.engine, self.hv, self.vps, msr_sites, pause_sites, {self.image.kernel_entry},
                                   vtl0_sites)
        self.partition = Partition(self.mem, self.hv, self.vps, self.scheduler)
        if self.vtl0_guest is not None:
            for i in range(cfg.cpus):
                self.partition.set_vtl0_state(i, initial_state(self.vtl0_guest, i, cfg.vtl0_iterations))
        self.timings["build_image_ms"] = (time.perf_counter() - t1) * 1e3

    # ---- devices -------------------------------------------------------------------------
    def _uart_output(self, name: str, data: bytes) -> None:
        self.serial[name] += data
        if self.on_serial is not None:
            self.on_serial(name, data)

    def serial_tail(self, name: str = "COM3", lines: int = SERIAL_TAIL_LINES) -> list[str]:
        text = bytes(self.serial[name]).decode("utf-8", "replace")
        return text.splitlines()[-lines:]

    # ---- running -------------------------------------------------------------------------
    def _stop_error(self, stop) -> GuestFaultError:
        """The guest error for a scheduler stop that is not the kernel handoff."""
        if stop.reason == STOP_CRASH:
            title = "boot shim panic" if stop.vp is self.bsp else f"VP {stop.vp.index} panic"
            return self._fail(title, stop.exit)
        if stop.reason == STOP_TIMEOUT:
            return self._fail("guest timeout", stop.exit, f"no kernel handoff within {self.config.timeout:g} s")
        if stop.reason == STOP_IDLE:
            bsp_exit = eng.VpExit(eng.EXIT_HLT, self.engine.reg("rip"))
            return self._fail("guest halted", bsp_exit, "the BSP halted before reaching the kernel")
        if stop.reason == STOP_ADDRESS:
            return self._fail("guest fault", stop.exit, f"VP {stop.vp.index} jumped to the kernel entry")
        return self._fail("guest fault", stop.exit, stop.detail)

    def _fail(self, title: str, exit, detail: str = "") -> GuestFaultError:
        err = fault_report(title, self.engine, exit, self.symbolize, self.serial_tail(), detail)
        err.serial = {k: bytes(v) for k, v in self.serial.items()}  # nothing the guest said is lost
        err.shim_log = vtl_image.read_shim_log(self.mem, self.image)
        return err

    def run_to_handoff(self) -> BootResult:
        """Run the boot shim until it enters the kernel; raise GuestFaultError on a fault/crash."""
        t0 = time.perf_counter()
        stop = self.scheduler.run(timeout=self.config.timeout)
        if stop.reason != STOP_ADDRESS or stop.vp is not self.bsp:
            raise self._stop_error(stop)
        self.timings["shim_to_handoff_ms"] = (time.perf_counter() - t0) * 1e3
        return self.take_handoff()

    def take_handoff(self) -> BootResult:
        """The Linux stand-in takes over from the BSP, which stands at the kernel entry: check the
        handoff as Linux would (raises on a bad one) and start the stand-in kernel."""
        t1 = time.perf_counter()
        regs = self.engine.registers()
        handoff_regs = HandoffRegs(**{k: regs[k] for k in ("rip", "rdi", "rsi", "rsp", "cr0", "cr3", "cr4",
                                                            "efer", "cs", "ds", "ss")})
        lay = self.image.layout
        handoff = check_handoff(self.mem, handoff_regs, kernel_entry=self.image.kernel_entry,
                                vtl2_base=lay.vtl2_base, vtl2_size=lay.vtl2_size,
                                initrd=self.initrd.data if self.initrd else None)
        self.timings["handoff_check_ms"] = (time.perf_counter() - t1) * 1e3
        self.linux = Kernel(self.partition, handoff)
        counters = self.engine.counters()
        counters.update(msr_exits=self.scheduler.msr_exits + counters["msr_fast_exits"], hypercalls=len(self.hv.hypercall_log),
                        vp_switches=self.scheduler.switches, ipis=self.hv.ipis_sent)
        return BootResult(self.config, self.image, handoff, regs, {k: bytes(v) for k, v in self.serial.items()},
                          vtl_image.read_shim_log(self.mem, self.image), counters, dict(self.timings),
                          list(self.hv.hypercall_log), self.kernel, self.initrd, self.shim_path, self.host_dt,
                          self.linux, sidecar_summary(self.linux, handoff))

    def use_engine_per_vp(self) -> None:
        """Benchmark baseline: from now on every VP not yet run gets its own new engine."""
        main = self.engine
        def factory():
            engine = eng.Engine(self.mem, main.cpuid_table, io_handler=None, hypercall_handler=main.hypercall_handler)
            self.bus.attach(engine)
            engine.attach_hypervisor(self.hv)
            return engine
        self.scheduler.engine_factory = factory
        self.scheduler.vp_engines[self.bsp.index] = main

    def close_vp_engines(self) -> None:
        for engine in self.scheduler.vp_engines.values():
            if engine is not self.engine:
                engine.close()
        self.scheduler.vp_engines.clear()

    def run_to(self, address: int, timeout: float = 60.0):
        """Run until some VP is about to execute address (a breakpoint); the scheduler's stop."""
        before = set(self.scheduler.stop_addresses)
        self.scheduler.set_stop_addresses(before | {address})
        try:
            return self.scheduler.run(timeout=timeout)
        finally:
            self.scheduler.set_stop_addresses(before)

    @property
    def sidecar_entry(self) -> int | None:
        """Where the shim calls the sidecar (its identity-mapped entry), if one is loaded."""
        return None if self.sidecar is None else self.layout.region("sidecar").start + self.sidecar.entry

    def run_sidecar(self, until=None, timeout: float = 30.0):
        """Run the sidecar CPUs (after the handoff) until until() holds or nothing can run."""
        return self.scheduler.run(until=until, timeout=timeout)

    def close(self) -> None:
        if self.engine is not None:
            pool.release(self.mem, self.engine)
            self.engine = None

    def save_snapshot(self, path) -> dict:
        """Save the whole machine to path (hclsim.snapshot); returns the snapshot's header."""
        from hclsim import snapshot
        return snapshot.save(self, path)

    @classmethod
    def from_snapshot(cls, path, on_serial=None, **images) -> "Machine":
        """A new machine that continues where the snapshot at path was taken."""
        from hclsim import snapshot
        return snapshot.restore(path, on_serial=on_serial, **images)


def sidecar_summary(linux, handoff) -> dict | None:
    """Nodes, per-CPU status and bring-up time of the sidecar, as the report shows them."""
    if linux.sidecar is None:
        return None
    t = handoff.dt.get("reftimes", {})
    start, end = t.get("reftime_sidecar_start", 0), t.get("reftime_sidecar_end", 0)
    nodes = []
    for node in linux.sidecar.nodes:
        nodes.append({"index": node.index, "control_page": node.control_gpa, "base_cpu": node.base_cpu,
                      "cpu_count": node.cpu_count, "shmem_base": node.shmem_base, "shmem_size": node.shmem_size,
                      "cpu_status": [sl.CPU_STATUS_NAMES.get(int(s), str(int(s))) for s in node.status]})
    # Guest time is the instruction count / 100 (hv/hypervisor.py), so this is exact to 100.
    return {"nodes": nodes, "bring_up_reftime_100ns": end - start,
            "bring_up_instructions": (end - start) * INSTRUCTIONS_PER_100NS,
            "idle_cpus": sum(st == "IDLE" for n in nodes for st in n["cpu_status"]),
            "linux_cpus": sorted(linux.cpus.online)}


def boot(config: BootConfig, on_serial=None) -> BootResult:
    machine = Machine(config, on_serial=on_serial)
    try:
        return machine.run_to_handoff()
    finally:
        machine.close()

