"""kernel_stub/sysfs.py: CPU lists and onlining, transparent huge pages, the DTB, the drivers'
new_id files, and one write log shared with the sysctls (underhill_init's order)."""
import pytest

from hclsim.boot.host_dt import build_host_config, write_host_dt
from hclsim.defs import kabi
from hclsim.kernel_stub.procfs import Sysctl, make_procfs
from hclsim.kernel_stub.sysfs import SysfsState, cpu_list, kstrtobool, make_sysfs
from hclsim.kernel_stub.vfs import KernelError, MountTable

from .kfs import CALLER, FakeClock, FakeCpus, errno_of, node, read, write

DTB = write_host_dt(build_host_config(4, 1, 1 << 30, 128 << 20, 64 << 20))
UIO = "bus/vmbus/drivers/uio_hv_generic/new_id"
VFIO = "bus/pci/drivers/vfio-pci/new_id"
GET, UART, CRASH = ("8dedd1aa-9056-49e4-bfd6-1bf90dc38ef0", "8b60ccf6-709f-4c11-90b5-229c959a9e6a",
                    "427b03e7-4ceb-4286-b5fc-486f4a1dd439")


def sysfs(cpus=None, **kw):
    state = SysfsState()
    cpus = cpus if cpus is not None else FakeCpus([0, 1, 2, 3, 8], [0, 1])
    return make_sysfs(cpus=cpus, state=state, dtb=DTB, **kw), state, cpus


@pytest.mark.parametrize("cpus,text", [([0], "0"), ([0, 1, 2, 3, 8], "0-3,8"), ([1, 3, 5], "1,3,5"),
                                       ([0, 1, 4, 5, 6, 9, 10], "0-1,4-6,9-10"), ([], "")])
def test_cpu_list(cpus, text):
    assert cpu_list(cpus) == text


def test_cpu_files():
    root, _, cpus = sysfs()
    base = "devices/system/cpu"
    assert read(root, f"{base}/possible") == b"0-3,8\n" and read(root, f"{base}/present") == b"0-3,8\n"
    assert read(root, f"{base}/online") == b"0-1\n" and read(root, f"{base}/offline") == b"2-3,8\n"
    assert {f"cpu{n}" for n in (0, 1, 2, 3, 8)} <= set(node(root, base).children())
    assert node(root, f"{base}/cpu0").children() == {}            # the BSP has no online file
    assert read(root, f"{base}/cpu1/online") == b"1\n" and read(root, f"{base}/cpu8/online") == b"0\n"
    assert node(root, f"{base}/cpu8/online").mode == 0o644


def test_cpu_online_writes_call_the_callback():
    root, state, cpus = sysfs()
    path = "devices/system/cpu/cpu8/online"
    assert write(root, path, "1\n") == 2
    assert cpus.calls == [8] and read(root, path) == b"1\n"
    assert read(root, "devices/system/cpu/online") == b"0-1,8\n"
    assert write(root, path, "1") == 1 and cpus.calls == [8]         # online already: success, no-op
    assert errno_of(write, root, path, "0") == kabi.EBUSY           # never offlined: one way
    assert write(root, "devices/system/cpu/cpu3/online", "0") == 1  # offline already: a no-op
    assert write(root, "devices/system/cpu/cpu2/online", "on") == 2 and cpus.calls == [8, 2]
    assert state.writes == [("/sys/devices/system/cpu/cpu8/online", 1), ("/sys/devices/system/cpu/cpu8/online", 1),
                            ("/sys/devices/system/cpu/cpu3/online", 0), ("/sys/devices/system/cpu/cpu2/online", 1)]


@pytest.mark.parametrize("text", [b"2", b" 1", b"x", b"\n", b"o", b"oz", b"\x001"])
def test_cpu_online_refuses(text):
    root, state, cpus = sysfs()
    assert errno_of(write, root, "devices/system/cpu/cpu8/online", text) == kabi.EINVAL
    assert cpus.calls == [] and state.writes == []


def test_cpu_online_errors_and_empty_writes():
    root, state, cpus = sysfs(FakeCpus([0, 1], [0], fail=KernelError(kabi.EIO, "sidecar did not answer")))
    assert errno_of(write, root, "devices/system/cpu/cpu1/online", "1") == kabi.EIO
    assert state.writes == []
    assert write(root, "devices/system/cpu/cpu1/online", b"") == 0 and cpus.calls == [1]   # never reaches the store


@pytest.mark.parametrize("text,value", [(b"1", True), (b"Y", True), (b"yes", True), (b"true", True), (b"on", True),
                                        (b"ON\n", True), (b"enable", True), (b"0", False), (b"n", False),
                                        (b"off", False), (b"false", False), (b"disable", False), (b"1junk", True)])
def test_kstrtobool(text, value):
    assert kstrtobool(text) is value


def test_transparent_hugepage():
    root, state, _ = sysfs()
    path = "kernel/mm/transparent_hugepage/enabled"
    assert read(root, path) == b"[always] madvise never\n"
    assert write(root, path, "madvise") == 7
    assert read(root, path) == b"always [madvise] never\n" and state.thp_enabled == "madvise"
    assert write(root, path, "never\n") == 6 and read(root, path) == b"always madvise [never]\n"
    for bad in ("madvise ", "madvise\n\n", "Always", "sometimes", " never"):
        assert errno_of(write, root, path, bad) == kabi.EINVAL
    assert state.writes == [("/sys/kernel/mm/transparent_hugepage/enabled", "madvise"),
                            ("/sys/kernel/mm/transparent_hugepage/enabled", "never")]


def test_firmware_fdt_and_devicetree():
    root, _, _ = sysfs()
    fdt = node(root, "firmware/fdt")
    assert fdt.mode == 0o400 and fdt.size() == len(DTB) and read(root, "firmware/fdt") == DTB
    assert read(root, "firmware/devicetree/base/openhcl/compatible") == b"microsoft,openhcl\0"
    assert read(root, "firmware/devicetree/base/cpus/cpu@3/reg") == (3).to_bytes(4, "big")
    bare = make_sysfs(cpus=FakeCpus([0], [0]), state=SysfsState())
    assert node(bare, "firmware").children() == {}


def test_uio_new_id():
    seen = []
    root, state, _ = sysfs()
    state.on_uio_new_id = seen.append
    for guid in (GET, UART, CRASH):
        assert write(root, UIO, guid) == 36
    assert state.uio_new_ids == [GET, UART, CRASH] == seen
    assert errno_of(write, root, UIO, GET) == kabi.EEXIST
    assert write(root, UIO, "ABCDEF01-2345-6789-abcd-ef0123456789 and more\n") == 46   # only 36 are read
    assert state.uio_new_ids[-1] == "abcdef01-2345-6789-abcd-ef0123456789"
    for bad in ("8dedd1aa-9056-49e4-bfd6-1bf90dc38ef", "8dedd1aa9056-49e4-bfd6-1bf90dc38ef0x",
                "{8dedd1aa-9056-49e4-bfd6-1bf90dc38ef0}", "8dedd1aa-9056-49e4-bfd6-1bf90dc38efg", ""):
        if bad:
            assert errno_of(write, root, UIO, bad) == kabi.EINVAL
    assert errno_of(node(root, UIO).open, kabi.O_RDONLY, CALLER) == kabi.EACCES   # write-only (0200)
    assert node(root, UIO).mode == 0o200


def test_vfio_new_id():
    root, state, _ = sysfs()
    nvme = "ffffffff ffffffff ffffffff ffffffff 010802 ffffff"
    assert write(root, VFIO, nvme) == len(nvme)
    assert state.vfio_new_ids == [(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0x010802, 0xFFFFFF, 0)]
    assert errno_of(write, root, VFIO, nvme) == kabi.EEXIST             # the driver matches it already
    assert write(root, VFIO, "0x1414 0xb111\n") == 14                    # two fields: the rest defaults
    assert state.vfio_new_ids[-1] == (0x1414, 0xB111, 0xFFFFFFFF, 0xFFFFFFFF, 0, 0, 0)
    assert write(root, VFIO, "8086 1234 ffffffff ffffffff 0 0 0") > 0     # seven: no EEXIST check
    for bad in ("8086", "", "xyz 1234", "8086 1234 0 0 0 0 1"):          # too few fields; driver_data not 0
        if bad:
            assert errno_of(write, root, VFIO, bad) == kabi.EINVAL
    assert [w[0] for w in state.writes] == ["/sys/bus/pci/drivers/vfio-pci/new_id"] * 3


def test_one_log_for_underhill_inits_twelve_writes():
    sysctl = Sysctl()
    state = SysfsState(writes=sysctl.writes)
    cpus = FakeCpus([0, 1], [0, 1])
    sys_root = make_sysfs(cpus=cpus, state=state, dtb=DTB)
    proc_root = make_procfs(cmdline=b"", clock=FakeClock(), sysctl=sysctl, cpus=cpus, mounts=MountTable(),
                            meminfo=lambda: {})
    core = "|/bin/underhill-crash %p %i %s %e"
    plan = [(proc_root, "/proc/sys/kernel/threads-max", "32768"), (proc_root, "/proc/sys/kernel/kptr_restrict", "1"),
            (sys_root, "/sys/kernel/mm/transparent_hugepage/enabled", "madvise"),
            (sys_root, "/sys/" + UIO, GET), (sys_root, "/sys/" + UIO, UART), (sys_root, "/sys/" + UIO, CRASH),
            (proc_root, "/proc/sys/kernel/core_pattern", core), (proc_root, "/proc/sys/kernel/core_pipe_limit", "1"),
            (proc_root, "/proc/sys/vm/panic_on_oom", "1"), (proc_root, "/proc/sys/vm/min_free_kbytes", "1024"),
            (proc_root, "/proc/sys/vm/watermark_scale_factor", "1"),
            (proc_root, "/proc/sys/vm/watermark_boost_factor", "0")]
    for root, path, value in plan:
        write(root, path.split("/", 2)[2], value)
    assert [p for p, _ in sysctl.writes] == [p for _, p, _ in plan]
    assert [v for _, v in sysctl.writes] == [32768, 1, "madvise", GET, UART, CRASH, core, 1, 1, 1024, 1, 0]
