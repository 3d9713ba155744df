"""Signed import statements: the global program's word that a file is a base of a model.

A statement is RFC 8785 canonical JSON with exactly these fields, and an Ed25519
signature over exactly its bytes, made outside the region with the global program's
import key (`sluice sign-import`):

    {"created_ms": 1700000000000, "format": "sluice.import/1", "model": "drivenet",
     "schema_hash": "<64 hex>", "sha256": "<64 hex: the safetensors file's bytes>"}

The gateway trusts a new base only under such a signature (gateway/core/importing.py): an
operator inside the region can no longer choose the bytes that the next release carries
out. On disk (`FILE.sig`) the pair is a small JSON file, the statement as an object and
the signature in base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sluice.models.manifest import (
    ManifestRefused,
    canonical_json,
    key_id,
    load_public_key,
    read_bounded,
)

STATEMENT_FORMAT = "sluice.import/1"
SIGNATURE_FILE_FORMAT = "sluice.import-signature/1"
MAX_STATEMENT_BYTES = 1024  # a statement is about 250 bytes
SIGNATURE_BYTES = 64  # Ed25519
MAX_SIGNATURE_FILE_BYTES = 4096
MAX_CREATED_MS = (1 << 53) - 1  # a JSON integer every language reads exactly
_MODEL = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # as the gateway's NAME_PATTERN
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"format", "model", "schema_hash", "sha256", "created_ms"})


class StatementRefused(ValueError):
    """A statement, its signature or its file is malformed; the message says how."""


@dataclass(frozen=True)
class ImportStatement:
    model: str
    schema_hash: str  # Schema.hash of the model the file holds weights of
    sha256: str  # hex sha256 of the whole safetensors file
    created_ms: int  # when it was signed (recorded; replay is bounded by model and bytes)

    def to_json(self) -> bytes:
        """The canonical bytes that are signed; StatementRefused if a field is malformed."""
        doc = {
            "format": STATEMENT_FORMAT,
            "model": self.model,
            "schema_hash": self.schema_hash,
            "sha256": self.sha256,
            "created_ms": self.created_ms,
        }
        _check(doc)
        return canonical_json(doc)


@dataclass(frozen=True)
class SignedStatement:
    """A statement's exact bytes and the signature over them, as ImportBase carries them."""

    statement_json: bytes
    signature: bytes

    @property
    def statement(self) -> ImportStatement:
        return parse_statement(self.statement_json)

    @property
    def statement_sha256(self) -> str:
        return hashlib.sha256(self.statement_json).hexdigest()

    def write(self, path: Path) -> None:
        """Write the signature file atomically (a temp file, then a link: the whole file or
        none); FileExistsError rather than replace one."""
        doc = {
            "format": SIGNATURE_FILE_FORMAT,
            "statement": json.loads(self.statement_json),
            "signature": base64.b64encode(self.signature).decode(),
        }
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            with tmp.open("x") as f:
                f.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # never over another signature
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def read(cls, path: Path) -> SignedStatement:
        """A signature file's statement (in canonical form) and signature; StatementRefused
        when it is not one. The signature is not verified here: only the gateway's keys say
        whom it is trusted from."""
        try:
            raw = read_bounded(path, MAX_SIGNATURE_FILE_BYTES, "signature file")
        except ManifestRefused as exc:
            raise StatementRefused(str(exc)) from None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise StatementRefused(f"{path}: not JSON ({str(exc)[:120]})") from None
        if not isinstance(doc, dict) or set(doc) != {"format", "statement", "signature"}:
            raise StatementRefused(f"{path}: expected exactly format, statement and signature")
        if doc["format"] != SIGNATURE_FILE_FORMAT:
            raise StatementRefused(f"{path}: format is not {SIGNATURE_FILE_FORMAT!r}")
        if not isinstance(doc["statement"], dict):
            raise StatementRefused(f"{path}: statement must be an object")
        _check(doc["statement"])
        try:
            signature = base64.b64decode(str(doc["signature"]), validate=True)
        except (binascii.Error, ValueError):
            raise StatementRefused(f"{path}: signature is not base64") from None
        if len(signature) != SIGNATURE_BYTES:
            raise StatementRefused(
                f"{path}: signature of {len(signature)} bytes; Ed25519 signs in {SIGNATURE_BYTES}"
            )
        return cls(canonical_json(doc["statement"]), signature)


def sign_statement(statement: ImportStatement, key: Ed25519PrivateKey) -> SignedStatement:
    data = statement.to_json()
    return SignedStatement(data, key.sign(data))


def verifying_key(
    statement_json: bytes, signature: bytes, keys: Mapping[str, Ed25519PublicKey]
) -> str | None:
    """The id of the first key under which the signature verifies, None if none does.
    Call it before parse_statement: nothing unsigned is parsed."""
    if len(statement_json) > MAX_STATEMENT_BYTES or len(signature) != SIGNATURE_BYTES:
        return None
    for kid, key in keys.items():
        try:
            key.verify(signature, statement_json)
        except InvalidSignature:
            continue
        return kid
    return None


def parse_statement(raw: bytes) -> ImportStatement:
    """A statement from its exact signed bytes: canonical JSON of exactly the five fields,
    each of its type and bounded; StatementRefused saying what is wrong otherwise."""
    if len(raw) > MAX_STATEMENT_BYTES:
        raise StatementRefused(f"statement of {len(raw)} bytes; at most {MAX_STATEMENT_BYTES}")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StatementRefused(f"statement is not JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise StatementRefused("statement: expected a JSON object")
    _check(doc)
    if canonical_json(doc) != raw:  # also a repeated key, which json.loads would drop
        raise StatementRefused("statement is not in RFC 8785 canonical form")
    return ImportStatement(doc["model"], doc["schema_hash"], doc["sha256"], doc["created_ms"])


def trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """key id -> key of every PEM Ed25519 public key file; StatementRefused naming the
    first file that is not one (the gateway will not start with it)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = load_public_key(path)
        except ManifestRefused as exc:
            raise StatementRefused(
                f"import_keys: {exc}; each must be a PEM Ed25519 public key of the global program"
            ) from None
        keys.setdefault(key_id(key), key)
    return keys


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check(doc: Mapping[str, Any]) -> None:
    if set(doc) != _FIELDS:
        extra = sorted(str(k)[:32] for k in set(doc) - _FIELDS)[:5]
        raise StatementRefused(
            f"statement fields: expected exactly {sorted(_FIELDS)}; unexpected {extra}, "
            f"missing {sorted(_FIELDS - set(doc))}"
        )
    if doc["format"] != STATEMENT_FORMAT:
        raise StatementRefused(f"statement format is not {STATEMENT_FORMAT!r}")
    model = doc["model"]
    if not isinstance(model, str) or not _MODEL.fullmatch(model):
        raise StatementRefused("statement model: not a model name ([a-z0-9][a-z0-9_.-]{0,63})")
    for name in ("schema_hash", "sha256"):
        if not isinstance(doc[name], str) or not _SHA256.fullmatch(doc[name]):
            raise StatementRefused(f"statement {name}: not 64 lowercase hex digits")
    created = doc["created_ms"]
    if type(created) is not int or not 0 <= created <= MAX_CREATED_MS:
        raise StatementRefused(f"statement created_ms: not an integer from 0 to {MAX_CREATED_MS}")
