"""Boot one mutated input and classify what happened; the oracles a handoff is checked against.

An outcome is clean when it is one of:
- "error": an HclsimError with a one-line message, raised before the boot runs (a loader or
  the machine refusing the input);
- "panic": the shim's own panic (GuestFaultError "boot shim panic: ..." with its message);
- "handoff": the shim reached the kernel, the stand-in's handoff check passed, and the oracles
  agree: the kernel command line and the e820 map are what the shim should have built from its
  inputs, and every CPU is Linux's or the sidecar's, never both.
Anything else (a guest fault, a timeout, a HandoffError, a Python exception) fails the test.
"""
import ctypes
import dataclasses
import os
import re
from dataclasses import dataclass, field

import libfdt
from hypothesis import HealthCheck, settings

from hclsim import HclsimError
from hclsim.boot import layout as L
from hclsim.boot.host_dt import HostConfig, bootargs_bytes, build_host_config, write_host_dt
from hclsim.config import BootConfig
from hclsim.cpu.fault import GuestFaultError
from hclsim.kernel_stub.handoff import kernel_params, linux_isspace, param_is
from hclsim.machine import Machine
from hclsim.sidecar import layout as sl
from hclsim.sidecar.partition import node_memory_bytes, partition

PAGE = 4096
KERNEL_CMDLINE_SIZE = 4096          # the shim's buffer (shim.h), NUL included
SHIM_SPACES = b" \t\n\r"            # what the shim trims off each line (cmdline.c is_space)
BOOT_TIMEOUT = 30.0                 # a hang is a failure, not a wait


def examples(normal: int) -> int:
    """How many cases a property runs: `normal` in the suite, $HCLSIM_FUZZ_EXAMPLES when set
    (benches/bench_fuzz.py sets it for the long run)."""
    return int(os.environ.get("HCLSIM_FUZZ_EXAMPLES") or normal)


def fuzz_settings(normal: int):
    """Deterministic: a fixed seed (derandomize) and no example database, so every run of the
    suite tries the same cases."""
    return settings(derandomize=True, database=None, max_examples=examples(normal), deadline=None,
                    print_blob=False, suppress_health_check=list(HealthCheck))


# ---- outcomes ------------------------------------------------------------------------------------

_PANIC = re.compile(r"boot shim panic: at RIP 0x[0-9a-f]+(?: \([^)]*\))?: (.*)")


@dataclass
class Outcome:
    kind: str                         # "error", "panic" or "handoff"
    message: str = ""
    result: object = None             # BootResult of a handoff
    layout: object = None             # the machine's VtlLayout
    params: object = None             # the ShimParamsRaw the shim was given
    shim_base: int = 0
    notes: dict = field(default_factory=dict)

    def __repr__(self):
        return f"Outcome({self.kind}: {self.message[:200]!r})"


def clean_error(exc: Exception) -> str:
    """The message of a clean refusal: an HclsimError (not a guest fault) on one line."""
    assert isinstance(exc, HclsimError) and not isinstance(exc, GuestFaultError), repr(exc)
    msg = str(exc)
    assert msg and "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


def boot_case(config: BootConfig, *, host_dt: bytes | None = None, params: dict | None = None,
              static_raw: bytes | None = None) -> Outcome:
    """Build the machine (a refusal is an "error"), put the mutated host device tree / ShimParams
    fields / raw static command line into its RAM as a loader or host would, run the shim."""
    config = config.with_(timeout=BOOT_TIMEOUT)
    try:
        m = Machine(config)
    except HclsimError as exc:
        return Outcome("error", clean_error(exc))
    try:
        if host_dt is not None:
            region = m.layout.region("parameters")
            assert len(host_dt) <= region.size
            m.mem.fill(region.start, region.size)
            m.mem.write(region.start, host_dt)
        if static_raw is not None:
            pcl = L.ParavisorCommandLine(policy=config.cmdline_policy_value,
                                         static_command_line_len=len(static_raw))
            ctypes.memmove(pcl.static_command_line, static_raw, len(static_raw))
            m.mem.write_struct(m.image.cmdline_gpa, pcl)
        p = m.mem.read_struct(L.ShimParamsRaw, m.image.params_gpa)
        for name, value in (params or {}).items():
            setattr(p, name, value)
        m.mem.write_struct(m.image.params_gpa, p)
        seen = dict(layout=m.layout, params=p, shim_base=m.image.shim_base)
        try:
            result = m.run_to_handoff()
        except GuestFaultError as exc:
            summary = str(exc)
            match = _PANIC.fullmatch(summary)
            assert match, f"not a clean shim panic: {summary}"
            return Outcome("panic", match.group(1), **seen)
        return Outcome("handoff", result=result, **seen)
    finally:
        m.close()


# ---- the command line the shim should build ------------------------------------------------------

_FIXED = {}


def fixed_options() -> bytes:
    """The shim's fixed kernel parameters: everything before "console=" on a plain boot."""
    if "line" not in _FIXED:
        m = Machine(BootConfig(cpus=1, no_sidecar=True, vtl0_guest=False))
        try:
            line = m.run_to_handoff().handoff.cmdline_bytes
        finally:
            m.close()
        _FIXED["line"] = line[:line.index(b" console=")]
    return _FIXED["line"]


def shim_has_token(line: bytes, token: bytes) -> bool:
    """cmdline.c's cmdline_has_token: whitespace-separated words (its four spaces), up to a NUL."""
    line = line.split(b"\0")[0]
    return token in re.split(rb"[ \t\n\r]+", line)


@dataclass(frozen=True)
class ShimInputs:
    """What the shim's command line and sidecar decisions depend on."""
    static: bytes = b""               # the measured static line (up to its length)
    policy: str = "append-chosen"
    isolation: str = "none"
    bootargs: bytes | None = b""      # the host's /chosen/bootargs (None: no property)
    com3: bool = True
    com3_speed: int = 115200
    numa_of_cpu: tuple = (0, 0, 0, 0)  # the host's cpus, in /cpus order
    sidecar_image: bool = True

    @classmethod
    def of(cls, config: BootConfig, host: HostConfig | None = None, static: bytes | None = None):
        host = host or build_host_config(config.cpus, config.numa_nodes, max(config.memory, 1 << 30),
                                         config.vtl2_base, config.vtl2_size, config.host_bootargs, config.com3)
        return cls(static=config.static_cmdline.encode() if static is None else static,
                   policy=config.cmdline_policy, isolation=config.isolation,
                   bootargs=bootargs_bytes(host.bootargs), com3=host.com3, com3_speed=host.com3_speed,
                   numa_of_cpu=tuple(c.numa_node for c in host.cpus), sidecar_image=not config.no_sidecar)

    @property
    def static_line(self) -> bytes:
        return self.static.split(b"\0")[0]

    @property
    def trusted(self) -> bool:
        return self.isolation == "none" or shim_has_token(self.static_line, b"OPENHCL_CONFIDENTIAL_DEBUG=1")

    @property
    def host_line(self) -> bytes | None:
        """The host's bootargs when the shim appends them."""
        args = None if self.bootargs is None else self.bootargs.split(b"\0")[0]
        if not args or self.policy != "append-chosen" or not self.trusted:
            return None
        return args

    @property
    def sidecar_nodes(self) -> list:
        off = (not self.sidecar_image or self.isolation != "none"
               or shim_has_token(self.static_line, b"OPENHCL_SIDECAR=off")
               or (self.host_line is not None and shim_has_token(self.host_line, b"OPENHCL_SIDECAR=off")))
        return [] if off else partition(list(self.numa_of_cpu))


def expected_cmdline(inputs: ShimInputs) -> tuple[bytes, bool]:
    """(the kernel command line, whether it is too long for the shim's buffer): fixed options,
    console, OPENHCL_CONFIDENTIAL=1 when isolated, the shim's boot_cpus= when the sidecar runs,
    then the static line and the trusted host's line (each trimmed), with every other
    boot_cpus parameter dropped from those two (Linux's parse, up to a "--")."""
    parts = [fixed_options()]
    speed = inputs.com3_speed or 115200
    parts.append(f"console=ttyS2,{speed}".encode() if inputs.com3 and inputs.trusted else b"console=ttynull")
    if inputs.isolation != "none":
        parts.append(b"OPENHCL_CONFIDENTIAL=1")
    nodes = inputs.sidecar_nodes
    if nodes:
        parts.append(b"boot_cpus=" + ",".join(str(n.base_vp) for n in nodes).encode())
    shim_part = b" ".join(parts)
    rest = [line.strip(SHIM_SPACES) for line in (inputs.static_line, inputs.host_line) if line is not None]
    line = b" ".join([shim_part] + [r for r in rest if r])
    if len(line) >= KERNEL_CMDLINE_SIZE:
        return line, True
    return shim_part + drop_param(line[len(shim_part):], "boot_cpus"), False


def drop_param(tail: bytes, name: str) -> bytes:
    """tail without each `name` parameter and the spaces before it (up to a "--")."""
    params, _init = kernel_params(tail)
    out, copied = bytearray(), 0
    for p in params:
        if param_is(p, name):
            gap = p.start
            while gap > 0 and linux_isspace(tail[gap - 1]):
                gap -= 1
            out += tail[copied:gap]
            copied = p.end
    return bytes(out + tail[copied:])


# ---- the e820 map the shim should build -----------------------------------------------------------

# The ShimParamsRaw regions the shim reserves (memmap.c: whole pages), as (offset, size) fields.
RESERVED_FIELDS = (("persisted_state_region_offset", "persisted_state_region_size"),
                   ("parameter_region_offset", "parameter_region_size"),
                   ("vtl2_reserved_region_offset", "vtl2_reserved_region_size"),
                   ("log_buffer_start", "log_buffer_size"), ("sidecar_offset", "sidecar_size"))


def expected_e820(params, shim_base: int, nodes) -> list[tuple[int, int, int]]:
    """VTL2 only, from the ShimParamsRaw the shim read: its non-RAM regions (page-rounded) and
    the sidecar node memory (top of VTL2) reserved, the rest RAM, neighbours of a type merged."""
    start = shim_base + params.memory_start_offset
    end = start + params.memory_size
    reserved = []
    for off, size in RESERVED_FIELDS:
        if getattr(params, size):
            a = shim_base + getattr(params, off)
            reserved.append((a & ~(PAGE - 1), -(-(a + getattr(params, size)) // PAGE) * PAGE))
    if nodes:
        reserved.append((end - node_memory_bytes(nodes), end))
    pieces, cur = [], start
    for s, e in sorted(reserved):
        if s > cur:
            pieces.append((cur, s, L.E820_RAM))
        pieces.append((s, e, L.E820_RESERVED))
        cur = e
    if cur < end:
        pieces.append((cur, end, L.E820_RAM))
    merged = []
    for s, e, t in pieces:
        if merged and merged[-1][2] == t and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e, t)
        else:
            merged.append((s, e, t))
    return [(s, e - s, t) for s, e, t in merged]


def check_handoff(outcome: Outcome, inputs: ShimInputs) -> None:
    """The oracles for a handoff (the stand-in's own check already passed)."""
    r = outcome.result
    line, too_long = expected_cmdline(inputs)
    assert not too_long, f"a {len(line)}-byte command line should have made the shim panic"
    assert r.handoff.cmdline_bytes == line, f"command line:\n{r.handoff.cmdline_bytes!r}\nexpected\n{line!r}"
    nodes = inputs.sidecar_nodes
    e820 = [(e.addr, e.size, e.type) for e in r.handoff.e820]
    assert e820 == expected_e820(outcome.params, outcome.shim_base, nodes), f"e820 {e820}"
    check_cpus(r, nodes)


def check_cpus(r, nodes) -> None:
    """Every CPU is a Linux CPU or an IDLE sidecar CPU, never both; Linux has the node bases."""
    linux = set(r.linux.cpus.online)
    sidecar = r.linux.sidecar
    if not nodes:
        assert sidecar is None
        return
    held = {n.base_cpu + i for n in sidecar.nodes for i in range(n.cpu_count) if n.status[i] != sl.CPU_REMOVED}
    assert not linux & held, f"CPUs {sorted(linux & held)} are Linux CPUs and sidecar CPUs at once"
    assert linux == {n.base_vp for n in nodes}, f"Linux CPUs {sorted(linux)}"
    assert [(n.base_cpu, n.cpu_count) for n in sidecar.nodes] == [(n.base_vp, n.vp_count) for n in nodes]


def expect_panic_if(outcome: Outcome, inputs: ShimInputs) -> None:
    """A handoff checked by the oracles, or a panic the inputs call for (too long a line)."""
    line, too_long = expected_cmdline(inputs)
    if too_long:
        assert outcome.kind == "panic" and "kernel command line too long" in outcome.message, outcome
        return
    assert outcome.kind == "handoff", outcome
    check_handoff(outcome, inputs)


# ---- host device trees ---------------------------------------------------------------------------

def host_dt_for(config: BootConfig, lay, **changes) -> tuple[HostConfig, bytes]:
    """The host device tree the machine would write for its layout, with changes to the
    HostConfig (cpus, memory, bootargs, com3...), and its blob."""
    memory = max(config.memory, lay.vtl2_base + lay.vtl2_size)
    host = build_host_config(config.cpus, config.numa_nodes, memory, lay.vtl2_base, lay.vtl2_size,
                             bootargs=config.host_bootargs, com3=config.com3)
    if changes:
        host = dataclasses.replace(host, **changes)
    return host, write_host_dt(host)


def fdt_check_full(blob: bytes, size: int) -> int:
    """libfdt's own verdict on a blob in a region of size bytes (0: sound)."""
    buf = bytearray(blob) + bytearray(max(0, size - len(blob)))
    if len(buf) < 40:
        return -libfdt.TRUNCATED
    return libfdt.fdt_check_full(buf, size)


# ---- nothing leaks from one machine to the next ---------------------------------------------------

PRISTINE = BootConfig(cpus=4)


def pristine_fingerprint(fresh_engine: bool = False) -> tuple:
    """What a plain 4-vCPU boot produces: instructions, serial output, boot_params, DTB. With
    fresh_engine, on an engine no earlier machine used (the pool's idle pairs set aside)."""
    from hclsim.cpu import pool
    saved = None
    if fresh_engine:
        with pool._lock:
            saved, pool._idle = pool._idle, {}
    try:
        m = Machine(PRISTINE)
        try:
            r = m.run_to_handoff()
            return (r.counters["instructions"], r.serial["COM3"], r.handoff.boot_params, r.handoff.dtb,
                    r.handoff.cmdline_bytes)
        finally:
            m.close()
    finally:
        if saved is not None:
            with pool._lock:
                used, pool._idle = pool._idle, saved
            for pairs in used.values():
                for _mem, engine in pairs:
                    engine.close()


def run_then_check_pristine(fuzz) -> None:
    """Run a hypothesis property, then check a pristine boot in this process (pooled engines,
    whatever the mutated machines left) is the boot a brand-new engine gives."""
    fuzz()
    assert pristine_fingerprint() == pristine_fingerprint(fresh_engine=True)
