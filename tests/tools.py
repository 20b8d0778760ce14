"""Debian tools some tests drive (dtc, GNU cpio, gdb): a test that needs one skips, naming the
package to install, and fails instead when CI is set (CI installs them in .ci/run)."""
import os
import shutil

import pytest

PACKAGES = {"dtc": "device-tree-compiler", "cpio": "cpio", "gdb": "gdb"}


def require(tool: str) -> str:
    """The path of tool, or skip (fail under CI) naming its Debian package."""
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} not installed (apt-get install {PACKAGES[tool]})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path
