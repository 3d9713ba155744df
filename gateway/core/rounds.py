"""Rounds: open, count commits, close on quorum or deadline, fold into a new version, publish."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.core.aggregation import Contribution
from gateway.core.catalog import Catalog, ServedModel
from gateway.core.errors import NotFound, PreconditionFailed
from gateway.core.fedbuff import FedBuffPolicy
from gateway.core.privacy import PreparedRound, RoundPrivacy
from gateway.core.records import (
    ClosedRound,
    CommittedUpdate,
    PublishOutcome,
    Round,
    RoundState,
    Version,
)
from gateway.core.strategies.base import FedAvg, RoundInput, RoundReport, Strategy
from gateway.store import audit
from gateway.store.blobs import BlobStore
from gateway.store.sqlite import Store

log = logging.getLogger(__name__)


RETRY_SECONDS = 5.0  # a failed close (disk full, a publish error) is retried this often


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RoundPolicy:
    quorum: int = 4  # close as soon as this many updates are committed
    min_updates: int = 1  # at the deadline, close only with at least this many
    round_seconds: float = 600.0  # deadline, counted from the round's opening


class Publisher(Protocol):
    def publish(
        self,
        model: ServedModel,
        version: Version,
        weights: Path,
        updates: Sequence[CommittedUpdate],
        dp: Mapping[str, object] | None = None,
    ) -> PublishOutcome:
        """Write a release of these weights, or say why policy or the guard refused one."""


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
    ) -> None:
        self.privacy = privacy or RoundPrivacy(None)  # screening always, DP when configured
        self.fedbuff = fedbuff  # buffered asynchronous mode: stale updates weighted down
        self.strategies = dict(strategies or {})  # model -> strategy; FedAvg when absent
        unknown = set(self.strategies) - set(catalog.names())
        if unknown:
            raise ValueError(f"strategies configured for models not served: {sorted(unknown)}")
        self.state_root = state_root or blobs.root.parent / "state"
        self.store = store
        self.blobs = blobs
        self.catalog = catalog
        self.policy = policy
        self.publisher = publisher
        self._close_lock = threading.Lock()
        self._retry_at: dict[tuple[str, int], float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # life cycle

    def bootstrap(self) -> None:
        """Create version 0 and round 1 for new models; finish closes a crash interrupted."""
        for served in self.catalog:
            if self.store.latest_version(served.name) is None:
                self._create_initial_version(served)
        for r in self.store.rounds_in_state(RoundState.AGGREGATING):
            log.warning("finishing round %s of %s interrupted by a restart", r.round, r.model)
            try:
                self.close(r.model, r.round, force=True)
            except Exception:  # the gateway still starts; the worker retries the close
                log.exception("round %s of %s could not be closed yet", r.round, r.model)

    def _create_initial_version(self, served: ServedModel) -> None:
        module = served.entry.build(served.entry.init_seed)
        sha = self.blobs.write(served.schema.tensor_bytes(module.state_dict()))
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
                        self.blobs.path(u.payload_sha256).unlink(missing_ok=True)
            return [u.update_id for u in dropped]

    def note_commit(self, model: str, round_no: int) -> None:
        """Called after an update commits: wake the worker when the quorum is reached."""
        r = self.store.get_round(model, round_no)
        if r is not None and r.accepted >= self.policy.quorum:
            self._wake.set()

    def tick(self) -> None:
        """Close every open round that reached its quorum, or its deadline with enough updates;
        retry (at most every RETRY_SECONDS) a close that failed half-way."""
        for stuck in self.store.rounds_in_state(RoundState.AGGREGATING):
            key = (stuck.model, stuck.round)
            if time.monotonic() >= self._retry_at.get(key, 0.0):
                self._retry_at[key] = time.monotonic() + RETRY_SECONDS
                self.close(stuck.model, stuck.round, force=True)
        for served in self.catalog:
            r = self.store.latest_round(served.name)
            if r is None or r.state != RoundState.OPEN:
                continue
            due = now_ms() >= r.deadline_ms
            if r.accepted >= self.policy.quorum or (due and r.accepted >= self.policy.min_updates):
                self.close(r.model, r.round)
            elif due:
                # Too few updates by the deadline: keep the round open another period.
                with self.store.transaction() as db:
                    extended = now_ms() + int(self.policy.round_seconds * 1000)
                    self.store.extend_deadline(db, r.model, r.round, extended)

    def close(self, model: str, round_no: int, force: bool = False) -> ClosedRound:
        """Close a round and fold its updates into the next version (idempotent)."""
        with self._close_lock:
            r = self.store.get_round(model, round_no)
            if r is None:
                raise NotFound(f"round {round_no} of {model!r} does not exist")
            if r.state == RoundState.CLOSED and r.version is not None:
                v = self.store.get_version(model, r.version)
                if v is not None:
                    released = self.store.get_release(model, v.version) is not None
                    return ClosedRound(v, released, "" if released else "see the audit log")
            if r.state == RoundState.OPEN:
                if r.accepted < max(self.policy.min_updates, 1) and not force:
                    raise PreconditionFailed(
                        f"round {round_no} of {model!r} has {r.accepted} updates; "
                        f"closing needs at least {max(self.policy.min_updates, 1)}"
                    )
                with self.store.transaction() as db:
                    self.store.set_round_state(db, model, round_no, RoundState.AGGREGATING)
            return self._aggregate(self.catalog.get(model), r)

    def strategy_for(self, model: str) -> Strategy:
        return self.strategies.get(model) or FedAvg()

    def state_dir(self, model: str, version: int) -> Path:
        """Server-side strategy state kept with a version (e.g. FedAdam's moments)."""
        return self.state_root / model / str(version)

    def _run_strategy(
        self,
        served: ServedModel,
        strategy: Strategy,
        r: Round,
        base: Version,
        prepared: PreparedRound,
        version_no: int,
    ) -> tuple[str, RoundReport, dict[str, object] | None]:
        """Aggregate into a blob; the strategy's state goes to state/<model>/<version>."""
        state_in = self.state_dir(r.model, base.version)
        final_state = self.state_dir(r.model, version_no)
        staging = final_state.with_name(f".{version_no}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        out = self.blobs.temp_path()
        try:
            report = strategy.aggregate(
                RoundInput(
                    schema=served.schema,
                    base_path=self.blobs.path(base.weights_sha256),
                    contributions=prepared.contributions,
                    server_round=r.round,
                    state_in=state_in if state_in.is_dir() else None,
                ),
                out,
                staging,
            )
            dp = self.privacy.finish(served.schema, prepared, out, staging)  # before hashing
            sha = self.blobs.adopt(out)
            shutil.rmtree(final_state, ignore_errors=True)  # a rerun after a crash
            staging.rename(final_state)
        finally:
            out.unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        return sha, report, dp

    def _aggregate(self, served: ServedModel, r: Round) -> ClosedRound:
        updates = self.store.round_updates(r.model, r.round)
        if not updates:
            raise PreconditionFailed(f"round {r.round} of {r.model!r} has no updates to fold")
        base = self.store.get_version(r.model, r.base_version)
        if base is None:
            raise NotFound(f"base version {r.base_version} of {r.model!r} is missing")
        started = time.perf_counter()
        contributions = [
            Contribution(
                self.blobs.path(u.payload_sha256),
                u.num_examples,
                self.fedbuff.weight(r.base_version - u.base_version) if self.fedbuff else 1.0,
            )
            for u in updates
        ]
        strategy = self.strategy_for(r.model)
        latest = self.store.latest_version(r.model)
        version_no = (latest.version if latest else 0) + 1
        state_in = self.state_dir(r.model, base.version)
        prepared = self.privacy.prepare(
            served.schema, updates, contributions, state_in if state_in.is_dir() else None
        )
        updates = prepared.updates
        sha, report, dp = self._run_strategy(served, strategy, r, base, prepared, version_no)
        folded_s = time.perf_counter() - started
        version = Version(
            model=r.model,
            version=version_no,
            round=r.round,
            weights_sha256=sha,
            num_trainers=len({u.trainer for u in updates}),
            num_regions=len({u.region for u in updates}),
            num_examples=sum(u.num_examples for u in updates),
            created_ms=now_ms(),
        )
        outcome = self.publisher.publish(served, version, self.blobs.path(sha), updates, dp)
        release = outcome.release
        with self.store.transaction() as db:
            self.store.insert_version(db, version)
            audit.append(
                db,
                "round.closed",
                "gateway",
                f"{r.model}/round/{r.round}",
                {
                    "version": version.version,
                    "base_version": r.base_version,
                    "weights_sha256": sha,
                    "updates": [u.update_id for u in updates],
                    "num_trainers": version.num_trainers,
                    "num_regions": version.num_regions,
                    "strategy": strategy.name,
                    "strategy_facts": dict(report.facts),
                    "screening": prepared.screening.facts(),
                    "dp": dp,
                },
            )
            if release is not None:
                self.store.insert_release(db, release)
                audit.append(
                    db,
                    "release.published",
                    "gateway",
                    f"{r.model}/release/{version.version}",
                    {"files": [f.__dict__ for f in release.files]},
                )
            else:
                audit.append(
                    db,
                    "release.refused",
                    "gateway",
                    f"{r.model}/release/{version.version}",
                    {"reason": outcome.refused},
                )
            self.store.set_round_state(
                db, r.model, r.round, RoundState.CLOSED, closed_ms=now_ms(), version=version.version
            )
            self._open_next(db, r.model, r.round + 1, version.version)
        log.info(
            "round %d of %s closed: %d updates -> version %d in %.2fs (aggregation %.2fs)%s",
            r.round,
            r.model,
            len(updates),
            version.version,
            time.perf_counter() - started,
            folded_s,
            "" if release else f" (no release: {outcome.refused})",
        )
        return ClosedRound(version, release is not None, outcome.refused)
