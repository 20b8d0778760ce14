"""Machine snapshots (hclsim.snapshot): a machine saved mid-boot, mid sidecar bring-up or after
the handoff and restored into a new Machine continues exactly as the original and as a run that
was never interrupted; bad files and different images are refused with one line."""
import numpy as np
import pytest

from hclsim import snapshot, snapshot_state
from hclsim.boot import firmware
from hclsim.config import BootConfig
from hclsim.cpu import fastpath, ram_pages
from hclsim.machine import Machine, boot
from hclsim.sidecar import layout as sl
from hclsim.testkit import guest_counters


def outcome(result) -> dict:
    """Everything a finished boot is compared on."""
    h = result.handoff
    return {"serial": result.serial, "shim_log": result.shim_log, "counters": guest_counters(result.counters),
            "dtb": h.dtb, "boot_params": h.boot_params, "cmdline": h.cmdline, "regs": result.regs,
            "hypercalls": result.hypercalls, "sidecar": result.sidecar_summary}


def shim_address(machine, symbol: str) -> int:
    return machine.image.shim_base + machine.shim.symbol(symbol)


def sidecar_address(machine, symbol: str) -> int:
    return sl.IMAGE_VA + machine.sidecar.symbol(symbol)  # the sidecar runs from its high alias


def test_mid_shim_snapshot_continues_like_an_uninterrupted_boot(hclsim_machine, hclsim_snapshot):
    reference = outcome(boot(BootConfig(cpus=8)))
    m = hclsim_machine(cpus=8)
    stop = m.run_to(shim_address(m, "sidecar_plan"))
    assert stop.vp is m.bsp
    path = hclsim_snapshot.save(m)
    info = hclsim_snapshot.info(path)
    assert info["point"] == "before-handoff" and info["loaded_vp"]["symbol"] == "shim:sidecar_plan"
    assert 0 < info["instructions"] < reference["counters"]["instructions"]
    original = outcome(m.run_to_handoff())
    restored = outcome(hclsim_snapshot.restore(path).run_to_handoff())
    assert restored == original == reference


def test_mid_sidecar_bring_up_with_64_cpus(hclsim_machine, hclsim_snapshot):
    reference = outcome(boot(BootConfig(cpus=64, numa_nodes=2)))
    m = hclsim_machine(cpus=64, numa_nodes=2)
    assert m.run_to(m.sidecar_entry).vp is m.bsp
    for _ in range(3):  # a few APs in ap_main, the rest not started or on their way
        stop = m.run_to(sidecar_address(m, "ap_main"))
    assert stop.vp is not m.bsp
    started = [vp.state for vp in m.vps].count("not-started")
    assert 0 < started < 63
    path = hclsim_snapshot.save(m)
    assert hclsim_snapshot.info(path)["loaded_vp"] == {"vp": stop.vp.index, "rip": stop.exit.rip,
                                                       "symbol": "sidecar:ap_main"}
    original = outcome(m.run_to_handoff())
    restored = outcome(hclsim_snapshot.restore(path).run_to_handoff())
    assert restored == original == reference
    assert restored["sidecar"]["idle_cpus"] == 62


@pytest.mark.slow
def test_mid_bring_up_with_1024_cpus_and_4_gib(hclsim_machine, hclsim_snapshot):
    config = dict(cpus=1024, numa_nodes=4, memory=4 << 30)
    reference = outcome(boot(BootConfig(**config)))
    m = hclsim_machine(**config)
    m.run_to(m.sidecar_entry)
    for _ in range(300):
        m.run_to(sidecar_address(m, "ap_main"))
    path = hclsim_snapshot.save(m)
    original = outcome(m.run_to_handoff())
    assert outcome(hclsim_snapshot.restore(path).run_to_handoff()) == original == reference


def _drive_linux(machine) -> dict:
    """Sidecar work after the handoff: VTL0 on CPU 5 through its intercepts, CPU 6 onlined."""
    from hclsim.sidecar.vp_loop import VpRunner
    from hclsim.devices.vtl0_test import TestDevices
    results = machine.vtl0_guest.results(machine.mem)
    runner = VpRunner(machine.partition, machine.linux.sidecar, 5, TestDevices())
    seen = runner.run_until_halted(lambda: results[5]["done"] == 1)
    assert results[5]["iterations"] == machine.config.vtl0_iterations == 5 and runner.devices.finished(5)
    machine.linux.cpus.online_cpu(6)
    return {"intercepts": seen, "record": bytes(results[5]), "online": sorted(machine.linux.cpus.online),
            "instructions": machine.engine.counters()["instructions"], "hypercalls": list(machine.hv.hypercall_log),
            "status": [bytes(n.status) for n in machine.linux.sidecar.nodes]}


def test_snapshot_after_the_handoff_keeps_the_linux_stand_in(hclsim_machine, hclsim_snapshot):
    m = hclsim_machine(cpus=12, vtl0_iterations=5)   # the snapshot's config keeps it
    m.run_to_handoff()
    m.linux.cpus.online_cpu(3)
    path = hclsim_snapshot.save(m)
    assert hclsim_snapshot.info(path)["point"] == "after-handoff"
    original = _drive_linux(m)
    r = hclsim_snapshot.restore(path)
    assert sorted(r.linux.cpus.online) == [0, 3]
    assert r.linux.handoff.dtb == m.linux.handoff.dtb
    assert _drive_linux(r) == original


def test_snapshot_of_a_fresh_machine_boots_like_the_original(hclsim_machine, tmp_path):
    m = hclsim_machine(cpus=4, isolation="vbs", host_bootargs="OPENHCL_X=1")
    path = tmp_path / "fresh.hclsnap"
    assert m.save_snapshot(path)["loaded_vp"] is None  # the Machine-level API
    restored = Machine.from_snapshot(path)
    try:
        assert restored.config == m.config
        assert outcome(restored.run_to_handoff()) == outcome(m.run_to_handoff())
    finally:
        restored.close()


def test_snapshot_stores_only_pages_with_data(hclsim_machine, hclsim_snapshot):
    m = hclsim_machine(cpus=4)
    m.run_to_handoff()
    present = ram_pages.present_pages(m.mem)
    # Never the whole GiB: at most what machines of this process touched before (pooled RAM is
    # zeroed in place, up to 256 MiB of pages; runs of the VTL0 guest touch its pages too).
    assert present.sum() <= present.size // 4
    path = hclsim_snapshot.save(m)
    info = hclsim_snapshot.info(path)
    assert 0 < info["ram_bytes"] < 8 << 20
    assert path.stat().st_size < 2 << 20


def test_data_runs_match_a_full_scan():
    from hclsim.cpu.memory import GuestMemory
    mem = GuestMemory(64 << 20)
    mem.write(0x1FFF, b"\x01\x02")                 # straddles pages 1 and 2
    mem.write(0x5000, b"\x03")
    mem.fill(0x100000, 0x10000, 0)                 # touched, but zero: not stored
    mem.write(0x3FFFFFF, b"\x04")                  # the last byte of RAM
    runs = ram_pages.data_runs(mem)              # before the full scan below touches every page
    assert runs == [(0x1000, 0x2000), (0x5000, 0x1000), (0x3FFF000, 0x1000)]
    nonzero = np.flatnonzero(mem.array().reshape(-1, 4096).any(axis=1))
    assert [p * 4096 for p in nonzero] == [a for start, size in runs for a in range(start, start + size, 4096)]


# ---- refusals -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "boot.hclsnap"
    m = Machine(BootConfig(cpus=2))
    try:
        m.run_to(m.image.shim_base + m.shim.symbol("sidecar_plan"))
        snapshot.save(m, path)
    finally:
        m.close()
    return path


def _one_line_error(path, **images) -> str:
    with pytest.raises(snapshot.SnapshotError) as info:
        snapshot.restore(path, **images)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("damage,expected", [
    (lambda raw: raw[:len(raw) // 2], "corrupt"),
    (lambda raw: raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:], "corrupt"),
    (lambda raw: b"\x7fELF" + raw[4:], "not an hclsim snapshot"),
    (lambda raw: b"", "not an hclsim snapshot"),
])
def test_damaged_file_is_one_clear_error(saved, tmp_path, damage, expected):
    bad = tmp_path / "bad.hclsnap"
    bad.write_bytes(damage(saved.read_bytes()))
    assert expected in _one_line_error(bad)


def test_missing_file(tmp_path):
    assert "cannot read snapshot" in _one_line_error(tmp_path / "nope.hclsnap")


def test_different_shim_is_refused(saved, tmp_path):
    shipped = firmware.build(firmware.SHIM).read_bytes()
    assert shipped.count(b"openhcl boot shim") == 1
    other = tmp_path / "other-shim.elf"
    other.write_bytes(shipped.replace(b"openhcl boot shim", b"openhcl boot shin"))
    message = _one_line_error(saved, shim=str(other))
    assert "different boot shim" in message and "same images" in message
    # the same image under another path is fine
    same = tmp_path / "same-shim.elf"
    same.write_bytes(shipped)
    m = snapshot.restore(saved, shim=str(same))
    try:
        assert m.run_to_handoff().handoff.cmdline
    finally:
        m.close()


def test_only_image_paths_can_be_replaced(saved):
    assert "only image paths" in _one_line_error(saved, cpus=4)


def test_state_from_a_different_hclsim_is_refused(saved, tmp_path):
    """A snapshot whose scheduler has state this hclsim's does not (written by another version)."""
    import hashlib
    import json
    import struct
    import zstandard
    header, blobs = snapshot._read(saved)
    parts = {name: blobs[start:start + length] for name, (start, length) in header["blobs"].items()}
    state = json.loads(zstandard.ZstdDecompressor().decompressobj().decompress(parts["state"]))
    state["scheduler"]["quantum"] = 5
    parts["state"] = zstandard.ZstdCompressor().compress(json.dumps(state).encode())
    pos = 0
    for name, blob in parts.items():
        header["blobs"][name] = [pos, len(blob)]
        pos += len(blob)
    head = json.dumps(header).encode()
    body = struct.pack("<I", len(head)) + head + b"".join(parts.values())
    other = tmp_path / "other-version.hclsnap"
    other.write_bytes(snapshot.MAGIC + hashlib.sha256(body).digest() + body)
    message = _one_line_error(other)
    assert "different hclsim" in message and "Scheduler" in message and "quantum" in message


# ---- what a snapshot covers -----------------------------------------------------------------

# Machine attributes Machine(config) rebuilds from the config and images, and those a snapshot
# restores: a new attribute must be added to one of them (and restored if it is run state).
MACHINE_REBUILT = {"config", "on_serial", "timings", "kernel", "initrd", "shim_path", "shim", "sidecar_path",
                   "sidecar", "layout", "host_dt", "hv", "mem", "engine", "image", "symbolize", "vtl0_guest",
                   "vps", "bsp", "scheduler", "bus", "partition"}
MACHINE_RESTORED = {"serial", "linux"}
# Engine attributes: hooks, handlers and caches set up by Engine()/Machine(), and restored state.
ENGINE_REBUILT = {"mem", "cpuid_table", "io_handler", "hypercall_handler", "after_run", "exits", "uc", "_uch",
                  "_reg_buf", "_reg_ptr", "state", "_stop_reason", "_fault", "code_signature", "pristine",
                  "sites", "site_handler", "_site_hooks", "_hv_tables", "long_mode_templates",
                  "_scratch", "_scratch_ptr", "_old_exception", "_batches", "runvp",
                  "exception_handler"}   # None in a machine (a real kernel sets its own, hclsim/real_linux.py)
ENGINE_RESTORED = {"current_vp", "vmcall_stops"}


def test_every_machine_and_engine_attribute_is_rebuilt_or_restored():
    m = Machine(BootConfig(cpus=4))
    try:
        m.run_to_handoff()
        assert set(vars(m)) <= MACHINE_REBUILT | MACHINE_RESTORED, set(vars(m)) - MACHINE_REBUILT - MACHINE_RESTORED
        assert set(vars(m.engine)) <= ENGINE_REBUILT | ENGINE_RESTORED, \
            set(vars(m.engine)) - ENGINE_REBUILT - ENGINE_RESTORED
    finally:
        m.close()


def test_every_fast_path_header_slot_is_restored_or_layout():
    slots = {name for name in vars(fastpath) if name.startswith("H_") and name != "HEADER_SLOTS"}
    assert slots == set(snapshot_state.FASTPATH_SLOTS) | set(snapshot_state.FASTPATH_LAYOUT)


def test_unsupported_state_is_named_at_save(tmp_path):
    m = Machine(BootConfig(cpus=2))
    try:
        m.hv.rdmsr = lambda *a: 0  # e.g. a test's monkeypatch: not machine state a file can hold
        with pytest.raises(snapshot_state.SnapshotStateError, match="Hypervisor.rdmsr"):
            snapshot.save(m, tmp_path / "x.hclsnap")
    finally:
        m.close()
