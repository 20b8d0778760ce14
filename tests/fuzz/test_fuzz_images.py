"""Mutated kernels and initrds: the stand-in vmlinux and bzImages of it in every payload
compression, the shipped initrd and cpio newc archives (plain, legacy lz4, concatenated), with
bits flipped, words overwritten, header fields set to the extremes or to malformed cpio hex, and
truncation. The loader refuses one with a one-line HclsimError naming the file, or accepts it;
then it boots: the stand-in's check (e820 covering the kernel, the initrd's bytes) and the
oracles must pass. No warning may be printed on the way."""
import gzip
import warnings

from hypothesis import given, strategies as st

from hclsim import HclsimError
from hclsim.boot.initrd import compress, load_initrd
from hclsim.boot.kernel import load_kernel
from hclsim.config import BootConfig
from hclsim.kernel_stub import images

from ..test_kernel import make_bzimage
from .harness import ShimInputs, boot_case, check_handoff, clean_error, fuzz_settings, run_then_check_pristine

_IMAGES = {}


def kernels() -> dict:
    if not _IMAGES:
        vmlinux = images.default_kernel().read_bytes()
        _IMAGES["elf"] = vmlinux
        for c in ("gzip", "lz4", "zstd", "xz", "bzip2", "lzma"):
            _IMAGES[c] = make_bzimage(vmlinux, c)
        initrd = images.default_initrd().read_bytes()
        cpio = gzip.decompress(initrd)
        _IMAGES["initrd"] = {"gzip": initrd, "cpio": cpio, "lz4": compress(cpio, "lz4"),
                             "concatenated": cpio + compress(cpio, "zstd")}
    return _IMAGES


CPIO_FIELDS = [b"-0000070", b"-0000001", b"0x000010", b" 0000001", b"0000_001", b"+0000010", b"ffffffff",
               b"00000000", b"7fffffff", b"0000000g"]


@st.composite
def mutated(draw, data: bytes, header_span: int) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "byte", "word", "hex", "truncate"]))
        if not b:
            break
        near = draw(st.booleans())  # half the changes land in the headers, where they matter most
        at = draw(st.integers(0, min(len(b), header_span if near else len(b)) - 1))
        if kind == "flip":
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            b[at] = draw(st.integers(0, 255))
        elif kind == "word":
            value = draw(st.sampled_from([0, 1, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 0x1000, 0x200000]))
            b[at:at + 8] = value.to_bytes(4, "little") * 2
        elif kind == "hex":
            b[at:at + 8] = draw(st.sampled_from(CPIO_FIELDS))
        else:
            del b[at:]
    return bytes(b)


def _boot(config: BootConfig, inputs: ShimInputs):
    out = boot_case(config)
    assert out.kind == "handoff", out  # an accepted image boots: the shim does not read it
    check_handoff(out, inputs)
    return out


@given(data=st.data())
@fuzz_settings(200)
def _kernel(data, tmp):
    name = data.draw(st.sampled_from(["elf", "elf", "gzip", "lz4", "zstd", "xz", "bzip2", "lzma"]))
    image = data.draw(mutated(kernels()[name], 0x1400))
    path = tmp / "kernel"
    path.write_bytes(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            kernel = load_kernel(path)
        except HclsimError as exc:
            assert clean_error(exc).startswith(f"kernel {path}"), exc
            return
    assert kernel.span <= 1 << 30 and kernel.alignment & (kernel.alignment - 1) == 0
    config = BootConfig(cpus=4, kernel=str(path))
    out = _boot(config, ShimInputs.of(config))
    assert out.layout.region("kernel").start % kernel.alignment == 0


def test_mutated_kernels(tmp_path):
    run_then_check_pristine(lambda: _kernel(tmp=tmp_path))


@given(data=st.data())
@fuzz_settings(300)
def _initrd(data, tmp):
    name = data.draw(st.sampled_from(["gzip", "cpio", "cpio", "lz4", "concatenated"]))
    image = data.draw(mutated(kernels()["initrd"][name], 0x300))
    path = tmp / "initrd"
    path.write_bytes(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            load_initrd(path)
        except HclsimError as exc:
            assert clean_error(exc).startswith(f"initrd {path}"), exc
            return
    config = BootConfig(cpus=4, initrd=str(path))
    out = _boot(config, ShimInputs.of(config))
    assert out.result.handoff.initrd_size == len(image)


def test_mutated_initrds(tmp_path):
    run_then_check_pristine(lambda: _initrd(tmp=tmp_path))
