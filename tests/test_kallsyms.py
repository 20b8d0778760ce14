"""hclsim/debug/kallsyms.py on kallsyms tables built here in both layouts Linux has used, and on
the real kernel (its symbol file read by binutils' readelf); debug/symbol_elf.py."""
import shutil
import struct
import subprocess

import pytest

from hclsim.debug import kallsyms
from hclsim.debug.symbol_elf import symbol_elf

BASE = 0xFFFFFFFF81000000
# (address, type, name): percpu symbols first (absolute), then text and data, by address.
SYMBOLS = [(0x0, "A", "fixed_percpu_data"), (0x1000, "A", "cpu_debug_store")] + \
    [(BASE + 0x40 * i, "T" if i % 3 else "t", f"func_{i}_x{i % 7}") for i in range(3000)] + \
    [(BASE + 0x200000, "D", "some_data"), (BASE + 0x300000, "B", "_end")]


def _tokens() -> list[bytes]:
    used = {c for _a, t, n in SYMBOLS for c in (t + n).encode()}
    return [bytes([c]) if c in used else b"~%02x" % c for c in range(256)]


def _tables(layout: str) -> tuple[bytes, int]:
    """An image holding kallsyms tables (names as one token a character) and where they start."""
    n, tokens = len(SYMBOLS), _tokens()
    names, markers = bytearray(), []
    for i, (_a, t, name) in enumerate(SYMBOLS):
        if i % 256 == 0:
            markers.append(len(names))
        entry = (t + name).encode()
        names += bytes([len(entry)]) + entry                 # token c is the character c
    offsets = [a if a < BASE else -(a - BASE) - 1 for a, _t, _n in SYMBOLS]   # ABSOLUTE_PERCPU
    table = b"".join(t + b"\0" for t in tokens)
    index, off = [], 0
    for t in tokens:
        index.append(off)
        off += len(t) + 1

    def align(b: bytearray, to: int = 8) -> None:
        b += bytes(-len(b) % to)

    out = bytearray(b"\xcc" * 4096)                           # other rodata before
    if layout == "6.1":
        align(out)
        out += struct.pack(f"<{n}i", *offsets)
        align(out)
        out += struct.pack("<Q", BASE)
    align(out)
    out += struct.pack("<I", n)
    align(out)
    out += names
    align(out)
    out += struct.pack(f"<{len(markers)}I", *markers)
    if layout == "6.2":
        align(out)
        out += bytes(3 * n)                                   # kallsyms_seqs_of_names
    align(out)
    out += table
    align(out)
    out += struct.pack("<256H", *index)
    if layout == "6.2":
        align(out)
        out += struct.pack(f"<{n}i", *offsets)
        align(out)
        out += struct.pack("<Q", BASE)
    out += b"arch/x86/kernel/head64.c\0" + b"\xcc" * 4096
    return bytes(out)


@pytest.mark.parametrize("layout", ["6.1", "6.2"])
def test_the_tables_are_found_and_read_back_in_either_layout(layout):
    assert kallsyms.parse(_tables(layout)) == SYMBOLS


def test_an_image_without_kallsyms_is_one_clear_error():
    with pytest.raises(kallsyms.KallsymsError, match="no kallsyms token table"):
        kallsyms.parse(b"0\x001\x002\x003\x00" * 1000)


def test_the_symbol_file_is_an_elf_binutils_reads():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf")
    symbols = [(0, 0x40, "startup_64"), (0x40, 0x100, "start_kernel")]
    data = symbol_elf(BASE, 0x140, symbols)
    path = f"/tmp/hclsim-test-symbols-{id(data)}.elf"
    with open(path, "wb") as f:
        f.write(data)
    try:
        out = subprocess.run([readelf, "-W", "-s", "-S", path], capture_output=True, text=True, check=True).stdout
    finally:
        import os
        os.unlink(path)
    assert "ffffffff81000040   256 FUNC    GLOBAL DEFAULT    1 start_kernel" in out
    assert ".text             NOBITS          ffffffff81000000" in out


def test_a_distribution_kernel_gets_its_text_symbols_from_its_own_kallsyms(real_kernel):
    from hclsim.boot.kernel import load_kernel
    image = load_kernel(real_kernel)
    ks = kallsyms.kernel_symbols(image)
    assert ks.base == BASE and ks.symbol("startup_64") == image.entry_offset   # the vmlinux entry
    assert len(ks.symbols) > 20_000
    for name in ("start_kernel", "x86_64_start_kernel", "do_syscall_64", "native_safe_halt", "panic"):
        assert ks.symbol(name) is not None, name
    at = ks.symbol("start_kernel")
    assert ks.symbolize(at) == "start_kernel" and ks.symbolize(at + 5) == "start_kernel+0x5"
    assert kallsyms.kernel_symbols(image) is ks                  # cached by file
    readelf = shutil.which("readelf")
    if readelf:
        out = subprocess.run([readelf, "-W", "-s", ks.path], capture_output=True, text=True, check=True).stdout
        assert f"{BASE + at:016x}" in out and " start_kernel\n" in out
