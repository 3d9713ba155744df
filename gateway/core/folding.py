"""Fold one round into a version: the strategy over spool files checked as they are read, a
finite result, the release, and one commit; nothing of an uncommitted version stays."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from sluice.gateway.core.aggregation import Contribution
from sluice.gateway.core.catalog import ServedModel
from sluice.gateway.core.closing import (
    CloseRefused,
    CorruptUpdates,
    SpoolCheck,
    check_finite,
    deterministic,
    feed,
)
from sluice.gateway.core.fedbuff import FedBuffPolicy
from sluice.gateway.core.finite import FiniteCheck
from sluice.gateway.core.privacy import PreparedRound, RoundPrivacy
from sluice.gateway.core.records import (
    MAX_SAFE_INT,
    ClosedRound,
    CommittedUpdate,
    PublishOutcome,
    Round,
    RoundState,
    Version,
)
from sluice.gateway.core.scan import changed_since
from sluice.gateway.core.strategies.base import FedAvg, RoundInput, RoundReport, Strategy
from sluice.gateway.store import audit
from sluice.gateway.store.blobs import BlobStore, PieceHash, Proof
from sluice.gateway.store.sqlite import Store

log = logging.getLogger(__name__)

# Opens the round after a closed one, in the closing transaction: (db, model, round, base).
OpenNext = Callable[[sqlite3.Connection, str, int, int], None]


def now_ms() -> int:
    return int(time.time() * 1000)


class WeightsRead(Protocol):
    """Fed a new version's bytes, in order, as its adoption reads and hashes them."""

    def feed(self, data: bytes | memoryview) -> None: ...

    def proof(self) -> Callable[[], Proof]:
        """Once every byte was fed: checks that a file still holds those bytes (the
        version's blob, when the next close reads it as its base)."""
        ...


class Publisher(Protocol):
    def read_along(self) -> WeightsRead:
        """What to feed the version's bytes as the adoption hashes them, then hand to
        publish() (`read`): the publisher's record of the bytes behind the sha256."""

    def publish(
        self,
        model: ServedModel,
        version: Version,
        weights: Path,
        updates: Sequence[CommittedUpdate],
        dp: Mapping[str, object] | None = None,
        read: WeightsRead | None = None,
    ) -> PublishOutcome:
        """Write a release of these weights, or say why policy or the guard refused one."""

    def discard(self, model: str, version: int) -> None:
        """Remove what publish() wrote for a version that was then not committed."""

    def drop_orphans(self, released: set[tuple[str, int]]) -> list[Path]:
        """Remove release directories no release row names; returns them."""


class RoundFolder:
    """What a close does once the round's updates are chosen (RoundManager chooses them,
    and sorts out what a failure here means)."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        publisher: Publisher,
        privacy: RoundPrivacy,
        strategies: Mapping[str, Strategy],
        state_root: Path,
        open_next: OpenNext,
        fedbuff: FedBuffPolicy | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.publisher = publisher
        self.privacy = privacy  # screening always, DP when configured
        self.strategies = dict(strategies)  # model -> strategy; FedAvg when absent
        self.state_root = state_root
        self.fedbuff = fedbuff  # buffered asynchronous mode: stale updates weighted down
        self._open_next = open_next

    def strategy_for(self, model: str) -> Strategy:
        return self.strategies.get(model) or FedAvg()

    def state_dir(self, model: str, version: int) -> Path:
        """Server-side strategy state kept with a version (e.g. FedAdam's moments)."""
        return self.state_root / model / str(version)

    def unlink_unreferenced(self, shas: set[str]) -> None:
        with self.blobs.lock:
            for sha in shas - self.store.referenced_blobs():
                self.blobs.remove(self.blobs.path(sha))

    def _drop_uncommitted(self, sha: str) -> None:
        """A version blob placed (pinned) for a row that will not be committed."""
        self.blobs.unpin(sha)
        self._drop_unreferenced(sha)

    def _drop_unreferenced(self, sha: str) -> None:
        """Cleanup on a failing close: a store that fails here too (the fault that failed
        the close, likely) leaves the blob to the next start's orphan sweep, and the
        close's own error is the one raised."""
        try:
            self.unlink_unreferenced({sha})
        except Exception as exc:
            log.warning("could not drop the unreferenced blob %s: %s", sha[:12], exc)

    def fold(self, served: ServedModel, r: Round, updates: list[CommittedUpdate]) -> ClosedRound:
        """Fold these updates of round r into the next version and commit it with its
        release (or the reason there is none), opening the next round.

        Raises CorruptUpdates (spool files that are not what was acknowledged),
        CloseRefused (a reason that will not go away) or what storage raised; nothing
        written for the uncommitted version stays behind.
        """
        base = self.store.get_version(r.model, r.base_version)
        if base is None:
            raise CloseRefused(f"base version {r.base_version} of {r.model!r} is missing")
        total = sum(u.num_examples for u in updates)
        if total > MAX_SAFE_INT:
            raise CloseRefused(f"its updates sum to {total} examples; at most {MAX_SAFE_INT}")
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
        size = served.schema.payload_bytes
        # The updates' spool files are checked by the scan before the strategy (prepare);
        # the base's while the scan runs.
        spool = SpoolCheck(self.blobs, size, [base.weights_sha256])
        prepared: PreparedRound | None = None
        try:
            prepared = self.privacy.prepare(
                served.schema,
                updates,
                contributions,
                state_in if state_in.is_dir() else None,
                # FedAvg's fold reads every update once: it checks and measures them too,
                # against the tags their pushes recorded where this gateway holds them.
                in_fold=isinstance(strategy, FedAvg) and self.privacy.norms_may_wait,
                proofs=[self.blobs.proof(u.payload_sha256) for u in updates],
            )
            sha, report, dp, prepared, read = self._run_strategy(
                served, strategy, r, base, prepared, version_no, spool
            )
        except CorruptUpdates as exc:
            raise self._spoiled(base, {**exc.problems, **spool.problems()}) from None
        except Exception as exc:
            # A file truncated, removed or changed after its scan fails the strategy.
            problems = {
                **(changed_since(prepared.scanned) if prepared is not None else {}),
                **spool.problems(),
            }
            if not problems and prepared is not None and prepared.fold_scan is not None:
                problems = self.privacy.rescan(served.schema, prepared)
            if problems:
                raise self._spoiled(base, problems) from exc
            if deterministic(exc):
                raise CloseRefused(f"{type(exc).__name__}: {exc}") from exc
            raise
        try:
            folded_s = time.perf_counter() - started
            screened = [u.update_id for u in updates]  # the order screening's indices refer to
            updates = prepared.updates
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
            facts = {
                "version": version.version,
                "base_version": r.base_version,
                "weights_sha256": sha,
                "updates": [u.update_id for u in updates],
                "num_trainers": version.num_trainers,
                "num_regions": version.num_regions,
                "strategy": strategy.name,
                "strategy_facts": dict(report.facts),
                "screening": {**prepared.screening.facts(), "updates": screened},
                "dp": dp,
                "fold_s": round(folded_s, 3),
            }
            closed = self._publish(served, r, version, updates, facts, dp, read)
        except BaseException:
            # Nothing of a version that was not committed stays behind.
            self.blobs.unpin(sha)  # first: whatever fails below, no pin is left
            self.publisher.discard(r.model, version_no)
            shutil.rmtree(self.state_dir(r.model, version_no), ignore_errors=True)
            self._drop_unreferenced(sha)
            raise
        self.blobs.unpin(sha)  # its row is in: referred to from here on
        # The next close checks its base against the tags recorded as these bytes hashed
        # to its name (BlobStore.verify), instead of hashing it again.
        self.blobs.remember(sha, served.schema.payload_bytes, read.proof())
        log.info(
            "round %d of %s closed: %d updates -> version %d in %.2fs (aggregation %.2fs)%s",
            r.round,
            r.model,
            len(updates),
            version.version,
            time.perf_counter() - started,
            folded_s,
            "" if closed.released else f" (no release: {closed.refused})",
        )
        return closed

    def _publish(
        self,
        served: ServedModel,
        r: Round,
        version: Version,
        updates: Sequence[CommittedUpdate],
        facts: Mapping[str, object],
        dp: Mapping[str, object] | None,
        read: WeightsRead,
    ) -> ClosedRound:
        """Write the release (or record why not) and commit the version in one transaction."""
        weights = self.blobs.path(version.weights_sha256)
        outcome = self.publisher.publish(served, version, weights, updates, dp, read)
        release = outcome.release
        with self.store.transaction() as db:
            self.store.insert_version(db, version)
            audit.append(db, "round.closed", "gateway", f"{r.model}/round/{r.round}", facts)
            if release is not None:
                self.store.insert_release(db, release)
                audit.append(
                    db,
                    "release.published",
                    "gateway",
                    f"{r.model}/release/{version.version}",
                    {
                        "files": [f.__dict__ for f in release.files],
                        "stages_s": dict(outcome.stages),
                    },
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
        return ClosedRound(version, release is not None, outcome.refused)

    def _version_checks(
        self, served: ServedModel, what: str
    ) -> tuple[WeightsRead, Callable[[bytes | memoryview], None]]:
        """The checks a new version's bytes are fed, in order, as they are hashed to its
        name: finite, and the publisher's record of them (read_along)."""
        finite = FiniteCheck(served.schema)
        read = self.publisher.read_along()

        def inspect(data: bytes | memoryview) -> None:
            feed(finite, data, what)
            read.feed(data)  # the piece a worker hashes meanwhile

        return read, inspect

    def _spoiled(self, base: Version, problems: dict[str, str]) -> Exception:
        if base.weights_sha256 in problems:
            why = problems[base.weights_sha256].replace("its spool file", "its weights file")
            return CloseRefused(f"base version {base.version} is corrupt: {why}")
        return CorruptUpdates(problems)

    def _run_strategy(
        self,
        served: ServedModel,
        strategy: Strategy,
        r: Round,
        base: Version,
        prepared: PreparedRound,
        version_no: int,
        spool: SpoolCheck,
    ) -> tuple[str, RoundReport, dict[str, object] | None, PreparedRound, WeightsRead]:
        """Aggregate into a blob; the strategy's state goes to state/<model>/<version>.

        Nothing is adopted unless every spool file hashed to its name while the strategy
        read it, and the weights and the strategy's state are finite. The publisher's
        WeightsRead is fed the very pieces the adoption hashes to the blob's name.
        """
        state_in = self.state_dir(r.model, base.version)
        final_state = self.state_dir(r.model, version_no)
        staging = final_state.with_name(f".{version_no}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        out = self.blobs.temp_path()
        what = f"the aggregate of round {r.round}"
        read, inspect = self._version_checks(served, what)
        hashed = PieceHash(inspect)
        # A strategy that writes the aggregate front to back feeds every piece as it
        # writes: hashed, checked and tagged while the fold reads the next blocks, and the
        # file is not read again. With DP, the noise pass rewrites the file after it: what
        # the strategy wrote is tagged instead, the noise pass checks its reads against
        # those tags and feeds the noised pieces as it writes them.
        size = served.schema.payload_bytes
        strategy_tags = self.blobs.tagger() if self.privacy.dp is not None else None
        fed = [0]

        def tag_written(piece: memoryview) -> None:
            assert strategy_tags is not None
            strategy_tags.feed(piece)
            fed[0] += piece.nbytes

        tee: Callable[[memoryview], None] | None = hashed.feed
        if self.privacy.dp is not None:
            tee = tag_written if strategy_tags is not None else None
        adopted: list[str] = []  # the version's blob, once placed (pinned)
        try:
            try:
                # Overflow makes inf, refused below as a whole, not a warning half-way.
                with np.errstate(over="ignore", invalid="ignore"):
                    report = strategy.aggregate(
                        RoundInput(
                            schema=served.schema,
                            base_path=self.blobs.path(base.weights_sha256),
                            contributions=prepared.contributions,
                            server_round=r.round,
                            state_in=state_in if state_in.is_dir() else None,
                            scan=prepared.fold_scan,
                            written=tee,
                        ),
                        out,
                        staging,
                    )
                    if prepared.fold_scan is not None:
                        prepared = self.privacy.scanned_by_fold(prepared)
                    problems = {**changed_since(prepared.scanned), **spool.problems()}
                    if problems:
                        raise CorruptUpdates(problems)
                    proved = strategy_tags is not None and fed[0] == size  # every byte fed
                    dp = self.privacy.finish(  # before hashing
                        served.schema,
                        prepared,
                        out,
                        staging,
                        check=strategy_tags.proof()() if proved and strategy_tags else None,
                        written=hashed.feed if proved else None,
                    )
                for state in sorted(staging.glob("*.bin")):  # server optimizers' moments
                    check_finite(served.schema, state, f"the {strategy.name} state {state.name}")
                # Pinned until its row is in (fold): no row refers to it while the release is
                # built, and a push refused at its commit with the same bytes drops its blob.
                if hashed.size == size:  # fed whole, by the strategy or the noise pass
                    sha = self.blobs.adopt_written(out, hashed, pin=True)
                else:
                    # Written by a strategy that feeds nothing (or a store that tags nothing):
                    # read, hashed and checked whole, with checks fed nothing yet.
                    read, inspect = self._version_checks(served, what)
                    sha = self.blobs.adopt(out, inspect=inspect, pin=True)
                adopted.append(sha)
                shutil.rmtree(final_state, ignore_errors=True)  # a rerun after a crash
                staging.rename(final_state)
            finally:
                hashed.wait()  # no worker hashes a piece of a close that has ended
                out.unlink(missing_ok=True)
                shutil.rmtree(staging, ignore_errors=True)
            return sha, report, dp, prepared, read
        except BaseException:
            for sha in adopted:  # placed, but not handed to fold: dropped here
                self._drop_uncommitted(sha)
            raise
