"""The layering, checked: every module's imports (read with ast) go one way,
definitions <- cpu <- hypervisor <- {boot, devices, sidecar} <- {kernel_stub, hcl} <- hclsim/ (the
assembly, the CLIs, the debugger, snapshots); hcl/ (userspace) imports only definitions, devices
and the MMIO instruction decoder. A module may import its own layer and those below;
boot, devices and sidecar are one layer but do not import one another. The `hclsim` package's
own __init__ (the version and HclsimError) counts as definitions.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> (folder, rank); equal ranks are siblings that must not import each other.
LAYERS = {"hclsim.defs": ("defs", 0), "hclsim.cpu": ("cpu", 1), "hclsim.hv": ("hv", 2),
          "hclsim.boot": ("boot", 3), "hclsim.devices": ("devices", 3), "hclsim.sidecar": ("sidecar", 3),
          "hclsim.kernel_stub": ("kernel_stub", 4), "hclsim.hcl": ("hcl", 4), "hclsim": ("hclsim", 5)}
# The paravisor's userspace (hcl/) runs as separate processes that reach the machine only through
# the kernel interface: besides definitions it may use the device models (they are the VMM's) and
# the instruction decoder that completes MMIO, nothing of the hypervisor or the machine.
USERSPACE_MAY_IMPORT = {"hclsim.defs", "hclsim.devices", "hclsim.cpu.mmio_emulate"}


def _layer(module: str) -> str | None:
    if module == "hclsim":
        return "hclsim.defs"   # the package root: version and HclsimError only
    for package in sorted(LAYERS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


def _modules():
    for package, (folder, _) in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def _imports(module: str, path: Path):
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:   # `from hclsim import cpu`: the subpackage is the target
                full = f"{target}.{alias.name}"
                yield node.lineno, full if target == "hclsim" and full in LAYERS else target


def test_every_layer_holds_files():
    for package, (folder, _) in LAYERS.items():
        assert list((ROOT / folder).glob("*.py")), package


def violations(module: str, path: Path) -> list[str]:
    own = _layer(module)
    rank = LAYERS[own][1]
    wrong = []
    for line, target in _imports(module, path):
        layer = _layer(target)
        if layer is None or layer == own:
            continue
        if own == "hclsim.hcl" and layer not in USERSPACE_MAY_IMPORT and target not in USERSPACE_MAY_IMPORT:
            wrong.append(f"{path.name}:{line} imports {target} (userspace reaches the machine only through its kernel)")
            continue
        other = LAYERS[layer][1]
        if other > rank or (other == rank and layer != own):
            wrong.append(f"{path.name}:{line} imports {target} ({layer} is not below {own})")
    return wrong


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_go_one_way(module, path):
    assert not violations(module, path), "\n".join(violations(module, path))


def test_a_wrong_way_import_is_caught(tmp_path):
    src = tmp_path / "bad.py"
    src.write_text("from hclsim import HclsimError\nfrom hclsim.defs import hvdef\n"
                   "def f():\n    from hclsim.machine import Machine\n    from ..sidecar import client\n"
                   "    import hclsim.devices.bus\n")
    found = violations("hclsim.boot.bad", src)
    assert [w.split(" imports ")[1].split(" ")[0] for w in found] == \
        ["hclsim.machine", "hclsim.sidecar", "hclsim.devices.bus"], found
