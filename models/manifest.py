"""Release manifests: canonical JSON, Ed25519 signatures, and the checks the global team runs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Callable, Iterable, Mapping
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
# The largest manifest anyone verifies (the gateway writes a few KiB; a model of 2**16
# weights stays well below): a larger one is refused before it is hashed or parsed.
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 64  # Ed25519
MAX_KEY_FILE_BYTES = 16 << 10


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
    except (ValueError, RecursionError) as exc:  # a decode error, an integer of 5000 digits
        raise ManifestRefused(f"manifest is not JSON: {str(exc)[:200]}") from exc
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


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """A regular file's bytes, refused (ManifestRefused) when it is larger than limit or not
    a regular file: a hostile path (a FIFO, /dev/zero, a sparse terabyte) is never read
    whole and never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ManifestRefused(f"{what} {path}: cannot be opened: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ManifestRefused(f"{what} {path}: not a regular file")
        if info.st_size > limit:
            raise ManifestRefused(f"{what} {path}: {info.st_size} bytes; at most {limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ManifestRefused(f"{what} {path}: cannot be read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ManifestRefused(f"{what} {path}: grew past {limit} bytes while read")
    return data


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = read_bounded(path, MAX_KEY_FILE_BYTES, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:  # not PEM, or not a public key at all
        raise ManifestRefused(f"{path}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ManifestRefused(f"{path}: not an Ed25519 public key")
    return key


_HEX = frozenset("0123456789abcdef")
_MAX_INT = (1 << 53) - 1
_RELEASE_FILES = frozenset({MODEL_FILE, DATA_FILE})
_DP_FIELDS = {
    "epsilon": float,
    "delta": float,
    "noise_multiplier": float,
    "clipping_norm": float,
    "adaptive_clipping": bool,
    "sampling_rate": float,
    "rounds": int,
    "accountant": str,
    "noise_stddev": float,
}


def _fail(field: str, what: str) -> ManifestRefused:
    return ManifestRefused(f"manifest field {field!r}: {what}")


def _int(doc: Mapping[str, Any], field: str) -> None:
    value = doc[field]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INT:
        raise _fail(field, "not an integer from 0 to 2**53 - 1")


def _number(value: object, field: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise _fail(field, "not a finite number")


def _text(value: object, field: str, limit: int = 256) -> str:
    if not isinstance(value, str) or not 0 < len(value.encode()) <= limit:
        raise _fail(field, f"not a string of 1 to {limit} bytes")
    return value


def _hex(value: object, field: str, length: int) -> None:
    if not isinstance(value, str) or len(value) != length or not set(value) <= _HEX:
        raise _fail(field, f"not {length} lowercase hex digits")


def _list(value: object, field: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise _fail(field, f"not a list of at most {limit} entries")
    return value


_FIELDS: dict[str, Callable[[Mapping[str, Any], str], None]] = {}


def check_fields(doc: Mapping[str, Any]) -> None:
    """A signed manifest holds exactly the fields the gateway writes, each of its type and
    bounded: a leaked key cannot use the manifest itself as a channel of its own."""
    extra = sorted(set(doc) - set(_FIELDS))
    missing = sorted(set(_FIELDS) - set(doc))
    if extra or missing:
        raise ManifestRefused(
            f"manifest fields: unexpected {[k[:32] for k in extra[:5]]}, missing {missing}"
        )
    for field, check in _FIELDS.items():
        check(doc, field)


def _check_files(doc: Mapping[str, Any], field: str) -> None:
    files = _list(doc[field], field, 2)
    names = []
    for f in files:
        if not isinstance(f, dict) or set(f) != {"name", "size", "sha256"}:
            raise _fail(field, "each entry holds exactly name, size and sha256")
        if f["name"] not in _RELEASE_FILES:
            raise _fail(field, f"a release holds only {sorted(_RELEASE_FILES)}")
        _int(f, "size")
        _hex(f["sha256"], "sha256", 64)
        names.append(f["name"])
    if MODEL_FILE not in names or len(set(names)) != len(names):
        raise _fail(field, f"lists {MODEL_FILE} once, and the data file at most once")


def _check_weights(doc: Mapping[str, Any], field: str) -> None:
    for w in _list(doc[field], field, 1 << 16):
        if not isinstance(w, dict) or set(w) - {"in_graph"} != {"name", "shape", "dtype"}:
            raise _fail(field, "each entry holds exactly name, shape and dtype (and in_graph)")
        if w.get("in_graph", False) is not False:
            # Written only for state the graph does not read, which the data file holds.
            raise _fail("weights.in_graph", "present only as false")
        _text(w["name"], "weights.name")
        _text(w["dtype"], "weights.dtype", 8)
        for d in _list(w["shape"], "weights.shape", 8):
            if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= _MAX_INT:
                raise _fail("weights.shape", "not a list of non-negative integers")


def outside_graph(weights: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """Names of a manifest's weights that the graph does not read (`"in_graph": false`):
    state such as BatchNorm's num_batches_tracked, which holds its place in the data file."""
    return frozenset(w["name"] for w in weights if w.get("in_graph") is False)


def _check_ops(doc: Mapping[str, Any], field: str) -> None:
    for op in _list(doc[field], field, 256):
        if not isinstance(op, list) or len(op) != 2 or not isinstance(op[0], str):
            raise _fail(field, "each entry is [domain, op_type]")
        if len(op[0]) > 64:
            raise _fail(field, "a domain of at most 64 characters")
        _text(op[1], "ops.op_type", 64)


def _check_dp(doc: Mapping[str, Any], field: str) -> None:
    dp = doc[field]
    if dp is None:
        return
    if not isinstance(dp, dict) or not set(dp) <= set(_DP_FIELDS):
        raise _fail(field, f"null or an object of {sorted(_DP_FIELDS)}")
    for key, kind in _DP_FIELDS.items():
        if key not in dp:
            continue
        if kind is float:
            _number(dp[key], f"dp.{key}")
        elif kind is int:
            _int(dp, key)
        elif kind is bool and not isinstance(dp[key], bool):
            raise _fail(f"dp.{key}", "not a boolean")
        elif kind is str:
            _text(dp[key], f"dp.{key}", 16)


def _check_rounds(doc: Mapping[str, Any], field: str) -> None:
    for r in _list(doc[field], field, 1 << 10):
        _int({"round": r}, "round")


def _check_text(doc: Mapping[str, Any], field: str, limit: int) -> None:
    _text(doc[field], field, limit)


def _check_parity(doc: Mapping[str, Any], field: str) -> None:
    _number(doc[field], field)


_FIELDS.update(
    {
        "format": lambda d, f: None,  # parse() checked it
        "model": lambda d, f: _check_text(d, f, 64),
        "version": _int,
        "parent_version": _int,
        "rounds": _check_rounds,
        "schema_hash": lambda d, f: _hex(d[f], f, 64),
        "structure_hash": lambda d, f: _hex(d[f], f, 64),
        "weights": _check_weights,
        "ops": _check_ops,
        "files": _check_files,
        "num_trainers": _int,
        "num_regions": _int,
        "num_examples": _int,
        "num_updates": _int,
        "parity_max_abs_diff": _check_parity,
        "dp": _check_dp,
        "created_ms": _int,
        "signing_key_id": lambda d, f: _hex(d[f], f, 16),
    }
)


def verify_signature(
    manifest_json: bytes, signature: bytes, public_key: Ed25519PublicKey
) -> dict[str, Any]:
    """The parsed manifest if the signature is the given key's; ManifestRefused otherwise.
    The signature is checked first: nothing unsigned is ever parsed."""
    if len(manifest_json) > MAX_MANIFEST_BYTES or len(signature) > MAX_SIGNATURE_BYTES:
        raise ManifestRefused(
            f"manifest of {len(manifest_json)} bytes or signature of {len(signature)} bytes: "
            f"at most {MAX_MANIFEST_BYTES} and {MAX_SIGNATURE_BYTES}"
        )
    try:
        public_key.verify(signature, manifest_json)
    except InvalidSignature:
        raise ManifestRefused(
            f"manifest signature does not verify with key {key_id(public_key)}"
        ) from None
    doc = parse(manifest_json)
    check_fields(doc)
    return doc


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
