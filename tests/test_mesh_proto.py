"""The mesh messages are declared once, in hcl/mesh.proto; hcl/mesh_pb2.py is what protoc makes
of it (regenerated here and compared), and an invitation survives the trip a child host makes."""
import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hclsim.hcl import mesh, mesh_pb2 as pb

HCL = Path(__file__).resolve().parent.parent / "hcl"


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates mesh_pb2.py")
    done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HCL}", f"--python_out={tmp_path}",
                           str(HCL / "mesh.proto")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    fresh = (tmp_path / "mesh_pb2.py").read_text().splitlines()
    kept = (HCL / "mesh_pb2.py").read_text().splitlines()
    # Only the generator's own version line may differ.
    differ = [(a, b) for a, b in zip(fresh, kept) if a != b and not a.startswith("# Protobuf Python Version")]
    assert len(fresh) == len(kept) and not differ, differ[:3]


def test_invitation_round_trip(monkeypatch):
    inv = pb.Invitation(node_name="vm", address="123", socket_fd=3)
    monkeypatch.setenv(mesh.INVITATION_ENV, base64.b64encode(inv.SerializeToString()).decode())
    got = mesh.take_invitation()
    assert (got.node_name, got.address, got.socket_fd) == ("vm", "123", 3)
    assert mesh.INVITATION_ENV not in os.environ         # the child removes it, as the real one does


def test_a_malformed_invitation_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(mesh.INVITATION_ENV, "not base64!")
    with pytest.raises(mesh.MeshError, match="malformed MESH_WORKER_INVITATION"):
        mesh.take_invitation()


def test_channel_call_and_reply():
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    got = []
    server = mesh.Channel(b, lambda ch, env: (got.append(env), ch.reply(env.id, payload=b"ok")), "server").start()
    client = mesh.Channel(a, lambda ch, env: None, "client").start()
    reply = client.call(timeout=5, control=pb.ControlRequest(flush_logs=pb.Empty()))
    assert reply.payload == b"ok" and got[0].WhichOneof("body") == "control"
    server.close()
    with pytest.raises(mesh.MeshError):
        client.call(timeout=5, control=pb.ControlRequest(flush_logs=pb.Empty()))
    client.close()
