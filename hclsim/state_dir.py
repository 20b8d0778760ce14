"""The VM's state folder (`hclsim boot --state DIR`): what a VM keeps across its runs.

It holds the VM's VMGS disk, hclsim.vmgs (4 MiB, VMGS_DEFAULT_CAPACITY, sparse, blank until
the VM worker formats it), which the host offers the paravisor as /dev/vmgs, and a lock: one VM
at a time uses a state folder (a second would tear the first one's writes). Without --state a
fresh folder in the run's folder stands in, gone after the run.
"""
import fcntl
import os

from hclsim import HclsimError
from hclsim.hcl import vmgs

VMGS_FILE = "hclsim.vmgs"
LOCK_FILE = "hclsim.lock"


class StateDirError(HclsimError):
    pass


class StateDir:
    def __init__(self, path: str):
        """Take the folder (made if missing) and check its VMGS before anything boots."""
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
            self._lock = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateDirError(f"--state {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(self._lock)
            raise StateDirError(f"--state {path}: another VM uses this state folder (pid {holder})") from None
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, f"{os.getpid()}\n".encode(), 0)
        self.vmgs_path = os.path.join(path, VMGS_FILE)
        try:
            if not os.path.exists(self.vmgs_path):
                with open(self.vmgs_path, "wb") as f:
                    f.truncate(vmgs.DEFAULT_CAPACITY)
            self.vmgs_state = vmgs.check_file(self.vmgs_path)
        except vmgs.VmgsError as exc:
            self.close()
            raise StateDirError(f"--state {path}: {VMGS_FILE}: {exc} (left as it is; move it away to start "
                                "the VM's state over)") from None
        except OSError as exc:
            self.close()
            raise StateDirError(f"--state {path}: {VMGS_FILE}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)             # the lock goes with it
            self._lock = None
