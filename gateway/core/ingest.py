"""Ingest one pushed update: validate the header, spool and check the payload, then commit."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sluice.gateway.core.catalog import Catalog
from sluice.gateway.core.errors import (
    Busy,
    Conflict,
    Forbidden,
    IntegrityError,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    SluiceError,
    TooLarge,
    Unavailable,
    bounded,
    storage_fault,
)
from sluice.gateway.core.fedbuff import FedBuffPolicy
from sluice.gateway.core.finite import FiniteCheck
from sluice.gateway.core.records import (
    MAX_SAFE_INT,
    NAME_PATTERN,
    SHA256_PATTERN,
    UPDATE_ID_PATTERN,
    PushResult,
    Round,
    RoundState,
    UpdateHeader,
)
from sluice.gateway.pki import TRAINER, Principal
from sluice.gateway.store import audit
from sluice.gateway.store.blobs import BlobStore
from sluice.gateway.store.sqlite import Store

MAX_CHUNK_BYTES = 4 << 20
# An update's FedAvg weight: fits a signed 32-bit integer wherever trainers count, and a
# round's sum stays a safe JSON integer (< 2**53) for up to 2**22 trainers.
MAX_NUM_EXAMPLES = (1 << 31) - 1


@dataclass(frozen=True)
class Limits:
    max_chunk_bytes: int = MAX_CHUNK_BYTES  # payload bytes in one chunk message
    max_header_bytes: int = 16 << 10  # serialized header message
    max_metrics: int = 64  # entries in the header's metrics map
    max_num_examples: int = MAX_NUM_EXAMPLES  # an update's FedAvg weight
    max_metric_name: int = 64  # characters in a metric's name
    # Largest magnitude of a float in an update: one trainer's float32-max deltas (weighted
    # by a large num_examples) would overflow the fold to Inf and fail every round.
    max_abs_value: float = 1e6


@dataclass(frozen=True)
class PayloadChunk:
    offset: int
    data: bytes | memoryview  # immutable: bytes, or a view of bytes (hashed after the write)


@dataclass(frozen=True)
class Trailer:
    num_chunks: int
    # Push protocol 2: the payload's hex sha256, when the header left it empty.
    payload_sha256: str = ""


# PushUpdate protocol spoken here (RoundInfo.push_protocol): 2 = the payload's sha256 may
# come in the trailer instead of the header, so a client hashes while it streams.
PUSH_PROTOCOL = 2


BodyItem = PayloadChunk | Trailer


def _check_header_fields(h: UpdateHeader, header_bytes: int, limits: Limits) -> None:
    if header_bytes > limits.max_header_bytes:
        raise TooLarge(f"update header is {header_bytes} bytes; at most {limits.max_header_bytes}")
    if not UPDATE_ID_PATTERN.fullmatch(h.update_id):
        raise InvalidInput(
            f"update_id {bounded(h.update_id)!r}: expected 1-64 chars of [A-Za-z0-9._-]"
        )
    for field, value in (("trainer", h.trainer), ("region", h.region)):
        if not NAME_PATTERN.fullmatch(value):
            raise InvalidInput(
                f"{field} {bounded(value)!r}: expected 1-64 lowercase chars of [a-z0-9_.-]"
            )
    if not 0 < h.num_examples <= limits.max_num_examples:
        raise InvalidInput(
            f"num_examples must be > 0 and at most {limits.max_num_examples}: it is the "
            f"update's FedAvg weight; got {h.num_examples}"
        )
    # uint64 on the wire; the gateway stores and signs no integer past 2**53 - 1.
    for field, number in (
        ("round", h.round),
        ("base_version", h.base_version),
        ("payload_bytes", h.payload_bytes),
    ):
        if number > MAX_SAFE_INT:
            raise InvalidInput(f"{field} {number} is out of range; at most {MAX_SAFE_INT}")
    if len(h.metrics) > limits.max_metrics:
        raise TooLarge(f"{len(h.metrics)} metrics; at most {limits.max_metrics}")
    for name, metric in h.metrics.items():
        if not 0 < len(name) <= limits.max_metric_name or not name.isprintable():
            raise InvalidInput(
                f"metric name {bounded(name)!r}: expected 1-{limits.max_metric_name} "
                "printable characters"
            )
        if not math.isfinite(metric):
            raise InvalidInput(f"metric {name!r} is {metric}; metrics must be finite")
    if h.payload_sha256 and not SHA256_PATTERN.fullmatch(h.payload_sha256):
        raise InvalidInput(
            "payload_sha256: expected 64 lowercase hex characters (or none, with the sha256 "
            "in the trailer)"
        )


def _payload_sha256(h: UpdateHeader, trailer: Trailer) -> str:
    """The sha256 the payload must hash to: the header's or the trailer's (one of them, or
    both the same)."""
    late = trailer.payload_sha256
    if late and not SHA256_PATTERN.fullmatch(late):
        raise InvalidInput("trailer payload_sha256: expected 64 lowercase hex characters")
    if h.payload_sha256 and late and late != h.payload_sha256:
        raise InvalidInput(
            "the header and the trailer name different payload sha256s; send it in one of them"
        )
    if not (h.payload_sha256 or late):
        raise InvalidInput(
            "payload_sha256 is in neither the header nor the trailer; send it in one of them"
        )
    return h.payload_sha256 or late


def _check_principal(h: UpdateHeader, principal: Principal) -> None:
    """A trainer pushes only as itself and only for its own region."""
    if principal.role != TRAINER:
        raise Forbidden(f"{principal.role} {principal.name!r} may not push updates")
    if (h.trainer, h.region) != (principal.name, principal.region):
        raise Forbidden(
            f"trainer {principal.name!r} of region {principal.region!r} may not push as "
            f"{h.trainer!r} of region {h.region!r}"
        )


class Ingest:
    """Receives updates; a rejected or interrupted push leaves no file and no row."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        catalog: Catalog,
        limits: Limits | None = None,
        on_commit: Callable[[str, int], None] | None = None,
        fedbuff: FedBuffPolicy | None = None,
        coalesce: audit.Coalescer | None = None,
    ) -> None:
        self.coalesce = coalesce  # repeated rejections: one audit row per window, counted
        self.fedbuff = fedbuff
        self.store = store
        self.blobs = blobs
        self.catalog = catalog
        self.limits = limits or Limits()
        self._on_commit = on_commit

    def replay(self, h: UpdateHeader) -> PushResult | None:
        """The acknowledgement of an already committed update id, or None if it is new."""
        row = self.store.find_update(h.update_id)
        if row is None:
            return None
        # Not the round: with buffered aggregation an update lands in whichever round is
        # open, so a retry may name an older one.
        same = (row["model"], row["trainer"], row["payload_sha256"]) == (
            h.model,
            h.trainer,
            h.payload_sha256,
        )
        if not same:
            raise Conflict(
                f"update_id {h.update_id!r} was already used for a different update "
                f"(by {row['trainer']!r} in round {row['round']} of {row['model']!r}); a trainer "
                "sends one update per round, and a fresh id names each"
            )
        stored = self.store.get_round(h.model, row["round"])
        if stored is not None and stored.state == RoundState.FAILED:
            raise PreconditionFailed(
                f"update {h.update_id!r} was committed to round {stored.round} of {h.model!r}, "
                f"which failed ({stored.failure}); push it to the open round with a new id"
            )
        return PushResult(h.update_id, False, row["round"], stored.accepted if stored else 0)

    def _open_round(self, h: UpdateHeader) -> Round:
        """The round this update joins: the one it names, or with buffered aggregation
        (FedBuff) the open one, if the update's base is not too stale."""
        latest = self.store.latest_round(h.model)
        if self.fedbuff is not None and latest is not None and h.round <= latest.round:
            if latest.state != RoundState.OPEN:
                # The buffer is being folded; the next one opens in a moment.
                raise Busy(f"round {latest.round} of {h.model!r} is {latest.state}; push again")
            staleness = latest.base_version - h.base_version
            if not 0 <= staleness <= self.fedbuff.max_staleness:
                raise PreconditionFailed(
                    f"update trained from version {h.base_version} is {staleness} versions "
                    f"behind version {latest.base_version}; at most "
                    f"{self.fedbuff.max_staleness} are accepted: pull and train again"
                )
            return latest
        r = self.store.get_round(h.model, h.round)
        hint = (
            f"open round is {latest.round} (base version {latest.base_version})" if latest else ""
        )
        if r is None:
            raise NotFound(f"round {h.round} of model {h.model!r} does not exist; {hint}")
        if r.state != RoundState.OPEN:
            raise PreconditionFailed(f"round {h.round} of {h.model!r} is {r.state}; {hint}")
        if h.base_version != r.base_version:
            raise PreconditionFailed(
                f"stale base version {h.base_version}: round {r.round} trains from version "
                f"{r.base_version}; pull it and train again"
            )
        return r

    def _join(self, h: UpdateHeader) -> Round:
        """The round this update joins, if its trainer has no update there yet: a trainer
        counts once per round, so one trainer is never a quorum (README: updates)."""
        r = self._open_round(h)
        committed = self.store.trainer_update(h.model, r.round, h.trainer)
        if committed is not None:
            raise Conflict(
                f"trainer {h.trainer!r} already has update {committed!r} in round {r.round} of "
                f"{h.model!r}; a trainer sends one update per round (a retry reuses its id)"
            )
        return r

    def check_header(self, h: UpdateHeader, header_bytes: int) -> PushResult | None:
        """Validate everything knowable from the header; returns an ack for a replayed id."""
        _check_header_fields(h, header_bytes, self.limits)
        served = self.catalog.get(h.model)
        # Without the sha256 a committed id is answered once its payload hashed (_receive).
        replayed = self.replay(h) if h.payload_sha256 else None
        if replayed is not None:
            return replayed
        if h.schema_hash != served.schema.hash:
            raise PreconditionFailed(
                f"schema hash {h.schema_hash[:12]}... does not match model {h.model!r} "
                f"({served.schema.hash[:12]}...); pull the model's current schema"
            )
        if h.payload_bytes != served.schema.payload_bytes:
            raise InvalidInput(
                f"payload_bytes {h.payload_bytes}: model {h.model!r} updates are exactly "
                f"{served.schema.payload_bytes} bytes"
            )
        try:
            self._join(h)
        except SluiceError:
            # A retry whose original committed since the replay check above (its commit may
            # have closed the round, or be the trainer's update there): the same answer.
            replayed = self.replay(h) if h.payload_sha256 else None
            if replayed is None:
                raise
            return replayed
        return None

    def receive(
        self,
        h: UpdateHeader,
        header_bytes: int,
        body: Iterable[BodyItem],
        peer: str = "",
        principal: Principal | None = None,
    ) -> PushResult:
        """Check, spool and commit one update; body yields chunks then exactly one trailer.

        Every outcome is audited: accepted in the commit's own transaction; a rejection or
        an interrupted stream in an entry of its own (and nothing else is stored).
        """
        try:
            if principal is not None:
                # Sizes and shapes first: the identity check echoes the header's names.
                _check_header_fields(h, header_bytes, self.limits)
                _check_principal(h, principal)
            return self._receive(h, header_bytes, body, peer, principal)
        except SluiceError as exc:
            self._audit_failure("push.rejected", h, peer, str(exc), principal)
            raise
        except Exception as exc:
            fault = storage_fault(exc)
            reason = fault or type(exc).__name__
            self._audit_failure("push.interrupted", h, peer, reason, principal)
            if fault is not None:
                raise Unavailable(
                    f"the gateway could not store the update: {fault}; push it again later"
                ) from exc
            raise

    def _audit_failure(
        self,
        kind: str,
        h: UpdateHeader,
        peer: str,
        reason: str,
        principal: Principal | None = None,
    ) -> None:
        # Header fields may be hostile: cap what goes into the log. The actor is who sent
        # the push (its certificate), not whom the header names.
        actor = principal.name if principal is not None else h.trainer[:64] or "unknown"
        subject = f"{h.model[:64]}/round/{h.round}"
        detail = {
            "update_id": h.update_id[:64],
            "region": h.region[:64],
            "peer": peer,
            "reason": reason[:500],
        }
        if principal is not None and h.trainer != principal.name:
            detail["header_trainer"] = h.trainer[:64]
        if kind == "push.rejected" and self.coalesce is not None:
            # A trainer retrying a bad push in a loop: counted, not a row (and fsync) each.
            self.coalesce.record(kind, actor, subject, detail, reason[:80])
        else:
            self.store.record_soon(kind, actor, subject, detail)  # full disk: once there is room

    def drop_crash_leftovers(self) -> list[str]:
        """What a crash left in blobs/, at start and in `sluice gc`: each push it cut off
        audited (push.interrupted) before its temp file goes, then the blobs no row names
        dropped; returns those blobs' names. While the disk refuses those entries (they
        wait in memory: record_soon) the temp files stay, the only evidence of them, for
        the next start or gc to audit."""
        self.record_interrupted()
        evidence_audited = not self.store.holds_deferred()
        return self.blobs.drop_orphans(self.store.referenced_blobs(), temp_files=evidence_audited)

    def record_interrupted(self) -> int:
        """Audit every push a crash cut off (its temp file is still in blobs/tmp, tagged
        with who sent what); returns how many."""
        found = self.blobs.temp_tags()
        for tag, size in found:
            parts = tag.split("+")  # _receive's tag: trainer+model+round+update_id
            if len(parts) < 4 or not parts[-2].isdigit():
                parts = ["unknown", "unknown", "0", tag]
            model = "+".join(parts[1:-2])
            h = UpdateHeader(parts[-1], parts[0], "", model, int(parts[-2]), 0, 0, "", "", 0)
            reason = f"the gateway stopped after receiving {size} bytes of it"
            self._audit_failure("push.interrupted", h, "", reason)
        return len(found)

    def _receive(
        self,
        h: UpdateHeader,
        header_bytes: int,
        body: Iterable[BodyItem],
        peer: str,
        principal: Principal | None,
    ) -> PushResult:
        if not h.payload_sha256 and self.store.find_update(h.update_id) is not None:
            return self._replay_after_payload(h, header_bytes, body)
        try:
            replayed = self.check_header(h, header_bytes)
        except SluiceError:
            # Without the sha256, check_header cannot tell a retry whose original committed
            # meanwhile: its payload, hashed, can (as a committed id's is above).
            if h.payload_sha256 or self.store.find_update(h.update_id) is None:
                raise
            return self._replay_after_payload(h, header_bytes, body)
        if replayed is not None:
            return replayed
        schema = self.catalog.get(h.model).schema
        finite = FiniteCheck(schema, self.limits.max_abs_value)
        with self.blobs.temp(f"{h.trainer}+{h.model}+{h.round}+{h.update_id}") as tmp:

            def spool(data: bytes | memoryview) -> None:
                finite.feed(data)
                tmp.write(data)

            trailer = self._stream(h, body, spool)
            sha = _payload_sha256(h, trailer)
            if tmp.hexdigest() != sha:
                said = "header" if h.payload_sha256 else "trailer"
                raise IntegrityError(f"payload sha256 is {tmp.hexdigest()}; {said} said {sha}")
            h = dataclasses.replace(h, payload_sha256=sha)
            tmp.finish()  # the fsync, outside the lock below
            with self.blobs.lock:
                final = self.blobs.commit(tmp)
                try:
                    result = self._commit(h, peer, principal)
                except BaseException:
                    if h.payload_sha256 not in self.store.referenced_blobs():
                        self.blobs.remove(final)
                    raise
        if result.created and self._on_commit is not None:
            self._on_commit(h.model, result.round)
        return result

    def _stream(
        self,
        h: UpdateHeader,
        body: Iterable[BodyItem],
        sink: Callable[[bytes | memoryview], None],
    ) -> Trailer:
        """Hand each chunk's bytes to sink, in order, checking every chunk's size and offset
        and the trailer (last, exactly once, counting the chunks sent); returns it."""
        trailer, num_chunks, size = None, 0, 0
        for item in body:
            if trailer is not None:
                raise InvalidInput("message after the trailer; the trailer must be last")
            if isinstance(item, Trailer):
                trailer = item
                continue
            if len(item.data) > self.limits.max_chunk_bytes:
                raise TooLarge(
                    f"chunk {num_chunks} is {len(item.data)} bytes; "
                    f"at most {self.limits.max_chunk_bytes}"
                )
            if item.offset != size:
                raise InvalidInput(f"chunk {num_chunks} at offset {item.offset}; expected {size}")
            if size + len(item.data) > h.payload_bytes:
                raise InvalidInput(f"payload runs past its declared {h.payload_bytes} bytes")
            sink(item.data)
            size += len(item.data)
            num_chunks += 1
        if trailer is None:
            raise InvalidInput(
                f"stream ended after {size} of {h.payload_bytes} bytes without a trailer"
            )
        if size != h.payload_bytes:
            raise InvalidInput(f"payload is {size} bytes; header said {h.payload_bytes}")
        if trailer.num_chunks != num_chunks:
            raise InvalidInput(f"trailer counts {trailer.num_chunks} chunks; {num_chunks} arrived")
        return trailer

    def _replay_after_payload(
        self, h: UpdateHeader, header_bytes: int, body: Iterable[BodyItem]
    ) -> PushResult:
        """A committed update id again, its sha256 in the trailer: the payload is hashed as it
        arrives (nothing stored), then answered as a replay of the same update, or refused
        as another one under a used id."""
        _check_header_fields(h, header_bytes, self.limits)
        served = self.catalog.get(h.model)
        if h.payload_bytes != served.schema.payload_bytes:
            raise InvalidInput(
                f"payload_bytes {h.payload_bytes}: model {h.model!r} updates are exactly "
                f"{served.schema.payload_bytes} bytes"
            )
        digest = hashlib.sha256()
        trailer = self._stream(h, body, digest.update)
        sha = _payload_sha256(h, trailer)
        if digest.hexdigest() != sha:
            raise IntegrityError(f"payload sha256 is {digest.hexdigest()}; trailer said {sha}")
        replayed = self.replay(dataclasses.replace(h, payload_sha256=sha))
        if replayed is None:  # rows are never deleted: only a corrupt store gets here
            raise Unavailable(f"update {h.update_id!r} could not be found again; push it again")
        return replayed

    def _commit(self, h: UpdateHeader, peer: str, principal: Principal | None) -> PushResult:
        with self.store.transaction() as db:
            replayed = self.replay(h)  # a concurrent retry may have won the race
            if replayed is not None:
                return replayed
            if principal is not None and self.store.is_revoked(principal.serial):
                raise Forbidden(
                    f"the certificate of {principal.name!r} was revoked during the upload"
                )
            joined = self._join(h)  # the round may have closed during the upload
            h = dataclasses.replace(h, round=joined.round)
            self.store.insert_update(db, h, int(time.time() * 1000))
            audit.append(
                db,
                "push.accepted",
                h.trainer,
                f"{h.model}/round/{h.round}",
                {
                    "update_id": h.update_id,
                    "region": h.region,
                    "base_version": h.base_version,
                    "num_examples": h.num_examples,
                    "payload_sha256": h.payload_sha256,
                    "payload_bytes": h.payload_bytes,
                    "peer": peer,
                },
            )
        r = self.store.get_round(h.model, h.round)
        return PushResult(h.update_id, True, h.round, r.accepted if r else 0)
