"""The images hclsim boots by default: the stand-in kernel (kernel_stub/image/, a vmlinux-like
ELF built by boot/firmware.py) and the shipped initrd (kernel_stub/rootfs.config, a gen_init_cpio
config like OpenHCL's, over the sources in kernel_stub/rootfs/).

What the config needs built (the kernel modules, compiled with the machine's gcc, and the build
information files) and the initrd itself are cached in firmware.cache_dir(), keyed by a hash of
their inputs, and written by atomic rename so parallel test workers can race safely.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import hclsim
from hclsim.boot import firmware, initrd

HERE = Path(__file__).resolve().parent
STANDIN_KERNEL = firmware.FirmwareSpec("standin-kernel", HERE / "image", pie=False)
ROOTFS_CONFIG = HERE / "rootfs.config"
ROOTFS_SOURCES = HERE / "rootfs"
MODULE_SOURCES = ROOTFS_SOURCES / "modules"
INITRD_COMPRESSION = "gzip"

# Kernel-module-like objects: no PIC, kernel code model, and nothing that varies by machine or
# path (-fno-ident drops the compiler's .comment; sources are compiled by their file name from
# their folder, so the STT_FILE symbol is the bare name). -fno-toplevel-reorder keeps the
# .modinfo strings in source order.
MODULE_CFLAGS = (
    "-c", "-O2", "-std=gnu11", "-ffreestanding", "-fno-pic", "-mcmodel=kernel", "-mno-red-zone",
    "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
    "-fno-ident", "-fno-toplevel-reorder", "-Wall", "-Wextra", "-Werror",
)


def default_kernel(force: bool = False) -> Path:
    """The stand-in vmlinux (entry at physical 0x1000000), built unless cached."""
    return firmware.build(STANDIN_KERNEL, force=force)


def default_initrd(force: bool = False) -> Path:
    """The shipped initrd (gzip cpio newc of kernel_stub/rootfs.config), built unless cached."""
    extra = rootfs_build(force=force)
    out = firmware.cache_dir() / "initrd" / f"hclsim-initrd-{rootfs_hash(extra)}.cpio.gz"
    if out.exists() and not force:
        return out
    data = initrd.build_initrd_from_config(ROOTFS_CONFIG, ROOTFS_SOURCES, INITRD_COMPRESSION, extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".initrd-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def rootfs_hash(extra_sources: dict) -> str:
    """Hash of what build_initrd_from_config() reads: the config, every source file it names
    (the built ones included), the compression and the builder itself."""
    h = hashlib.sha256(INITRD_COMPRESSION.encode())
    h.update(Path(initrd.__file__).read_bytes())
    h.update(ROOTFS_CONFIG.read_bytes())
    for path in initrd.config_sources(ROOTFS_CONFIG, ROOTFS_SOURCES, extra_sources):
        h.update(f"{path.name} {path.stat().st_size}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# --- what the config needs built --------------------------------------------------------------

def module_sources() -> list[Path]:
    return sorted(MODULE_SOURCES.glob("*.c"))


def build_info() -> dict[str, bytes]:
    """/etc/underhill-build-info.json and /etc/kernel-build-info.json: fixed content (no dates,
    hosts or git state), so builds stay reproducible."""
    release = re.search(r'#define UTS_RELEASE "([^"]+)"', (STANDIN_KERNEL.source_dir / "version.c").read_text())
    underhill = {"crate_name": "underhill_entry", "openhcl_version": hclsim.__version__,
                 "scm_revision": "hclsim", "scm_branch": "hclsim", "build_profile": "release"}
    kernel = {"kernel_version": release.group(1) if release else "unknown", "scm_revision": "hclsim"}
    return {name: (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
            for name, doc in (("underhill-build-info.json", underhill), ("kernel-build-info.json", kernel))}


def rootfs_build(force: bool = False) -> dict[str, Path]:
    """Build the modules (modules/NAME.ko) and build information files into the cache unless
    there; returns the config's SOURCE names for them mapped to the cached files."""
    info = build_info()
    gcc = firmware._tool("gcc")
    h = hashlib.sha256(firmware._compiler_version(gcc).encode())
    h.update(repr(MODULE_CFLAGS).encode())
    for path in sorted(MODULE_SOURCES.glob("*.[ch]")):
        h.update(f"{path.name} {path.stat().st_size}\n".encode())
        h.update(path.read_bytes())
    for name, data in sorted(info.items()):
        h.update(name.encode() + b"\n" + data)
    out = firmware.cache_dir() / "rootfs" / f"rootfs-{h.hexdigest()[:16]}"
    names = {f"modules/{src.stem}.ko": out / f"{src.stem}.ko" for src in module_sources()}
    names.update({name: out / name for name in info})
    if force or not out.is_dir():
        firmware.check_cache_dir()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _build_into(out, gcc, info, force)
        except OSError as e:
            raise firmware.CacheDirError(f"cache folder {firmware.cache_dir()} cannot be used: "
                                         f"{e.strerror or e}; point HCLSIM_CACHE at a writable folder") from None
    return names


def _build_into(out: Path, gcc: str, info: dict, force: bool) -> None:
    # Built in a private folder renamed into place: parallel workers may race here.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".rootfs-"))
    try:
        for src in module_sources():
            modname = src.stem.replace("-", "_")  # KBUILD_MODNAME, as kbuild derives it
            _compile([gcc, *MODULE_CFLAGS, f'-DKBUILD_MODNAME="{modname}"', src.name,
                      "-o", str(tmp / f"{src.stem}.ko")], src)
        for name, data in info.items():
            (tmp / name).write_bytes(data)
        if force and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():  # not a lost race: report it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compile(cmd: list[str], src: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=src.parent, capture_output=True, text=True)
    except OSError as e:
        raise firmware.FirmwareBuildError(f"kernel module {src.name}: cannot run {cmd[0]}: "
                                          f"{e.strerror or e}") from None
    if proc.returncode != 0:
        first = next((l for l in proc.stderr.splitlines() if "error" in l), proc.stderr.strip()[:300])
        raise firmware.FirmwareBuildError(f"kernel module build failed: {first}")
