"""Rounds: open, count trainers, close on quorum or deadline, fold into a new version, publish.

A close that fails leaves nothing behind and ends one of three ways (core/closing.py): a
corrupt update is excluded and the close runs without it; a reason that will not go away
fails the round (audited, in status) and opens the next on the same base; anything else
(a full disk first) keeps the round aggregating and is retried with backoff, without
holding up other models.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sluice.gateway.core.catalog import Catalog, ServedModel
from sluice.gateway.core.closing import CloseRefused, CorruptUpdates, Retry
from sluice.gateway.core.errors import (
    NotFound,
    PreconditionFailed,
    SluiceError,
    Unavailable,
    storage_fault,
)
from sluice.gateway.core.fedbuff import FedBuffPolicy
from sluice.gateway.core.folding import Publisher, RoundFolder, now_ms
from sluice.gateway.core.privacy import RoundPrivacy
from sluice.gateway.core.records import ClosedRound, CommittedUpdate, Round, RoundState, Version
from sluice.gateway.core.retention import Retention, RetentionPolicy
from sluice.gateway.core.strategies.base import Strategy
from sluice.gateway.store import audit
from sluice.gateway.store.blobs import BlobStore
from sluice.gateway.store.sqlite import Store

log = logging.getLogger(__name__)


RETRY_SECONDS = 5.0  # first wait before a failed close (disk full) is retried; doubles
MAX_RETRY_SECONDS = 300.0  # longest wait between two tries of a close
CLOSE_ATTEMPTS = 3  # a close failing this often for an unknown reason fails its round


@dataclass(frozen=True)
class RoundPolicy:
    quorum: int = 4  # close as soon as this many trainers have an update committed
    min_updates: int = 1  # at the deadline, close only with updates of at least this many
    round_seconds: float = 600.0  # deadline, counted from the round's opening


# A close resumed at start-up is audited; a round whose close was resumed this many times
# (each time the process died before it finished) fails instead of looping on restarts.
RESUMED = "round.close_resumed"
RESUME_LIMIT = 8


class RoundManager:
    """Owns round state transitions; one aggregation at a time, in commit order."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        catalog: Catalog,
        policy: RoundPolicy,
        publisher: Publisher,
        strategies: Mapping[str, Strategy] | None = None,
        state_root: Path | None = None,
        fedbuff: FedBuffPolicy | None = None,
        privacy: RoundPrivacy | None = None,
        retention: RetentionPolicy | None = None,
    ) -> None:
        unknown = set(strategies or {}) - set(catalog.names())
        if unknown:
            raise ValueError(f"strategies configured for models not served: {sorted(unknown)}")
        self.state_root = state_root or blobs.root.parent / "state"
        self.store = store
        self.blobs = blobs
        self.catalog = catalog
        self.policy = policy
        self.publisher = publisher
        self.folder = RoundFolder(
            store,
            blobs,
            publisher,
            privacy or RoundPrivacy(None),
            strategies or {},
            self.state_root,
            self._open_next,
            fedbuff,
        )
        self.retention_policy = retention or RetentionPolicy()
        self.retention = Retention(store, blobs, self.state_root)
        self._close_lock = threading.Lock()
        self._retries: dict[tuple[str, int], Retry] = {}  # closes that failed, to try again
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # life cycle

    def bootstrap(self) -> None:
        """Create version 0 and round 1 for new models; remove what a crash left half-made;
        finish closes a crash interrupted (a failure is retried by the worker)."""
        for served in self.catalog:
            if self.store.latest_version(served.name) is None:
                self._create_initial_version(served)
        self._drop_orphans()
        self._retain()
        for r in self.store.rounds_in_state(RoundState.AGGREGATING):
            subject = f"{r.model}/round/{r.round}"
            resumed = [e for e in self.store.audit_entries(RESUMED) if e.subject == subject]
            if len(resumed) >= RESUME_LIMIT:
                # The process died in each of these closes (a crash, an OOM kill): the
                # next try would die too. End it visibly instead of a crash loop.
                self._fail(r, f"the gateway stopped during {len(resumed)} restarts' closes")
                continue
            log.warning("finishing round %s of %s interrupted by a restart", r.round, r.model)
            self.store.record_soon(RESUMED, "gateway", subject, {"restart": len(resumed) + 1})
            self._attempt(r.model, r.round, force=True)

    def _drop_orphans(self) -> None:
        """Release directories with no release row (a kill between their rename and the
        commit) and strategy state directories with no version row."""
        released = self.store.released_versions()
        for path in self.publisher.drop_orphans(released):
            log.warning("removed %s: no release row names it (left by a crash)", path)
            subject = f"{path.parent.name}/release/{path.name}"
            self.store.record("release.orphan_removed", "gateway", subject, {"path": str(path)})
        for model_dir in sorted(self.state_root.iterdir()) if self.state_root.is_dir() else []:
            for entry in sorted(model_dir.iterdir()) if model_dir.is_dir() else []:
                name = entry.name
                known = name.isdigit() and self.store.get_version(model_dir.name, int(name))
                if entry.is_dir() and not known and (name.isdigit() or name.endswith(".staging")):
                    shutil.rmtree(entry, ignore_errors=True)

    def _create_initial_version(self, served: ServedModel) -> None:
        # init_weights when declared (checked against the schema), else the factory's seed.
        sha = self.blobs.write(served.schema.tensor_bytes(served.entry.initial_state()))
        with self.store.transaction() as db:
            self.store.insert_version(db, Version(served.name, 0, 0, sha, 0, 0, 0, now_ms()))
            self._open_next(db, served.name, 1, 0)

    def _open_next(
        self, db: sqlite3.Connection, model: str, round_no: int, base_version: int
    ) -> None:
        opened = now_ms()
        deadline = opened + int(self.policy.round_seconds * 1000)
        r = Round(model, round_no, base_version, RoundState.OPEN, opened, deadline)
        self.store.insert_round(db, r)

    def start(self) -> None:
        self._worker = threading.Thread(target=self._run, name="rounds", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # a failing close must not kill the worker; it retries next tick
                log.exception("round worker failed")

    # state

    def current(self, model: str) -> Round:
        self.catalog.get(model)
        r = self.store.latest_round(model)
        if r is None:
            raise NotFound(f"model {model!r} has no round yet")
        return r

    def revoke(self, serial_hex: str, principal: str, reason: str) -> list[str]:
        """Record a revoked certificate and discard its principal's updates in open rounds.

        Holds the close lock, so no round is being folded meanwhile; returns the ids dropped.
        """
        with self._close_lock:
            dropped: list[CommittedUpdate] = []
            for served in self.catalog:
                r = self.store.latest_round(served.name)
                if r is not None and r.state == RoundState.OPEN:
                    dropped += [
                        u
                        for u in self.store.round_updates(r.model, r.round)
                        if u.trainer == principal
                    ]
            with self.store.transaction() as db:
                self.store.insert_revoked(db, serial_hex, principal, reason, now_ms())
                audit.append(
                    db,
                    "cert.revoked",
                    "operator",
                    principal,
                    {"serial": serial_hex, "reason": reason},
                )
                self.store.delete_updates(db, [u.update_id for u in dropped])
                for u in dropped:
                    audit.append(
                        db,
                        "push.discarded",
                        "gateway",
                        f"{u.trainer}/round/{u.round}",
                        {"update_id": u.update_id, "reason": "certificate revoked"},
                    )
            with self.blobs.lock:
                referenced = self.store.referenced_blobs()
                for u in dropped:
                    if u.payload_sha256 not in referenced:
                        self.blobs.remove(self.blobs.path(u.payload_sha256))
            return [u.update_id for u in dropped]

    @property
    def close_lock(self) -> threading.Lock:
        """Held by every close and revocation; whoever changes a model's versions or rounds
        outside a close (core/importing.py) holds it too."""
        return self._close_lock

    def note_commit(self, model: str, round_no: int) -> None:
        """Called after an update commits: wake the worker when the quorum is reached."""
        r = self.store.get_round(model, round_no)
        if r is not None and r.accepted >= self.policy.quorum:
            self._wake.set()

    def tick(self) -> None:
        """Close every open round that reached its quorum, or its deadline with enough updates;
        retry, with backoff, a close that failed for a reason that may go away."""
        for stuck in self.store.rounds_in_state(RoundState.AGGREGATING):
            retry = self._retries.get((stuck.model, stuck.round))
            if retry is None or time.monotonic() >= retry.due:
                self._attempt(stuck.model, stuck.round, force=True)
        for served in self.catalog:
            r = self.store.latest_round(served.name)
            if r is None or r.state != RoundState.OPEN:
                continue
            retry = self._retries.get((r.model, r.round))
            if retry is not None and time.monotonic() < retry.due:
                continue
            due = now_ms() >= r.deadline_ms
            if r.accepted >= self.policy.quorum or (due and r.accepted >= self.policy.min_updates):
                self._attempt(r.model, r.round)
            elif due:
                # Too few updates by the deadline: keep the round open another period.
                with self.store.transaction() as db:
                    extended = now_ms() + int(self.policy.round_seconds * 1000)
                    self.store.extend_deadline(db, r.model, r.round, extended)

    def _attempt(self, model: str, round_no: int, force: bool = False) -> None:
        """close() for the worker: a failure is logged (and audited by close), and the
        other models' rounds still get their turn."""
        try:
            self.close(model, round_no, force=force)
        except SluiceError as exc:
            log.warning("round %s of %s: %s", round_no, model, exc)
        except Exception:
            log.exception("round %s of %s could not be closed yet", round_no, model)

    def close(self, model: str, round_no: int, force: bool = False) -> ClosedRound:
        """Close a round and fold its updates into the next version. Idempotent: a round
        closed before (perhaps before a restart) says again what it produced.

        Raises PreconditionFailed when the round failed or was reopened (the message says
        why), Unavailable when the gateway's storage failed (the close is retried).
        """
        with self._close_lock:
            r = self.store.get_round(model, round_no)
            if r is None:
                raise NotFound(f"round {round_no} of {model!r} does not exist")
            if r.state == RoundState.CLOSED and r.version is not None:
                return self._closed(r, r.version)
            if r.state == RoundState.FAILED:
                raise PreconditionFailed(
                    f"round {round_no} of {model!r} failed: {r.failure}; round {round_no + 1} "
                    f"opened on the same base version {r.base_version}"
                )
            try:
                if r.state == RoundState.OPEN:
                    if r.accepted < max(self.policy.min_updates, 1) and not force:
                        raise PreconditionFailed(
                            f"round {round_no} of {model!r} has updates of {r.accepted} "
                            f"trainers; closing needs at least {max(self.policy.min_updates, 1)}"
                        )
                    with self.store.transaction() as db:
                        self.store.set_round_state(db, model, round_no, RoundState.AGGREGATING)
                closed = self._aggregate(self.catalog.get(model), r)
            except SluiceError:
                raise
            except CloseRefused as exc:
                try:
                    self._fail(r, str(exc))
                except Exception as failing:  # a full disk refuses even that: retried
                    raise self._failed_attempt(r, failing) from exc
                self._retain()
                raise PreconditionFailed(
                    f"round {round_no} of {model!r} failed: {exc}; round {round_no + 1} opened "
                    f"on the same base version {r.base_version}"
                ) from exc
            except Exception as exc:
                instead = self._failed_attempt(r, exc)
                if instead is exc:
                    raise
                raise instead from exc
            self._retries.pop((model, round_no), None)
            self._retain()
            return closed

    def _retain(self) -> None:
        """Apply retention after a round ended (close lock held, or before serving). Its
        failure (a full disk refusing the audit entry) leaves everything in place for the
        next close and never fails this one."""
        if not self.retention_policy.active:
            return
        try:
            for removal in self.retention.apply(self.retention_policy):
                log.info("retention removed %s", removal.describe())
        except Exception:
            log.exception("retention could not run; it runs again after the next close")

    def _closed(self, r: Round, version: int) -> ClosedRound:
        """What the close of an already closed round produced, and why nothing was released."""
        v = self.store.get_version(r.model, version)
        if v is None:
            raise NotFound(f"version {version} of {r.model!r} is missing")
        if self.store.get_release(r.model, v.version) is not None:
            return ClosedRound(v, True, already_closed=True)
        subject = f"{r.model}/release/{v.version}"
        reasons = [
            str(e.detail.get("reason", ""))
            for e in self.store.audit_entries("release.refused")
            if e.subject == subject
        ]
        return ClosedRound(v, False, reasons[-1] if reasons else "", already_closed=True)

    def _failed_attempt(self, r: Round, exc: Exception) -> Exception:
        """Note a close that failed for a reason that may go away; what to raise instead.
        The round stays aggregating and tick() tries again after a growing wait; after
        CLOSE_ATTEMPTS failures of an unknown kind the round fails."""
        key = (r.model, r.round)
        fault = storage_fault(exc)
        error = fault or f"{type(exc).__name__}: {exc}"
        last = self._retries.get(key)
        attempts = (last.attempts if last else 0) + 1
        wait = min(RETRY_SECONDS * 2 ** (attempts - 1), MAX_RETRY_SECONDS)
        self._retries[key] = Retry(attempts, time.monotonic() + wait, error)
        if fault is None and attempts >= CLOSE_ATTEMPTS:
            reason = f"closing failed {attempts} times: {error[:300]}"
            try:
                self._fail(r, reason)
            except Exception:
                log.exception("round %s of %s: could not record its failure", r.round, r.model)
                return exc
            return PreconditionFailed(f"round {r.round} of {r.model!r} failed: {reason}")
        if last is None or last.error != error:  # one entry per distinct error, not per try
            self.store.record_soon(
                "round.close_failed",
                "gateway",
                f"{r.model}/round/{r.round}",
                {"error": error[:500], "attempt": attempts, "retry_in_s": wait},
            )
        if fault is not None:
            return Unavailable(
                f"round {r.round} of {r.model!r} could not be closed: {fault}; the gateway "
                f"tries again in {wait:.0f} s"
            )
        return exc

    def close_error(self, model: str, round_no: int) -> str:
        """Why the last try to close this round failed, while it is being retried."""
        retry = self._retries.get((model, round_no))
        return retry.error if retry else ""

    def _fail(self, r: Round, reason: str) -> None:
        """End a round that can never be folded, visibly: audited, in status; its updates
        stay recorded but unfolded, and the next round opens on the same base."""
        updates = self.store.round_updates(r.model, r.round)
        with self.store.transaction() as db:
            self.store.set_round_state(
                db, r.model, r.round, RoundState.FAILED, closed_ms=now_ms(), failure=reason
            )
            audit.append(
                db,
                "round.failed",
                "gateway",
                f"{r.model}/round/{r.round}",
                {
                    "reason": reason,
                    "base_version": r.base_version,
                    "updates": [u.update_id for u in updates],
                },
            )
            self._open_next(db, r.model, r.round + 1, r.base_version)
        self._retries.pop((r.model, r.round), None)
        log.error("round %s of %s failed: %s", r.round, r.model, reason)

    def _exclude(
        self, r: Round, updates: Sequence[CommittedUpdate], problems: dict[str, str]
    ) -> None:
        """Drop updates whose spool files changed after they were acknowledged (audited)."""
        bad = [u for u in updates if u.payload_sha256 in problems]
        with self.store.transaction() as db:
            self.store.delete_updates(db, [u.update_id for u in bad])
            for u in bad:
                audit.append(
                    db,
                    "push.excluded",
                    "gateway",
                    f"{r.model}/round/{r.round}",
                    {
                        "update_id": u.update_id,
                        "trainer": u.trainer,
                        "reason": f"{problems[u.payload_sha256]} (changed since acknowledged)",
                    },
                )
        self.folder.unlink_unreferenced({u.payload_sha256 for u in bad})
        log.error(
            "round %s of %s: excluded corrupt updates %s",
            r.round,
            r.model,
            [u.update_id for u in bad],
        )

    def _reopen(self, r: Round, remaining: int) -> None:
        self._retries.pop((r.model, r.round), None)
        with self.store.transaction() as db:
            self.store.set_round_state(db, r.model, r.round, RoundState.OPEN)
            deadline = now_ms() + int(self.policy.round_seconds * 1000)
            self.store.extend_deadline(db, r.model, r.round, deadline)
            audit.append(
                db,
                "round.reopened",
                "gateway",
                f"{r.model}/round/{r.round}",
                {"remaining_trainers": remaining, "needed": max(self.policy.min_updates, 1)},
            )

    def strategy_for(self, model: str) -> Strategy:
        return self.folder.strategy_for(model)

    def _participants(self, r: Round) -> list[CommittedUpdate]:
        """The round's updates to fold: each trainer's first (ingest refuses a second one;
        a database from before that rule may hold more)."""
        first: dict[str, CommittedUpdate] = {}
        for u in self.store.round_updates(r.model, r.round):
            first.setdefault(u.trainer, u)
        return list(first.values())

    def _aggregate(self, served: ServedModel, r: Round) -> ClosedRound:
        """Fold the round, excluding corrupt updates (and folding again) until it folds, too
        few remain (the round reopens) or it is refused (CloseRefused)."""
        excluded = False
        while True:
            updates = self._participants(r)
            if not updates or (excluded and len(updates) < self.policy.min_updates):
                self._reopen(r, len(updates))
                raise PreconditionFailed(
                    f"round {r.round} of {r.model!r} reopened: updates of {len(updates)} "
                    f"trainers remain after corrupt ones were excluded (see the audit log); "
                    f"closing needs {max(self.policy.min_updates, 1)}"
                )
            try:
                return self.folder.fold(served, r, updates)
            except CorruptUpdates as exc:
                self._exclude(r, updates, exc.problems)
                excluded = True
