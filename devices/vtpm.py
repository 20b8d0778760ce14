"""The vTPM's registers (vm/devices/tpm/tpm_device in OpenVMM; section 8 of
shared/design/openhcl-userspace.md), x86 layout, over a TPM 2.0 engine (devices/swtpm.py):

- the CRB control area, MMIO 0xFED40000..=0xFED4006F: locality state and control, the interface
  id, and the START/CANCEL flow. START = 1 reads the command (up to 4096 bytes) at command_pa in
  guest memory, runs it in the engine, writes the response at response_pa, and clears START.
  Reads of 1, 2 or 4 bytes (8 at 0x30, 0x5C and 0x68), the offset floored to 4; writes of 1, 2
  or 4 bytes, 4-aligned.
- the I/O ports 0x1040..=0x1048: the control port (+0, write-only) selects a TpmIoCommand, the
  data port (+4, 4 bytes little endian) reads or writes its value. MAP_SHARED_MEMORY takes the
  page of the command and response buffers (response = command + 4096).
Wrong widths and undefined registers are IoErrors the guest sees as an error (a read of all ones).

State, as OpenHCL keeps it: the engine's NV state in the VM's VMGS file TPM_NVRAM (3), the PPI
state in TPM_PPI (2), through the stores the device is given (nvram_store, ppi_store:
restore() -> bytes or None, persist(data)). The first access seeds the engine from the NV store;
every command that changed NV (swtpm rewrote its permanent state, as libtpms's NV commit does) is
persisted before the guest sees the command done. The engine's volatile state (PCRs, sessions)
after each command is the saved state's tpm_state_blob, so a worker restarted from its saved
state carries on with the same PCRs; a reset or a new boot starts from NV alone (TPM2_Startup).
"""
import struct

from hclsim.defs.platform import Region
from hclsim.devices.bus import IoError
from hclsim.devices.saved_state import Field, Schema
from hclsim.devices.swtpm import BLOB_PERMANENT, BLOB_VOLATILE, SwtpmError

CRB_BASE, CRB_SIZE = 0xFED40000, 0x70
IO_BASE, IO_SIZE = 0x1040, 9                     # 0x1040..=0x1048
CONTROL_PORT, DATA_PORT = IO_BASE, IO_BASE + 4
# Control area offsets.
LOC_STATE, LOC_CTRL, LOC_STS, CRB_INTF_ID = 0x00, 0x08, 0x0C, 0x30
REQUEST, STATUS, CANCEL, START, INTERRUPT_CONTROL = 0x40, 0x44, 0x48, 0x4C, 0x50
COMMAND_SIZE, COMMAND_PA_LO, COMMAND_PA_HI, RESPONSE_SIZE, RESPONSE_PA_LO, RESPONSE_PA_HI = (
    0x58, 0x5C, 0x60, 0x64, 0x68, 0x6C)
WIDE_OFFSETS = (CRB_INTF_ID, COMMAND_PA_LO, RESPONSE_PA_LO)       # where an 8-byte read is allowed
BUFFER_SIZE = 4096
# TpmIoCommand.
(IO_VERSION, IO_MAP_SHARED_MEMORY, IO_ESTABLISHED, IO_PPI_GET_PENDING_OPERATION, IO_PPI_GET_LAST_OPERATION,
 IO_PPI_GET_LAST_RESULT, IO_PPI_SET_OPERATION, IO_PPI_GET_USER_CONFIRMATION, IO_PPI_SET_OPERATION_ARG3_INTEGER2,
 IO_GET_TCG_PROTOCOL_VERSION, IO_CAPABILITY_HASH_ALG_BITMAP) = (0, 1, 2, 3, 5, 6, 7, 8, 32, 64, 65)
IO_INTERFACE_VERSION = 1
TCG2_PROTOCOL = 1
HASH_ALG_SHA256 = 1 << 1                          # the bitmap's SHA-256 bit (SHA-1 is bit 0)
PPI_WORDS = 7
PPI_FILE, NVRAM_FILE = 2, 3                      # VMGS FileId TPM_PPI, TPM_NVRAM
TPM_ST_NO_SESSIONS = 0x8001
# GetCapability, GetTestResult, ReadPublic, PCR_Read, NV_ReadPublic: they change no TPM state.
READ_ONLY_COMMANDS = frozenset((0x17A, 0x17C, 0x173, 0x17E, 0x169))


class Vtpm:
    """The device; engine: execute(command bytes) -> response bytes, cancel(). guest_memory
    (read(gpa, n), write(gpa, data)) is set by whoever puts it on a bus or in a worker."""
    name = "tpm"
    uses_guest_memory = True
    nonvolatile_stores = {"ppi_store": PPI_FILE, "nvram_store": NVRAM_FILE}
    saved_state = Schema("hclsim.devices.vtpm.Vtpm", (
        Field(1, "control_area", bytes, b""), Field(2, "current_io_command", int, -1),
        Field(3, "requested_locality", int, 0), Field(4, "ppi_state", bytes, b""),
        Field(5, "tpm_state_blob", bytes, b"")))

    def __init__(self, engine=None, nvram_store=None, ppi_store=None):
        self.engine = engine
        self.nvram_store, self.ppi_store = nvram_store, ppi_store
        self.volatile = b""                     # the engine's volatile state after the last command
        self._seeded = False                    # the engine holds this device's state
        self._nv = (None, None)                 # (swtpm's NV mark, the NV blob last persisted)
        self.nv_persists = 0
        self.fatal: str | None = None           # why this device cannot go on (its worker ends, and restarts)
        self.guest_memory = None
        self.mmio_regions = (Region("control_area", CRB_BASE, CRB_SIZE),)
        self.pio_regions = (Region("io", IO_BASE, IO_SIZE),)
        self.regs = {off: 0 for off in range(0, CRB_SIZE, 4)}
        self.requested = False
        self.io_command: int | None = None
        self.ppi = [0] * PPI_WORDS
        self.commands = 0

    # ---- the CRB control area ----------------------------------------------------------
    def _seed(self):
        """Before the first access after power on, a restore or a reset: the PPI state from its
        store, the engine from the NV store (and the volatile state a restore brought). Until
        it succeeds every access fails (and tries again): never a TPM without the VM's state."""
        if self.ppi_store is not None:
            ppi = self.ppi_store.restore()
            if ppi is not None and len(ppi) == 4 * PPI_WORDS:
                self.ppi = list(struct.unpack(f"<{PPI_WORDS}I", ppi))
        if self.engine is None:
            self._seeded = True
            return
        nv = self.nvram_store.restore() if self.nvram_store is not None else None
        if nv is None and self.commands:
            nv = self.engine.get_state(BLOB_PERMANENT)    # a reset without a store: keep NV, drop the rest
        blobs = {BLOB_PERMANENT: nv} if nv else {}
        if self.volatile:
            blobs[BLOB_VOLATILE] = self.volatile
        if blobs:
            self.engine.set_state(blobs)
        self._nv = (self.engine.nv_mark(), nv)
        self._seeded = True

    def _seed_or_fail(self) -> None:
        try:
            self._seed()
        except SwtpmError as exc:
            self.fatal = f"the TPM engine failed: {exc}"
            raise

    def _after_command(self, command: bytes) -> None:
        """NV persisted if the command changed it; the volatile state kept for the saved state
        (~150-240 us for swtpm to marshal, so not after the commands that only read without a
        session, whose state they cannot change)."""
        mark = self.engine.nv_mark()
        if mark != self._nv[0]:
            nv = self.engine.get_state(BLOB_PERMANENT)
            if nv != self._nv[1] and self.nvram_store is not None:
                self.nvram_store.persist(nv)
                self.nv_persists += 1
            self._nv = (mark, nv)
        tag, _size, code = struct.unpack_from(">HII", command)
        if not (tag == TPM_ST_NO_SESSIONS and code in READ_ONLY_COMMANDS):
            self.volatile = self.engine.get_state(BLOB_VOLATILE)

    def _persist_ppi(self) -> None:
        if self.ppi_store is not None:
            self.ppi_store.persist(struct.pack(f"<{PPI_WORDS}I", *self.ppi))

    def mmio_read(self, gpa: int, size: int):
        if not self._seeded:
            self._seed_or_fail()
        off = gpa - CRB_BASE
        if size == 8 and off not in WIDE_OFFSETS or size not in (1, 2, 4, 8):
            return IoError(f"a {size}-byte read at control area {off:#x}")
        word = off & ~3
        value = self._reg(word)
        if size == 8:
            value |= self._reg(word + 4) << 32
        return (value >> (8 * (off - word))) & ((1 << (8 * size)) - 1)

    def _reg(self, word: int) -> int:
        if word == LOC_STATE:
            return 0x83 if self.requested else 0x81
        if word == LOC_STS:
            return 1
        if word == CRB_INTF_ID:
            return 0x4011
        return self.regs.get(word, 0)

    def mmio_write(self, gpa: int, size: int, value: int):
        if not self._seeded:
            self._seed_or_fail()
        off = gpa - CRB_BASE
        if size not in (1, 2, 4) or off % 4:
            return IoError(f"a {size}-byte write at control area {off:#x}")
        if off == LOC_CTRL:
            self.requested = not value & 2
        elif off == CANCEL:
            self.regs[CANCEL] = value & 1
            if value & 1 and self.engine is not None:
                self.engine.cancel()
        elif off == START:
            if value & 1:
                return self._start()
        elif off in (LOC_STATE, LOC_STS, CRB_INTF_ID):
            return IoError(f"control area {off:#x} is read-only")
        else:
            self.regs[off] = value & 0xFFFFFFFF
        return None

    def _pa(self, lo: int) -> int:
        return self.regs[lo] | self.regs[lo + 4] << 32

    def _start(self):
        """Run the command in guest memory; START reads 1 meanwhile and 0 after."""
        if self.engine is None or self.guest_memory is None:
            return IoError("the vTPM has no engine or no guest memory")
        self.regs[START] = 1
        try:
            size = min(self.regs[COMMAND_SIZE] or BUFFER_SIZE, BUFFER_SIZE)
            command = self.guest_memory.read(self._pa(COMMAND_PA_LO), size)
            length = struct.unpack_from(">I", command, 2)[0] if len(command) >= 6 else 0
            if not 10 <= length <= size:
                return IoError(f"a TPM command of {length} bytes in a {size}-byte buffer")
            response = self.engine.execute(command[:length])
            room = min(self.regs[RESPONSE_SIZE] or BUFFER_SIZE, BUFFER_SIZE)
            if len(response) > room:
                return IoError(f"a {len(response)}-byte response does not fit in {room} bytes")
            self.commands += 1
            self._after_command(command)                # NV persisted before the guest sees the response
            self.guest_memory.write(self._pa(RESPONSE_PA_LO), response)
        except SwtpmError as exc:                      # the engine is gone: nothing more can be served
            self.fatal = f"the TPM engine failed: {exc}"
            return IoError(f"TPM command failed: {exc}")
        except Exception as exc:                       # guest memory or a store failed
            return IoError(f"TPM command failed: {exc}")
        finally:
            self.regs[START] = 0
        return None

    # ---- the I/O ports ---------------------------------------------------------------------
    def pio_read(self, port: int, size: int):
        if not self._seeded:
            self._seed_or_fail()
        if port != DATA_PORT:
            return IoError(f"port {port:#x} is not the TPM's data port (invalid register)")
        if size != 4:
            return IoError(f"a {size}-byte read of the data port (invalid access size)")
        cmd = self.io_command
        if cmd == IO_VERSION:
            return IO_INTERFACE_VERSION
        if cmd == IO_ESTABLISHED:
            return self.regs[COMMAND_PA_LO]
        if cmd == IO_GET_TCG_PROTOCOL_VERSION:
            return TCG2_PROTOCOL
        if cmd == IO_CAPABILITY_HASH_ALG_BITMAP:
            return HASH_ALG_SHA256
        if cmd == IO_PPI_GET_PENDING_OPERATION:
            return self.ppi[0]
        if cmd == IO_PPI_GET_LAST_OPERATION:
            return self.ppi[1]
        if cmd == IO_PPI_GET_LAST_RESULT:
            return self.ppi[2]
        if cmd == IO_PPI_GET_USER_CONFIRMATION:
            return 4                                    # allowed, no physical presence needed
        return IoError(f"no readable TpmIoCommand {cmd}")

    def pio_write(self, port: int, size: int, value: int):
        if not self._seeded:
            self._seed_or_fail()
        if size != 4:
            return IoError(f"a {size}-byte write to TPM port {port:#x} (invalid access size)")
        if port == CONTROL_PORT:
            self.io_command = value
            return None
        if port != DATA_PORT:
            return IoError(f"port {port:#x} is not a TPM port (invalid register)")
        cmd = self.io_command
        if cmd == IO_MAP_SHARED_MEMORY:
            self.regs[COMMAND_PA_LO], self.regs[COMMAND_PA_HI] = value & 0xFFFFFFFF, 0
            resp = value + BUFFER_SIZE
            self.regs[RESPONSE_PA_LO], self.regs[RESPONSE_PA_HI] = resp & 0xFFFFFFFF, resp >> 32
            self.regs[COMMAND_SIZE] = self.regs[RESPONSE_SIZE] = BUFFER_SIZE
            return None
        if cmd == IO_PPI_SET_OPERATION:
            self.ppi[0] = value
            self._persist_ppi()
            return None
        if cmd == IO_PPI_SET_OPERATION_ARG3_INTEGER2:
            self.ppi[3] = value
            self._persist_ppi()
            return None
        return IoError(f"no writable TpmIoCommand {cmd}")

    # ---- saved state ----------------------------------------------------------------------
    def save(self) -> dict:
        area = b"".join(struct.pack("<I", self.regs[off]) for off in range(0, CRB_SIZE, 4))
        return {"control_area": area, "current_io_command": -1 if self.io_command is None else self.io_command,
                "requested_locality": int(self.requested), "ppi_state": struct.pack(f"<{PPI_WORDS}I", *self.ppi),
                "tpm_state_blob": self.volatile}

    def restore(self, values: dict) -> None:
        area = values["control_area"]
        self.regs = {off: (struct.unpack_from("<I", area, off)[0] if off + 4 <= len(area) else 0)
                     for off in range(0, CRB_SIZE, 4)}
        cmd = values["current_io_command"]
        self.io_command = None if cmd < 0 else cmd
        self.requested = bool(values["requested_locality"])
        ppi = values["ppi_state"]
        self.ppi = list(struct.unpack(f"<{PPI_WORDS}I", ppi)) if len(ppi) == 4 * PPI_WORDS else [0] * PPI_WORDS
        self.volatile = values["tpm_state_blob"]
        self._seeded = False                    # the engine takes this state at the next access
