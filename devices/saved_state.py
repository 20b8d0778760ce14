"""Saved state as an explicit, versioned schema per device (the shape of OpenVMM's per-device
`SavedState` with numbered fields): each field has a number that is never reused, a kind and a
default. A blob records values by number, so a reader ignores numbers it does not know and gives
fields the blob lacks their default; a device changes its state only by adding fields.
"""
from dataclasses import dataclass

from hclsim import HclsimError


class SavedStateError(HclsimError):
    pass


@dataclass(frozen=True)
class Field:
    number: int
    name: str
    kind: type           # int, bytes or str
    default: object = None

    def value_default(self):
        return self.kind() if self.default is None else self.default


@dataclass(frozen=True)
class Schema:
    package: str         # e.g. "hclsim.devices.uart16550"
    fields: tuple

    def __post_init__(self):
        numbers = [f.number for f in self.fields]
        if len(set(numbers)) != len(numbers) or len({f.name for f in self.fields}) != len(numbers):
            raise ValueError(f"{self.package}: field numbers and names must be unique")

    def encode(self, values: dict) -> dict:
        """A JSON-ready blob: {"package": ..., "fields": {number: value}}; bytes as hex."""
        unknown = set(values) - {f.name for f in self.fields}
        if unknown:
            raise SavedStateError(f"{self.package}: no field {sorted(unknown)[0]!r} in the schema")
        out = {}
        for f in self.fields:
            value = values.get(f.name, f.value_default())
            if not isinstance(value, f.kind):
                raise SavedStateError(f"{self.package}.{f.name}: {type(value).__name__}, not {f.kind.__name__}")
            out[str(f.number)] = value.hex() if f.kind is bytes else value
        return {"package": self.package, "fields": out}

    def decode(self, blob: dict) -> dict:
        """Field name -> value; unknown numbers ignored, missing fields at their default."""
        if not isinstance(blob, dict) or blob.get("package") != self.package:
            got = blob.get("package") if isinstance(blob, dict) else type(blob).__name__
            raise SavedStateError(f"saved state of {got!r} given to {self.package}")
        raw = blob.get("fields", {})
        values = {}
        for f in self.fields:
            value = raw.get(str(f.number))
            if value is None:
                values[f.name] = f.value_default()
                continue
            if f.kind is bytes:
                try:
                    value = bytes.fromhex(value)
                except (TypeError, ValueError):
                    raise SavedStateError(f"{self.package}.{f.name}: not hex bytes") from None
            if not isinstance(value, f.kind):
                raise SavedStateError(f"{self.package}.{f.name}: {type(value).__name__}, not {f.kind.__name__}")
            values[f.name] = value
        return values
