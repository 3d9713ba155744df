"""The fields of a release manifest that tests sign but do not look at: what
models.manifest.check_fields requires beside the ones a test is about."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sluice.models.manifest import key_id


def filler_fields(public_key: Ed25519PublicKey) -> dict[str, Any]:
    return {
        "parent_version": 0,
        "rounds": [1],
        "schema_hash": "0" * 64,
        "num_trainers": 3,
        "num_regions": 3,
        "num_examples": 30,
        "num_updates": 3,
        "parity_max_abs_diff": 0.0,
        "dp": None,
        "created_ms": 1,
        "signing_key_id": key_id(public_key),
    }
