"""Pinned structure hashes: what a model's graph must be, whatever a signed manifest says.

A leaked signing key can sign a manifest for any file; a pinned structure hash still refuses
a changed graph (new constants, outputs, nodes). The pin is trust on first use: written at
the first verified pull of a model, then required of every later pull.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from sluice.models.manifest import ManifestRefused, read_bounded

_HEX = frozenset("0123456789abcdef")
_MAX_PIN_FILE_BYTES = 1 << 20


class Pins:
    def __init__(self, path: Path, pins: dict[str, str]) -> None:
        self.path = path
        self._pins = pins

    @classmethod
    def load(cls, path: Path) -> Pins:
        if not os.path.lexists(path):
            return cls(path, {})
        data = read_bounded(path, _MAX_PIN_FILE_BYTES, "pin file")
        try:
            doc = json.loads(data)
            pins = {str(k): str(v) for k, v in doc["structure_hashes"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ManifestRefused(f"{path}: not a pin file ({str(exc)[:200]})") from exc
        for model, value in pins.items():
            if len(value) != 64 or not set(value) <= _HEX:
                raise ManifestRefused(f"{path}: pin of {model!r} is not a sha256 hex digest")
        return cls(path, pins)

    def get(self, model: str) -> str | None:
        return self._pins.get(model)

    def pin(self, model: str, structure_hash: str) -> None:
        """Record a model's structure hash, atomically (a crash leaves the old file)."""
        self._pins[model] = structure_hash
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"structure_hashes": self._pins}, indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
