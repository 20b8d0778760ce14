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


def build_elf(source: str, out_dir) -> Path:
    """A position-independent static ELF linked at 0 (the shape of a boot shim) from GNU as source
    in AT&T syntax, entry `_start`."""
    out_dir = Path(out_dir)
    src, elf = out_dir / "fw.S", out_dir / "fw.elf"
    src.write_text(source)
    subprocess.run(["gcc", "-nostdlib", "-static-pie", "-fPIE", "-Wl,--no-dynamic-linker", "-Wl,--build-id=none",
                    "-Wl,-z,max-page-size=4096", "-g", str(src), "-o", str(elf)], check=True, capture_output=True)
    return elf


# Writes `text` to COM3 (no LSR polling: the simulated UART never backs up).
def com3_print(text: str) -> str:
    lines = ["    mov $0x3e8, %dx"]
    for ch in text.encode():
        lines += [f"    mov ${ch}, %al", "    out %al, %dx"]
    return "\n".join(lines) + "\n"
