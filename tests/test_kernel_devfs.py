"""kernel_stub/devfs.py: the character devices (numbers, /dev/null and /dev/ttyprintk as host
descriptors, /dev/random's RNDADDENTROPY) and devtmpfs."""
import errno
import os
import stat
import time

import pytest

from hclsim.defs import kabi
from hclsim.kernel_stub.devfs import RNDGETENTCNT, Devices, Random
from hclsim.kernel_stub.kmsg import Kmsg
from hclsim.kernel_stub.vfs import CharDevice, Dir, File

from .kfs import CALLER, FakeClock, errno_of, no_threads_left


@pytest.fixture
def devices():
    devs = Devices(Kmsg(FakeClock(2.0)))
    yield devs
    devs.shutdown()
    assert no_threads_left("ttyprintk")


def texts(kmsg):
    return [(r.facility, r.level, r.text) for r in kmsg.records()]


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_numbers_are_linuxs(devices):
    numbers = {name: (devices.by_name(name).major, devices.by_name(name).minor)
               for name in ("null", "zero", "random", "urandom", "kmsg", "console", "ttyprintk")}
    assert numbers == {"null": (1, 3), "zero": (1, 5), "random": (1, 8), "urandom": (1, 9), "kmsg": (1, 11),
                       "console": (5, 1), "ttyprintk": (5, 3)}
    assert devices.by_number(1, 11).name == "kmsg" and devices.by_number(5, 3).name == "ttyprintk"
    assert errno_of(devices.by_number, 10, 200) == errno.ENXIO
    assert errno_of(devices.by_name, "mshv") == kabi.ENOENT


def test_registry_and_devtmpfs(devices):
    tree = devices.tree()
    assert tree is devices.tree()
    assert {"null", "kmsg", "ttyprintk", "console", "random", "urandom", "pts"} <= set(tree.children())
    assert isinstance(tree.children()["pts"], Dir) and tree.children()["pts"].children() == {}
    mshv = CharDevice("mshv", 10, 58, lambda flags, caller: File())
    devices.register(mshv)
    assert devices.by_number(10, 58) is mshv and tree.children()["mshv"] is mshv
    assert errno_of(devices.register, CharDevice("mshv", 10, 59, None)) == kabi.EBUSY
    assert errno_of(devices.register, CharDevice("other", 10, 58, None)) == kabi.EBUSY
    devices.unregister("mshv")
    assert "mshv" not in tree.children() and errno_of(devices.by_number, 10, 58) == errno.ENXIO
    assert tree.children()["kmsg"].kind == kabi.KIND_CHARDEV and tree.children()["kmsg"].mode == 0o644


@pytest.mark.parametrize("flags,readable,writable", [(kabi.O_RDONLY, True, False), (kabi.O_WRONLY, False, True),
                                                     (kabi.O_RDWR, True, True)])
def test_null_is_the_hosts(devices, flags, readable, writable):
    f = devices.by_number(1, 3).open(flags, CALLER)
    fd = f.host_fd
    st = os.fstat(fd)
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    if readable:
        assert os.read(fd, 10) == b""
    if writable:
        assert os.write(fd, b"gone") == 4
    else:
        with pytest.raises(OSError):
            os.write(fd, b"x")
    assert f.read(5) == b"" and f.write(b"abc") == 3
    f.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    f.close()                                     # twice is fine


def test_ttyprintk_lines_go_to_kmsg(devices):
    f = devices.by_name("ttyprintk").open(kabi.O_WRONLY, CALLER)
    os.write(f.host_fd, b"thread 'main' panicked at src/lib.rs:1\nnote: run with RUST_BACKTRACE=1\r\n")
    os.write(f.host_fd, b"cr only\rpart")
    os.write(f.host_fd, b"ial")
    wait_for(lambda: len(devices.kmsg.records()) == 3)
    f.close()                                     # the last writer: the partial line is flushed
    wait_for(lambda: no_threads_left("ttyprintk"))
    assert texts(devices.kmsg) == [(0, 6, b"[U] thread 'main' panicked at src/lib.rs:1"),
                                   (0, 6, b"[U] note: run with RUST_BACKTRACE=1"),
                                   (0, 6, b"[U] cr only"), (0, 6, b"[U] partial")]


def test_ttyprintk_cuts_long_lines(devices):
    f = devices.by_name("ttyprintk").open(kabi.O_WRONLY, CALLER)
    f.write(b"a" * 508 + b"b" * 10 + b"\n")        # a kernel-side write takes the same path
    assert texts(devices.kmsg) == [(0, 6, b"[U] " + b"a" * 508 + b"\\"), (0, 6, b"[U] " + b"b" * 10)]
    f.close()


def test_ttyprintk_ends_when_every_copy_is_closed(devices):
    f = devices.by_name("console").open(kabi.O_WRONLY, CALLER)
    child = os.dup(f.host_fd)                     # what a forked process inherits
    f.close()
    time.sleep(0.05)
    assert not no_threads_left("ttyprintk")
    os.write(child, b"from the child\n")
    os.close(child)
    wait_for(lambda: no_threads_left("ttyprintk"))
    assert texts(devices.kmsg) == [(0, 6, b"[U] from the child")]


def test_ttyprintk_shutdown_stops_threads_with_writers_open(devices):
    files = [devices.by_name("ttyprintk").open(kabi.O_WRONLY, CALLER) for _ in range(3)]
    kept = [os.dup(f.host_fd) for f in files]
    for f in files:
        f.close()
    os.write(kept[0], b"last words")
    devices.shutdown()
    assert no_threads_left("ttyprintk")
    assert texts(devices.kmsg) == [(0, 6, b"[U] last words")]
    assert errno_of(devices.by_name("ttyprintk").open, kabi.O_WRONLY, CALLER) == kabi.ENODEV
    for fd in kept:
        os.close(fd)


def test_random_reads_and_writes(devices):
    f = devices.by_name("urandom").open(kabi.O_RDONLY, CALLER)
    a, b = f.read(64), f.read(64)
    assert len(a) == 64 and a != b
    assert f.write(b"mixed in") == 8
    pool = devices.random
    assert pool.entropy_avail == 0
    assert [(i.pid, i.data, i.requested_bits, i.credited_bits, i.how) for i in pool.inputs] == \
        [(CALLER.pid, b"mixed in", 0, 0, "write")]


def _pool_info(bits: int, size: int, data: bytes) -> bytes:
    return kabi.RND_POOL_INFO.pack(bits, size) + data


def test_rndaddentropy_credits_up_to_the_pool_size(devices):
    f = devices.by_name("random").open(kabi.O_WRONLY, CALLER)
    assert f.ioctl(kabi.RNDADDENTROPY, _pool_info(64, 8, b"\x11" * 8)) == (0, b"")
    assert devices.random.entropy_avail == 64
    assert f.ioctl(RNDGETENTCNT, b"") == (0, (64).to_bytes(4, "little"))
    f.ioctl(kabi.RNDADDENTROPY, _pool_info(256 * 8, 256, bytes(range(256))))   # underhill_init's 256 bytes
    assert devices.random.entropy_avail == 256
    assert [(i.requested_bits, i.credited_bits, len(i.data)) for i in devices.random.inputs] == \
        [(64, 64, 8), (2048, 192, 256)]
    assert [r.text for r in devices.kmsg.records()] == [b"random: crng init done"]
    f.ioctl(kabi.RNDADDENTROPY, _pool_info(8, 1, b"x"))
    assert devices.random.inputs[-1].credited_bits == 0 and len(devices.kmsg.records()) == 1


@pytest.mark.parametrize("arg,err", [
    (_pool_info(-1, 4, b"abcd"), kabi.EINVAL),        # entropy_count < 0, checked first
    (_pool_info(-1, -1, b""), kabi.EINVAL),
    (_pool_info(8, -1, b""), kabi.EFAULT),            # a negative size is a huge copy: it faults
    (_pool_info(32, 8, b"four"), kabi.EFAULT),        # fewer bytes than buf_size
    (b"\x08\0\0\0\x04", kabi.EFAULT),                 # not even the header
    (b"", kabi.EFAULT),
])
def test_rndaddentropy_bad_arguments(devices, arg, err):
    f = devices.by_name("random").open(kabi.O_WRONLY, CALLER)
    assert errno_of(f.ioctl, kabi.RNDADDENTROPY, arg) == err
    assert devices.random.inputs == [] and devices.random.entropy_avail == 0


def test_random_other_ioctls():
    pool = Random(initial_bits=300)
    assert pool.entropy_avail == 256
    f = pool.open(kabi.O_RDONLY, CALLER)
    assert errno_of(f.ioctl, 0x1234, b"") == kabi.EINVAL      # random_ioctl's default is EINVAL
    zero = Random()
    g = zero.open(kabi.O_RDONLY, CALLER)
    assert g.ioctl(kabi.IOW(ord("R"), 1, 4), (40).to_bytes(4, "little")) == (0, b"")   # RNDADDTOENTCNT
    assert zero.entropy_avail == 40 and zero.inputs[-1].data == b""
    assert g.ioctl(kabi.IO(ord("R"), 6), b"") == (0, b"")     # RNDCLEARPOOL: no effect any more
    assert zero.entropy_avail == 40


def test_kmsg_device(devices):
    w = devices.by_number(1, 11).open(kabi.O_WRONLY, CALLER)
    w.write(b"<21>underhill_init: Initial process\n")
    r = devices.by_name("kmsg").open(kabi.O_RDONLY | kabi.O_NONBLOCK, CALLER)
    assert r.read(4096) == b"21,0,2000000,-;underhill_init: Initial process\n"
