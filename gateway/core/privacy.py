"""A round's screening and central DP around the strategy: clip before, noise and account after.

Order (Andrew et al.; Flower's server-side DP wrappers): norms of the round's updates ->
screening (flag, and by policy drop, norm outliers; audited) -> clip each update to C
(Contribution.scale) -> the strategy aggregates -> Gaussian noise on the aggregate ->
adaptive C update -> one more round in the privacy ledger. The ledger and the clipping
state live in the version's state directory, like a strategy's own state. A DP version is
not reproducible byte for byte on a rerun: its noise is fresh by design.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sluice.gateway.core.aggregation import Contribution
from sluice.gateway.core.dp import (
    AdaptiveClipping,
    DpPolicy,
    GaussianNoise,
    PrivacyLedger,
    add_noise,
    clip_scales,
    dp_facts,
    noise_stddev,
    update_norms,
    with_scales,
)
from sluice.gateway.core.errors import PreconditionFailed
from sluice.gateway.core.records import CommittedUpdate
from sluice.gateway.core.screening import ScreeningPolicy, ScreeningResult, screen
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


class RoundPrivacy:
    def __init__(self, dp: DpPolicy | None, screening: ScreeningPolicy | None = None) -> None:
        self.dp = dp
        self.screening = screening or ScreeningPolicy()

    def prepare(
        self,
        schema: Schema,
        updates: Sequence[CommittedUpdate],
        contributions: Sequence[Contribution],
        state_in: Path | None,
    ) -> PreparedRound:
        norms = update_norms(schema, contributions)
        result = screen(norms, self.screening)
        kept = result.kept(list(contributions))
        if not kept:
            raise PreconditionFailed("screening dropped every update of the round")
        kept_norms = result.kept(norms)
        clipping = ledger = None
        if self.dp is not None:
            ledger, clipping = self._load(state_in)
            kept = with_scales(kept, clip_scales(kept_norms, clipping.clipping_norm))
        return PreparedRound(result.kept(list(updates)), kept, kept_norms, result, clipping, ledger)

    def _load(self, state_in: Path | None) -> tuple[PrivacyLedger, AdaptiveClipping]:
        assert self.dp is not None
        ledger, clipping = PrivacyLedger(), self.dp.initial_clipping()
        if state_in is not None and (state_in / LEDGER_FILE).exists():
            ledger = PrivacyLedger.from_json((state_in / LEDGER_FILE).read_text())
        if self.dp.adaptive and state_in is not None and (state_in / CLIPPING_FILE).exists():
            clipping = AdaptiveClipping.from_json((state_in / CLIPPING_FILE).read_text())
        return ledger, clipping

    def finish(
        self, schema: Schema, prepared: PreparedRound, out_path: Path, state_out: Path
    ) -> dict[str, object] | None:
        """Noise the aggregate in place and record the round; the DP facts, or None."""
        if self.dp is None:
            return None
        assert prepared.clipping is not None and prepared.ledger is not None
        total = sum(c.num_examples for c in prepared.contributions)
        weights = [c.num_examples / total for c in prepared.contributions]
        c_norm = prepared.clipping.clipping_norm
        stddev = noise_stddev(self.dp.model_noise_multiplier(), c_norm, weights)
        add_noise(schema, out_path, GaussianNoise(stddev))
        ledger = prepared.ledger.record(self.dp.noise_multiplier, self.dp.sampling_rate)
        (state_out / LEDGER_FILE).write_text(ledger.to_json())
        if self.dp.adaptive:
            (state_out / CLIPPING_FILE).write_text(
                prepared.clipping.updated(prepared.norms).to_json()
            )
        return {**dp_facts(ledger, self.dp, c_norm), "noise_stddev": stddev}
