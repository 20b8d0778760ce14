"""Regenerate hcl/pb/*_pb2.py from hcl/proto (a developer tool; needs grpcio-tools, the test
extra). protoc writes imports by proto file name ("import inspect_pb2"); they are rewritten to
this package, where google/rpc/status.proto's module is status_pb2."""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO = Path(__file__).resolve().parent.parent / "proto"
PB = Path(__file__).resolve().parent
FILES = ("google/rpc/status.proto", "ttrpc.proto", "diag.proto", "inspect.proto", "inspect_service.proto",
         "profile.proto")
_OURS = {"inspect_pb2": "inspect_pb2", "diag_pb2": "diag_pb2", "google.rpc.status_pb2": "status_pb2"}


def generate(out: Path) -> dict[str, str]:
    """{module file name: text} as protoc makes them, imports rewritten."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}", f"--python_out={tmp}",
                               *(str(PROTO / f) for f in FILES)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr)
        texts = {}
        for f in FILES:
            path = Path(tmp) / (f[:-len(".proto")] + "_pb2.py")
            text = path.read_text()
            text = re.sub(r"^from google\.rpc import status_pb2 as (\S+)$",
                          r"from hclsim.hcl.pb import status_pb2 as \1", text, flags=re.M)
            text = re.sub(r"^import (inspect_pb2|diag_pb2) as (\S+)$", r"from hclsim.hcl.pb import \1 as \2",
                          text, flags=re.M)
            texts[Path(path).name] = text
    for name, text in texts.items():
        (out / name).write_text(text)
    return texts


if __name__ == "__main__":
    generate(PB)
    print(f"wrote {', '.join(f[:-6].rsplit('/', 1)[-1] + '_pb2.py' for f in FILES)} in {PB}")
