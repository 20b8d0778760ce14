"""RUN_VP by doorbell answered in the engine (cpu/runvp_fastpath.py): the same pages, byte for
byte, as the Python path leaves at every exit, and correct hand-backs of the engine when
something else needs it (another CPU ringing, a thread waiting for the CPU lock, a slow VMM)."""
import logging
import threading
import time

import pytest

from hclsim.config import BootConfig
from hclsim.cpu import runvp_fastpath
from hclsim.defs import kabi
from hclsim.devices import vtl0_test
from hclsim.hcl import vp as hcl_vp
from hclsim.kernel_stub.mshv import InProcessVtl, Mshv
from hclsim.machine import Machine

ITERATIONS = 300


def _run(cpus: int = 1, iterations: int = ITERATIONS, record=None, during=None, **config):
    """The worker's VP loop as threads of this process on the kernel driver, until power off.
    Returns (devices, per-CPU exits, the engine's counters, the learned sites)."""
    m = Machine(BootConfig(cpus=cpus, vtl0_iterations=iterations, **config))
    try:
        m.run_to_handoff()
        assert sorted(m.linux.cpus.online) == list(range(cpus))
        mshv = Mshv(m.linux.partition, m.linux.cpus, m.linux.sidecar, lambda _text, _level=6: None)
        for cpu in range(cpus):
            mshv.prime(cpu)
        holder = {}
        devices = vtl0_test.TestDevices(cpus, on_power_off=lambda: holder["loop"].stop())
        loop = holder["loop"] = hcl_vp.VpLoop(InProcessVtl(mshv), [], devices.bus, logging.getLogger("test"))
        if record is not None:
            real = loop.complete

            def recording(cpu, msg, regs):
                run = loop._run_pages[cpu]
                record.append((cpu, bytes(run[kabi.RUN_EXIT_MESSAGE:kabi.RUN_EXIT_MESSAGE + 256]),
                               bytes(run[kabi.RUN_CONTEXT:kabi.RUN_CONTEXT + 128])))
                return real(cpu, msg, regs)
            loop.complete = recording
        threads = [threading.Thread(target=loop.run, args=(cpu, True)) for cpu in range(cpus)]
        for t in threads:
            t.start()
        stop = threading.Event()
        helper = threading.Thread(target=during, args=(mshv, stop)) if during else None
        if helper:
            helper.start()
        for t in threads:
            t.join(60)
        stop.set()
        if helper:
            helper.join(10)
        assert not any(t.is_alive() for t in threads)
        counters = m.engine.runvp.counters()
        exits = {cpu: loop.stats[cpu].exits for cpu in range(cpus)}
        assert exits == {cpu: mshv.run_counts[cpu] for cpu in range(cpus)}     # each exit answered once
        sites = int(m.engine.runvp.buf[runvp_fastpath.A_NSITES])
        mshv.close()
        return devices, exits, counters, sites
    finally:
        m.close()


def test_engine_answers_the_loop_and_leaves_the_python_paths_pages(monkeypatch):
    native = []
    devices, exits, counters, sites = _run(record=native)
    assert all(devices.finished(cpu) for cpu in (0,))
    assert devices.loop.writes == ITERATIONS
    assert counters["runvp_fast_exits"] >= ITERATIONS      # the loop's OUTs, after each site's first
    assert sites >= 2

    real_arm = runvp_fastpath.RunVpFastPath.arm

    def python_only(self, vp, run):      # armed, then not: every hook declines
        real_arm(self, vp, run)
        self.buf[runvp_fastpath.A_ARMED] = 0
    monkeypatch.setattr(runvp_fastpath.RunVpFastPath, "arm", python_only)
    python = []
    devices2, exits2, counters2, _ = _run(record=python)
    assert counters2["runvp_fast_exits"] == 0
    assert exits2 == exits and devices2.com1 == devices.com1
    assert len(native) == len(python) == exits[0]
    for i, (a, b) in enumerate(zip(native, python)):
        assert a == b, f"exit {i}: the engine's pages differ from the Python path's"


def test_another_cpu_ringing_takes_the_engine_back_in_turn():
    devices, exits, counters, _ = _run(cpus=2, no_sidecar=True)
    assert devices.finished(0) and devices.finished(1)
    assert devices.loop.writes == 2 * ITERATIONS
    assert counters["runvp_fast_exits"] > 0 and counters["runvp_bails"] > 0
    assert exits[0] == exits[1]


def test_a_thread_waiting_for_the_cpu_lock_gets_it():
    got = []

    def reader(mshv, stop):       # GET_VP_REGISTERS from another thread, as the worker's MSR path does
        while not stop.is_set():
            t0 = time.perf_counter()
            mshv.get_registers(0, [0x00020000])      # HvRegister.Rax
            got.append(time.perf_counter() - t0)
            time.sleep(0.0005)
    devices, exits, counters, _ = _run(iterations=3000, during=reader)
    assert devices.loop.writes == 3000
    assert len(got) > 5 and counters["runvp_bails"] > 0


def test_a_slow_vmm_finds_the_kernel_asleep_and_still_gets_answers(monkeypatch):
    real = hcl_vp.VpLoop.complete
    calls = [0]

    def slow(self, cpu, msg, regs):
        calls[0] += 1
        if calls[0] % 50 == 0:
            time.sleep(2 * runvp_fastpath.SPIN_NS / 1e9)    # past the engine's spin
        return real(self, cpu, msg, regs)
    monkeypatch.setattr(hcl_vp.VpLoop, "complete", slow)
    devices, exits, counters, _ = _run()
    assert devices.loop.writes == ITERATIONS
    assert counters["runvp_bails"] >= ITERATIONS // 50


@pytest.mark.parametrize("field", ["M_VP", "M_PORT", "M_RAX", "M_CODE", "M_RDI"])
def test_message_offsets_come_from_the_declaration(field):
    import ctypes
    from hclsim.defs import hvdef
    offsets = {"M_VP": 16, "M_PORT": 16 + hvdef.HvX64IoPortInterceptMessage.port_number.offset,
               "M_RAX": 16 + hvdef.HvX64IoPortInterceptMessage.rax.offset,
               "M_CODE": 16 + hvdef.HvX64IoPortInterceptMessage.instruction_bytes.offset,
               "M_RDI": 16 + ctypes.sizeof(hvdef.HvX64IoPortInterceptMessage) - 8}
    assert getattr(runvp_fastpath, field) == offsets[field]
