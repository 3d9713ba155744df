"""Release manifests: canonical JSON, Ed25519 signatures, and the checks the global team runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# /2: RFC 8785 (JCS) canonical JSON, which any language can reproduce. /1 (Python's
# json.dumps with sorted keys) is still verified, for releases published before /2.
MANIFEST_FORMAT = "sluice.release/2"
LEGACY_FORMAT = "sluice.release/1"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the second file of the large-model layout


class ManifestRefused(ValueError):
    """A manifest, its signature or a file it describes failed verification."""


def canonical_json(doc: Any) -> bytes:
    """RFC 8785 (JCS): one byte string per document, the same in every language, so it can be
    signed. Integers must lie within +-(2**53 - 1), as JSON numbers in every language do."""
    try:
        return rfc8785.dumps(doc)
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"manifest cannot be put in canonical form: {exc}") from exc


def _legacy_canonical_json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse(manifest_json: bytes) -> dict[str, Any]:
    """Decode a manifest that must already be in canonical form and of a known format."""
    try:
        doc = json.loads(manifest_json)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestRefused(f"manifest is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") not in (MANIFEST_FORMAT, LEGACY_FORMAT):
        raise ManifestRefused(f"manifest format is not {MANIFEST_FORMAT!r}")
    try:
        canonical = (
            canonical_json(doc) if doc["format"] == MANIFEST_FORMAT else _legacy_canonical_json(doc)
        )
    except ValueError as exc:
        raise ManifestRefused(str(exc)) from exc
    if canonical != manifest_json:
        raise ManifestRefused(f"manifest is not in the canonical form of {doc['format']!r}")
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
