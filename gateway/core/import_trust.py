"""Who may set a base: the global program's import keys and the statements they sign.

The import key's private half lives outside the region, with the global program; the
gateway holds the public halves (config import_keys). An operator inside the region can
send a base only with a statement signed by one of them, and only the bytes it names, for
the model and schema it names: the next release (base + mean delta) can no longer carry
bytes the operator chose. Without import_keys, imports are off.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sluice.gateway.core.errors import Forbidden, InvalidInput, PreconditionFailed
from sluice.models.import_statement import (
    MAX_STATEMENT_BYTES,
    SIGNATURE_BYTES,
    ImportStatement,
    StatementRefused,
    parse_statement,
    verifying_key,
)

IMPORTS_OFF = (
    "imports are off: no import_keys configured; set import_keys in [gateway] of sluice.toml "
    "(or SLUICE_IMPORT_KEYS) to the global program's Ed25519 public key files and restart "
    "the gateway"
)


class ImportKeys:
    """The trusted import keys, by key id (models.manifest.key_id)."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys = dict(keys or {})

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def authorize(self, statement_json: bytes, signature: bytes) -> str:
        """The id of the key the statement is signed with; checked on the raw bytes, before
        anything is parsed. PreconditionFailed when imports are off, InvalidInput for a
        missing or oversized statement or a signature of the wrong size, Forbidden for a
        signature no trusted key made."""
        if not self._keys:
            raise PreconditionFailed(IMPORTS_OFF)
        if not statement_json:
            raise InvalidInput(
                "the header carries no statement: an import needs the global program's "
                "signed statement (`sluice sign-import`, run outside the region)"
            )
        if len(statement_json) > MAX_STATEMENT_BYTES:
            raise InvalidInput(
                f"statement_json of {len(statement_json)} bytes; at most {MAX_STATEMENT_BYTES}"
            )
        if len(signature) != SIGNATURE_BYTES:
            raise InvalidInput(
                f"signature of {len(signature)} bytes; an Ed25519 signature has {SIGNATURE_BYTES}"
            )
        kid = verifying_key(statement_json, signature, self._keys)
        if kid is None:
            raise Forbidden(
                f"the statement's signature does not verify under any import key of this "
                f"gateway ({', '.join(self.ids[:4])}): it was not signed by the global "
                "program, or was changed after it was signed"
            )
        return kid

    @staticmethod
    def statement(statement_json: bytes, key_id: str) -> ImportStatement:
        """The authorized statement, parsed; InvalidInput when it is malformed."""
        try:
            return parse_statement(statement_json)
        except StatementRefused as exc:
            raise InvalidInput(f"the statement signed by key {key_id}: {exc}") from None

    @staticmethod
    def check(statement: ImportStatement, model: str, schema_hash: str) -> None:
        """The statement is for this model, served with this schema; PreconditionFailed
        otherwise (a statement is replayed only for its own model)."""
        if statement.model != model:
            raise PreconditionFailed(
                f"the signed statement is for model {statement.model!r}, not {model!r}: "
                "import it into its own model"
            )
        if statement.schema_hash != schema_hash:
            raise PreconditionFailed(
                f"the signed statement is for schema {statement.schema_hash[:16]}...; model "
                f"{model!r} has {schema_hash[:16]}...: the weights are of another structure"
            )
