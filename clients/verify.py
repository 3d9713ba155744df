"""What the global team runs before trusting a release: signature, sizes, sha256, format check."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from models.artifact import ArtifactRefused, inspect_onnx
from models.manifest import (
    DATA_FILE,
    MODEL_FILE,
    ManifestRefused,
    file_digest,
    listed_files,
    verify_signature,
)
from models.schema import TensorSpec


def verify_release(
    manifest_json: bytes,
    signature: bytes,
    public_key: Ed25519PublicKey,
    files: Mapping[str, Path],
) -> dict[str, Any]:
    """The verified manifest, or ManifestRefused saying what failed.

    files maps each name the manifest lists to a local path; nothing more, nothing less.
    """
    doc = verify_signature(manifest_json, signature, public_key)
    listed = listed_files(doc)
    if set(files) != set(listed):
        raise ManifestRefused(f"files {sorted(files)} do not match the manifest's {sorted(listed)}")
    for name, path in files.items():
        if path.is_symlink() or not path.is_file():
            raise ManifestRefused(f"{path}: not a regular file")
        size, sha = file_digest(path)
        if (size, sha) != listed[name]:
            raise ManifestRefused(
                f"{name}: {size} bytes with sha256 {sha[:16]}...; the manifest says "
                f"{listed[name][0]} bytes with sha256 {listed[name][1][:16]}..."
            )
    try:
        weights = [TensorSpec(w["name"], tuple(w["shape"]), w["dtype"]) for w in doc["weights"]]
        ops = frozenset((str(d), str(o)) for d, o in doc["ops"])
        report = inspect_onnx(
            files[MODEL_FILE].read_bytes(),
            weights,
            allowed_ops=ops,
            external_data_file=DATA_FILE if DATA_FILE in listed else None,
        )
    except ArtifactRefused as exc:
        raise ManifestRefused(f"{MODEL_FILE}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestRefused(f"manifest lacks a usable weights/ops description: {exc}") from exc
    if DATA_FILE in listed and listed[DATA_FILE][0] != report.external_data_bytes:
        raise ManifestRefused(
            f"{DATA_FILE}: {listed[DATA_FILE][0]} bytes; {MODEL_FILE} lays out "
            f"{report.external_data_bytes}"
        )
    if report.structure_hash != doc["structure_hash"]:
        raise ManifestRefused(f"{MODEL_FILE}: graph structure differs from the manifest's")
    return doc
