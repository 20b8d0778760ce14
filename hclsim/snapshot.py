"""Machine snapshots: save a whole simulated machine to a file and restore it into a new Machine
that continues exactly as the original would (same serial output, instruction counts, handoff).

A snapshot is taken between scheduler runs: before the boot, at a breakpoint (Machine.run_to),
at the kernel handoff or later while the Linux stand-in drives the sidecar. It holds the
BootConfig, digests of every image, guest RAM (only pages with data, zstd-compressed), every
VP's CPU context and the run state (hclsim.snapshot_state). Restoring rebuilds the machine from
the config, checks that the images are the same ones, and loads the state over it.

File: MAGIC, sha256 of the rest, then a JSON header (length-prefixed) and the zstd blobs it
locates (state JSON, CPU contexts, RAM data).
"""
import hashlib
import json
import os
import struct
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import unicorn
import zstandard

from hclsim import HclsimError, __version__
from hclsim.config import BootConfig
from hclsim.cpu.ram_pages import data_runs
from hclsim.snapshot_state import SnapshotStateError, apply, capture

MAGIC = b"HCLSNAP\x00"
FORMAT = 2   # 2: device state through the bus (devices/saved_state.py), not fast-path slots
IMAGE_NAMES = {"shim": "boot shim", "sidecar": "sidecar kernel", "vtl0_guest": "VTL0 test guest",
               "kernel": "kernel", "initrd": "initrd"}
_PREFIX = len(MAGIC) + 32
HEADER_KEYS = ("format", "unicorn", "config", "images", "memory_size", "blobs")


class SnapshotError(HclsimError):
    pass


def image_digests(machine) -> dict:
    """sha256 of what each image puts into guest RAM (None for images the machine lacks)."""
    def firmware(img):
        if img is None:
            return None
        h = hashlib.sha256(struct.pack("<Q", img.entry))
        for seg in img.segments:
            h.update(struct.pack("<QQ?Q", seg.vaddr, seg.memsz, seg.executable, len(seg.data)) + seg.data)
        return h.hexdigest()

    k = machine.kernel
    kernel = hashlib.sha256(struct.pack("<QQ", k.entry_offset, k.alignment))
    for seg in k.segments:
        kernel.update(struct.pack("<QQQ", seg.offset, seg.memsz, len(seg.data)) + seg.data)
    return {"shim": firmware(machine.shim), "sidecar": firmware(machine.sidecar),
            "vtl0_guest": firmware(machine.vtl0_guest.image if machine.vtl0_guest else None),
            "kernel": kernel.hexdigest(),
            "initrd": None if machine.initrd is None else hashlib.sha256(machine.initrd.data).hexdigest()}


def _unicorn_version() -> str:
    return unicorn.__version__


# ---- saving ---------------------------------------------------------------------------------

def save(machine, path) -> dict:
    """Write machine's snapshot to path; returns its header (see read_info)."""
    if machine.engine is None:
        raise SnapshotError("cannot snapshot a closed machine")
    if machine.scheduler.engine_factory is not None:
        raise SnapshotError("cannot snapshot a machine in engine-per-VP (benchmark baseline) mode")
    if machine.scheduler.parked is not None:
        machine.scheduler.unload()       # a Linux CPU's VTL0 parked in the engine goes back to its file
    state, contexts = capture(machine)
    runs = data_runs(machine.mem)
    state["ram_runs"] = runs
    cctx = zstandard.ZstdCompressor(level=3)
    ram = cctx.compressobj()  # run by run: no copy of all RAM data at once
    ram_blob = b"".join([ram.compress(machine.mem.array(gpa, length)) for gpa, length in runs] + [ram.flush()])
    blobs = {"state": cctx.compress(json.dumps(state, separators=(",", ":")).encode()),
             "contexts": cctx.compress(contexts), "ram": ram_blob}
    header = _header(machine, runs, blobs)
    head = json.dumps(header, indent=1).encode()
    body = struct.pack("<I", len(head)) + head + b"".join(blobs.values())
    out = Path(path)
    partial = out.with_name(out.name + ".partial")  # never leave a half-written snapshot at path
    try:
        partial.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)
        os.replace(partial, out)
    except OSError as exc:
        raise SnapshotError(f"{out}: cannot write snapshot: {exc.strerror}") from None
    return header


def _header(machine, runs, blobs: dict) -> dict:
    offsets, pos = {}, 0
    for name, blob in blobs.items():
        offsets[name] = [pos, len(blob)]
        pos += len(blob)
    loaded = machine.scheduler.loaded
    stopped = None
    if loaded is not None:
        rip = machine.engine.reg("rip")
        stopped = {"vp": loaded.index, "rip": rip, "symbol": machine.symbolize(rip)}
    config = asdict(machine.config)
    return {
        "format": FORMAT, "hclsim": __version__, "unicorn": _unicorn_version(),
        "config": config, "images": image_digests(machine), "memory_size": machine.mem.size,
        "point": "after-handoff" if getattr(machine, "linux", None) is not None else "before-handoff",
        "instructions": machine.engine.counters()["instructions"], "loaded_vp": stopped,
        "ram_bytes": sum(length for _, length in runs), "blobs": offsets,
    }


# ---- reading --------------------------------------------------------------------------------

def _read(path) -> tuple[dict, bytes]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{p}: cannot read snapshot: {exc.strerror}") from None
    if len(raw) < _PREFIX + 4 or not raw.startswith(MAGIC):
        raise SnapshotError(f"{p}: not an hclsim snapshot")
    body = raw[_PREFIX:]
    if hashlib.sha256(body).digest() != raw[len(MAGIC):_PREFIX]:
        raise SnapshotError(f"{p}: snapshot is corrupt (checksum mismatch: truncated or modified)")
    (head_len,) = struct.unpack_from("<I", body)
    try:
        header = json.loads(body[4:4 + head_len])
        fmt = header["format"]
        missing = [key for key in HEADER_KEYS if key not in header]
    except (ValueError, KeyError, TypeError):
        raise SnapshotError(f"{p}: snapshot header is not valid") from None
    if fmt != FORMAT:
        raise SnapshotError(f"{p}: snapshot format {fmt} is not supported (this hclsim reads format {FORMAT})")
    if missing:
        raise SnapshotError(f"{p}: snapshot header lacks {', '.join(missing)}")
    return header, body[4 + head_len:]


def read_info(path) -> dict:
    """The snapshot's header: config, image digests, point (before/after handoff), instructions,
    the VP loaded at the stop (vp, rip, symbol), RAM bytes stored."""
    return _read(path)[0]


def _blob(header: dict, blobs: bytes, name: str, path) -> bytes:
    try:
        start, length = header["blobs"][name]
        return zstandard.ZstdDecompressor().decompressobj().decompress(blobs[start:start + length])
    except (KeyError, ValueError, TypeError, zstandard.ZstdError) as exc:
        raise SnapshotError(f"{path}: snapshot blob {name!r} is not valid: {exc}") from None


def _config(header: dict, path, images: dict) -> BootConfig:
    known = {f.name for f in fields(BootConfig)}
    saved = header.get("config") or {}
    unknown = set(saved) - known
    if unknown:
        raise SnapshotError(f"{path}: snapshot config has unknown fields {sorted(unknown)} (a different hclsim)")
    bad = set(images) - {"shim", "sidecar", "kernel", "initrd"}
    if bad:
        raise SnapshotError(f"restore: only image paths can be replaced, not {sorted(bad)}")
    values = dict(saved, **{k: str(v) for k, v in images.items()})
    for name in ("host_cpu_order", "device_workers"):          # tuples that JSON made lists
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    return BootConfig(**values)


def restore(path, on_serial=None, **images):
    """A new Machine in the snapshot's state. images (shim=, sidecar=, kernel=, initrd=) replace
    the recorded paths, e.g. when the snapshot moved to another host; their contents must be
    the same as when the snapshot was taken."""
    from hclsim.machine import Machine  # machine imports this module for its convenience methods

    header, blobs = _read(path)
    if header.get("unicorn") != _unicorn_version():
        raise SnapshotError(f"{path}: snapshot was taken with Unicorn {header.get('unicorn')}; "
                            f"this is Unicorn {_unicorn_version()}")
    machine = Machine(_config(header, path, images), on_serial=on_serial)
    try:
        digests = image_digests(machine)
        for name, digest in header["images"].items():
            if digests.get(name) != digest:
                raise SnapshotError(f"{path}: snapshot was taken with a different {IMAGE_NAMES.get(name, name)} "
                                    f"({_short(digest)}, now {_short(digests.get(name))}); "
                                    f"restore needs the same images")
        if machine.mem.size != header["memory_size"]:
            raise SnapshotError(f"{path}: guest RAM is {machine.mem.size:#x} bytes, "
                                f"the snapshot's {header['memory_size']:#x}")
        state = _json(_blob(header, blobs, "state", path), path)
        _restore_ram(machine, state.pop("ram_runs"), _blob(header, blobs, "ram", path), path)
        apply(machine, state, _blob(header, blobs, "contexts", path))
        # Translated code and cached block counts came from the RAM as Machine() wrote it.
        machine.engine.uc.ctl_flush_tb()
        machine.engine.state.forget_blocks()
    except SnapshotStateError as exc:
        machine.close()
        raise SnapshotError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:  # a state this hclsim does not know how to read
        machine.close()
        raise SnapshotError(f"{path}: snapshot state is not readable by this hclsim "
                            f"({type(exc).__name__}: {exc})") from None
    except BaseException:
        machine.close()
        raise
    return machine


def _short(digest) -> str:
    return "none" if digest is None else "sha256 " + digest[:12]


def _json(data: bytes, path) -> dict:
    try:
        return json.loads(data)
    except ValueError:
        raise SnapshotError(f"{path}: snapshot state is not valid JSON") from None


def _restore_ram(machine, runs, data: bytes, path) -> None:
    mem = machine.mem
    if sum(length for _, length in runs) != len(data):
        raise SnapshotError(f"{path}: snapshot RAM data does not match its page runs")
    mem.reset()  # pages the snapshot does not list are zero
    pos = 0
    view = np.frombuffer(data, np.uint8)
    for gpa, length in runs:
        if not mem.contains(gpa, length):
            raise SnapshotError(f"{path}: snapshot RAM run at {gpa:#x} is outside guest RAM")
        mem.array(gpa, length)[:] = view[pos:pos + length]
        pos += length
