"""Signed manifests: RFC 8785 canonical form, and a closed set of bounded fields, so that a
leaked signing key cannot use the manifest itself as a channel."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.models.manifest import (
    LEGACY_FORMAT,
    MANIFEST_FORMAT,
    ManifestRefused,
    canonical_json,
    key_id,
    parse,
    verify_signature,
)

KEY = Ed25519PrivateKey.generate()


def genuine() -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "model": "drivenet",
        "version": 3,
        "parent_version": 2,
        "rounds": [3],
        "schema_hash": "a" * 64,
        "structure_hash": "b" * 64,
        "weights": [{"name": "head.weight", "shape": [4, 8], "dtype": "<f4"}],
        "ops": [["", "Gemm"], ["", "Relu"]],
        "files": [{"name": "model.onnx", "size": 1234, "sha256": "c" * 64}],
        "num_trainers": 3,
        "num_regions": 3,
        "num_examples": 300,
        "num_updates": 3,
        "parity_max_abs_diff": 2.9802322387695312e-08,
        "dp": {"epsilon": 4.73, "delta": 1e-05, "rounds": 1, "accountant": "rdp"},
        "created_ms": 1795839953909,
        "signing_key_id": key_id(KEY.public_key()),
    }


def signed(doc: dict[str, Any]) -> tuple[bytes, bytes]:
    data = rfc8785.dumps(doc)
    return data, KEY.sign(data)


def test_a_genuine_manifest_verifies_and_is_jcs() -> None:
    data, sig = signed(genuine())
    assert verify_signature(data, sig, KEY.public_key()) == genuine()
    assert b"2.9802322387695312e-8" in data  # JCS (ECMAScript) number form, not Python's
    assert canonical_json(genuine()) == data


def test_python_json_is_not_the_canonical_form_of_format_2() -> None:
    doc = genuine()
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ManifestRefused, match="canonical form"):
        parse(data)
    doc["format"] = LEGACY_FORMAT  # releases published before /2 still verify
    assert parse(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


FRAME = "QUJD" * 24_576  # 98,304 characters: a frame, base64-ish


@pytest.mark.parametrize(
    ("where", "edit"),
    [
        ("extra field", lambda d: d.update(frame=FRAME)),
        ("extra dp field", lambda d: d["dp"].update(frame=FRAME)),
        (
            "extra file",
            lambda d: d["files"].append({"name": "frame.bin", "size": 1, "sha256": "d" * 64}),
        ),
        ("extra file field", lambda d: d["files"][0].update(note=FRAME)),
        ("long model name", lambda d: d.update(model=FRAME)),
        ("long weight name", lambda d: d["weights"][0].update(name=FRAME)),
        ("long op", lambda d: d["ops"].append(["", FRAME])),
        ("long domain", lambda d: d["ops"].append([FRAME, "Relu"])),
        ("many rounds", lambda d: d.update(rounds=list(range(5000)))),
        ("hash as text", lambda d: d.update(structure_hash=FRAME[:64])),
        ("a string where a count goes", lambda d: d.update(num_trainers="3 " + FRAME)),
        ("a huge integer", lambda d: d.update(num_examples=2**53 + 1) or None),
        ("a missing field", lambda d: d.pop("created_ms")),
        ("weights extra key", lambda d: d["weights"][0].update(doc=FRAME)),
        ("accountant text", lambda d: d["dp"].update(accountant=FRAME)),
    ],
)
def test_a_leaked_key_cannot_carry_a_frame_in_the_manifest(where: str, edit: Any) -> None:
    doc = copy.deepcopy(genuine())
    edit(doc)
    try:
        data, sig = signed(doc)
    except rfc8785.CanonicalizationError:
        return  # not even representable as a manifest
    with pytest.raises(ManifestRefused):
        verify_signature(data, sig, KEY.public_key())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(sorted(genuine())), value=json_values)
def test_any_signed_value_is_verified_or_refused_never_a_crash(field: str, value: Any) -> None:
    doc = genuine()
    doc[field] = value
    data, sig = signed(doc)
    try:
        verify_signature(data, sig, KEY.public_key())
    except ManifestRefused as exc:
        assert str(exc)


def test_an_oversized_manifest_or_signature_is_refused_before_it_is_parsed() -> None:
    data, sig = signed(genuine())
    padded = data[:-1] + b" " * (1 << 20) + b"}"
    with pytest.raises(ManifestRefused, match="at most"):
        verify_signature(padded, KEY.sign(padded), KEY.public_key())
    with pytest.raises(ManifestRefused, match="at most"):
        verify_signature(data, sig + b"\x00" * 64, KEY.public_key())


def test_a_signed_manifest_with_a_5000_digit_integer_is_refused_not_a_crash() -> None:
    data = b'{"format":"sluice.release/2","version":' + b"7" * 5000 + b"}"
    with pytest.raises(ManifestRefused, match="not JSON"):
        verify_signature(data, KEY.sign(data), KEY.public_key())


def test_local_files_are_read_bounded_and_never_block(tmp_path: Any) -> None:
    import os

    from sluice.models.manifest import load_public_key, read_bounded

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ManifestRefused, match="not a regular file"):
        read_bounded(fifo, 100, "manifest")  # returns at once: nobody writes to it
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(1 << 40)
    with pytest.raises(ManifestRefused, match="at most 100"):
        read_bounded(big, 100, "manifest")
    (tmp_path / "key.pem").write_bytes(
        b"-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----\n"
    )
    with pytest.raises(ManifestRefused, match="not a PEM public key"):
        load_public_key(tmp_path / "key.pem")
