"""Assemble small x86-64 snippets with the machine's GNU as (tests only)."""
import subprocess
import tempfile
from pathlib import Path


def assemble(source: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, binary = Path(tmp, "a.S"), Path(tmp, "a.o"), Path(tmp, "a.bin")
        src.write_text(".intel_syntax noprefix\n.code64\n" + source + "\n")
        subprocess.run(["as", "-o", str(obj), str(src)], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True)
        return binary.read_bytes()
