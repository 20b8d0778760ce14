"""Shared pytest fixtures. Keep each fixture small and documented; group them by subsystem."""
import os
from pathlib import Path

import pytest

# --- kernel and initrd images ---------------------------------------------------------------

REAL_IMAGES_DEFAULT = "/var/cache/hclsim-real-images"


@pytest.fixture(scope="session")
def standin_kernel() -> Path:
    """The stand-in vmlinux ELF (kernel_stub/image/), built into the cache."""
    from hclsim.kernel_stub import images
    return images.default_kernel()


@pytest.fixture(scope="session")
def shipped_initrd() -> Path:
    """The shipped default initrd (kernel_stub/rootfs.config as a gzip cpio newc)."""
    from hclsim.kernel_stub import images
    return images.default_initrd()


def _real_image(name: str) -> Path:
    """A file fetched by .ci/real-images.sh; skipped when absent, but a failure under CI."""
    directory = Path(os.environ.get("HCLSIM_REAL_IMAGES") or REAL_IMAGES_DEFAULT)
    path = directory / name
    if not path.is_file() or not (directory / "VERSION").is_file():
        reason = (f"real Debian kernel/initrd not found in {directory} "
                  f"(run .ci/real-images.sh as root, or set HCLSIM_REAL_IMAGES)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def real_kernel() -> Path:
    """A Debian cloud kernel's /boot/vmlinuz (a compressed bzImage)."""
    return _real_image("vmlinuz")


@pytest.fixture(scope="session")
def real_initrd() -> Path:
    """The initrd Debian's initramfs-tools built for that kernel."""
    return _real_image("initrd.img")


@pytest.fixture(scope="session")
def real_kernel_version(real_kernel) -> str:
    """The release of the real kernel, e.g. 6.1.0-56-cloud-amd64."""
    return (real_kernel.parent / "VERSION").read_text().strip()
