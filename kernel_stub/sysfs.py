"""sysfs of the stand-in kernel: the CPUs (and onlining a sidecar CPU), transparent huge
pages, the raw DTB and the device tree, and the new_id files of the uio_hv_generic and
vfio-pci drivers, with the parsing and errnos of the Linux store functions.

A store gets at most PAGE_SIZE bytes of a write as a C string (it ends at a NUL); a
zero-length write never reaches it (sysfs_kf_write). Accepted writes are logged in order in
SysfsState.writes [(absolute path, value)], which can be the Sysctl's list, so one log
holds the order of every write underhill_init makes.
"""
import re
from dataclasses import dataclass, field

from hclsim.defs import kabi
from hclsim.kernel_stub.vfs import Dir, GeneratedFile, KernelError

PAGE_SIZE = 4096
NR_CPUS = 2048
THP_MODES = ("always", "madvise", "never")
PCI_ANY_ID = 0xFFFFFFFF
_GUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX_FIELD = re.compile(rb"\s*(?:0[xX](?=[0-9a-fA-F]))?([0-9a-fA-F]+)")


@dataclass
class SysfsState:
    thp_enabled: str = "always"              # CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS
    uio_new_ids: list = field(default_factory=list)     # GUIDs (lowercase), in order
    vfio_new_ids: list = field(default_factory=list)    # (vendor, device, subvendor, subdevice, class,
    #                                                       class_mask, driver_data)
    writes: list = field(default_factory=list)
    on_uio_new_id: object = None             # (guid) -> None: a driver binding the devices of that class
    on_vfio_new_id: object = None            # (id tuple) -> None


def cpu_list(cpus) -> str:
    """A CPU list as Linux prints it (%*pbl): ranges, `0-3,8`."""
    out, cpus = [], sorted(set(cpus))
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def kstrtobool(s: bytes) -> bool:
    """lib/kstrtox.c: only the first character (two for on/off) counts."""
    c = s[:1].lower()
    if c in (b"y", b"t", b"1", b"e"):
        return True
    if c in (b"n", b"f", b"0", b"d"):
        return False
    if c == b"o" and s[1:2].lower() in (b"n", b"f"):
        return s[1:2].lower() == b"n"
    raise KernelError(kabi.EINVAL, f"not a boolean: {s[:16]!r}")


def sysfs_streq(s: bytes, word: str) -> bool:
    """Equal but for one trailing newline."""
    return s == word.encode() or s == word.encode() + b"\n"


def _store(path: str, state: SysfsState, fn):
    """The write callback of a store: PAGE_SIZE at most, as a C string; fn(text) -> the value
    to log (or raises KernelError)."""
    def write(data: bytes, caller):
        data = data[:PAGE_SIZE]
        if not data:
            return 0
        value = fn(data.split(b"\0", 1)[0])
        state.writes.append((path, value))
        return len(data)
    return write


def _online_file(n: int, cpus, state: SysfsState) -> GeneratedFile:
    path = f"/sys/devices/system/cpu/cpu{n}/online"

    def store(text: bytes):
        want = kstrtobool(text)
        online = cpus.is_online(n)
        if want and not online:
            cpus.online(n)                   # may raise KernelError
        elif not want and online:            # device_offline of an offline CPU is a no-op too
            raise KernelError(kabi.EBUSY, f"cpu{n}: sidecar conversion is one way")
        return int(want)

    return GeneratedFile(lambda: b"1\n" if cpus.is_online(n) else b"0\n", _store(path, state, store), mode=0o644)


def _uio_new_id(state: SysfsState):
    def store(text: bytes):
        # uuid_is_valid looks at the first 36 characters only; what follows is ignored.
        if _GUID.match(text) is None:
            raise KernelError(kabi.EINVAL, f"not a GUID: {text[:40]!r}")
        guid = text[:36].decode().lower()
        if guid in state.uio_new_ids:
            raise KernelError(kabi.EEXIST, f"{guid} is already a dynamic id")
        state.uio_new_ids.append(guid)
        if state.on_uio_new_id is not None:
            state.on_uio_new_id(guid)
        return guid
    return store


def _pci_match(entry: tuple, dev: tuple) -> bool:
    """pci_match_one_device of a dynamic id and a device (vendor, device, subvendor, subdevice, class)."""
    v, d, sv, sd, cls, mask, _data = entry
    return (all(a in (PCI_ANY_ID, b) for a, b in zip((v, d, sv, sd), dev[:4]))
            and not (cls ^ dev[4]) & mask)


def _vfio_new_id(state: SysfsState):
    def store(text: bytes):
        # sscanf "%x %x %x %x %x %x %lx": at least vendor and device; stops at the first bad field.
        values, pos = [], 0
        while len(values) < 7:
            m = _HEX_FIELD.match(text, pos)
            if m is None:
                break
            values.append(int(m.group(1), 16) & (0xFFFFFFFF if len(values) < 6 else (1 << 64) - 1))
            pos = m.end()
        if len(values) < 2:
            raise KernelError(kabi.EINVAL, f"new_id needs a vendor and a device id: {text[:40]!r}")
        ids = tuple(values + [PCI_ANY_ID, PCI_ANY_ID, 0, 0, 0][len(values) - 2:])
        if len(values) != 7 and any(_pci_match(e, ids[:5]) for e in state.vfio_new_ids):
            raise KernelError(kabi.EEXIST, "the driver already matches that device")
        if ids[6] != 0:                      # driver_data must be one of vfio-pci's id_table (0)
            raise KernelError(kabi.EINVAL, f"driver_data {ids[6]:#x} matches no id_table entry")
        state.vfio_new_ids.append(ids)
        if state.on_vfio_new_id is not None:
            state.on_vfio_new_id(ids)
        return text.rstrip(b"\n").decode("ascii", "backslashreplace")
    return store


def make_sysfs(*, cpus, state: SysfsState, dtb: bytes | None = None, devicetree: Dir | None = None) -> Dir:
    """One mount of sysfs.

    cpus: .present (CPU numbers), .is_online(n), .online(n) (brings a sidecar CPU up; raises
    KernelError); state: the SysfsState to keep what is written; dtb: the DTB the kernel booted
    with (firmware/fdt); devicetree: the Dir of firmware/devicetree/base (procfs.device_tree;
    built from dtb when not given)."""
    present = sorted(cpus.present)
    thp_path = "/sys/kernel/mm/transparent_hugepage/enabled"

    def thp_show() -> bytes:
        return (" ".join(f"[{m}]" if m == state.thp_enabled else m for m in THP_MODES) + "\n").encode()

    def thp_store(text: bytes):
        for mode in THP_MODES:
            if sysfs_streq(text, mode):
                state.thp_enabled = mode
                return mode
        raise KernelError(kabi.EINVAL, f"not one of {', '.join(THP_MODES)}: {text[:16]!r}")

    def online() -> list[int]:
        return [c for c in present if cpus.is_online(c)]

    cpu = Dir({
        "possible": GeneratedFile(lambda: f"{cpu_list(present)}\n".encode()),
        "present": GeneratedFile(lambda: f"{cpu_list(present)}\n".encode()),
        "online": GeneratedFile(lambda: f"{cpu_list(online())}\n".encode()),
        "offline": GeneratedFile(lambda: f"{cpu_list(set(present) - set(online()))}\n".encode()),
        "kernel_max": GeneratedFile(lambda: f"{NR_CPUS - 1}\n".encode()),
    })
    for n in present:   # cpu0 (the BSP) has no online file: it cannot be unplugged on x86
        cpu.add(f"cpu{n}", Dir({} if n == 0 else {"online": _online_file(n, cpus, state)}))

    firmware = Dir()
    if dtb is not None:
        blob = bytes(dtb)
        firmware.add("fdt", GeneratedFile(lambda: blob, mode=0o400, size=len(blob)))
        if devicetree is None:
            from hclsim.kernel_stub.procfs import device_tree
            devicetree = device_tree(blob)
    if devicetree is not None:
        firmware.add("devicetree", Dir({"base": devicetree}))

    uio = "/sys/bus/vmbus/drivers/uio_hv_generic/new_id"
    vfio = "/sys/bus/pci/drivers/vfio-pci/new_id"
    return Dir({
        "devices": Dir({"system": Dir({"cpu": cpu})}),
        "kernel": Dir({"mm": Dir({"transparent_hugepage": Dir({
            "enabled": GeneratedFile(thp_show, _store(thp_path, state, thp_store)),
        })})}),
        "firmware": firmware,
        "bus": Dir({
            "vmbus": Dir({"devices": Dir(), "drivers": Dir({"uio_hv_generic": Dir({
                "new_id": GeneratedFile(write=_store(uio, state, _uio_new_id(state)), mode=0o200)})})}),
            "pci": Dir({"devices": Dir(), "drivers": Dir({"vfio-pci": Dir({
                "new_id": GeneratedFile(write=_store(vfio, state, _vfio_new_id(state)), mode=0o200)})})}),
        }),
    })
