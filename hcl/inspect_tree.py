"""Inspect trees in OpenVMM's style (support/inspect), answered as hcl/proto/inspect.proto's Node.

A tree is built on demand from plain values: a dict is a directory (its keys the names; a
"a/b" key is the path through directories), a callable is evaluated when the walk reaches it
(and must return a tree), a Leaf carries a value with its display flags, its sensitivity and
optionally how to update it, and a Remote answers its whole subtree itself (the VM worker's
`vm`, over the mesh). Depth counts directory levels as OpenVMM does: at depth 0 a directory's
values are given and its subdirectories are Unevaluated.
"""
from dataclasses import dataclass

from hclsim.hcl.pb import inspect_pb2 as ipb

FLAG_HEX, FLAG_COUNT, FLAG_BINARY = 1, 2, 4
SAFE, UNSPECIFIED, SENSITIVE = "safe", "unspecified", "sensitive"
_RANK = {SAFE: 0, UNSPECIFIED: 1, SENSITIVE: 2}
UNLIMITED = 0xFFFFFFFF


class InspectError(Exception):
    """An update that cannot be applied (its text goes to the client)."""


@dataclass
class Leaf:
    value: object
    flags: int = 0
    sensitivity: str = UNSPECIFIED
    update: object = None        # (text) -> the new value; None: immutable


@dataclass
class Lazy:
    """A directory made when the walk goes into it (not at depth 0, where it is Unevaluated)."""
    make: object
    sensitivity: str = UNSPECIFIED


@dataclass
class Remote:
    """A subtree answered elsewhere: inspect(path, depth) -> Node; update(path, text) -> Value."""
    inspect: object
    update: object = None
    sensitivity: str = UNSPECIFIED


def hex_(value: int, **kw) -> Leaf:
    return Leaf(value, FLAG_HEX, **kw)


def counter(value: int, **kw) -> Leaf:
    return Leaf(value, FLAG_COUNT, **kw)


def value_message(v, flags: int = 0) -> ipb.Value:
    m = ipb.Value()
    k = m.kind
    if isinstance(v, bool):
        k.bool.value = v
    elif isinstance(v, int):
        if v < 0:
            k.signed.field1 = v
        else:
            k.unsigned.value = v
    elif isinstance(v, float):
        k.double.value = v
    elif isinstance(v, (bytes, bytearray)):
        k.bytes.value = bytes(v)
    else:
        k.string.value = str(v)
    if flags:
        m.flags.field1 = flags
    return m


def _entries(tree: dict) -> list:
    """(name, child) with "a/b" keys nested: each first component once, in key order."""
    out: dict = {}
    for name, child in tree.items():
        head, _, rest = name.partition("/")
        if rest:
            sub = out.setdefault(head, {})
            if isinstance(sub, dict):
                sub[rest] = child
        else:
            out[head] = child
    return list(out.items())


def _sensitivity(child) -> str:
    return child.sensitivity if isinstance(child, (Leaf, Remote, Lazy)) else UNSPECIFIED


def _resolve(child):
    while True:
        if isinstance(child, Lazy):
            child = child.make()
        elif callable(child) and not isinstance(child, (Leaf, Remote)):
            child = child()
        else:
            return child


def node(tree, depth: int, level: str = SENSITIVE) -> ipb.Node:
    """The Node of tree, directories expanded depth levels down; only entries at or below the
    sensitivity level (SAFE for a confidential VM)."""
    n = ipb.Node()
    try:
        tree = _resolve(tree)
    except Exception as exc:                    # a failing node is reported, not fatal
        n.failed.field1.mesh.value = f"{type(exc).__name__}: {exc}"
        return n
    if isinstance(tree, Remote):
        return tree.inspect("", depth)
    if isinstance(tree, Leaf):
        n.value.field1.CopyFrom(value_message(tree.value, tree.flags))
        return n
    if not isinstance(tree, dict):
        n.value.field1.CopyFrom(value_message(tree))
        return n
    d = n.dir
    d.SetInParent()
    for name, child in _entries(tree):
        sens = _sensitivity(child)
        if _RANK[sens] > _RANK[level]:
            continue
        e = d.field1.add(name=name)
        getattr(e.sensitivity, sens).SetInParent()
        resolved = child
        if not isinstance(child, (dict, Remote, Lazy)):
            try:
                resolved = _resolve(child)
            except Exception:
                resolved = child
        if isinstance(resolved, (dict, Remote, Lazy)) and depth == 0:
            e.node.unevaluated.SetInParent()
        else:
            e.node.CopyFrom(node(resolved, depth - 1 if isinstance(resolved, (dict, Remote, Lazy)) else depth,
                                 level))
    return n


def _walk(tree, path: str, level: str):
    """(the subtree at path, the rest of the path inside a Remote or "")."""
    parts = [p for p in path.strip("/").split("/") if p]
    cur = tree
    for i, part in enumerate(parts):
        cur = _resolve(cur)
        if isinstance(cur, Remote):
            return cur, "/".join(parts[i:])
        if not isinstance(cur, dict):
            raise KeyError(path)
        children = dict(_entries(cur))
        if part not in children or _RANK[_sensitivity(children[part])] > _RANK[level]:
            raise KeyError(path)
        cur = children[part]
    return cur, ""


def inspect(tree, path: str, depth: int, level: str = SENSITIVE) -> ipb.Node:
    try:
        sub, rest = _walk(tree, path, level)
    except KeyError:
        n = ipb.Node()
        n.failed.field1.not_found.SetInParent()
        return n
    if isinstance(sub, Remote):
        return sub.inspect(rest, depth)
    return node(sub, depth, level)


def update(tree, path: str, text: str, level: str = SENSITIVE) -> ipb.Value:
    try:
        sub, rest = _walk(tree, path, level)
    except KeyError:
        raise InspectError("not found") from None
    if isinstance(sub, Remote):
        if sub.update is None:
            raise InspectError("immutable node")
        return sub.update(rest, text)
    sub = _resolve(sub)
    if not isinstance(sub, Leaf):
        raise InspectError("not a directory" if isinstance(sub, dict) else "immutable node")
    if sub.update is None:
        raise InspectError("immutable node")
    try:
        new = sub.update(text)
    except (ValueError, TypeError) as exc:
        raise InspectError(f"update error: {exc}") from None
    return value_message(new, sub.flags)


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")
