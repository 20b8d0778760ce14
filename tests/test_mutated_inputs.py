"""Issue 9, "What mutated inputs break": one focused test per input that crashed, hung or misled
the simulator, the shim or the stand-in, plus the image checks of "Bad input" (a corrupt bzImage
payload, a userspace ELF as the kernel, an ELF that is not a sidecar). tests/fuzz/ tries many
more inputs of each kind."""
import contextlib
import ctypes
import signal
import struct
import subprocess
import time
import warnings

import libfdt
import lz4.block
import pytest

from hclsim import HclsimError
from hclsim.boot import firmware, layout as L
from hclsim.boot.elfimage import FirmwareImageError, load_firmware_image
from hclsim.boot.host_dt import HostCpu, HostDtError, bootargs_bytes, build_host_config, read_host_dt, write_host_dt
from hclsim.boot.image import ImageError, plan_layout
from hclsim.boot.initrd import InitrdError, compress, load_initrd, lz4_legacy_compress
from hclsim.boot.kernel import KernelError, load_kernel
from hclsim.config import BootConfig
from hclsim.debug.target import DebugTarget
from hclsim.kernel_stub import images
from hclsim.kernel_stub.cpus import CpuOnlineError, boot_cpu_plan, parse_boot_cpus
from hclsim.kernel_stub.handoff import HandoffError, kernel_params
from hclsim.machine import Machine
from hclsim.sidecar import layout as sl

from .fuzz.harness import ShimInputs, boot_case, check_handoff, fdt_check_full, host_dt_for
from .test_kernel import make_bzimage

MiB = 1 << 20


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (SIGALRM interrupts a Python loop in the main thread)."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(exc: Exception, *starts: str) -> str:
    msg = str(exc)
    assert isinstance(exc, HclsimError) and "\n" not in msg, msg
    assert any(s in msg for s in starts), msg
    return msg


@pytest.fixture(scope="module")
def vmlinux() -> bytes:
    return images.default_kernel().read_bytes()


def write(tmp_path, data: bytes, name: str = "image") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def layout_of(config: BootConfig):
    m = Machine(config)
    try:
        return m.layout
    finally:
        m.close()


# ---- the simulator crashed or hung ------------------------------------------------------------

def test_boot_cpus_naming_a_cpu_that_does_not_exist():
    """A trusted host's boot_cpus=0,99 (8 CPUs): was an IndexError in the stand-in."""
    cfg = BootConfig(cpus=8, host_bootargs="boot_cpus=0,99")
    out = boot_case(cfg)
    assert out.kind == "handoff", out
    check_handoff(out, ShimInputs.of(cfg))
    assert b"99" not in out.result.handoff.cmdline_bytes


class _Node:
    def __init__(self, base, status):
        self.index, self.base_cpu, self.cpu_count, self.status = 0, base, len(status), status

    def owns(self, cpu):
        return self.base_cpu <= cpu < self.base_cpu + self.cpu_count

    def cpu_status(self, cpu):
        return self.status[cpu - self.base_cpu]


class _Partition:
    vp_count = 4

    @staticmethod
    def apic_id(i):
        return i


class _Sidecar:
    nodes = [_Node(0, [sl.CPU_REMOVED, sl.CPU_IDLE, sl.CPU_IDLE, sl.CPU_IDLE])]


DT_CPUS = [(i, 0) for i in range(4)]


@pytest.mark.parametrize("line,problem", [
    (b"boot_cpus=0,99", "CPU 99 does not exist (the device tree lists 4 CPUs)"),
    (b"boot_cpus=0-1", "CPU 1 is also a sidecar CPU (node 0, IDLE)"),
    (b"quiet", "missing, but the sidecar runs"),
])
def test_stand_in_names_a_boot_cpu_plan_that_cannot_be(line, problem):
    """What a shim of one's own could hand over: a clean HandoffError, not an IndexError."""
    with pytest.raises(HandoffError) as info:
        boot_cpu_plan(DT_CPUS, line, _Partition, _Sidecar)
    one_line(info.value, problem)


def test_stand_in_reads_boot_cpus_the_way_linux_does():
    assert parse_boot_cpus(b'boot_cpus=1 boot-cpus=0,2-3 "x=boot_cpus=5" -- boot_cpus=7') == [0, 2, 3]
    assert parse_boot_cpus(b'"boot_cpus=0,1"') == [0, 1]
    assert parse_boot_cpus(b"boot_cpusx=1") is None
    for bad in (b"boot_cpus=0-999999999999", b"boot_cpus=a", b"boot_cpus=3-1", b"boot_cpus"):
        with pytest.raises(CpuOnlineError):
            parse_boot_cpus(bad)
    params, init = kernel_params(b' a "b c" d="e f" -- g h')
    assert [(p.name, p.value) for p in params] == [(b"a", None), (b"b c", None), (b"d", b"e f")]
    assert init == b"g h"
    assert [p.name for p in kernel_params(b"x\xa0y\x0bz")[0]] == [b"x", b"y", b"z"]  # isspace(0xA0)


@pytest.mark.parametrize("length", list(range(500, 600)) + [1564, 2588, 100_000])
def test_host_bootargs_that_fill_the_device_tree_buffer(length):
    """Bootargs of 540..543 bytes (and every 1 KiB more) filled pylibfdt's writer to the byte:
    fdt_finish had no room for FDT_END and raised FDT_ERR_NOSPACE."""
    config = build_host_config(4, 1, 1 << 30, 128 * MiB, 64 * MiB, bootargs="x" * length)
    assert read_host_dt(write_host_dt(config)) == config


def test_host_bootargs_too_long_or_with_a_nul_are_one_error():
    with pytest.raises(HostDtError) as info:
        write_host_dt(build_host_config(4, 1, 1 << 30, 128 * MiB, 64 * MiB, bootargs="x" * 300_000))
    one_line(info.value, "host bootargs are 300000 bytes, more than the 262144 bytes")
    with pytest.raises(HostDtError) as info:
        bootargs_bytes("a\0b")
    one_line(info.value, "host bootargs: NUL byte at offset 1")


def _patch_phdr(vmlinux: bytes, index: int, field_offset: int, value: int) -> bytes:
    phoff, = struct.unpack_from("<Q", vmlinux, 32)
    data = bytearray(vmlinux)
    struct.pack_into("<Q", data, phoff + 56 * index + field_offset, value)
    return bytes(data)


@pytest.mark.parametrize("index,field,value,problem", [
    (2, 40, 1 << 44, "wraps past the top"),                 # p_memsz: guest RAM of 16 TiB was mapped, then zeroed
    (0, 40, 1 << 30, "overlap"),
    (2, 40, 0x7E000000, "more than an x86_64 kernel image can"),
    (2, 24, 1 << 44, "more than an x86_64 kernel image can"),  # p_paddr: the layout planner ran for minutes
    (2, 24, (1 << 64) - 0x1000, "more than an x86_64 kernel image can"),
])
def test_kernel_segment_with_an_absurd_size_or_address(tmp_path, vmlinux, index, field, value, problem):
    path = write(tmp_path, _patch_phdr(vmlinux, index, field, value))
    t0 = time.perf_counter()
    with deadline(20), pytest.raises(KernelError) as info:
        Machine(BootConfig(kernel=path))
    one_line(info.value, problem)
    assert time.perf_counter() - t0 < 5


def test_layout_planner_refuses_what_cannot_be_guest_memory():
    with pytest.raises(ImageError) as info:
        plan_layout(128 * MiB, 64 * MiB, 1 << 47, 2 * MiB, 0x1000, 0)
    one_line(info.value, "outside the 46-bit guest physical address space")
    with pytest.raises(ImageError) as info:
        plan_layout(128 * MiB, 1 << 46, 0x3000, 2 * MiB, 0x1000, 0)
    one_line(info.value, "beyond the 46-bit guest physical address space")


@pytest.mark.parametrize("machine,name", [(0x1234, "e_machine 0x1234"), (183, "AARCH64"), (3, "386")])
def test_elf_with_another_or_an_unknown_machine(tmp_path, vmlinux, machine, name):
    """An unknown e_machine was an AttributeError while formatting the error."""
    data = bytearray(vmlinux)
    struct.pack_into("<H", data, 18, machine)
    with pytest.raises(KernelError) as info:
        load_kernel(write(tmp_path, bytes(data)))
    one_line(info.value, f"wrong machine: {name} ELF64, need x86_64 ELF64")


@pytest.mark.parametrize("phoff", [0, 1, 8, 56, 100, 0x1FFF, 1 << 40, (1 << 64) - 1])
def test_bad_e_phoff_is_one_error_and_no_warning(tmp_path, vmlinux, phoff):
    """A bad e_phoff printed lief's RuntimeWarning ("N is not a valid TYPE") before the error."""
    data = bytearray(vmlinux)
    struct.pack_into("<Q", data, 32, phoff)
    path = write(tmp_path, bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            load_kernel(path)
        except KernelError as exc:
            one_line(exc, "kernel ")


def _cpio_entry(name: bytes, data: bytes, namesize: bytes | None = None) -> bytes:
    fields = [1, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08x" % f for f in fields)
    if namesize is not None:
        head = head[:6 + 8 * 11] + namesize + head[6 + 8 * 12:]
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return pad(head + name + b"\0") + pad(data)


@pytest.mark.parametrize("namesize", [b"-0000070", b"-0000001", b"-fffffff", b" 0000004", b"0000_004", b"+0000004",
                                      b"0x000004"])
def test_cpio_header_fields_must_be_eight_hex_digits(tmp_path, namesize):
    """int() takes a sign: an empty entry with namesize -0x70 led the header scan back to its own
    header, for ever."""
    archive = _cpio_entry(b"etc", b"", namesize) + _cpio_entry(b"TRAILER!!!", b"")
    with deadline(10), pytest.raises(InitrdError) as info:
        load_initrd(write(tmp_path, archive))
    one_line(info.value, "bad cpio header at 0x0 (field namesize")


def _lz4_stream_with_bad_block() -> bytes:
    """A legacy lz4 stream one flipped bit makes lz4.block reject (found by search, fixed data)."""
    data = bytes(range(256)) * 64 + b"hclsim" * 500
    good = lz4_legacy_compress(data)
    for pos in range(8, len(good)):
        for bit in range(8):
            bad = bytearray(good)
            bad[pos] ^= 1 << bit
            try:
                lz4.block.decompress(bytes(bad[8:]), uncompressed_size=8 << 20)
            except lz4.block.LZ4BlockError:
                return bytes(bad)
    raise AssertionError("no bit flip breaks the stream")


def test_lz4_stream_with_a_flipped_bit(tmp_path, vmlinux):
    bad = _lz4_stream_with_bad_block()
    with pytest.raises(InitrdError) as info:
        load_initrd(write(tmp_path, bad))
    one_line(info.value, "segment at 0x0: corrupt lz4 data")


def test_bzimage_with_a_corrupt_lz4_payload(tmp_path, vmlinux):
    """'Bad input': a bzImage whose compressed payload is corrupt (an LZ4 block error)."""
    payload = bytearray(compress(vmlinux, "lz4"))
    for pos in range(12, len(payload) - 8, 7):
        payload[pos] ^= 0xA5
    with pytest.raises(KernelError) as info:
        Machine(BootConfig(kernel=write(tmp_path, make_bzimage(vmlinux, "lz4", payload=bytes(payload)))))
    one_line(info.value, ": bzImage payload: corrupt lz4 data")


def test_real_bzimage_with_a_corrupt_lz4_payload(tmp_path, real_kernel):
    raw = bytearray(real_kernel.read_bytes())
    setup = ((raw[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", raw, 0x248)
    if raw[setup + offset:setup + offset + 4] != struct.pack("<I", 0x184C2102):
        pytest.skip("the real kernel's payload is not legacy lz4")
    size_at = setup + offset + 4                # magic, then the first block's u32 size
    size, = struct.unpack_from("<I", raw, size_at)
    struct.pack_into("<I", raw, size_at, size // 2)  # the block ends mid-sequence
    with pytest.raises(KernelError) as info:
        load_kernel(write(tmp_path, bytes(raw)))
    one_line(info.value, "bzImage payload: corrupt lz4 data")


# ---- a host's boot_cpus= overrode the shim's -----------------------------------------------------

@pytest.mark.parametrize("bootargs", ["boot_cpus=0,1", "boot-cpus=0-7", '"boot_cpus=0,1,2"', "x boot_cpus=1 y",
                                      "BOOT_CPUS=1 boot_cpus=0,1"])
def test_trusted_host_boot_cpus_cannot_override_the_shims(bootargs):
    """The stand-in brought up CPU 1 while the sidecar also held it (Linux-online and IDLE)."""
    cfg = BootConfig(cpus=8, host_bootargs=bootargs)
    out = boot_case(cfg)
    assert out.kind == "handoff", out
    check_handoff(out, ShimInputs.of(cfg))  # Linux CPUs are the node bases; no CPU is in both
    assert sorted(out.result.linux.cpus.online) == [0]
    assert parse_boot_cpus(out.result.handoff.cmdline_bytes) == [0]


def test_boot_cpus_after_double_dash_belongs_to_init():
    cfg = BootConfig(cpus=8, host_bootargs="quiet -- boot_cpus=0,1")
    out = boot_case(cfg)
    check_handoff(out, ShimInputs.of(cfg))
    assert out.result.handoff.cmdline_bytes.endswith(b" boot_cpus=0 quiet -- boot_cpus=0,1")
    assert sorted(out.result.linux.cpus.online) == [0]


# ---- the shim handed Linux what the host's device tree said -------------------------------------

@pytest.mark.parametrize("isolation", ["none", "snp"])
def test_two_cpu_nodes_with_one_apic_id_are_a_shim_panic(isolation):
    """On a hardware-isolated VM the VP index check does not run, and the shim handed Linux two
    cpu nodes with APIC id 2."""
    cfg = BootConfig(cpus=4, isolation=isolation)
    _host, blob = host_dt_for(cfg, layout_of(cfg), cpus=(HostCpu(0, 0), HostCpu(2, 0), HostCpu(2, 0), HostCpu(3, 0)))
    out = boot_case(cfg, host_dt=blob)
    assert out.kind == "panic", out
    assert out.message == "malformed host device tree: cpus 1 and 2 (in /cpus order) have the same APIC id 2"


def _blob_with(blob: bytes, *, version=None, last_comp=None, struct_tail=None) -> bytes:
    """blob with header fields changed, or struct_tail inserted before the final FDT_END."""
    b = bytearray(blob)
    words = list(struct.unpack_from(">10I", b))
    if struct_tail is not None:
        off_st, size_st = words[2], words[9]
        end = off_st + size_st - 4
        b[end:end] = struct_tail
        words[3] += len(struct_tail)          # strings block moves up
        words[9] += len(struct_tail)
        words[1] += len(struct_tail)
    if version is not None:
        words[5] = version
    if last_comp is not None:
        words[6] = last_comp
    struct.pack_into(">10I", b, 0, *words)
    return bytes(b)


@pytest.mark.parametrize("change,problem", [
    (dict(version=16, last_comp=17), "version older than its last_comp_version"),
    (dict(struct_tail=struct.pack(">I", 4)), "data after the root node"),          # FDT_NOP
    (dict(struct_tail=struct.pack(">II", 4, 4)), "data after the root node"),
])
def test_host_dt_fdt_check_full_rejects_is_a_shim_panic(change, problem):
    cfg = BootConfig(cpus=4)
    lay = layout_of(cfg)
    _host, blob = host_dt_for(cfg, lay)
    bad = _blob_with(blob, **change)
    assert fdt_check_full(bad, lay.region("parameters").size) != 0  # libfdt's verdict
    out = boot_case(cfg, host_dt=bad)
    assert out.kind == "panic" and out.message == f"malformed host device tree: {problem}", out


# ---- ShimParams -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,problem", [
    ("log_buffer_start", "symbol:cmdline_append", "log buffer [0x"),
    ("heap_size", 1 << 40, "heap [0x"),
    ("initrd_offset", "symbol:shim_main", "initrd [0x"),
    ("used_end", -(1 << 62), "used range [0x"),
    ("kernel_entry_offset", 0, "kernel entry 0x"),
    ("sidecar_entry_offset", 1 << 40, "sidecar entry 0x"),
])
def test_shim_params_are_checked_before_they_are_used(field, value, problem):
    """A log buffer over the shim's own code made it write its log into cmdline_append."""
    cfg = BootConfig(cpus=4)
    if isinstance(value, str):
        m = Machine(cfg)
        value = m.shim.symbol(value.split(":")[1])
        m.close()
    out = boot_case(cfg, params={field: value})
    assert out.kind == "panic" and out.message.startswith(f"malformed ShimParams: {problem}"), out


# ---- kernel_alignment --------------------------------------------------------------------------

@pytest.mark.parametrize("alignment,problem", [(0x700000, "is not a power of two"), (0x200001, "is not a power of two"),
                                               (1 << 31, "is larger than an x86_64 kernel image can be")])
def test_kernel_alignment_must_be_a_power_of_two(tmp_path, vmlinux, alignment, problem):
    """0x700000 was "honoured": the kernel went to 0x8500000, not even 2 MiB aligned."""
    path = write(tmp_path, make_bzimage(vmlinux, "gzip", alignment=alignment))
    with pytest.raises(KernelError) as info:
        Machine(BootConfig(kernel=path))
    one_line(info.value, f"bzImage kernel_alignment {alignment:#x} {problem}")
    with pytest.raises(ImageError) as info:
        plan_layout(128 * MiB, 64 * MiB, 0x3000, 0x300000, 0x1000, 0)
    one_line(info.value, "kernel alignment 0x300000 is not a power of two")


def test_kernel_alignment_power_of_two_places_the_kernel(tmp_path, vmlinux):
    out = boot_case(BootConfig(kernel=write(tmp_path, make_bzimage(vmlinux, "gzip", alignment=8 * MiB))))
    assert out.kind == "handoff" and out.layout.region("kernel").start % (8 * MiB) == 0


# ---- state left by an earlier machine --------------------------------------------------------------

def _fingerprint(result):
    return (result.counters["instructions"], result.serial["COM3"], result.handoff.boot_params, result.handoff.dtb)


@pytest.mark.parametrize("function", ["fdt_validate", "build_kernel_cmdline"])  # before / after the sidecar ran
def test_a_machine_that_rewrote_its_code_leaves_nothing_to_the_next(function):
    """Code rewritten in a machine (a log ring over cmdline_append did it; here the debugger
    writes a ud2 over a shim function) is retranslated by Unicorn; the next pooled machine wrote the
    pristine shim into RAM, which Unicorn did not see, and ran the old translation: #UD."""
    cfg = BootConfig(cpus=4)
    m = Machine(cfg)
    before = _fingerprint(m.run_to_handoff())
    m.close()
    m = Machine(cfg)
    target = m.image.shim_base + m.shim.symbol(function)
    DebugTarget(m).write_memory(0, target, b"\x0f\x0b", physical=True)  # the translation is dropped
    with pytest.raises(HclsimError, match="#UD"):
        m.run_to_handoff()
    m.close()
    for _ in range(2):
        m = Machine(cfg)
        try:
            assert _fingerprint(m.run_to_handoff()) == before
        finally:
            m.close()


# ---- command lines -------------------------------------------------------------------------------

def test_trusted_host_command_line_with_non_ascii_bytes():
    """Linux copies the command line as bytes and splits it at isspace() bytes: UTF-8, Latin-1
    or control bytes are taken as they are (only the NUL ends it)."""
    cfg = BootConfig(cpus=4)
    args = "OPENHCL_NAME=café LANG=\udcff bell=\x07"  # \udcff: the byte 0xff
    host, blob = host_dt_for(cfg, layout_of(cfg), bootargs=args)
    out = boot_case(cfg, host_dt=blob)
    assert out.kind == "handoff", out
    check_handoff(out, ShimInputs.of(cfg, host))
    h = out.result.handoff
    assert h.cmdline_bytes.endswith(b"OPENHCL_NAME=caf\xc3\xa9 LANG=\xff bell=\x07")
    assert h.cmdline.endswith("OPENHCL_NAME=café LANG=\\xff bell=\x07")


# ---- "Bad input": images that are not what they are given as ------------------------------------

@pytest.fixture(scope="module")
def userspace(tmp_path_factory) -> dict:
    """A dynamic, a static and a static-pie userspace program, built with gcc."""
    d = tmp_path_factory.mktemp("userspace")
    src = d / "hello.c"
    src.write_text("int main(void) { return 0; }\n")
    out = {"dynamic": "/bin/ls"}
    for kind, flags in (("static", ["-static", "-no-pie"]), ("static-pie", ["-static-pie"])):
        exe = d / kind
        subprocess.run(["gcc", *flags, "-o", str(exe), str(src)], check=True, capture_output=True)
        out[kind] = str(exe)
    return out


@pytest.mark.parametrize("kind,problem", [
    ("dynamic", "not a kernel: a dynamically linked program (PT_INTERP '/lib64/ld-linux-x86-64.so.2')"),
    ("static", "not a kernel: its entry code is linked at 0x401"),
    ("static-pie", "not a kernel: its entry code is linked at 0x"),
])
def test_userspace_program_as_the_kernel(userspace, kind, problem):
    with pytest.raises(KernelError) as info:
        Machine(BootConfig(kernel=userspace[kind]))
    msg = one_line(info.value, problem)
    assert msg.startswith(f"kernel {userspace[kind]}: not a kernel")


@pytest.mark.parametrize("what", ["shim", "vtl0", "dynamic", "static", "static-pie", "kernel"])
def test_elf_given_as_sidecar_that_is_not_a_sidecar(userspace, what):
    path = {"shim": firmware.build(firmware.SHIM), "vtl0": firmware.build(firmware.VTL0_GUEST),
            "kernel": images.default_kernel(), **userspace}[what]
    with pytest.raises(FirmwareImageError) as info:
        Machine(BootConfig(sidecar=str(path)))
    msg = one_line(info.value, "not a sidecar", "dynamically linked", "userspace program", "linked at 0")
    assert msg.startswith(f"sidecar {path}: ")


def test_the_shipped_images_are_what_they_are():
    assert load_firmware_image(firmware.build(firmware.SIDECAR), "sidecar").entry == 0
    with pytest.raises(FirmwareImageError, match="not a boot shim: its entry point is sidecar_entry"):
        load_firmware_image(firmware.build(firmware.SIDECAR), "boot shim")
