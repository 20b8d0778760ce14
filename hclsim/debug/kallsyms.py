"""A kernel's symbols rebuilt from its own kallsyms tables (scripts/kallsyms.c's output in
.rodata), for a kernel that ships without a symbol table (distribution bzImages; Debian's
System.map is a stub that points at the -dbg package).

The tables, in the order Linux 4.20 to 6.1 lays them out (CONFIG_KALLSYMS_BASE_RELATIVE):
kallsyms_offsets (s32 each), kallsyms_relative_base (u64), kallsyms_num_syms (u32),
kallsyms_names (per symbol: a length, one byte or, from 6.1, two with bit 7 set in the first,
then that many token numbers), kallsyms_markers (u32: where every 256th name starts),
kallsyms_token_table (256 NUL-terminated strings) and kallsyms_token_index (256 u16 offsets into
it). A name expands through the tokens; its first character is the type (`nm`'s T, t, D, ...).

Found without symbols: the token table holds every character the names use as a token of its
own at that character's index, so "0".."9" sit there as ten consecutive one-character strings;
counting back 0x30 strings gives its start. The index must then follow it, the markers (0 first,
increasing) precede it, and a count whose names parse exactly up to the markers precedes those.
Newer layouts (6.2 moved the offsets after the index) are looked for too. An address is
relative_base + offset, or with CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86_64) a non-negative offset
is absolute (per-CPU symbols) and a negative one is relative_base - 1 - offset.
"""
import bisect
import functools
import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

from hclsim import HclsimError
from hclsim.debug.symbol_elf import symbol_elf

DIGITS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
TEXT_TYPES = "tTwW"


class KallsymsError(HclsimError):
    pass


@dataclass(frozen=True)
class KernelSymbols:
    """The kernel's text symbols as the debugger's images hold symbols: (offset from `base`,
    size up to the next symbol, name)."""
    path: str                            # an ELF symbol file of them for gdb ("" if none)
    base: int
    symbols: tuple
    segments: tuple = ()                 # no code the debugger scans for exits
    source: str = ""                     # the kernel file they came from
    section = ".text"                    # all of them (text symbols only)

    @property
    def span(self) -> int:
        return self.symbols[-1][0] + self.symbols[-1][1] if self.symbols else 0

    @functools.cached_property
    def _starts(self) -> list[int]:
        return [s[0] for s in self.symbols]

    @functools.cached_property
    def _by_name(self) -> dict[str, int]:
        """name -> the first (lowest) offset of that name (static functions repeat names)."""
        found = {}
        for offset, _size, sym in self.symbols:
            found.setdefault(sym, offset)
        return found

    def symbol(self, name: str) -> int | None:
        return self._by_name.get(name)

    def symbolize(self, offset: int) -> str | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        start, size, name = self.symbols[i]
        if not start <= offset < start + size:
            return None
        return f"{name}+{offset - start:#x}" if offset != start else name


def _strings(blob: bytes, start: int, count: int) -> list[tuple[int, bytes]] | None:
    """count NUL-terminated strings from start: [(offset, bytes)], None if they run out."""
    out, pos = [], start
    for _ in range(count):
        end = blob.find(b"\0", pos, pos + 256)
        if end < 0:
            return None
        out.append((pos, blob[pos:end]))
        pos = end + 1
    return out


def _token_tables(blob: bytes):
    """Each (start, the 256 tokens, end) that may be the token table (then checked by its index)."""
    at = blob.find(DIGITS)
    while at >= 0:
        # Walk back over the 0x30 strings before "0": each ends with the NUL before the next.
        pos, ok = at, True
        for _ in range(0x30):
            prev = blob.rfind(b"\0", max(0, pos - 257), pos - 1)
            if prev < 0:
                ok = False
                break
            pos = prev + 1
        if ok:
            strings = _strings(blob, pos, 256)
            if strings and all(strings[0x30 + i][1] == b"%d" % i for i in range(10)) \
                    and all(len(t) for _o, t in strings):
                yield pos, [t for _o, t in strings], strings[-1][0] + len(strings[-1][1]) + 1
        at = blob.find(DIGITS, at + 1)


def _aligned(pos: int, to: int) -> int:
    return (pos + to - 1) & ~(to - 1)


def _token_index(blob: bytes, table: int, tokens: list[bytes], end: int) -> int:
    want = []
    off = 0
    for t in tokens:
        want.append(off)
        off += len(t) + 1
    packed = struct.pack("<256H", *want)
    for align in (2, 4, 8):
        pos = _aligned(end, align)
        if blob[pos:pos + 512] == packed:
            return pos
    raise KallsymsError("the kallsyms token index does not follow its token table")


def _names(blob: bytes, start: int, count: int, tokens: list[bytes]) -> tuple[list[str], list[int], int]:
    """count names from start: (names, where each starts, end)."""
    names, starts, pos = [], [], start
    for _ in range(count):
        if pos >= len(blob):
            raise KallsymsError("the kallsyms names run past the image")
        starts.append(pos)
        n = blob[pos]
        pos += 1
        if n & 0x80:                                 # a "big" name (6.1): two bytes of length
            n = (n & 0x7F) | (blob[pos] << 7)
            pos += 1
        names.append(b"".join(tokens[b] for b in blob[pos:pos + n]).decode("latin-1"))
        pos += n
    return names, starts, pos


def parse(blob: bytes) -> list[tuple[int, str, str]]:
    """[(address, type, name)] from an image holding kallsyms tables, in the tables' order."""
    for table, tokens, end in _token_tables(blob):
        try:
            index = _token_index(blob, table, tokens, end)
        except KallsymsError:
            continue
        return _symbols(blob, table, tokens, index + 512)
    raise KallsymsError("no kallsyms token table (is the kernel built with CONFIG_KALLSYMS?)")


def _marker_runs(blob: bytes, table: int):
    """(start, values) of each u32 array in the 16 MiB before the token table that begins with 0
    and increases: the markers, right before the table or before kallsyms_seqs_of_names (3 bytes
    a symbol: 6.2's layout, in some 6.1 stable kernels too); nearest first."""
    lo = max(0, table - (16 << 20)) & ~3
    words = np.frombuffer(blob, "<u4", (table - lo) // 4, lo).astype(np.int64)
    # Runs of words each 256 names (256 to 66,560 bytes) past the one before, from a 0: at least
    # 8 of them (2048 symbols; a kernel has tens of thousands). What follows may rise too.
    steps = np.diff(words)
    ok = np.concatenate(([False], (steps >= 256) & (steps < 256 * 260)))
    starts = np.flatnonzero(np.concatenate(([True], ~ok[1:])))
    ends = np.append(starts[1:], len(words))
    keep = (words[starts] == 0) & (ends - starts >= 8)
    for i, j in zip(starts[keep][::-1], ends[keep][::-1]):
        yield lo + 4 * int(i), words[i:j]


def _symbols(blob: bytes, table: int, tokens: list[bytes], index_end: int) -> list[tuple[int, str, str]]:
    for markers_at, markers in _marker_runs(blob, table):
        count_range = range(256 * (len(markers) - 1) + 1, 256 * len(markers) + 1)
        # The names start markers[-1] before the last 256 of them, which are at most 256 * 257
        # bytes: the count is just before the names.
        hi = markers_at - int(markers[-1])
        lo = max(0, hi - 256 * 258 - 16) & ~3
        if hi <= lo:
            continue
        words = np.frombuffer(blob, "<u4", (hi - lo) // 4, lo)
        for k in np.flatnonzero((words >= count_range.start) & (words < count_range.stop))[::-1]:
            count_at, n = lo + 4 * int(k), int(words[k])
            for start in (count_at + 4, _aligned(count_at + 4, 8)):
                if start + markers[1] > markers_at:
                    continue
                try:                             # the first 256 names must end where marker 1 says
                    if _names(blob, start, 256, tokens)[2] - start != markers[1]:
                        continue
                    names, starts, stop = _names(blob, start, n, tokens)
                except (KallsymsError, IndexError):
                    continue
                if not stop <= markers_at <= _aligned(stop, 8) or \
                        any(starts[256 * i] - start != markers[i] for i in range(len(markers))):
                    continue
                addresses = _addresses(blob, count_at, index_end, n)
                return [(a, name[:1], name[1:]) for a, name in zip(addresses, names)]
    raise KallsymsError("no kallsyms symbol count and names that end at the markers")


def _addresses(blob: bytes, count_at: int, index_end: int, n: int) -> list[int]:
    """The symbols' addresses from kallsyms_offsets and kallsyms_relative_base: before the count
    (up to 6.1), or after the token index (6.2 on)."""
    places = [(b, b - 4 * n - pad) for b in (count_at - 8, count_at - 12, count_at - 16) for pad in (0, 4)]
    places += [(_aligned(o + 4 * n, 8), o) for o in (_aligned(index_end, 4), _aligned(index_end, 8))]
    for base_at, offsets_at in places:
        if offsets_at < 0 or base_at + 8 > len(blob):
            continue
        (base,) = struct.unpack_from("<Q", blob, base_at)
        if base < 0xFFFFFFFF80000000:            # the kernel's text: where relative offsets start
            continue
        offsets = np.frombuffer(blob, "<i4", n, offsets_at).astype(np.int64)
        addresses = np.where(offsets >= 0, offsets, np.int64(base - (1 << 64)) - 1 - offsets)
        text = addresses[offsets < 0]
        if len(text) and np.all(np.diff(text) >= 0) and offsets[-1] != 0:   # sorted by address
            return [int(a) & ((1 << 64) - 1) for a in addresses]
    raise KallsymsError("no kallsyms offsets and relative base next to the tables")


_cache: dict = {}


def kernel_symbols(image) -> KernelSymbols:
    """The text symbols of a loaded kernel (boot/kernel.py KernelImage), from the kallsyms
    tables in its segments; cached by file (a Debian kernel's take ~0.7 s)."""
    try:
        st = os.stat(image.path)
        key = (image.path, st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _cache:
        return _cache[key]
    found, last = None, None
    for seg in image.segments:
        try:
            found = parse(seg.data)
            break
        except KallsymsError as exc:
            last = exc
    if found is None:
        raise last or KallsymsError("the kernel has no segments")
    text = sorted({(addr, name) for addr, kind, name in found if kind in TEXT_TYPES and addr >> 63})
    if not text:
        raise KallsymsError("kallsyms holds no kernel text symbols")
    base = text[0][0]
    symbols = tuple((a - base, (text[i + 1][0] - a) if i + 1 < len(text) else 1, name)
                    for i, (a, name) in enumerate(text) if i + 1 == len(text) or text[i + 1][0] > a)
    result = KernelSymbols(_write_symbol_file(key, base, symbols), base, symbols, source=image.path)
    if key is not None:
        _cache[key] = result
    return result


def _write_symbol_file(key, base: int, symbols) -> str:
    """The symbols as an ELF symbol file in the cache folder, for gdb (debug/symbol_elf.py); ""
    if it cannot be written (the debugger's own commands do not need it)."""
    from hclsim.boot.firmware import cache_dir
    data = symbol_elf(base, symbols[-1][0] + symbols[-1][1], symbols)
    name = hashlib.sha256(repr(key).encode() + data[:4096]).hexdigest()[:16]
    path = cache_dir() / "kallsyms" / f"linux-{name}.elf"
    try:
        if not path.is_file() or path.stat().st_size != len(data):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(path)
    except OSError:
        return ""
