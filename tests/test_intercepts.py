"""The I/O intercept message's fast path (one struct.pack) is byte for byte what the defs/hvdef.py
ctypes structs give, at every I/O exit of a real VTL0 run."""
from hclsim.config import BootConfig
from hclsim.devices import vtl0_test
from hclsim.hv import intercepts
from hclsim.machine import Machine
from hclsim.sidecar.vp_loop import LinuxVpRunner


def test_fast_io_message_is_the_ctypes_one(monkeypatch):
    machine = Machine(BootConfig(cpus=1, vtl0_iterations=3))
    try:
        machine.run_to_handoff()
        seen = []
        fast = intercepts.io_port

        def both(engine, vp):
            a, b = fast(engine, vp), intercepts.io_port_ctypes(engine, vp)
            seen.append((a, b))
            return a
        monkeypatch.setattr(intercepts, "io_port", both)
        runner = LinuxVpRunner(machine.partition, 0, vtl0_test.TestDevices(1))
        while runner.step() is not None:
            pass
        assert len(seen) > 20                              # COM1 characters, test port, loop, power off
        for a, b in seen:
            assert a == b
        assert {intercepts.parse(a)["port"] for a, _ in seen} >= {0x3F8, 0x440, 0x444, 0x404}
    finally:
        machine.close()


def test_fast_io_parse_reads_the_ctypes_fields():
    import ctypes
    from hclsim.defs import hvdef
    m = hvdef.HvX64IoPortInterceptMessage()
    m.header.vp_index, m.header.instruction_length_cr8, m.header.intercept_access_type = 7, 0x32, 1
    m.header.rip, m.header.rflags, m.port_number, m.access_info, m.rax = 0x200123, 0x246, 0x444, 0x14, 0xDEADBEEF
    msg = bytes(ctypes.c_uint32(hvdef.HvMessageType.X64IoPortIntercept)) + bytes(12) + bytes(m)
    got = hvdef.parse_intercept(msg)
    assert got == {"type": hvdef.HvMessageType.X64IoPortIntercept, "vp": 7, "instruction_length": 2, "access": 1,
                   "rip": 0x200123, "rflags": 0x246, "port": 0x444, "size": 4, "rax": 0xDEADBEEF}
