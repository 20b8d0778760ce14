"""The diag protocol is declared once, in hcl/proto/*.proto; hcl/pb/*_pb2.py is what protoc makes
of it (regenerated here and compared), and the messages are the public field numbers."""
import pytest

from hclsim.hcl.pb import diag_pb2, inspect_pb2, ttrpc_pb2


def test_generated_code_matches_the_protos(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates hcl/pb")
    from hclsim.hcl.pb import regenerate
    fresh = regenerate.generate(tmp_path)
    for name, text in fresh.items():
        kept = (regenerate.PB / name).read_text().splitlines()
        new = text.splitlines()
        differ = [(a, b) for a, b in zip(new, kept) if a != b and not a.startswith("# Protobuf Python Version")]
        assert len(new) == len(kept) and not differ, (name, differ[:3])


def test_wire_bytes_of_the_public_field_numbers():
    # ExecRequest.command = 1, stdout = 5; ttrpc Request.service = 1, method = 2, timeout_nano = 4.
    assert diag_pb2.ExecRequest(command="ls", stdout=2).SerializeToString() == b"\x0a\x02ls\x28\x02"
    assert ttrpc_pb2.Request(service="a", method="b", timeout_nano=1).SerializeToString() == b"\x0a\x01a\x12\x01b\x20\x01"
    # A unit variant of a mesh enum is an empty length-delimited field (Node::Unevaluated = 1).
    n = inspect_pb2.Node()
    n.unevaluated.SetInParent()
    assert n.SerializeToString() == b"\x0a\x00"
