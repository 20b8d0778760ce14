"""The hclsim pytest plugin (entry point pytest11 "hclsim"): fixtures for firmware regression
suites.

Fixtures:
  hclsim_boot(**BootConfig fields) -> hclsim.testkit.BootRun: a machine booted to the handoff
  hclsim_machine(**BootConfig fields) -> Machine: not yet run, for step-by-step tests
  golden.check(name, text_or_json): compare with <test dir>/golden/<test module>/<name>
  hclsim_snapshot: save(machine) / restore(path) / info(path) through hclsim.snapshot
Options:
  --hclsim-update-golden   rewrite golden files instead of comparing
  --hclsim-shim PATH       boot shim for every machine the fixtures make (default: shipped)
  --hclsim-sidecar PATH    sidecar kernel likewise
Machines are closed at teardown. A test that fails on a guest fault (GuestFaultError) shows
the fault's whole report (registers, page walk, code around RIP, last serial lines: what
`hclsim boot` prints and saves as fault.txt) in its failure. Nothing here imports the simulator
until a fixture is used, so the plugin costs nothing in sessions that do not use it.
"""
import difflib
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIRMWARE_OPTIONS = {"shim": "--hclsim-shim", "sidecar": "--hclsim-sidecar"}


def pytest_addoption(parser):
    group = parser.getgroup("hclsim", "hclsim firmware regression kit")
    group.addoption("--hclsim-update-golden", action="store_true", default=False,
                    help="rewrite golden files with the current output instead of comparing")
    group.addoption("--hclsim-shim", metavar="PATH", default=None,
                    help="boot shim ELF for every hclsim_boot / hclsim_machine (default: the shipped shim)")
    group.addoption("--hclsim-sidecar", metavar="PATH", default=None,
                    help="sidecar kernel ELF for every hclsim_boot / hclsim_machine (default: the shipped one)")


def pytest_configure(config):
    for option in FIRMWARE_OPTIONS.values():
        value = config.getoption(option)
        if value is not None and not Path(value).is_file():
            raise pytest.UsageError(f"{option} {value}: no such file")


def _guest_fault(exc):
    """The GuestFaultError exc is or was raised from (its __cause__ / __context__ chain)."""
    fault = sys.modules.get("hclsim.cpu.fault")
    seen = set()
    while fault is not None and exc is not None and id(exc) not in seen:
        if isinstance(exc, fault.GuestFaultError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failure caused by a guest fault carries the fault's whole report as a section."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or not report.failed:
        return
    err = _guest_fault(call.excinfo.value)
    if err is None or not getattr(err, "report", None):
        return
    section = ("hclsim guest fault report", err.report)
    longrepr = report.longrepr
    if hasattr(longrepr, "addsection"):
        longrepr.addsection(*section)
    else:
        report.sections.append(section)


def pytest_report_header(config):
    chosen = [f"{opt} {config.getoption(opt)}" for opt in FIRMWARE_OPTIONS.values() if config.getoption(opt)]
    return ["hclsim: " + ", ".join(chosen)] if chosen else None


def _boot_config(pytest_config, config, fields: dict):
    """The BootConfig a fixture uses: config (or the defaults) with fields, and the command
    line's firmware where the test chose none."""
    from hclsim.config import BootConfig
    cfg = (config or BootConfig()).with_(**fields)
    for name, option in FIRMWARE_OPTIONS.items():
        value = pytest_config.getoption(option)
        if value is not None and getattr(cfg, name) is None:
            cfg = cfg.with_(**{name: str(Path(value).resolve())})
    return cfg


class _Machines:
    """Machines a test made; all closed at its teardown."""

    def __init__(self):
        self.machines = []

    def track(self, machine):
        self.machines.append(machine)
        return machine

    def close(self):
        for machine in self.machines:
            machine.close()
        self.machines.clear()


@pytest.fixture
def _hclsim_machines():
    machines = _Machines()
    yield machines
    machines.close()


@pytest.fixture
def hclsim_machine(request, _hclsim_machines):
    """Factory: hclsim_machine(config=None, on_serial=None, **BootConfig fields) -> an un-run
    Machine (drive it with run_to, run_to_handoff, run_sidecar)."""
    from hclsim.machine import Machine

    def make(config=None, on_serial=None, **fields):
        cfg = _boot_config(request.config, config, fields)
        # Machine refuses a VTL2 that does not fit --memory: RAM is never grown behind the test's back.
        return _hclsim_machines.track(Machine(cfg, on_serial=on_serial))
    return make


@pytest.fixture
def hclsim_boot(hclsim_machine):
    """Factory: hclsim_boot(config=None, **BootConfig fields) -> hclsim.testkit.BootRun of a
    machine booted to the kernel handoff (a guest fault raises GuestFaultError)."""
    from hclsim.testkit import BootRun

    def boot(config=None, **fields):
        machine = hclsim_machine(config, **fields)
        return BootRun(machine, machine.run_to_handoff())
    return boot


@functools.lru_cache(maxsize=None)
def toolchain() -> str:
    """The compiler the firmware is built with: layouts and instruction counts depend on it."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return "no gcc"
    return subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.partition("\n")[0]


class Golden:
    """Golden files of one test module: <test dir>/golden/<module name>/<name>. The compiler that
    built the firmware when they were written is kept in <test dir>/golden/TOOLCHAIN."""

    def __init__(self, directory: Path, update: bool):
        self.directory, self.update = directory, update
        self.toolchain_file = directory.parent / "TOOLCHAIN"

    def path(self, name: str) -> Path:
        return self.directory / name

    @staticmethod
    def render(value) -> str:
        """Text as it is stored: str as is, bytes as UTF-8, anything else as indented JSON."""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            value = json.dumps(value, indent=2)
        return value if value.endswith("\n") else value + "\n"

    def check(self, name: str, value) -> None:
        """Fail with a unified diff if value differs from the golden file (or it is missing);
        with --hclsim-update-golden, write the file instead."""
        path, text = self.path(name), self.render(value)
        old = path.read_text() if path.is_file() else None
        if self.update:
            if old != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            if self._recorded_toolchain() != toolchain():
                self.toolchain_file.write_text(toolchain() + "\n")
            return
        if old == text:
            return
        if old is None:
            pytest.fail(f"golden file {path} is missing: run pytest with --hclsim-update-golden to create it",
                        pytrace=False)
        diff = difflib.unified_diff(old.splitlines(keepends=True), text.splitlines(keepends=True),
                                    f"golden/{path.parent.name}/{name}", "actual")
        pytest.fail(f"output differs from golden file {path} (run pytest with --hclsim-update-golden "
                    f"to accept it){self._toolchain_note()}:\n" + "".join(diff), pytrace=False)

    def _recorded_toolchain(self) -> str | None:
        return self.toolchain_file.read_text().strip() if self.toolchain_file.is_file() else None

    def _toolchain_note(self) -> str:
        recorded = self._recorded_toolchain()
        if recorded is None or recorded == toolchain():
            return ""
        return f"; note: the goldens were written with firmware built by {recorded}, this host has {toolchain()}"


@pytest.fixture
def golden(request):
    """golden.check(name, text_or_json) against <test dir>/golden/<test module>/<name>."""
    module = Path(str(request.fspath))
    return Golden(module.parent / "golden" / module.stem, request.config.getoption("--hclsim-update-golden"))


class SnapshotHelper:
    """Snapshots in the test's tmp_path; restored machines are closed at teardown."""

    def __init__(self, tmp_path: Path, machines: _Machines):
        self.tmp_path, self._machines = tmp_path, machines

    def save(self, machine, name: str = "machine.hclsnap") -> Path:
        from hclsim import snapshot
        path = self.tmp_path / name
        snapshot.save(machine, path)
        return path

    def restore(self, path, on_serial=None, **images):
        from hclsim import snapshot
        return self._machines.track(snapshot.restore(path, on_serial=on_serial, **images))

    @staticmethod
    def info(path) -> dict:
        from hclsim import snapshot
        return snapshot.read_info(path)


@pytest.fixture
def hclsim_snapshot(tmp_path, _hclsim_machines):
    """save(machine, name) -> Path, restore(path) -> Machine, info(path) -> header dict."""
    return SnapshotHelper(tmp_path, _hclsim_machines)
