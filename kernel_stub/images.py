"""The images hclsim boots by default: the stand-in kernel (kernel_stub/image/, a vmlinux-like
ELF built by boot/firmware.py) and the shipped initrd (built from the kernel_stub/initrd/ tree).

Both are cached in firmware.cache_dir(), keyed by a hash of their inputs, and written by atomic
rename so parallel test workers can race safely.
"""
import hashlib
import os
import tempfile
from pathlib import Path

from hclsim.boot import firmware, initrd

HERE = Path(__file__).resolve().parent
STANDIN_KERNEL = firmware.FirmwareSpec("standin-kernel", HERE / "image", pie=False)
INITRD_TREE = HERE / "initrd"
INITRD_COMPRESSION = "gzip"


def default_kernel(force: bool = False) -> Path:
    """The stand-in vmlinux (entry at physical 0x1000000), built unless cached."""
    return firmware.build(STANDIN_KERNEL, force=force)


def default_initrd(force: bool = False) -> Path:
    """The shipped initrd (gzip cpio newc of kernel_stub/initrd/), built unless cached."""
    out = firmware.cache_dir() / "initrd" / f"hclsim-initrd-{tree_hash()}.cpio.gz"
    if out.exists() and not force:
        return out
    data = initrd.build_initrd(INITRD_TREE, INITRD_COMPRESSION)
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


def tree_hash() -> str:
    """Hash of what build_initrd() reads (names, types, exec bits, link targets, contents), the
    compression and the builder itself, so any change to them gives a new cache entry."""
    h = hashlib.sha256(INITRD_COMPRESSION.encode())
    h.update(Path(initrd.__file__).read_bytes())
    for path in sorted(INITRD_TREE.rglob("*")):
        rel = path.relative_to(INITRD_TREE).as_posix()
        if path.is_symlink():
            h.update(f"L {rel} -> {os.readlink(path)}\n".encode())
        elif path.is_dir():
            h.update(f"D {rel}\n".encode())
        else:
            h.update(f"F {rel} {os.access(path, os.X_OK)} {path.stat().st_size}\n".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
