"""Mesh hosts: how the control process starts a child host (the same program re-run as
[argv0, node name], the invitation in MESH_WORKER_INVITATION, the IPC socket on fd 3, stdin and
stdout on /dev/null, comm "underhill-<node>"), and the channel both ends talk over: protobuf
Envelopes (hcl/mesh.proto), one per SOCK_SEQPACKET packet, each with an id, replies naming the
id they answer (support/mesh/mesh_process in the real source).
"""
import array
import base64
import itertools
import os
import socket
import threading

from hclsim.hcl import linux
from hclsim.hcl import mesh_pb2 as pb

IPC_FD = 3
INVITATION_ENV = "MESH_WORKER_INVITATION"
MAX_PACKET = 1 << 20


class MeshError(Exception):
    pass


class Channel:
    """One end of a host's socket: send envelopes, await replies, hand the rest to on_message."""

    def __init__(self, sock: socket.socket, on_message, name: str):
        self.sock, self.on_message, self.name = sock, on_message, name
        self._ids = itertools.count(1)
        self._pending: dict[int, list] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.closed = threading.Event()
        self._fds: dict[int, list[int]] = {}    # descriptors that came with an envelope, by its id
        self._reader = threading.Thread(target=self._read, name=f"mesh-{name}", daemon=True)

    def start(self) -> "Channel":
        self._reader.start()
        return self

    def send(self, reply_to: int = 0, fds: tuple = (), **body) -> int:
        """fds: descriptors to pass with the envelope (SCM_RIGHTS; the receiver's take_fds)."""
        env = pb.Envelope(id=next(self._ids), reply_to=reply_to, **body)
        data = env.SerializeToString()
        with self._send_lock:
            try:
                if fds:
                    self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    self.sock.send(data)
            except OSError as exc:
                raise MeshError(f"{self.name}: the peer is gone ({exc.strerror})") from None
        return env.id

    def take_fds(self, env_id: int) -> list[int]:
        """The descriptors that came with envelope env_id (each once)."""
        with self._lock:
            return self._fds.pop(env_id, [])

    def call(self, timeout: float | None = None, fds_out: list | None = None, **body) -> pb.Reply:
        """Send and wait for the reply (MeshError if the peer goes away first); fds_out gets the
        descriptors that came with the reply."""
        slot = [threading.Event(), None, 0]
        with self._lock:
            msg_id = next(self._ids)
            self._pending[msg_id] = slot
        env = pb.Envelope(id=msg_id, **body)
        with self._send_lock:
            try:
                self.sock.send(env.SerializeToString())
            except OSError as exc:
                raise MeshError(f"{self.name}: the peer is gone ({exc.strerror})") from None
        if not slot[0].wait(timeout):
            raise MeshError(f"{self.name}: no reply within {timeout} s")
        if slot[1] is None:
            raise MeshError(f"{self.name}: the peer went away before replying")
        fds = self.take_fds(slot[2])
        if fds_out is not None:
            fds_out.extend(fds)
        else:
            for fd in fds:
                os.close(fd)
        return slot[1]

    def reply(self, to: int, error: str = "", payload: bytes = b"", fds: tuple = ()) -> None:
        self.send(reply_to=to, fds=fds, reply=pb.Reply(error=error, payload=payload))

    def _read(self) -> None:
        try:
            while True:
                try:
                    data, anc, _flags, _addr = self.sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
                except OSError:
                    return
                if not data:
                    return
                fds = array.array("i")
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(raw[:len(raw) - len(raw) % 4])
                env = pb.Envelope()
                try:
                    env.ParseFromString(data)
                except Exception:      # protobuf's DecodeError: a peer speaking nonsense
                    for fd in fds:
                        os.close(fd)
                    continue
                if fds:
                    with self._lock:
                        self._fds[env.id] = list(fds)
                if env.reply_to:
                    with self._lock:
                        slot = self._pending.pop(env.reply_to, None)
                    if slot is not None:
                        slot[1], slot[2] = env.reply, env.id
                        slot[0].set()
                    continue
                self.on_message(self, env)
        finally:
            self.closed.set()
            with self._lock:
                pending, self._pending = self._pending, {}
            for slot in pending.values():
                slot[0].set()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def launch_host(node_name: str, argv0: str, env: dict, on_message):
    """Start a child host: (pid, Channel). The child is this program again, argv [argv0, name]."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    invitation = pb.Invitation(node_name=node_name, address=str(os.getpid()), socket_fd=IPC_FD)
    child_env = dict(env)
    child_env[INVITATION_ENV] = base64.b64encode(invitation.SerializeToString()).decode()
    devnull = os.open(os.devnull, os.O_RDWR)     # the host's /dev/null: stdio the child never uses
    try:
        pid = linux.spawn(argv0, [argv0, node_name], child_env, stdio=(devnull, devnull, None),
                          fds={IPC_FD: child_end.fileno()})
    finally:
        os.close(devnull)
        child_end.close()
    channel = Channel(parent_end, on_message, f"host {node_name}").start()
    return pid, channel


def take_invitation() -> pb.Invitation | None:
    """In a child host: the invitation (removed from the environment, as the real one does)."""
    raw = os.environ.pop(INVITATION_ENV, None)
    if raw is None:
        return None
    inv = pb.Invitation()
    try:
        inv.ParseFromString(base64.b64decode(raw, validate=True))
    except Exception as exc:          # binascii.Error or DecodeError
        raise MeshError(f"malformed {INVITATION_ENV}: {exc}") from None
    return inv
