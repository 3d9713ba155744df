"""A round's screening and central DP around the strategy: clip before, noise and account after.

Order (Andrew et al.; Flower's server-side DP wrappers): norms of the round's updates ->
screening (flag, and by policy drop, norm outliers; audited) -> clip each update to C
(Contribution.scale) -> the strategy aggregates -> Gaussian noise on the aggregate ->
adaptive C update -> one more round in the privacy ledger. The ledger and the clipping
state live in the version's state directory, like a strategy's own state. A DP version is
not reproducible byte for byte on a rerun: its noise is fresh by design.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from sluice.gateway.core.aggregation import Contribution, FoldScan
from sluice.gateway.core.closing import CorruptUpdates
from sluice.gateway.core.dp import (
    AdaptiveClipping,
    DpPolicy,
    GaussianNoise,
    PrivacyLedger,
    add_noise,
    clip_scales,
    dp_facts,
    noise_stddev,
    with_scales,
)
from sluice.gateway.core.errors import PreconditionFailed
from sluice.gateway.core.records import CommittedUpdate
from sluice.gateway.core.scan import Stamp, scan_updates, stamp_of
from sluice.gateway.core.screening import ScreeningPolicy, ScreeningResult, screen
from sluice.gateway.store.blobs import Proof
from sluice.models.schema import Schema

LEDGER_FILE = "dp_ledger.json"
CLIPPING_FILE = "dp_clipping.json"


@dataclass(frozen=True)
class PreparedRound:
    updates: list[CommittedUpdate]  # those that take part (screening may drop some)
    contributions: list[Contribution]  # with clipping folded into their scale
    norms: list[float]
    screening: ScreeningResult
    clipping: AdaptiveClipping | None  # the clipping state this round used (DP only)
    ledger: PrivacyLedger | None  # the lineage before this round (DP only)
    # sha256 -> (spool file, its stamp when scanned): checked again after the strategy
    scanned: Mapping[str, tuple[Path, Stamp]] = field(default_factory=dict)
    # Filled by the strategy's fold where the norms wait for it (prepare(in_fold=True))
    fold_scan: FoldScan | None = None


class RoundPrivacy:
    def __init__(self, dp: DpPolicy | None, screening: ScreeningPolicy | None = None) -> None:
        self.dp = dp
        self.screening = screening or ScreeningPolicy()

    @property
    def norms_may_wait(self) -> bool:
        """Whether nothing before the strategy needs the norms (no clipping, no dropping):
        then a strategy that reads every update once can measure them as it reads."""
        return self.dp is None and not self.screening.drop_outliers

    def prepare(
        self,
        schema: Schema,
        updates: Sequence[CommittedUpdate],
        contributions: Sequence[Contribution],
        state_in: Path | None,
        *,
        in_fold: bool = False,
        proofs: Sequence[Proof | None] = (),
    ) -> PreparedRound:
        """Norms, screening and clipping before the strategy. `in_fold` (only where
        norms_may_wait): the strategy's fold hashes and measures the updates as it reads
        them (PreparedRound.fold_scan; then `scanned_by_fold`), and only their sizes are
        checked here. Where an update has a proof (BlobStore.proof, in `proofs` by
        update), the fold's read or the scan's checks it against that instead of hashing
        it."""
        if in_fold:
            if not self.norms_may_wait:
                raise ValueError("the norms are needed before the fold")
            return self._before_fold(schema, updates, contributions, proofs)
        # The round's one read of each update before the strategy's: its norm, and the
        # spool check (a file that is not what was acknowledged is left out of a rerun).
        scans = scan_updates(
            schema,
            [c.path for c in contributions],
            [u.payload_sha256 for u in updates],
            proofs=list(proofs) or None,
        )
        problems = {
            u.payload_sha256: s.problem for u, s in zip(updates, scans, strict=True) if s.problem
        }
        if problems:
            raise CorruptUpdates(problems)
        norms = [s.norm for s in scans]
        scanned = {
            u.payload_sha256: (c.path, s.stamp)
            for u, c, s in zip(updates, contributions, scans, strict=True)
            if s.stamp is not None
        }
        result = screen(norms, self.screening)
        kept = result.kept(list(contributions))
        if not kept:
            raise PreconditionFailed("screening dropped every update of the round")
        kept_norms = result.kept(norms)
        clipping = ledger = None
        if self.dp is not None:
            ledger, clipping = self._load(state_in)
            kept = with_scales(kept, clip_scales(kept_norms, clipping.clipping_norm))
        return PreparedRound(
            result.kept(list(updates)), kept, kept_norms, result, clipping, ledger, scanned
        )

    def _before_fold(
        self,
        schema: Schema,
        updates: Sequence[CommittedUpdate],
        contributions: Sequence[Contribution],
        proofs: Sequence[Proof | None],
    ) -> PreparedRound:
        problems, scanned = {}, {}
        for u, c in zip(updates, contributions, strict=True):
            try:
                st = os.stat(c.path)
            except FileNotFoundError:
                problems[u.payload_sha256] = "its spool file is missing"
                continue
            if st.st_size != schema.payload_bytes:
                problems[u.payload_sha256] = (
                    f"its spool file is {st.st_size} bytes, expected {schema.payload_bytes}"
                )
            scanned[u.payload_sha256] = (c.path, stamp_of(st))
        if problems:
            raise CorruptUpdates(problems)
        return PreparedRound(
            list(updates),
            list(contributions),
            [],
            ScreeningResult([], [], {}),
            None,
            None,
            scanned,
            FoldScan(len(contributions), proofs),
        )

    def rescan(self, schema: Schema, prepared: PreparedRound) -> dict[str, str]:
        """After a fold that scanned its updates failed: which of them are not what was
        acknowledged (one read of each: a file the fold could not read, EIO, is named here
        and left out of the rerun instead of failing every retry the same way)."""
        scans = scan_updates(
            schema,
            [c.path for c in prepared.contributions],
            [u.payload_sha256 for u in prepared.updates],
        )
        return {
            u.payload_sha256: s.problem
            for u, s in zip(prepared.updates, scans, strict=True)
            if s.problem
        }

    def scanned_by_fold(self, prepared: PreparedRound) -> PreparedRound:
        """The round once its fold has hashed and measured its updates: CorruptUpdates for
        those that were not what was acknowledged, else the screening of their norms."""
        scan = prepared.fold_scan
        assert scan is not None
        problems = {
            u.payload_sha256: why
            for i, u in enumerate(prepared.updates)
            if (why := scan.problem(i, u.payload_sha256))
        }
        if problems:
            raise CorruptUpdates(problems)
        norms = [scan.norm(i) for i in range(len(prepared.updates))]
        result = screen(norms, self.screening)
        assert not result.dropped  # norms_may_wait: nothing is dropped
        return replace(prepared, norms=norms, screening=result, fold_scan=None)

    def _load(self, state_in: Path | None) -> tuple[PrivacyLedger, AdaptiveClipping]:
        assert self.dp is not None
        ledger, clipping = PrivacyLedger(), self.dp.initial_clipping()
        if state_in is not None and (state_in / LEDGER_FILE).exists():
            ledger = PrivacyLedger.from_json((state_in / LEDGER_FILE).read_text())
        if self.dp.adaptive and state_in is not None and (state_in / CLIPPING_FILE).exists():
            clipping = AdaptiveClipping.from_json((state_in / CLIPPING_FILE).read_text())
        return ledger, clipping

    def finish(
        self,
        schema: Schema,
        prepared: PreparedRound,
        out_path: Path,
        state_out: Path,
        check: Proof | None = None,
        written: Callable[[memoryview], None] | None = None,
    ) -> dict[str, object] | None:
        """Noise the aggregate in place and record the round; the DP facts, or None.
        `check` and `written`: as in dp.add_noise (what the strategy wrote, proved; the
        noised result, fed as it is written)."""
        if self.dp is None:
            return None
        assert prepared.clipping is not None and prepared.ledger is not None
        total = sum(c.num_examples for c in prepared.contributions)
        weights = [c.num_examples / total for c in prepared.contributions]
        c_norm = prepared.clipping.clipping_norm
        stddev = noise_stddev(self.dp.model_noise_multiplier(), c_norm, weights)
        add_noise(schema, out_path, GaussianNoise(stddev), check=check, written=written)
        ledger = prepared.ledger.record(self.dp.noise_multiplier, self.dp.sampling_rate)
        (state_out / LEDGER_FILE).write_text(ledger.to_json())
        if self.dp.adaptive:
            (state_out / CLIPPING_FILE).write_text(
                prepared.clipping.updated(prepared.norms).to_json()
            )
        return {**dp_facts(ledger, self.dp, c_norm), "noise_stddev": stddev}
