"""The models a gateway or trainer can serve: the built-in DriveNet family (builtin.toml)
and whatever a configuration declares, both through models.declare."""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sluice.models.declare import DeclarationError, declare_all
from sluice.models.entry import InputSpec, ModelEntry

__all__ = ["InputSpec", "ModelEntry", "builtin", "get", "load_declarations", "models"]

BUILTIN_FILE = Path(__file__).with_name("builtin.toml")


@functools.cache
def builtin() -> dict[str, ModelEntry]:
    """The DriveNet family, declared in builtin.toml exactly as a user declares a model."""
    return declare_all(tomllib.loads(BUILTIN_FILE.read_text())["model"])


def models(declared: Mapping[str, ModelEntry] | None = None) -> dict[str, ModelEntry]:
    """Built-in models plus declared ones; a declaration may not reuse a built-in name."""
    out = dict(builtin())
    for name, entry in (declared or {}).items():
        if name in out:
            raise DeclarationError(
                f"model {name!r}: the name is built in ({out[name].description}); choose another"
            )
        out[name] = entry
    return out


def get(name: str, declared: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    known = models(declared)
    try:
        return known[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(known))}") from None


def load_declarations(path: Path) -> dict[str, ModelEntry]:
    """The `[model.NAME]` tables of a sluice.toml (the trainer side reads the gateway's
    file to build the same modules); paths in them are relative to the file."""
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text())
    except OSError as exc:
        raise DeclarationError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise DeclarationError(f"{path}: not valid TOML ({exc})") from exc
    return declare_all(doc.get("model", {}), path.parent)
