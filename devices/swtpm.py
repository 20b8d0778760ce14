"""The TPM 2.0 engine behind hclsim's vTPM: swtpm (Debian's package), a process of its own with
its state folder, driven over its socket interface: TPM commands on the data socket (raw TPM
command and response buffers), control commands (swtpm's CMD_* of tpm_ioctl.h, big endian) on
the control socket. Started with not-need-init, so the guest's own TPM2_Startup is what starts it.

The vTPM device (devices/vtpm.py) executes the guest's commands here; swtpm keeps its NV state in
its own folder (tpm2-00.permall) for the run, and the device copies it to the VM's VMGS, which
outlives the run (get_state / set_state: swtpm's state blobs over the control channel).
"""
import os
import shutil
import socket
import struct
import subprocess
import time

from hclsim import HclsimError
from hclsim.defs.streams import read_exact

TPM_HEADER = struct.Struct(">HII")       # tag, size, command code / response code
MAX_RESPONSE = 4096                      # the CRB and I/O port buffers are a page
CMD_GET_CAPABILITY, CMD_INIT, CMD_SHUTDOWN, CMD_CANCEL_TPM_CMD, CMD_STOP = 1, 2, 3, 9, 14
CMD_GET_STATEBLOB, CMD_SET_STATEBLOB = 12, 13
BLOB_PERMANENT, BLOB_VOLATILE = 1, 2     # PTM_BLOB_TYPE_*: the NV state; PCRs, sessions and the rest
STATE_HEADER = struct.Struct(">IIII")    # ptm_getstate's response: result, flags, totlength, length
MAX_STATE = 1 << 20
PERMANENT_FILE = "tpm2-00.permall"      # swtpm's NV state file in its state folder
START_TIMEOUT_S = 10.0


class SwtpmError(HclsimError):
    pass


def swtpm_binary() -> str | None:
    return shutil.which("swtpm")


class Swtpm:
    """One swtpm process over state_dir (its sockets live there too)."""

    def __init__(self, state_dir: str, terminate: bool = False):
        """terminate: swtpm ends when its data connection goes (the worker that owns it died)."""
        binary = swtpm_binary()
        if binary is None:
            raise SwtpmError("swtpm is not installed (Debian: apt-get install swtpm)")
        os.makedirs(state_dir, exist_ok=True)
        self.state_dir = state_dir
        self.data_path = os.path.join(state_dir, "swtpm-data.sock")
        self.ctrl_path = os.path.join(state_dir, "swtpm-ctrl.sock")
        for p in (self.data_path, self.ctrl_path):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(
            [binary, "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
             "--server", f"type=unixio,path={self.data_path}", "--ctrl", f"type=unixio,path={self.ctrl_path}",
             "--flags", "not-need-init", "--log", f"file={os.path.join(state_dir, 'swtpm.log')},level=1",
             *(["--terminate"] if terminate else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.data = self._connect(self.data_path)
        self.ctrl = self._connect(self.ctrl_path)

    def _connect(self, path: str) -> socket.socket:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise SwtpmError(f"swtpm exited at start (status {self.proc.returncode})"
                                 + (f": {err[-1]}" if err else ""))
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise SwtpmError(f"swtpm did not listen on {path} within {START_TIMEOUT_S:g} s") from None
                time.sleep(0.01)

    def execute(self, command: bytes) -> bytes:
        """One TPM command, its whole response. SwtpmError when swtpm is gone or answers
        something that is not a TPM response."""
        if len(command) < TPM_HEADER.size or TPM_HEADER.unpack_from(command)[1] != len(command):
            raise SwtpmError(f"not a TPM command: {len(command)} bytes, header says otherwise")
        try:
            self.data.sendall(command)
            head = _recv_exact(self.data, TPM_HEADER.size)
            _tag, size, _rc = TPM_HEADER.unpack(head)
            if not TPM_HEADER.size <= size <= MAX_RESPONSE * 16:
                raise SwtpmError(f"swtpm answered a {size}-byte response")
            return head + _recv_exact(self.data, size - TPM_HEADER.size)
        except OSError as exc:
            raise SwtpmError(f"swtpm is gone: {exc.strerror or exc}") from None

    def control(self, cmd: int, payload: bytes = b"") -> bytes:
        """A control command; its result code must be 0. The rest of its response."""
        try:
            self.ctrl.sendall(struct.pack(">I", cmd) + payload)
            rest = self.ctrl.recv(4096)
        except OSError as exc:
            raise SwtpmError(f"swtpm's control channel is gone: {exc.strerror or exc}") from None
        if len(rest) < 4 or struct.unpack_from(">I", rest)[0] != 0:
            raise SwtpmError(f"swtpm refused control command {cmd}: {rest[:4].hex()}")
        return rest[4:]

    def nv_mark(self):
        """What changes when the engine commits NV: swtpm rewrites its permanent state file then
        (a stat, ~2 us, where fetching the blob to compare costs ~75 us). None before the first."""
        try:
            st = os.stat(os.path.join(self.state_dir, PERMANENT_FILE))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def get_state(self, blob_type: int) -> bytes:
        """One of the engine's state blobs (CMD_GET_STATEBLOB; over a socket it comes whole)."""
        try:
            self.ctrl.sendall(struct.pack(">IIII", CMD_GET_STATEBLOB, 0, blob_type, 0))
            result, _flags, total, length = STATE_HEADER.unpack(_recv_exact(self.ctrl, STATE_HEADER.size))
            if result != 0:
                raise SwtpmError(f"swtpm refused to give state blob {blob_type}: {result:#x}")
            if not length == total <= MAX_STATE:
                raise SwtpmError(f"swtpm gave a {length}-byte piece of a {total}-byte state blob")
            return _recv_exact(self.ctrl, length)
        except OSError as exc:
            raise SwtpmError(f"swtpm's control channel is gone: {exc.strerror or exc}") from None

    def set_state(self, blobs: dict) -> None:
        """Start the engine over on blobs ({BLOB_PERMANENT: bytes, BLOB_VOLATILE: bytes}): stopped,
        the blobs set, initialized again (with a volatile blob it carries on where it was, else
        it needs TPM2_Startup)."""
        self.control(CMD_STOP)
        for blob_type, blob in blobs.items():
            self.control(CMD_SET_STATEBLOB, struct.pack(">III", 0, blob_type, len(blob)) + blob)
        self.control(CMD_INIT, struct.pack(">I", 0))

    def cancel(self) -> None:
        self.control(CMD_CANCEL_TPM_CMD)

    def close(self) -> None:
        """Shut swtpm down (its state is saved by it), then make sure it is gone."""
        try:
            self.control(CMD_SHUTDOWN)
        except SwtpmError:
            pass
        for s in (self.data, self.ctrl):
            s.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    try:
        data = read_exact(sock, n)
    except EOFError:
        data = None
    if data is None:
        raise OSError(0, "the connection closed")
    return data


# ---- TPM 2.0 commands (TCG TPM 2.0 Library, Part 3), as the tests and the guest send them ----
TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS = 0x8001, 0x8002
TPM_CC_STARTUP, TPM_CC_GET_RANDOM, TPM_CC_PCR_READ, TPM_CC_PCR_EXTEND = 0x144, 0x17B, 0x17E, 0x182
TPM_CC_NV_DEFINE_SPACE, TPM_CC_NV_WRITE, TPM_CC_NV_READ, TPM_CC_NV_READ_PUBLIC = 0x12A, 0x137, 0x14E, 0x169
TPM_RH_OWNER = 0x40000001
TPMA_NV_OWNERWRITE, TPMA_NV_OWNERREAD, TPMA_NV_AUTHREAD, TPMA_NV_NO_DA = 1 << 1, 1 << 17, 1 << 18, 1 << 25
TPM_RC_HANDLE, TPM_RC_NV_UNINITIALIZED = 0x8B, 0x14A   # (the handle error's P/N bits above 0x8B vary)
TPM_SU_CLEAR = 0
TPM_ALG_SHA256 = 0x000B
TPM_RS_PW = 0x40000009
TPM_RC_SUCCESS, TPM_RC_INITIALIZE = 0, 0x100


def command(code: int, body: bytes, tag: int = TPM_ST_NO_SESSIONS) -> bytes:
    return TPM_HEADER.pack(tag, TPM_HEADER.size + len(body), code) + body


def response_code(response: bytes) -> int:
    return TPM_HEADER.unpack_from(response)[2]


def startup_clear() -> bytes:
    return command(TPM_CC_STARTUP, struct.pack(">H", TPM_SU_CLEAR))


def get_random(n: int) -> bytes:
    return command(TPM_CC_GET_RANDOM, struct.pack(">H", n))


def pcr_extend_sha256(pcr: int, digest: bytes) -> bytes:
    """PCR_Extend with a password session (empty auth) and one SHA-256 digest."""
    body = struct.pack(">I", pcr) + _password_session()
    body += struct.pack(">IH", 1, TPM_ALG_SHA256) + digest
    return command(TPM_CC_PCR_EXTEND, body, TPM_ST_SESSIONS)


def _password_session() -> bytes:
    auth = struct.pack(">IHBH", TPM_RS_PW, 0, 0, 0)                      # handle, nonce, attrs, hmac
    return struct.pack(">I", len(auth)) + auth


def nv_define_space(index: int, size: int, attributes: int = TPMA_NV_OWNERWRITE | TPMA_NV_OWNERREAD
                    | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA) -> bytes:
    """An ordinary NV index of size bytes, SHA-256 named, empty auth, the owner's to write."""
    public = struct.pack(">IHIHH", index, TPM_ALG_SHA256, attributes, 0, size)
    body = struct.pack(">I", TPM_RH_OWNER) + _password_session() + struct.pack(">H", 0)
    body += struct.pack(">H", len(public)) + public
    return command(TPM_CC_NV_DEFINE_SPACE, body, TPM_ST_SESSIONS)


def nv_write(index: int, data: bytes, offset: int = 0) -> bytes:
    body = struct.pack(">II", TPM_RH_OWNER, index) + _password_session()
    body += struct.pack(">H", len(data)) + data + struct.pack(">H", offset)
    return command(TPM_CC_NV_WRITE, body, TPM_ST_SESSIONS)


def nv_read(index: int, size: int, offset: int = 0) -> bytes:
    body = struct.pack(">II", index, index) + _password_session() + struct.pack(">HH", size, offset)
    return command(TPM_CC_NV_READ, body, TPM_ST_SESSIONS)


def nv_read_data(response: bytes) -> bytes:
    """The data of an NV_Read response (after its parameterSize)."""
    size, = struct.unpack_from(">H", response, TPM_HEADER.size + 4)
    return response[TPM_HEADER.size + 6:TPM_HEADER.size + 6 + size]


def nv_read_public(index: int) -> bytes:
    return command(TPM_CC_NV_READ_PUBLIC, struct.pack(">I", index))


def pcr_read_sha256(pcr: int) -> bytes:
    select = bytes(3)
    select = bytearray(select)
    select[pcr // 8] |= 1 << (pcr % 8)
    return command(TPM_CC_PCR_READ, struct.pack(">IHB", 1, TPM_ALG_SHA256, 3) + bytes(select))


def pcr_read_digest(response: bytes) -> bytes:
    """The one SHA-256 digest of a PCR_Read response."""
    off = TPM_HEADER.size + 4                                              # pcrUpdateCounter
    count, = struct.unpack_from(">I", response, off)                       # pcrSelectionOut
    off += 4 + count * (2 + 1 + 3)
    ndigests, = struct.unpack_from(">I", response, off)
    if ndigests != 1:
        raise SwtpmError(f"PCR_Read answered {ndigests} digests")
    size, = struct.unpack_from(">H", response, off + 4)
    return response[off + 6:off + 6 + size]
