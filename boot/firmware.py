"""Builds the project's freestanding x86_64 images (boot shim, stand-in kernel, later the sidecar)
with the machine's gcc/binutils, cached by a hash of their sources, compiler and flags.

Each image is a directory of .c/.S files plus a linker script; the result is a static ELF with
symbols and DWARF, so gdb, addr2line and `hclsim step` can show source lines.
"""
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hclsim import HclsimError

BOOT_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = BOOT_DIR / "firmware" / "include"

# Freestanding, no SSE (nothing saves vector state for us), no red zone (interrupts may come
# on the same stack later), no stack protector or CET (no runtime to support them).
COMMON_CFLAGS = [
    "-std=gnu11", "-O2", "-g", "-ffreestanding", "-fno-builtin", "-nostdlib",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-fcf-protection=none", "-mno-red-zone", "-mgeneral-regs-only", "-mno-sse", "-mno-mmx",
    "-fno-common", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
    "-ffunction-sections", "-fdata-sections",
]


class FirmwareBuildError(HclsimError):
    pass


class CacheDirError(HclsimError):
    """The cache folder cannot hold builds: not a folder, cannot be created or written."""


@dataclass(frozen=True)
class FirmwareSpec:
    """One freestanding image: its sources, linker script and how it is linked."""
    name: str
    source_dir: Path
    linker_script: str = "link.ld"
    pie: bool = True  # self-relocating images are linked -static-pie
    include_dirs: tuple = field(default_factory=lambda: (INCLUDE_DIR,))
    extra_cflags: tuple = ()

    def sources(self) -> list[Path]:
        return sorted(p for p in self.source_dir.iterdir() if p.suffix in (".c", ".S"))

    def inputs(self) -> list[Path]:
        files = [p for p in self.source_dir.iterdir() if p.suffix in (".c", ".S", ".h", ".ld")]
        for inc in self.include_dirs:
            files += [p for p in Path(inc).iterdir() if p.suffix == ".h"]
        return sorted(set(files))


SHIM = FirmwareSpec("shim", BOOT_DIR / "firmware" / "shim")
SIDECAR = FirmwareSpec("sidecar", BOOT_DIR.parent / "sidecar" / "firmware")
VTL0_GUEST = FirmwareSpec("vtl0", BOOT_DIR / "firmware" / "vtl0")
# The real /init of the test initrd for booting a distribution Linux (boot/initrd.py:
# real_init_initrd()): a static ET_EXEC at 0x400000, no DWARF (-g0) so the build holds no
# path of the checkout and the initrd is the same bytes wherever it is built.
INIT = FirmwareSpec("init", BOOT_DIR / "firmware" / "init", pie=False, include_dirs=(),
                    extra_cflags=("-g0",))


def cache_dir() -> Path:
    base = os.environ.get("HCLSIM_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hclsim"


def _cache_label(path: Path) -> str:
    return f"cache folder {path} ($HCLSIM_CACHE)" if os.environ.get("HCLSIM_CACHE") else f"cache folder {path}"


def check_cache_dir() -> Path:
    """cache_dir(), created if missing, or CacheDirError saying why it cannot hold the builds
    (a file in the way, a path under /proc or a regular file, no write access). Used before a
    boot starts and before a build writes there."""
    path = cache_dir()
    try:
        if path.exists() and not path.is_dir():
            raise CacheDirError(f"{_cache_label(path)} is not a folder; point HCLSIM_CACHE at a folder")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except CacheDirError:
        raise
    except OSError as e:
        raise CacheDirError(f"{_cache_label(path)} cannot be used: {e.strerror or e}; "
                            "point HCLSIM_CACHE at a writable folder") from None
    return path


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise FirmwareBuildError(
            f"{name} not found: the firmware is built with the machine's gcc and binutils "
            f"(apt-get install gcc binutils), or pass a prebuilt image with --shim PATH")
    return path


def _cflags(spec: FirmwareSpec) -> list[str]:
    flags = list(COMMON_CFLAGS) + list(spec.extra_cflags)
    flags += ["-fPIE"] if spec.pie else ["-fno-pic", "-mcmodel=kernel"]
    for inc in spec.include_dirs:
        flags += ["-I", str(inc)]
    return flags


def _link_flags(spec: FirmwareSpec) -> list[str]:
    flags = ["-nostdlib", "-nostartfiles", "-Wl,--build-id=none", "-Wl,--gc-sections",
             "-Wl,-z,noexecstack", "-Wl,-z,max-page-size=4096", "-Wl,-T," + str(spec.source_dir / spec.linker_script)]
    if spec.pie:
        flags += ["-static-pie", "-Wl,--no-dynamic-linker", "-Wl,-z,notext"]
    else:
        flags += ["-static", "-no-pie"]
    return flags


@functools.lru_cache(maxsize=None)
def _compiler_version(gcc: str) -> str:
    """First line of `gcc --version`, once per process: every machine asks for up to four images."""
    return subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def source_hash(spec: FirmwareSpec) -> str:
    h = hashlib.sha256()
    h.update(_compiler_version(_tool("gcc")).encode())
    h.update(repr((_cflags(spec), _link_flags(spec))).encode())
    for path in spec.inputs():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cached_path(spec: FirmwareSpec) -> Path:
    """Where spec's ELF is (or will be) cached."""
    return cache_dir() / "firmware" / f"{spec.name}-{source_hash(spec)}" / f"{spec.name}.elf"


def build(spec: FirmwareSpec, force: bool = False, verbose: bool = False) -> Path:
    """The path of spec's ELF, building it into the cache unless an identical build is there."""
    out = cached_path(spec)
    if out.exists() and not force:
        return out
    gcc = _tool("gcc")
    _tool("ld")
    check_cache_dir()
    try:
        out.parent.parent.mkdir(parents=True, exist_ok=True)
        return _build_into(spec, out, gcc, verbose)
    except OSError as e:
        raise CacheDirError(f"{_cache_label(cache_dir())} cannot be used: {e.strerror or e}; "
                            "point HCLSIM_CACHE at a writable folder") from None


def _build_into(spec: FirmwareSpec, out: Path, gcc: str, verbose: bool) -> Path:
    # Build in a private directory and rename into place: parallel test workers may race here.
    with tempfile.TemporaryDirectory(dir=out.parent.parent) as tmp:
        tmp = Path(tmp)
        objects = []
        for src in spec.sources():
            obj = tmp / (src.name + ".o")
            _run([gcc, *_cflags(spec), "-c", str(src), "-o", str(obj)], verbose)
            objects.append(str(obj))
        elf = tmp / out.name
        _run([gcc, *_link_flags(spec), *objects, "-o", str(elf)], verbose)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(elf, out)
    return out


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # found on PATH but cannot be run
        raise FirmwareBuildError(f"firmware build failed: cannot run {cmd[0]}: {e.strerror or e}") from None
    if proc.returncode != 0:
        first = next((l for l in proc.stderr.splitlines() if "error" in l), proc.stderr.strip()[:300])
        raise FirmwareBuildError(f"firmware build failed: {first}")
