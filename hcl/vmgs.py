"""The VM's guest state store: a VMGS (vm/vmgs in OpenVMM) on the host's VMGS disk.

The layout is VMGS version 3's, unencrypted (vmgs_format): 4096-byte blocks; two 168-byte
headers in blocks 0 and 1, the active one the valid header with the newer sequence number; each
names a file table (64 entries of 64 bytes, entry 0 the table itself) and every file is an
extent of blocks. A write never touches what the active header reaches: the file's new blocks
and a new table go to free blocks, then the other header slot gets sequence + 1. A crash at any
point leaves the old header (and so the old files) whole; its checksum (CRC32 of the header with
the checksum field zero) tells a torn header from a written one.

The disk is blank (all zeros) until the VM worker formats it, as OpenHCL formats an empty VMGS.
"""
import os
import struct
import threading
import zlib

from hclsim import HclsimError

BLOCK = 4096                                      # VMGS_BYTES_PER_BLOCK
FILE_COUNT = 64                                   # VMGS_FILE_COUNT
SIGNATURE = b"GUESTRTS"                           # VMGS_SIGNATURE (as the V1 format's)
VERSION_3 = 0x00030000
DEFAULT_CAPACITY = 0x400000                       # VMGS_DEFAULT_CAPACITY: 4 MiB
MIN_FILE_BLOCK = 2                                # VMGS_MIN_FILE_BLOCK_OFFSET: after the two headers
# VmgsHeader: signature, version, checksum, sequence, header_size, file_table_offset (block),
# file_table_size (blocks), encryption_algorithm, reserved, metadata_keys (2 x 64), reserved_1.
HEADER = struct.Struct("<8sIIIIIIHH128sI")
CHECKSUM_OFFSET = 12
# VmgsFileEntry: offset (block), allocation_size (blocks), valid_data_size (bytes), nonce,
# authentication_tag, reserved.
ENTRY = struct.Struct("<IIQ12s16s20s")
assert HEADER.size == 168 and ENTRY.size == 64 and ENTRY.size * FILE_COUNT == BLOCK

# FileId (vmgs_format): the ones hclsim's devices use.
FILE_TABLE, BIOS_NVRAM, TPM_PPI, TPM_NVRAM = 0, 1, 2, 3
FILE_NAMES = {0: "FILE_TABLE", 1: "BIOS_NVRAM", 2: "TPM_PPI", 3: "TPM_NVRAM", 4: "RTC_SKEW", 5: "ATTEST",
              6: "KEY_PROTECTOR", 7: "VM_UNIQUE_ID", 8: "GUEST_FIRMWARE", 9: "CUSTOM_UEFI", 10: "GUEST_WATCHDOG",
              11: "HW_KEY_PROTECTOR", 13: "GUEST_SECRET_KEY", 14: "HIBERNATION_FIRMWARE", 15: "PLATFORM_SEED",
              16: "PROVENANCE_DOC", 63: "EXTENDED_FILE_TABLE"}


class VmgsError(HclsimError):
    pass


def _checksum(header: bytes) -> int:
    return zlib.crc32(header[:CHECKSUM_OFFSET] + bytes(4) + header[CHECKSUM_OFFSET + 4:HEADER.size])


def _header(sequence: int, table_block: int) -> bytes:
    raw = bytearray(HEADER.pack(SIGNATURE, VERSION_3, 0, sequence, HEADER.size, table_block, 1, 0, 0, bytes(128), 0))
    struct.pack_into("<I", raw, CHECKSUM_OFFSET, _checksum(raw))
    return bytes(raw)


def _newer(a: int, b: int) -> bool:
    """Sequence a was written after b (they wrap at 2^32)."""
    return 0 < (a - b) % (1 << 32) < (1 << 31)


def read_headers(fd: int) -> tuple[int, tuple | None, str]:
    """(slot, header fields, why) of the active header: slot -1 and fields None when the disk
    is blank (no header was ever written), VmgsError when it holds something that is not one."""
    raw = os.pread(fd, 2 * BLOCK, 0)
    best, problems = None, []
    for slot in (0, 1):
        h = raw[slot * BLOCK:slot * BLOCK + HEADER.size]
        if len(h) < HEADER.size or h == bytes(HEADER.size):
            continue
        fields = HEADER.unpack(h)
        if fields[0] != SIGNATURE:
            problems.append(f"header {slot}: signature {fields[0]!r}, not {SIGNATURE!r}")
        elif fields[1] != VERSION_3 or fields[4] != HEADER.size:
            problems.append(f"header {slot}: version {fields[1]:#x}, size {fields[4]} (hclsim reads {VERSION_3:#x}, "
                            f"{HEADER.size})")
        elif fields[2] != _checksum(h):
            problems.append(f"header {slot}: checksum {fields[2]:#010x} does not match")
        elif fields[7] != 0:
            problems.append(f"header {slot}: encrypted (algorithm {fields[7]}), which hclsim does not read")
        elif best is None or _newer(fields[3], best[1][3]):
            best = (slot, fields)
    if best is not None:
        return best[0], best[1], ""
    if problems:
        raise VmgsError("not a VMGS: " + "; ".join(problems))
    return -1, None, "blank"


class Vmgs:
    """A VMGS on fd (a host file or the VMGS disk): read_file / write_file by FileId."""

    def __init__(self, fd: int, capacity: int | None = None):
        self.fd = fd
        self.lock = threading.Lock()              # devices' proxies write from their VPs' threads
        size = os.fstat(fd).st_size
        self.capacity_blocks = (capacity or size or DEFAULT_CAPACITY) // BLOCK
        if self.capacity_blocks < MIN_FILE_BLOCK + 2:
            raise VmgsError(f"a {self.capacity_blocks * BLOCK}-byte disk is too small for a VMGS")
        self.slot, header, _ = read_headers(fd)
        self.formatted_now = header is None
        if header is None:
            self._format()
        else:
            self.sequence, table_block = header[3], header[5]
            if not MIN_FILE_BLOCK <= table_block < self.capacity_blocks:
                raise VmgsError(f"not a VMGS: its file table at block {table_block} is outside the disk")
            self.table = self._read_table(table_block)

    def _read_table(self, block: int) -> list[list]:
        raw = os.pread(self.fd, BLOCK, block * BLOCK)
        if len(raw) < BLOCK:
            raise VmgsError(f"not a VMGS: its file table at block {block} is past the end of the disk")
        table = [list(ENTRY.unpack_from(raw, i * ENTRY.size)) for i in range(FILE_COUNT)]
        for file_id, e in enumerate(table):
            if e[2] and (e[0] < MIN_FILE_BLOCK or e[0] + e[1] > self.capacity_blocks or e[2] > e[1] * BLOCK):
                raise VmgsError(f"not a VMGS: file {file_id} ({e[2]} bytes at block {e[0]}) is outside the disk")
        return table

    def _format(self) -> None:
        """An empty VMGS: the table at block 2, header 0 with sequence 1."""
        os.ftruncate(self.fd, max(os.fstat(self.fd).st_size, self.capacity_blocks * BLOCK))
        self.table = [[0, 0, 0, bytes(12), bytes(16), bytes(20)] for _ in range(FILE_COUNT)]
        self.table[FILE_TABLE][:3] = [MIN_FILE_BLOCK, 1, BLOCK]
        self._write_table(MIN_FILE_BLOCK)
        self.sequence, self.slot = 1, 0
        os.pwrite(self.fd, _header(1, MIN_FILE_BLOCK).ljust(BLOCK, b"\0"), 0)
        os.pwrite(self.fd, bytes(BLOCK), BLOCK)
        os.fsync(self.fd)

    def _write_table(self, block: int) -> None:
        os.pwrite(self.fd, b"".join(ENTRY.pack(*e) for e in self.table), block * BLOCK)

    def files(self) -> dict[int, int]:
        """FileId -> its size, for the files that exist (the table itself left out)."""
        return {i: e[2] for i, e in enumerate(self.table) if i != FILE_TABLE and e[1]}

    def read_file(self, file_id: int) -> bytes | None:
        """The file's bytes, None if it was never written."""
        self._check_id(file_id)
        with self.lock:                           # its blocks are free for reuse after the next write
            offset, blocks, size = self.table[file_id][:3]
            data = os.pread(self.fd, size, offset * BLOCK) if blocks else None
        if data is None:
            return None
        if len(data) != size:
            raise VmgsError(f"file {file_id}: {len(data)} of its {size} bytes are on the disk")
        return data

    def write_file(self, file_id: int, data: bytes) -> None:
        """The file's new contents, all or nothing (new blocks, new table, then the other header)."""
        self._check_id(file_id)
        with self.lock:
            self._write(file_id, data)

    def _write(self, file_id: int, data: bytes) -> None:
        need = max(1, -(-len(data) // BLOCK))
        start = self._allocate(need, ())
        table_block = self._allocate(1, ((start, need),))
        os.pwrite(self.fd, bytes(data) + bytes(need * BLOCK - len(data)), start * BLOCK)
        old = [e[:] for e in self.table]
        self.table[file_id][:3] = [start, need, len(data)]
        self.table[FILE_TABLE][:3] = [table_block, 1, BLOCK]
        try:
            self._write_table(table_block)
            os.fdatasync(self.fd)                     # the blocks before the header that names them
            slot, sequence = 1 - self.slot, (self.sequence + 1) & 0xFFFFFFFF
            os.pwrite(self.fd, _header(sequence, table_block), slot * BLOCK)
            os.fdatasync(self.fd)
        except OSError:
            self.table = old
            raise
        self.slot, self.sequence = slot, sequence

    def _allocate(self, blocks: int, also_taken) -> int:
        """The first run of free blocks (not reached by the active header, nor also_taken)."""
        taken = sorted([(0, MIN_FILE_BLOCK), *((e[0], e[1]) for e in self.table if e[1]), *also_taken])
        at = MIN_FILE_BLOCK
        for start, length in taken:
            if start - at >= blocks:
                break
            at = max(at, start + length)
        if at + blocks > self.capacity_blocks:
            raise VmgsError(f"the VMGS is full: {blocks} blocks wanted, the disk has {self.capacity_blocks}")
        return at

    @staticmethod
    def _check_id(file_id: int) -> None:
        if not 0 < file_id < FILE_COUNT:
            raise VmgsError(f"no VMGS file {file_id} (file ids are 1..{FILE_COUNT - 1})")


class DeviceFiles:
    """The VMGS files one device may use, as its proxy's stores (restore(file_id), persist(file_id,
    data)); without a VMGS they live in memory, as OpenVMM's EphemeralNonVolatileStore (kept
    across the device worker's restarts, gone with the VM)."""

    def __init__(self, store: Vmgs | None, files):
        self.store, self.files = store, frozenset(files)
        self.memory: dict[int, bytes] = {}
        self.persists = 0

    def _check(self, file_id: int) -> None:
        if file_id not in self.files:
            raise VmgsError(f"VMGS file {file_id} is not this device's (it has {sorted(self.files)})")

    def restore(self, file_id: int) -> bytes | None:
        self._check(file_id)
        return self.store.read_file(file_id) if self.store is not None else self.memory.get(file_id)

    def file_store(self, file_id: int) -> "FileStore":
        """One of the files as a device's own NonVolatileStore (a device on the VM worker's bus)."""
        self._check(file_id)
        return FileStore(self, file_id)

    def persist(self, file_id: int, data: bytes) -> None:
        self._check(file_id)
        if self.store is not None:
            self.store.write_file(file_id, data)
        else:
            self.memory[file_id] = bytes(data)
        self.persists += 1


class FileStore:
    def __init__(self, files: DeviceFiles, file_id: int):
        self.files, self.file_id = files, file_id

    def restore(self) -> bytes | None:
        return self.files.restore(self.file_id)

    def persist(self, data: bytes) -> None:
        self.files.persist(self.file_id, data)


def check_file(path: str) -> str:
    """Before a boot: what the VMGS file at path holds ("blank", or "N files"); VmgsError
    when it is not a VMGS (nothing is changed: the user's data stays as it was)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if read_headers(fd)[1] is None:
            return "blank"
        return f"{len(Vmgs(fd).files())} files"        # a formatted disk is only read
    finally:
        os.close(fd)
