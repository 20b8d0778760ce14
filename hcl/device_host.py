"""openhcl_remote_chipset_worker: a VTL0 device in a mesh host of its own (the control process
makes it on the VM worker's MakeWorker; shared/design/openhcl-userspace.md section 6).

Isolation first: every descriptor but its channel, the proxy's socket and the kernel's is
closed, PR_SET_NO_NEW_PRIVS is set, and where the host kernel offers Landlock, opening files is
limited to nothing at all (its two state files were opened before, through the stand-in
kernel). Its state: the device's saved state after every committed write, in two alternating
slots of its state folder (a sequence number, a CRC and a length each), so a crash between
writes leaves the last complete one.
"""
import ctypes
import os
import socket
import struct
import zlib

from hclsim.defs import kabi
from hclsim.hcl import linux
from hclsim.hcl import mesh_pb2 as pb

SLOT = struct.Struct("<QII")            # sequence, CRC32 of the blob, its length; then the blob
PR_SET_NO_NEW_PRIVS = 38
LANDLOCK_CREATE_RULESET, LANDLOCK_RESTRICT_SELF = 444, 446
LANDLOCK_ACCESS_FS_ALL = (1 << 13) - 1   # ABI 1's filesystem rights: execute .. make_sym


class StateStore:
    """The device's committed state in folder (a rootfs path). Both slot files are opened once
    through the kernel (rootfs files come as host descriptors), so a commit is one pwrite(2)
    (a kernel request per commit cost ~200 us, more than the access itself)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.seq = 0
        linux.mkdir_all(folder)
        self.fds = [linux.open_file(f"{folder}/state.{n}", kabi.O_RDWR | kabi.O_CREAT).fileno() for n in (0, 1)]

    def load(self) -> bytes | None:
        best = None
        for fd in self.fds:
            raw = os.pread(fd, 1 << 20, 0)
            if len(raw) < SLOT.size:
                continue
            seq, crc, length = SLOT.unpack_from(raw)
            blob = raw[SLOT.size:SLOT.size + length]
            if len(blob) == length and zlib.crc32(blob) == crc and (best is None or seq > best[0]):
                best = (seq, blob)
        if best is None:
            return None
        self.seq = best[0]
        return best[1]

    def commit(self, blob: bytes) -> None:
        """The newest state into the older slot: a crash mid-write leaves the other one whole."""
        self.seq += 1
        os.pwrite(self.fds[self.seq % 2], SLOT.pack(self.seq, zlib.crc32(blob), len(blob)) + blob, 0)


RESTRICTED: list[str] = []


def restrict() -> list[str]:
    """No new privileges, and Landlock (no file opens) where the kernel offers it, for this
    thread and every thread it starts later: a device host does it in its main thread before
    any other (both are per thread). What was applied."""
    libc = ctypes.CDLL(None, use_errno=True)
    done = []
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        done.append("no new privileges")
    if _landlock(libc):
        done.append("landlock: no file opens")
    RESTRICTED[:] = done
    return done


ENGINE = {}                              # the tpm host's swtpm, started before the restrictions


def _tpm_engine_dir() -> str:
    """swtpm's state folder, on the host (swtpm is a host program): one per worker, since the
    one of a worker just killed may still be held by its swtpm (which ends when it notices), and
    nothing in it outlives the worker (NV is in the VMGS, the rest in the saved state)."""
    return os.path.join(linux.root_dir(), f"var/lib/hclsim-devices/tpm/swtpm-{os.getpid()}")


def prepare_host(name: str) -> None:
    """A device host, before its first other thread: load what serving needs (no imports once
    files cannot be opened), start the vTPM's swtpm (a program Landlock would stop), restrict."""
    if name == "tpm":
        from hclsim.devices import swtpm, vtpm  # noqa: F401
        os.makedirs(_tpm_engine_dir(), exist_ok=True)
        ENGINE["tpm"] = swtpm.Swtpm(_tpm_engine_dir(), terminate=True)
    import json, resource, traceback  # noqa: F401,E401  (imported later, in serving)
    from hclsim.devices import device_worker, device_worker_pb2, vtl0_test  # noqa: F401
    from hclsim.defs import platform  # noqa: F401
    from hclsim.hcl import guest_ram, inspect_tree, klog, profiler, underhill_init, worker  # noqa: F401
    restrict()


def isolate(keep: set[int]) -> str:
    """Close every descriptor but keep (and stdio): what the worker holds from then on.
    (close_range over the gaps: /proc/self/fd cannot be listed once Landlock is on.)"""
    import resource
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    start = 3
    for fd in sorted(f for f in keep if f >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, max(start, limit))
    return ", ".join(["descriptors closed", *RESTRICTED])


def _landlock(libc) -> bool:
    """Deny every filesystem access right (the ruleset has no rules): True if the kernel took it."""
    class Attr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64)]
    attr = Attr(LANDLOCK_ACCESS_FS_ALL)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0)
    if fd < 0:
        return False
    ok = libc.syscall(LANDLOCK_RESTRICT_SELF, fd, 0) == 0
    os.close(fd)
    return ok


class RemoteChipsetDeviceWorker:
    """One device: params are a RemoteChipsetDeviceParams, the proxy's socket came with them."""
    ends_host = True

    def __init__(self, params: bytes, channel, log, fds=()):
        from hclsim.devices import device_worker_pb2 as dpb
        self.params = dpb.RemoteChipsetDeviceParams.FromString(params)
        self.channel, self.log = channel, log
        self.sock = socket.socket(fileno=fds[0]) if fds else None
        for extra in fds[1:]:
            os.close(extra)

    def run(self) -> None:
        from hclsim.devices.device_worker import DeviceServer, restore_bytes
        if self.sock is None:
            raise RuntimeError("no proxy socket came with the launch")
        name = self.params.device_name
        make = DEVICES.get(name)
        if make is None:
            raise RuntimeError(f"no device {name!r} for a worker")
        store = StateStore(self.params.state_dir)
        blob = store.load()
        device = make()
        if blob is not None:
            restore_bytes(device, blob)
        memory = "no guest memory"
        if getattr(device, "uses_guest_memory", False):
            memory = self._map_guest_memory(device)
        engine = ENGINE.get(name)
        engine_fds = [engine.data.fileno(), engine.ctrl.fileno()] if engine is not None else []
        applied = isolate({mesh_fd(), kabi.KERNEL_FD, self.sock.fileno(), *store.fds, *engine_fds,
                           *linux.kernel_fds()})
        self.log.info(f"device {name}: serving ({'restored from' if blob else 'new, state in'} "
                      f"{self.params.state_dir}; {memory}; {applied})")
        fatal = DeviceServer(device, self.sock, commit=store.commit, restored=blob is not None).serve()
        if fatal:
            raise RuntimeError(f"device {name}: {fatal}; the worker ends (its proxy restarts it)")

    @staticmethod
    def _map_guest_memory(device) -> str:
        """The shared guest RAM mapped, where allowed (not in a confidential VM, whose memory the
        paravisor must not hand out); else each access is a request to the proxy."""
        from hclsim.hcl import guest_ram
        from hclsim.hcl.underhill_init import confidential
        if confidential(os.environ):
            return "guest memory through the proxy (confidential VM)"
        try:
            device.guest_memory = guest_ram.map_vtl0()
        except OSError as exc:
            return f"guest memory through the proxy ({exc.strerror or exc})"
        return "guest RAM mapped" if device.guest_memory is not None else "guest memory through the proxy"

    def stop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _make_tpm():
    from hclsim.devices.vtpm import Vtpm
    engine = ENGINE.get("tpm")
    if engine is None:
        raise RuntimeError("the tpm host has no swtpm")
    return Vtpm(engine)


def _devices() -> dict:
    from hclsim.devices.vtl0_test import WORKER_DEVICES
    return {**WORKER_DEVICES, "tpm": _make_tpm}


class _Devices(dict):
    """The devices a worker can run: the VTL0 test devices and the vTPM (loaded when asked)."""

    def _all(self) -> dict:
        return _devices()

    def __contains__(self, name) -> bool:
        return name in self._all()

    def get(self, name, default=None):
        return self._all().get(name, default)


DEVICES = _Devices()


def mesh_fd() -> int:
    from hclsim.hcl.mesh import IPC_FD
    return IPC_FD


def worker_params(name: str) -> bytes:
    from hclsim.devices import device_worker_pb2 as dpb
    return dpb.RemoteChipsetDeviceParams(device_name=name, state_dir=f"/var/lib/hclsim-devices/{name}")\
        .SerializeToString()


def launch(name: str) -> pb.LaunchWorker:
    return pb.LaunchWorker(worker_id="openhcl_remote_chipset_worker", params=worker_params(name))
