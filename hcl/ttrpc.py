"""ttrpc framing (support/mesh/mesh_rpc/src/message.rs in OpenVMM; hcl/proto/ttrpc.proto): a
10-byte header (length u32 BE, stream id u32 BE, type u8, flags u8) and a protobuf body of at
most 0xFFFFFF bytes. Shared by the diag server (hcl/diag_server.py) and hclsim's client.
"""
import struct

from hclsim.defs.streams import read_exact  # noqa: F401 (the diag client's too)

HEADER = struct.Struct(">IIBB")
TYPE_REQUEST, TYPE_RESPONSE = 1, 2
MAX_MESSAGE = 0xFFFFFF
# google.rpc.Code values the server answers with.
CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = (
    1, 2, 3, 4, 5, 12, 13, 14)
CODE_NAMES = {0: "Ok", CANCELLED: "Cancelled", UNKNOWN: "Unknown", INVALID_ARGUMENT: "InvalidArgument",
              DEADLINE_EXCEEDED: "DeadlineExceeded", NOT_FOUND: "NotFound", UNIMPLEMENTED: "Unimplemented",
              INTERNAL: "Internal", UNAVAILABLE: "Unavailable"}


class FrameTooLong(Exception):
    def __init__(self, stream_id: int, length: int):
        super().__init__(f"message length {length} exceeds the maximum {MAX_MESSAGE}")
        self.stream_id, self.length = stream_id, length


def encode(stream_id: int, kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise FrameTooLong(stream_id, len(payload))
    return HEADER.pack(len(payload), stream_id, kind, 0) + payload


def read_frame(sock) -> tuple[int, int, bytes] | None:
    """(stream id, type, payload), None at the end of the stream. A frame over the limit is
    read and dropped, then raised as FrameTooLong (the connection stays usable)."""
    header = read_exact(sock, HEADER.size)
    if header is None:
        return None
    length, stream_id, kind, _flags = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        left = length
        while left:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the peer hung up inside an oversized frame")
            left -= len(chunk)
        raise FrameTooLong(stream_id, length)
    payload = read_exact(sock, length) if length else b""
    if payload is None:
        raise EOFError("the peer hung up after a frame header")
    return stream_id, kind, payload
