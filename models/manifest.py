"""Release manifests: canonical JSON, Ed25519 signatures, and the checks the global team runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MANIFEST_FORMAT = "sluice.release/1"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the second file of the large-model layout


class ManifestRefused(ValueError):
    """A manifest, its signature or a file it describes failed verification."""


def canonical_json(doc: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per document, so it can be signed."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse(manifest_json: bytes) -> dict[str, Any]:
    """Decode a manifest that must already be in canonical form and of a known format."""
    try:
        doc = json.loads(manifest_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestRefused(f"manifest is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ManifestRefused(f"manifest format is not {MANIFEST_FORMAT!r}")
    if canonical_json(doc) != manifest_json:
        raise ManifestRefused("manifest is not in canonical form (sorted keys, no whitespace)")
    return doc


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ManifestRefused(f"{path}: not an Ed25519 public key")
    return key


def verify_signature(
    manifest_json: bytes, signature: bytes, public_key: Ed25519PublicKey
) -> dict[str, Any]:
    """The parsed manifest if the signature is the given key's; ManifestRefused otherwise."""
    try:
        public_key.verify(signature, manifest_json)
    except InvalidSignature:
        raise ManifestRefused(
            f"manifest signature does not verify with key {key_id(public_key)}"
        ) from None
    return parse(manifest_json)


def listed_files(doc: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) of every file the manifest lists."""
    try:
        return {f["name"]: (int(f["size"]), str(f["sha256"])) for f in doc["files"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestRefused(f"manifest file list is malformed: {exc}") from exc


def file_digest(path: Path, chunk_bytes: int = 8 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of a regular file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while data := f.read(chunk_bytes):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()
