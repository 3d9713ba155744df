"""What the global team runs before trusting a release: signature, sizes, sha256, format check."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sluice.models.artifact import (
    ArtifactRefused,
    StructureLimits,
    check_weight_specs,
    inspect_onnx,
)
from sluice.models.manifest import (
    DATA_FILE,
    MODEL_FILE,
    ManifestRefused,
    listed_files,
    outside_graph,
    verify_signature,
)
from sluice.models.onnx_wire import InitializerSpan
from sluice.models.schema import TensorSpec

_READ_BYTES = 8 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in after the check: no hang on open
_SHOWN_CHARS = 200  # of an error's text in a refusal
_LAYOUTS = ({MODEL_FILE}, {MODEL_FILE, DATA_FILE})  # the files a release may hold


@dataclass(frozen=True)
class VerifiedRelease:
    """A release read_release accepted, with the very bytes it checked."""

    manifest: dict[str, Any]
    model: memoryview  # model.onnx as hashed
    data: memoryview  # model.onnx.data as hashed; empty in the single-file layout
    ranges: tuple[InitializerSpan, ...]  # weights' raw_data in model, file order; () if two-file


def verify_release(
    manifest_json: bytes,
    signature: bytes,
    public_key: Ed25519PublicKey,
    files: Mapping[str, Path],
    *,
    structure_hash: str | None = None,
    limits: StructureLimits | None = None,
) -> dict[str, Any]:
    """The verified manifest, or ManifestRefused saying what failed.

    files maps each name the manifest lists to a local path; nothing more, nothing less.
    structure_hash, when given, pins the graph: a model.onnx with any other structure is
    refused even under a valid signature on a manifest that names it, so a leaked signing
    key can change weight values but not the graph around them. A malformed weights/ops
    description is blamed on the manifest, anything wrong in a file on that file; any
    other failure is a ManifestRefused too, and every file opened is closed again.
    limits: the format check's totals (models.artifact.StructureLimits, the defaults
    unless given): a model declared with bigger limits at the gateway needs the same here.
    """
    return _guarded(
        manifest_json, signature, public_key, files, structure_hash, False, limits
    ).manifest


def read_release(
    manifest_json: bytes,
    signature: bytes,
    public_key: Ed25519PublicKey,
    files: Mapping[str, Path],
    *,
    structure_hash: str | None = None,
    limits: StructureLimits | None = None,
) -> VerifiedRelease:
    """verify_release's checks, returning the bytes checked as well as the manifest.

    For a reader of the weights: it reads the bytes that were hashed, never the files a
    second time (which could have changed since). Memory: every file of the release,
    model.onnx.data included, where verify_release only streams the data file.
    """
    return _guarded(manifest_json, signature, public_key, files, structure_hash, True, limits)


def _guarded(
    manifest_json: bytes,
    signature: bytes,
    public_key: Ed25519PublicKey,
    files: Mapping[str, Path],
    pinned: str | None,
    keep_data: bool,
    limits: StructureLimits | None = None,
) -> VerifiedRelease:
    try:
        return _verify(manifest_json, signature, public_key, files, pinned, keep_data, limits)
    except ManifestRefused:
        raise
    except Exception as exc:  # never a crash on a pulled release: a refusal saying what broke
        raise ManifestRefused(
            f"release not verified: {type(exc).__name__}: {str(exc)[:_SHOWN_CHARS]}"
        ) from exc


def _verify(
    manifest_json: bytes,
    signature: bytes,
    public_key: Ed25519PublicKey,
    files: Mapping[str, Path],
    pinned: str | None,
    keep_data: bool,
    limits: StructureLimits | None = None,
) -> VerifiedRelease:
    doc = verify_signature(manifest_json, signature, public_key)
    listed = listed_files(doc)
    if set(listed) not in _LAYOUTS:  # a side file would leave unchecked but for its hash
        raise ManifestRefused(
            f"manifest lists {_clip_list(sorted(listed))}; a release is {MODEL_FILE}, with "
            f"{DATA_FILE} in the two-file layout, and nothing else"
        )
    if set(files) != set(listed):
        raise ManifestRefused(f"files {sorted(files)} do not match the manifest's {sorted(listed)}")
    weights, outside, ops, described = _description(doc)
    if pinned is not None and described != pinned:
        raise ManifestRefused(
            f"manifest names graph structure {described[:16]}, not the pinned {pinned[:16]}"
        )
    read: dict[str, memoryview] = {}
    for name, path in files.items():
        keep = name == MODEL_FILE or keep_data
        read[name] = _read_checked(path, name, *listed[name], keep=keep)
    model = read[MODEL_FILE]
    try:
        report = inspect_onnx(
            model,
            weights,
            allowed_ops=ops,
            external_data_file=DATA_FILE if DATA_FILE in listed else None,
            limits=limits or StructureLimits(),
            outside_graph=outside,
        )
    except ArtifactRefused as exc:
        raise ManifestRefused(f"{MODEL_FILE}: {exc}") from exc
    if DATA_FILE in listed and listed[DATA_FILE][0] != report.external_data_bytes:
        raise ManifestRefused(
            f"{DATA_FILE}: {listed[DATA_FILE][0]} bytes; {MODEL_FILE} lays out "
            f"{report.external_data_bytes}"
        )
    if pinned is not None and report.structure_hash != pinned:
        raise ManifestRefused(
            f"{MODEL_FILE}: graph structure {report.structure_hash[:16]} is not the pinned "
            f"{pinned[:16]}"
        )
    if report.structure_hash != described:
        raise ManifestRefused(f"{MODEL_FILE}: graph structure differs from the manifest's")
    if report.ops != frozenset((d if d != "ai.onnx" else "", o) for d, o in ops):
        # The manifest's op list is exactly the file's: no unused entries to carry data.
        raise ManifestRefused(f"the manifest's ops are not the ops {MODEL_FILE} uses")
    return VerifiedRelease(doc, model, read.get(DATA_FILE, memoryview(b"")), report.ranges)


def _description(
    doc: Mapping[str, Any],
) -> tuple[list[TensorSpec], frozenset[str], frozenset[tuple[str, str]], str]:
    """The weights (those outside the graph apart), ops and structure hash the manifest
    describes, checked for form only."""
    try:
        weights = [
            TensorSpec(w["name"], _shape(w["shape"]), _text(w["dtype"])) for w in doc["weights"]
        ]
        outside = outside_graph(doc["weights"])
        ops = frozenset((_text(d), _text(o)) for d, o in doc["ops"])
        described = _text(doc["structure_hash"])
        check_weight_specs(weights)  # names, shapes and dtypes a file could hold at all
    except (KeyError, TypeError, ValueError) as exc:  # ArtifactRefused is a ValueError
        raise ManifestRefused(
            f"manifest lacks a usable weights/ops description: {str(exc)[:_SHOWN_CHARS]}"
        ) from exc
    return weights, outside, ops, described


def _clip_list(names: list[str]) -> str:
    return str(names)[:_SHOWN_CHARS]


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, found {type(value).__name__}")
    return value


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise TypeError(f"shape {str(value)[:64]} is not a list of integers")
    return tuple(value)


def _read_checked(path: Path, name: str, size: int, sha256: str, keep: bool) -> memoryview:
    """Check one file's size and sha256 as it is read from one open descriptor (closed on
    every path): the bytes checked are the bytes hashed. Returns them if keep, else an
    empty view (a data file, possibly over 2 GiB, is only streamed)."""
    if path.is_symlink() or not path.is_file():
        raise ManifestRefused(f"{path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except OSError as exc:
        raise ManifestRefused(f"{path}: cannot be opened: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ManifestRefused(f"{path}: not a regular file")
        if info.st_size != size:  # before reading: a wrong size is never read into memory
            raise ManifestRefused(f"{name}: {info.st_size} bytes; the manifest says {size}")
        digest = hashlib.sha256()
        kept = bytearray(size if keep else 0)
        chunk = memoryview(kept) if keep else memoryview(bytearray(min(size, _READ_BYTES)))
        pos = 0
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            while pos < size:
                view = chunk[pos:] if keep else chunk[: min(size - pos, len(chunk))]
                n = f.readinto(view)
                if not n:
                    raise ManifestRefused(f"{name}: ended {size - pos} bytes early while read")
                digest.update(view[:n])
                pos += n
            if f.read(1):
                raise ManifestRefused(f"{name}: grew while being read")
    except OSError as exc:
        raise ManifestRefused(f"{name}: cannot be read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if digest.hexdigest() != sha256:
        raise ManifestRefused(
            f"{name}: sha256 {digest.hexdigest()[:16]}...; the manifest says {sha256[:16]}..."
        )
    return memoryview(kept)
