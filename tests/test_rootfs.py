"""The shipped rootfs (kernel_stub/rootfs.config, gen_init_cpio format, built reproducibly) and
kernel_stub/rootfs.py, which unpacks an initrd as Linux's initramfs code does."""
import errno
import gzip
import io
import os
import shutil
import stat
import subprocess

import libarchive
import pytest
from elftools.elf.elffile import ELFFile
from libarchive.entry import FileType

from hclsim import HclsimError
from hclsim.boot import initrd
from hclsim.boot.initrd import InitrdError, build_initrd_from_config, compress, load_initrd, parse_rootfs_config
from hclsim.hcl import tools
from hclsim.kernel_stub import images
from hclsim.kernel_stub.rootfs import DeviceNode, RootfsError, unpack

from .tools import require

TOOLS = sorted(tools.TOOLS)      # sh, cat, ls, ps, env, kill: each /usr/bin/NAME -> hcltools

TYPE_BITS = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "slink": stat.S_IFLNK}


@pytest.fixture(scope="module")
def config():
    return parse_rootfs_config(images.ROOTFS_CONFIG.read_text())


@pytest.fixture
def rootfs(shipped_initrd, tmp_path):
    return unpack(shipped_initrd.read_bytes(), tmp_path / "root")


# --- the shipped config -----------------------------------------------------------------------

def test_shipped_config_builds(shipped_initrd, config):
    loaded = load_initrd(shipped_initrd)
    assert loaded.compression == ("gzip",)
    assert loaded.files == len(config)
    names = {e.name for e in config}
    for name in ("bin", "sbin", "tmp", "dev/pts", "var/run", "lib/modules/999/hv_storvsc.ko",
                 "dev/console", "usr/bin/openvmm_hcl", "underhill-init", "usr/bin/underhill-dump",
                 "etc/underhill-build-info.json", "etc/kernel-build-info.json", "usr/bin/hcltools",
                 *(f"usr/bin/{tool}" for tool in TOOLS)):
        assert name in names


def test_gnu_cpio_lists_every_entry(shipped_initrd, config):
    out = subprocess.run([require("cpio"), "-itvn", "--quiet"], input=gzip.decompress(shipped_initrd.read_bytes()),
                         capture_output=True, check=True).stdout.decode()
    lines = out.splitlines()
    assert len(lines) == len(config)
    for line, e in zip(lines, config):  # config order
        fields = line.split()
        mode, uid, gid = fields[0], fields[2], fields[3]
        bits = (stat.S_IFCHR if e.dev == "c" else stat.S_IFBLK) if e.kind == "nod" else TYPE_BITS[e.kind]
        assert mode == stat.filemode(bits | e.mode), line
        assert (uid, gid) == (str(e.uid), str(e.gid)) and "1970" in fields, line
        if e.kind == "nod":
            assert fields[4:6] == [f"{e.major},", str(e.minor)] and fields[-1] == e.name, line
        elif e.kind == "slink":
            assert fields[-3:] == [e.name, "->", e.target], line
        else:
            assert fields[-1] == e.name, line
    by_name = {line.split()[-1]: line for line in lines if "->" not in line}
    assert by_name["tmp"].startswith("drwxrwxrwt")
    assert by_name["dev/kmsg"].startswith("crw-r--r--") and " 1,  11 " in by_name["dev/kmsg"]
    assert by_name["usr/bin/openvmm_hcl"].startswith("-rwxr-xr-x")
    assert by_name["usr/bin/hcltools"].startswith("-rwxr-xr-x")
    links = {line.split()[-3]: line.split()[-1] for line in lines if "->" in line}
    assert {links[f"usr/bin/{tool}"] for tool in TOOLS} == {"hcltools"}


def test_builds_are_byte_identical(shipped_initrd, tmp_path, monkeypatch):
    extra = images.rootfs_build()
    first = build_initrd_from_config(images.ROOTFS_CONFIG, images.ROOTFS_SOURCES, "gzip", extra)
    assert first == build_initrd_from_config(images.ROOTFS_CONFIG, images.ROOTFS_SOURCES, "gzip", extra)
    assert first == shipped_initrd.read_bytes()
    # Another checkout in another folder, another cache, modules compiled again: same bytes.
    sources = tmp_path / "checkout" / "rootfs"
    shutil.copytree(images.ROOTFS_SOURCES, sources)
    monkeypatch.setenv("HCLSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(images, "MODULE_SOURCES", sources / "modules")
    again = images.rootfs_build()
    assert {k: v.read_bytes() for k, v in again.items()} == {k: v.read_bytes() for k, v in extra.items()}
    assert build_initrd_from_config(images.ROOTFS_CONFIG, sources, "gzip", again) == first


# --- the unpacked shipped rootfs --------------------------------------------------------------

def test_unpacked_shipped_rootfs(rootfs, config):
    program = rootfs.resolve("/underhill-init")
    assert program == rootfs.root / "usr" / "bin" / "openvmm_hcl"
    assert program.read_bytes() == (images.ROOTFS_SOURCES / "openvmm_hcl").read_bytes()
    assert stat.S_IMODE(program.stat().st_mode) == 0o755
    assert rootfs.resolve("/bin/openvmm_hcl") == program
    assert rootfs.resolve("/bin/underhill-crash") == rootfs.resolve("/usr/bin/underhill-dump") == program
    assert os.readlink(rootfs.root / "underhill-init") == "/usr/bin/openvmm_hcl"  # kept as written
    assert rootfs.lookup("/underhill-init") == "symlink" and rootfs.lookup("/bin/openvmm_hcl") == "file"
    assert rootfs.lookup("/bin") == "symlink" and rootfs.lookup("/usr/bin") == "dir"
    assert rootfs.lookup("/dev/console") == "symlink" and rootfs.lookup("/dev/kmsg") == "chardev"
    assert rootfs.lookup("/missing") is None and rootfs.lookup("/missing/deeper") is None
    assert rootfs.device("/dev/console") == DeviceNode("c", 5, 3, 0o600)
    assert rootfs.device("/dev/null") == DeviceNode("c", 1, 3, 0o666)
    assert rootfs.device("/dev/kmsg") == DeviceNode("c", 1, 11, 0o644)
    assert rootfs.device("/bin/openvmm_hcl") is None
    assert set(rootfs.devices) == {"/dev/null", "/dev/kmsg", "/dev/ttyprintk"}
    assert (rootfs.root / "dev" / "kmsg").read_bytes() == b""  # the placeholder
    assert stat.S_IMODE((rootfs.root / "tmp").stat().st_mode) == 0o1777
    in_usr_bin = sorted(n.rsplit("/", 1)[1] for e in config for n in (e.name, *e.links)
                        if n.startswith("usr/bin/"))
    assert {"hcltools", "openvmm_hcl", "underhill-crash", "underhill-dump", *TOOLS} <= set(in_usr_bin)
    assert rootfs.listdir("/bin") == in_usr_bin
    assert rootfs.listdir("/lib/modules") == ["000", "001", "999"]
    assert rootfs.warnings == []
    with pytest.raises(RootfsError) as info:
        rootfs.listdir("/bin/openvmm_hcl")
    assert info.value.errno == errno.ENOTDIR


def test_the_small_programs_are_one_file_linked_by_their_names(rootfs, config):
    """/usr/bin/hcltools (hcl/tools.py's launcher) and a link per tool, relative as the
    openvmm_hcl links are; every tool the program dispatches has its link, and no more."""
    program = rootfs.resolve("/usr/bin/hcltools")
    assert program.read_bytes() == (images.ROOTFS_SOURCES / "hcltools").read_bytes()
    assert stat.S_IMODE(program.stat().st_mode) == 0o755
    assert b"from hclsim.hcl.tools import main" in program.read_bytes()
    for tool in TOOLS:
        assert rootfs.lookup(f"/usr/bin/{tool}") == "symlink"
        assert os.readlink(rootfs.root / "usr" / "bin" / tool) == "hcltools"
        assert rootfs.resolve(f"/bin/{tool}") == program
    linked = {e.name.rsplit("/", 1)[1] for e in config if e.kind == "slink" and e.target == "hcltools"}
    assert linked == set(TOOLS)


def test_modules_are_relocatable_elf_with_modinfo(rootfs):
    expected = {"000/pci-hyperv-intf.ko": ("pci_hyperv_intf", ""),
                "001/pci-hyperv.ko": ("pci_hyperv", "pci-hyperv-intf"),
                "999/hv_storvsc.ko": ("hv_storvsc", "")}
    for rel, (name, depends) in expected.items():
        with open(rootfs.resolve(f"/lib/modules/{rel}"), "rb") as f:
            elf = ELFFile(f)
            assert elf["e_type"] == "ET_REL" and elf["e_machine"] == "EM_X86_64"
            info = elf.get_section_by_name(".modinfo").data().split(b"\0")
            assert elf.get_section_by_name(".comment") is None  # -fno-ident: no compiler version
        assert f"name={name}".encode() in info and f"depends={depends}".encode() in info, info
        assert b"license=GPL" in info and any(s.startswith(b"description=") for s in info)
    storvsc = open(rootfs.resolve("/lib/modules/999/hv_storvsc.ko"), "rb").read()
    assert b"parm=storvsc_ringbuffer_size:" in storvsc and b"parm=storvsc_max_hw_queues:" in storvsc


def test_build_info_is_json(rootfs):
    import json
    info = json.loads(rootfs.resolve("/etc/underhill-build-info.json").read_text())
    assert info["scm_revision"] == "hclsim" and info["openhcl_version"]
    assert json.loads(rootfs.resolve("/etc/kernel-build-info.json").read_text())["kernel_version"] == "6.6.0-hclsim-standin"


# --- configs ----------------------------------------------------------------------------------

def _config(tmp_path, text: str, files: dict | None = None, name="rootfs.config"):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for rel, data in (files or {}).items():
        (src / rel).write_bytes(data)
    path = tmp_path / name
    path.write_text(text)
    return path, src


@pytest.mark.parametrize("line, problem", [
    ("nod /dev/null 0666 0 0 x 1 3", "device type 'x'"),
    ("dir /etc 0755 0", "dir takes NAME MODE UID GID, got 3"),
    ("dir /etc 0789 0 0", "MODE '0789' is not an octal number"),
    ("slink /bin /usr/bin 0777 root 0", "UID 'root' is not a decimal number"),
    ("fil /etc/x x 0644 0 0", "type 'fil' unknown"),
    ("pipe /run/p 0644 0 0", "type 'pipe' not supported"),
    ("file /../x x 0644 0 0", "'..' component"),
])
def test_malformed_config_line(tmp_path, line, problem):
    path, src = _config(tmp_path, f"# comment\ndir /etc 0755 0 0\n{line}\ndir /run 0755 0 0\n")
    with pytest.raises(InitrdError) as info:
        build_initrd_from_config(path, src)
    msg = str(info.value)
    assert isinstance(info.value, HclsimError) and "\n" not in msg
    assert msg.startswith(f"{path} line 3: ") and problem in msg and repr(line) in msg, msg


def test_missing_source_names_the_line(tmp_path):
    path, src = _config(tmp_path, "dir /etc 0755 0 0\nfile /etc/x nothere 0644 0 0\n")
    with pytest.raises(InitrdError, match=r"line 2: source 'nothere' .*cannot read"):
        build_initrd_from_config(path, src)


def test_hard_links_and_extra_sources(tmp_path):
    built = tmp_path / "built.bin"
    built.write_bytes(b"made elsewhere")
    path, src = _config(tmp_path, "dir /etc 0755 0 0\nfile /etc/a data 0640 7 8 /etc/b /etc/c\n"
                                  "file /etc/built built.bin 0600 0 0\n", {"data": b"shared"})
    data = build_initrd_from_config(path, src, "none", {"built.bin": built})
    listing = subprocess.run([require("cpio"), "-itvn", "--quiet"], input=data, capture_output=True,
                             check=True).stdout.decode().splitlines()
    assert [l.split()[1] for l in listing[1:4]] == ["3", "3", "3"]  # nlink
    assert [l.split()[2:4] for l in listing[1:4]] == [["7", "8"]] * 3
    fs = unpack(data, tmp_path / "root")
    a, b, c = (fs.resolve(f"/etc/{n}") for n in "abc")
    assert a.read_bytes() == b.read_bytes() == c.read_bytes() == b"shared"
    assert a.stat().st_ino == b.stat().st_ino == c.stat().st_ino
    assert stat.S_IMODE(a.stat().st_mode) == 0o640
    assert fs.resolve("/etc/built").read_bytes() == b"made elsewhere"


# --- unpacking: compressed, concatenated, overrides ------------------------------------------

def test_concatenated_compressed_archives_override(tmp_path):
    one, src = _config(tmp_path, "dir /etc 0755 0 0\nfile /etc/motd motd1 0644 0 0\n"
                                 "slink /etc/link motd 0777 0 0\nnod /dev 0600 0 0 c 1 1\n",
                       {"motd1": b"first", "motd2": b"second"}, "one.config")
    two, _ = _config(tmp_path, "dir /dev 0755 0 0\nnod /dev/kmsg 0600 0 0 c 1 11\n"
                               "file /etc/motd motd2 0600 0 0\nfile /etc/link motd2 0644 0 0\n", name="two.config")
    microcode = build_initrd_from_config(one, src, "none")
    data = microcode + b"\0" * 8 + build_initrd_from_config(two, src, "zstd")
    assert load_initrd(_write(tmp_path, data)).compression == ("none", "zstd")
    fs = unpack(data, tmp_path / "root")
    assert fs.resolve("/etc/motd").read_bytes() == b"second"
    assert stat.S_IMODE(fs.resolve("/etc/motd").stat().st_mode) == 0o600
    assert fs.lookup("/etc/link") == "file"            # a symlink replaced by a file
    assert fs.lookup("/dev") == "dir" and "/dev" not in fs.devices  # a device replaced by a directory
    assert fs.device("/dev/kmsg") == DeviceNode("c", 1, 11, 0o600)
    # The same again as one xz stream holding both archives.
    both = compress(microcode + build_initrd_from_config(two, src, "none"), "xz")
    assert unpack(both, tmp_path / "root2").resolve("/etc/motd").read_bytes() == b"second"


def test_later_entries_follow_linux(tmp_path):
    entries = [("d", "dir", 0o755), ("d/f", "file", b"x"), ("n", "dir", 0o755),
               ("n", "chr", (1, 3)), ("n", "chr", (9, 9)),  # a node over a node keeps its numbers
               ("d", "file", b"over a full directory"),     # cannot replace it: skipped
               ("s", "sym", "d"), ("s", "sym", "n")]
    fs = unpack(_archive(entries), tmp_path / "root")
    assert fs.device("/n") == DeviceNode("c", 1, 3, 0o644) and fs.lookup("/n") == "chardev"
    assert fs.lookup("/d") == "dir" and fs.resolve("/d/f").read_bytes() == b"x"
    assert fs.device("/s") == DeviceNode("c", 1, 3, 0o644)
    assert any("'d' skipped" in w for w in fs.warnings)


def test_entry_under_a_missing_parent_is_skipped(tmp_path):
    fs = unpack(_archive([("a/b", "file", b"x"), ("c", "file", b"y")]), tmp_path / "root")
    assert fs.lookup("/a/b") is None and fs.lookup("/c") == "file"
    assert len(fs.warnings) == 1 and "'a/b' skipped" in fs.warnings[0]


def test_corrupt_initrd_is_a_rootfs_error(tmp_path):
    with pytest.raises(RootfsError, match="unrecognised data"):
        unpack(b"junk" * 10, tmp_path / "root")


# --- hostile archives -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/../../x", "/../x", "ok/../../../../x"])
def test_dotdot_names_refused(tmp_path, name):
    with pytest.raises(RootfsError) as info:
        unpack(_archive([("a", "dir", 0o755), ("ok", "dir", 0o755), (name, "file", b"evil")]),
               tmp_path / "root")
    assert repr(name) in str(info.value) and "'..'" in str(info.value)
    assert not (tmp_path / "x").exists()


def test_symlink_loops_give_eloop(tmp_path):
    chain = [(f"l{i}", "sym", f"l{i + 1}") for i in range(41)] + [("l41", "file", b"end")]
    fs = unpack(_archive([("a", "sym", "b"), ("b", "sym", "/a"), ("self", "sym", "./self"), *chain]),
                tmp_path / "root")
    for path in ("/a", "/self", "/a/x", "/l0"):
        with pytest.raises(RootfsError) as info:
            fs.resolve(path)
        assert info.value.errno == errno.ELOOP, path
    assert fs.resolve("/l1").read_bytes() == b"end"  # exactly 40 links
    assert fs.lookup("/a") == "symlink" and fs.resolve("/a", follow_last=False) == fs.root / "a"
    with pytest.raises(RootfsError):
        fs.lookup("/a/x")


def test_symlinks_pointing_outside_stay_inside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    fs = unpack(_archive([("etc", "dir", 0o755), ("abs", "sym", "/etc"), ("up", "sym", "../../.."),
                          ("host", "sym", str(outside)), ("abs/passwd", "file", b"p"),
                          ("up/escaped", "file", b"e"), ("host/planted", "file", b"h")]), tmp_path / "root")
    root = fs.root
    assert fs.resolve("/up") == root and fs.resolve("/up/up/up/etc") == root / "etc"
    assert fs.resolve("/abs/passwd") == root / "etc" / "passwd" and (root / "etc" / "passwd").read_bytes() == b"p"
    assert (root / "escaped").read_bytes() == b"e" and not (tmp_path / "escaped").exists()
    # The host folder's path, taken inside the root, does not exist there.
    with pytest.raises(RootfsError) as info:
        fs.resolve("/host/planted")
    assert info.value.errno == errno.ENOENT
    assert list(outside.iterdir()) == [] and any("'host/planted' skipped" in w for w in fs.warnings)
    assert os.readlink(root / "host") == str(outside)  # kept as written


def test_deep_dotdot_in_entry_through_symlink_refused(tmp_path):
    with pytest.raises(RootfsError, match="'up/../x'"):
        unpack(_archive([("up", "sym", "/"), ("up/../x", "file", b"e")]), tmp_path / "root")


# --- helpers ----------------------------------------------------------------------------------

def _write(tmp_path, data: bytes):
    path = tmp_path / "initrd.img"
    path.write_bytes(data)
    return path


def _archive(entries) -> bytes:
    """A newc archive written as given (names unchecked, unlike the config builder)."""
    out = io.BytesIO()
    with libarchive.custom_writer(out.write, "cpio_newc") as archive:
        for ino, (name, kind, arg) in enumerate(entries, start=1):
            if kind == "dir":
                initrd._write_entry(archive, name, FileType.DIRECTORY, arg, ino=ino, nlink=2)
            elif kind == "file":
                initrd._write_entry(archive, name, FileType.REGULAR_FILE, 0o644, ino=ino, data=arg)
            elif kind == "sym":
                initrd._write_entry(archive, name, FileType.SYMBOLINK_LINK, 0o777, ino=ino, symlink=arg)
            else:
                initrd._write_entry(archive, name, FileType.CHAR_DEVICE, 0o644, ino=ino, rdev=arg)
    return out.getvalue()
