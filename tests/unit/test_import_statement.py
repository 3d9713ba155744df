"""Signed import statements (models/import_statement.py): only the exact canonical form of
the five fields is accepted, and a signature covers exactly its bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.models.import_statement import (
    STATEMENT_FORMAT,
    ImportStatement,
    SignedStatement,
    StatementRefused,
    parse_statement,
    sign_statement,
    verifying_key,
)
from sluice.models.manifest import key_id
from tests.unit.test_tensorfile import JSON

TINY = "drivenet-tiny"
CREATED_MS = 1_700_000_000_000


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


# 8. Statements, fuzzed: only the exact canonical form of the five fields is accepted.


_VALID = {
    "format": STATEMENT_FORMAT,
    "model": TINY,
    "schema_hash": "a" * 64,
    "sha256": "b" * 64,
    "created_ms": CREATED_MS,
}


# Values that are almost right: wrong case, length, sign, type, size.
NEAR: list[object] = ["A" * 64, "a" * 63, "a" * 65, "sluice.import/2", "Drivenet", "", "-1",
                      -1, 2**53, 1.5, True, "x" * 2000, "d" * 64]  # fmt: skip


@st.composite
def mutated_statement(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = dict(_VALID)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "value", "add", "near"]))
        key = draw(st.sampled_from(sorted(_VALID)))
        if op == "drop":
            doc.pop(key, None)
        elif op == "value":
            doc[key] = draw(JSON)
        elif op == "add":
            doc[draw(st.text(max_size=12))] = draw(JSON)
        else:  # a value that is almost right
            doc[key] = draw(st.sampled_from(NEAR))
    encode = draw(st.sampled_from(["canonical", "sorted-spaced", "unsorted"]))
    try:
        if encode == "canonical":
            raw = rfc8785.dumps(doc)
        elif encode == "sorted-spaced":
            raw = json.dumps(doc, sort_keys=True).encode()
        else:
            raw = json.dumps(doc, separators=(",", ":")).encode()
    except (rfc8785.CanonicalizationError, ValueError):
        raw = json.dumps(doc).encode()
    if draw(st.booleans()):  # and sometimes the bytes themselves
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=4)) + raw[cut + draw(st.integers(0, 4)) :]
    return raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_statement())
def test_malformed_statements_are_refused_with_a_reason(raw: bytes) -> None:
    try:
        statement = parse_statement(raw)
    except StatementRefused as exc:
        assert 0 < len(str(exc)) < 400
        return
    # Accepted: exactly the canonical bytes of a well-formed statement.
    assert statement.to_json() == raw
    assert json.loads(raw)["format"] == STATEMENT_FORMAT
    assert len(raw) <= 1024


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 63))
def test_a_signature_covers_exactly_its_statement(noise: bytes, at: int) -> None:
    key = Ed25519PrivateKey.generate()
    keys = {key_id(key.public_key()): key.public_key()}
    good = sign_statement(ImportStatement(TINY, "a" * 64, "b" * 64, CREATED_MS), key)
    assert verifying_key(good.statement_json, good.signature, keys) == key_id(key.public_key())
    if noise != good.statement_json:
        assert verifying_key(noise, good.signature, keys) is None
    assert verifying_key(good.statement_json, flip(good.signature, at), keys) is None


def test_a_signature_file_round_trips_and_a_malformed_one_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    good = sign_statement(ImportStatement(TINY, "a" * 64, "b" * 64, CREATED_MS), key)
    path = tmp_path / "w.sig"
    good.write(path)
    assert SignedStatement.read(path) == good
    with pytest.raises(FileExistsError):
        good.write(path)  # never over another signature
    assert not list(tmp_path.glob(".*.tmp"))
    doc = json.loads(path.read_text())
    bad: dict[str, Any] = {
        "not JSON": "{",
        "extra field": {**doc, "key_id": "0" * 16},
        "other format": {**doc, "format": "sluice.import-signature/2"},
        "bad base64": {**doc, "signature": "***"},
        "short signature": {**doc, "signature": doc["signature"][:-8]},
        "statement not an object": {**doc, "statement": "{}"},
        "statement field missing": {**doc, "statement": {"format": STATEMENT_FORMAT}},
        "too large": {**doc, "pad": "x" * 5000},
    }
    for value in bad.values():  # keyed by what is wrong, for the reader
        path.write_text(value if isinstance(value, str) else json.dumps(value))
        with pytest.raises(StatementRefused):
            SignedStatement.read(path)
