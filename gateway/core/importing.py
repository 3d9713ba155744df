"""Import a new base version: weights the global program signed, checked here, trained from next.

The one inbound path for weights (docs/IMPORT.md). The operator streams a safetensors file
with the global program's signed statement (models/import_statement.py); the gateway
trusts the operator for none of it:

    trust      imports are off without import_keys; the statement's signature verifies
               under one of them before anything is parsed or any chunk is read
    statement  canonical, exactly its fields; its model is the one imported, its schema
               hash the served model's
    header     format, sizes bounded by the model's schema, reason
    spool      chunks in order into blobs/tmp (never whole in memory); the safetensors
               header checked as soon as its bytes are in (core/tensorfile.py); the file's
               sha256 must be the statement's
    assemble   the flat payload in schema order, every value checked
    commit     under the close lock, one transaction: version row, open round rebased onto
               it, `base.imported` audit entry; the DP ledger carries over to the new version

A refusal or an interrupted stream leaves no blob, no row and the round as it was, and is
audited (`base.import_refused`, `base.import_interrupted`). Nothing here creates a release.
A statement may be imported again (it can only give the bytes it signs, for its model):
reverting to an earlier signed base is the operator's to decide, and audited.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sluice.gateway.core.errors import (
    Busy,
    Forbidden,
    IntegrityError,
    InvalidInput,
    PreconditionFailed,
    SluiceError,
    TooLarge,
    Unavailable,
    bounded,
    storage_fault,
)
from sluice.gateway.core.import_trust import ImportKeys
from sluice.gateway.core.ingest import MAX_CHUNK_BYTES
from sluice.gateway.core.privacy import CLIPPING_FILE, LEDGER_FILE
from sluice.gateway.core.records import Round, RoundState, Version
from sluice.gateway.core.rounds import RoundManager
from sluice.gateway.core.tensorfile import (
    HeadReader,
    Layout,
    check_ties,
    copy_checked,
    max_file_bytes,
)
from sluice.gateway.pki import Principal
from sluice.gateway.store import audit
from sluice.gateway.store.blobs import TempBlob
from sluice.gateway.store.direct import open_regular
from sluice.models.import_statement import ImportStatement
from sluice.models.schema import Schema

SAFETENSORS = "safetensors"
MAX_REASON_CHARS = 512


@dataclass(frozen=True)
class ImportLimits:
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    # Largest float magnitude in a base: with every accepted delta also at most this, a
    # fold of base + deltas cannot overflow to Inf (config.max_update_abs_value).
    max_abs_value: float = 1e6


@dataclass(frozen=True)
class ImportHeader:
    model: str
    format: str
    file_bytes: int
    statement_json: bytes  # the global program's statement, exactly as signed
    signature: bytes  # Ed25519 over statement_json
    reason: str = ""


@dataclass(frozen=True)
class FileChunk:
    offset: int
    data: bytes


ImportItem = ImportHeader | FileChunk


@dataclass(frozen=True)
class ImportedBase:
    model: str
    version: int
    weights_sha256: str
    round: int  # the open round, now training from it
    kept: tuple[str, ...]  # tensors kept from the previous version
    signing_key_id: str  # the import key the statement verified under


@dataclass
class _Attempt:
    """What is known of one import so far: what its audit entry says."""

    header: ImportHeader | None = None
    key_id: str = ""  # once the signature verified
    statement: ImportStatement | None = None  # once it parsed
    received: int = 0  # bytes spooled

    def facts(self, peer: str, why: str) -> dict[str, object]:
        detail: dict[str, object] = {
            "reason": why[:500],
            "peer": peer,
            "received_bytes": self.received,
        }
        h = self.header
        if h is not None:
            detail["file_bytes"] = h.file_bytes
            detail["statement_sha256"] = hashlib.sha256(h.statement_json).hexdigest()
        if self.key_id:
            detail["signing_key_id"] = self.key_id
        if self.statement is not None:
            detail["signed_file_sha256"] = self.statement.sha256
            detail["statement_created_ms"] = self.statement.created_ms
        return detail


class BaseImporter:
    """Receives imports; every outcome is audited, and only a whole, checked one, signed by
    a key of the global program, commits."""

    def __init__(
        self,
        rounds: RoundManager,
        limits: ImportLimits | None = None,
        keys: ImportKeys | None = None,
    ) -> None:
        self.rounds = rounds
        self.store = rounds.store
        self.blobs = rounds.blobs
        self.limits = limits or ImportLimits()
        self.keys = keys or ImportKeys()  # none: imports are off

    def receive(
        self, items: Iterable[ImportItem], principal: Principal | None = None, peer: str = ""
    ) -> ImportedBase:
        """items: one ImportHeader, then the file's chunks in order. principal: the operator
        (None on a plain-text loopback gateway)."""
        actor = principal.name if principal is not None else "operator"
        stream = iter(items)
        attempt = _Attempt()
        try:
            first = next(stream, None)
            if not isinstance(first, ImportHeader):
                raise InvalidInput("an import starts with exactly one header message")
            attempt.header = first
            return self._receive(first, stream, principal, peer, attempt)
        except SluiceError as exc:
            self._audit("base.import_refused", attempt, actor, peer, str(exc))
            raise
        except Exception as exc:  # the client went away, or the gateway's storage failed
            fault = storage_fault(exc)
            self._audit(
                "base.import_interrupted", attempt, actor, peer, fault or type(exc).__name__
            )
            if fault is not None:
                raise Unavailable(f"the gateway could not store the import: {fault}") from exc
            raise

    def _audit(self, kind: str, attempt: _Attempt, actor: str, peer: str, why: str) -> None:
        model = bounded(attempt.header.model) if attempt.header is not None else ""
        self.store.record_soon(kind, actor, f"{model}/import", attempt.facts(peer, why))

    def _check_header(self, h: ImportHeader, schema: Schema) -> None:
        if h.format != SAFETENSORS:
            raise InvalidInput(f"format {bounded(h.format)!r}: only safetensors is imported")
        limit = max_file_bytes(schema)
        if h.file_bytes > limit:
            raise TooLarge(
                f"file_bytes {h.file_bytes}: a safetensors file of {h.model!r} is at most {limit}"
            )
        if h.file_bytes < 8:
            raise InvalidInput(f"file_bytes {h.file_bytes}: a safetensors file is at least 8")
        if len(h.reason) > MAX_REASON_CHARS:
            raise InvalidInput(f"reason is {len(h.reason)} characters; at most {MAX_REASON_CHARS}")

    def _receive(
        self,
        h: ImportHeader,
        stream: Iterator[ImportItem],
        principal: Principal | None,
        peer: str,
        attempt: _Attempt,
    ) -> ImportedBase:
        # Authorization first: the signature, on the raw bytes, before any chunk is read.
        attempt.key_id = self.keys.authorize(h.statement_json, h.signature)
        statement = attempt.statement = self.keys.statement(h.statement_json, attempt.key_id)
        schema = self.rounds.catalog.get(h.model).schema
        self.keys.check(statement, h.model, schema.hash)
        self._check_header(h, schema)
        r = self.store.latest_round(h.model)
        if r is not None:  # before the upload, not only after it (checked again at commit)
            self._check_round(r)
        with self.blobs.temp() as spool:  # untagged: a crash's leftover is dropped at start
            layout = self._spool(h, schema, stream, spool, attempt)
            if spool.hexdigest() != statement.sha256:
                raise PreconditionFailed(
                    f"the file's sha256 is {spool.hexdigest()}; the signed statement is for "
                    f"{statement.sha256}: these are not the bytes the global program signed"
                )
            spool.finish()
            with self.blobs.temp() as out:
                previous = self._assemble(h.model, schema, layout, spool.path, out)
                return self._commit(h, attempt, layout, previous, out, principal, peer)

    def _spool(
        self,
        h: ImportHeader,
        schema: Schema,
        stream: Iterator[ImportItem],
        spool: TempBlob,
        attempt: _Attempt,
    ) -> Layout:
        head = HeadReader(schema, h.model, h.file_bytes)
        layout: Layout | None = None
        for item in stream:
            if not isinstance(item, FileChunk):
                raise InvalidInput("a second header; an import sends one, then chunks")
            if not item.data:
                raise InvalidInput(f"empty chunk at offset {item.offset}; chunks carry bytes")
            if len(item.data) > self.limits.max_chunk_bytes:
                raise TooLarge(
                    f"chunk of {len(item.data)} bytes; at most {self.limits.max_chunk_bytes}"
                )
            if item.offset != spool.size:
                raise InvalidInput(f"chunk at offset {item.offset}; expected {spool.size}")
            if spool.size + len(item.data) > h.file_bytes:
                raise InvalidInput(f"the file runs past its declared {h.file_bytes} bytes")
            spool.write(item.data)
            attempt.received = spool.size
            if layout is None:
                layout = head.feed(item.data)
        if spool.size != h.file_bytes:
            raise InvalidInput(f"the stream ended after {spool.size} of {h.file_bytes} bytes")
        if layout is None:  # unreachable: HeadReader refuses a header past file_bytes
            raise InvalidInput("the file ended inside its header")
        return layout

    def _assemble(
        self, model: str, schema: Schema, layout: Layout, spool: Path, out: TempBlob
    ) -> Version:
        """Write the payload in schema order into out, checking every value; returns the
        version it succeeds (whose values the kept tensors take)."""
        previous = self.store.latest_version(model)
        if previous is None:
            raise PreconditionFailed(f"model {model!r} has no version yet")
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(spool.open("rb"))
            check_ties(src, layout, schema)
            base: BinaryIO | None = None
            if layout.kept:
                problem = self.blobs.verify(previous.weights_sha256, schema.payload_bytes)
                if problem:
                    why = problem.replace("its spool file", "its weights file")
                    raise IntegrityError(
                        f"version {previous.version}, whose {layout.kept[0]!r} the import "
                        f"keeps, is corrupt: {why}"
                    )
                held = open_regular(self.blobs.path(previous.weights_sha256))
                base = stack.enter_context(os.fdopen(held, "rb"))
            for spec, start, _ in schema.spans():
                span = layout.spans.get(spec.name)
                if span is not None:
                    copy_checked(src, span[0], spec, out, self.limits.max_abs_value)
                elif base is not None:
                    copy_checked(base, start, spec, out, self.limits.max_abs_value)
        return previous

    def _commit(
        self,
        h: ImportHeader,
        attempt: _Attempt,
        layout: Layout,
        previous: Version,
        out: TempBlob,
        principal: Principal | None,
        peer: str,
    ) -> ImportedBase:
        out.finish()  # the fsync, before any lock
        with self.rounds.close_lock:  # no close (which numbers versions too) meanwhile
            latest = self.store.latest_version(h.model)
            r = self.store.latest_round(h.model)
            if latest is None or r is None:
                raise PreconditionFailed(f"model {h.model!r} has no round yet")
            self._check_round(r)
            if layout.kept and latest.version != previous.version:
                raise Busy(
                    f"version {latest.version} of {h.model!r} was made during the import; "
                    "import again"
                )
            version_no = latest.version + 1
            self._carry_state(h.model, latest.version, version_no)
            try:
                with self.blobs.lock:
                    final = self.blobs.commit(out)
                    try:
                        sha = out.hexdigest()
                        r = self._insert(h, attempt, layout, latest, sha, principal, peer)
                    except BaseException:
                        if out.hexdigest() not in self.store.referenced_blobs():
                            self.blobs.remove(final)
                        raise
            except BaseException:
                state = self.rounds.folder.state_dir(h.model, version_no)
                shutil.rmtree(state, ignore_errors=True)
                raise
        sha, kid = out.hexdigest(), attempt.key_id
        return ImportedBase(h.model, version_no, sha, r.round, layout.kept, kid)

    def _insert(
        self,
        h: ImportHeader,
        attempt: _Attempt,
        layout: Layout,
        latest: Version,
        sha: str,
        principal: Principal | None,
        peer: str,
    ) -> Round:
        """One transaction: the version, the open round rebased onto it, the audit entry."""
        version_no = latest.version + 1
        now = int(time.time() * 1000)
        deadline = now + int(self.rounds.policy.round_seconds * 1000)  # time to train anew
        actor = principal.name if principal is not None else "operator"
        with self.store.transaction() as db:
            if principal is not None and self.store.is_revoked(principal.serial):
                raise Forbidden(
                    f"the certificate of {principal.name!r} was revoked during the import"
                )
            r = self.store.latest_round(h.model)  # again: a push may have committed since
            if r is None:
                raise PreconditionFailed(f"model {h.model!r} has no round yet")
            self._check_round(r)
            self.store.insert_version(db, Version(h.model, version_no, 0, sha, 0, 0, 0, now))
            self.store.rebase_round(db, h.model, r.round, version_no, deadline)
            facts = self._facts(h, attempt, layout, latest, r, sha, peer)
            audit.append(db, "base.imported", actor, f"{h.model}/version/{version_no}", facts)
        return r

    def _check_round(self, r: Round) -> None:
        """The open round may move to the new base if no update was trained for it yet;
        with buffered aggregation its updates come along, one version staler."""
        if r.state != RoundState.OPEN:
            raise PreconditionFailed(
                f"round {r.round} of {r.model!r} is {r.state}; import once it has closed"
            )
        if r.accepted and self.rounds.folder.fedbuff is None:
            raise PreconditionFailed(
                f"round {r.round} of {r.model!r} has updates of {r.accepted} trainers, trained "
                f"from version {r.base_version}; close it first (sluice close-round) and "
                "import again"
            )

    def _carry_state(self, model: str, previous: int, version_no: int) -> None:
        """The DP ledger and clipping state go on with the new version (epsilon keeps
        counting: an import must not reset the privacy budget); a server optimizer's
        moments do not (a new base starts them afresh)."""
        source = self.rounds.folder.state_dir(model, previous)
        files = [source / n for n in (LEDGER_FILE, CLIPPING_FILE) if (source / n).is_file()]
        if not files:
            return
        final = self.rounds.folder.state_dir(model, version_no)
        staging = final.with_name(f".{version_no}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for f in files:
                shutil.copyfile(f, staging / f.name)
            shutil.rmtree(final, ignore_errors=True)  # left by a crash before its commit
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _facts(
        h: ImportHeader,
        attempt: _Attempt,
        layout: Layout,
        previous: Version,
        r: Round,
        sha: str,
        peer: str,
    ) -> dict[str, object]:
        statement = attempt.statement
        if statement is None:  # unreachable: _authorize set it
            raise PreconditionFailed("an import commits only with its signed statement")
        source = {
            "format": h.format,
            "verified_by": "gateway",
            "signing_key_id": attempt.key_id,
            "statement_sha256": hashlib.sha256(h.statement_json).hexdigest(),
            "statement_created_ms": statement.created_ms,
        }
        meta = {bounded(k): bounded(v) for k, v in sorted(layout.metadata.items())[:8]}
        return {
            "version": previous.version + 1,
            "previous_version": previous.version,
            "weights_sha256": sha,
            "file_sha256": statement.sha256,
            "file_bytes": h.file_bytes,
            "source": source,
            "file_metadata": meta,
            "kept_tensors": list(layout.kept),
            "round": r.round,
            "round_previous_base": r.base_version,
            "round_updates_kept": r.accepted,
            "reason": h.reason,
            "peer": peer,
        }
