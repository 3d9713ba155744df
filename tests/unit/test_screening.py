"""Update screening: a scaled update is an outlier by norm; a sign-flipped one is not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sluice.gateway.core.aggregation import Contribution
from sluice.gateway.core.dp import update_norms
from sluice.gateway.core.screening import ScreeningPolicy, screen
from sluice.models.schema import Schema, TensorSpec

SCHEMA = Schema(
    (
        TensorSpec("conv.weight", (16, 3, 3, 3), "<f4"),
        TensorSpec("bn.num_batches_tracked", (), "<i8"),
        TensorSpec("fc.weight", (10, 64), "<f4"),
    )
)


def spool(path: Path, scale: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {
        "conv.weight": (rng.standard_normal((16, 3, 3, 3)) * scale).astype("<f4"),
        "bn.num_batches_tracked": np.array(8, "<i8"),
        "fc.weight": (rng.standard_normal((10, 64)) * scale).astype("<f4"),
    }
    path.write_bytes(SCHEMA.flatten(arrays))
    return path


def negate(path: Path, out: Path) -> Path:
    views = SCHEMA.views(path.read_bytes())
    flipped = {k: -v if SCHEMA.tensors[i].is_float else v for i, (k, v) in enumerate(views.items())}
    out.write_bytes(SCHEMA.flatten(flipped))
    return out


def honest_round(tmp_path: Path) -> list[Contribution]:
    """Four honest trainers whose update sizes differ (different data, different steps)."""
    scales = [0.010, 0.013, 0.008, 0.011]
    return [Contribution(spool(tmp_path / f"u{i}.bin", s, i), 100) for i, s in enumerate(scales)]


def test_a_100x_scaled_update_is_flagged(tmp_path: Path) -> None:
    honest = honest_round(tmp_path)
    attacker = Contribution(spool(tmp_path / "scaled.bin", 0.010 * 100, 0), 100)
    contributions = [honest[0], honest[1], attacker, honest[2], honest[3]]
    norms = update_norms(SCHEMA, contributions)

    result = screen(norms)

    assert result.flagged == [2]
    assert result.dropped == []  # flag only, unless the policy drops
    assert "x the round's median" in result.reasons[2]
    assert result.kept(contributions) == contributions

    dropping = screen(norms, ScreeningPolicy(drop_outliers=True))
    assert dropping.flagged == dropping.dropped == [2]
    assert dropping.kept(contributions) == [c for c in contributions if c is not attacker]
    assert dropping.kept(norms) == [n for i, n in enumerate(norms) if i != 2]


def test_a_sign_flipped_update_is_not_flagged_by_norm(tmp_path: Path) -> None:
    """Negating a delta keeps its norm exactly: norm screening cannot see a sign flip.
    Robust strategies (median, Krum, Bulyan) are the answer to that attack."""
    honest = honest_round(tmp_path)
    flipped = Contribution(negate(honest[0].path, tmp_path / "flipped.bin"), 100)
    contributions = [*honest, flipped]
    norms = update_norms(SCHEMA, contributions)

    assert norms[-1] == norms[0]
    result = screen(norms, ScreeningPolicy(drop_outliers=True))
    assert result.flagged == result.dropped == []


def test_honest_spread_is_not_flagged() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        # Norms spread like honest updates: log-normal, a factor ~1.35 either way.
        norms = list(np.exp(rng.normal(0.0, 0.3, size=int(rng.integers(3, 40)))))
        assert screen(norms).flagged == []


def test_too_few_updates_for_a_rule() -> None:
    assert screen([1.0, 100.0]).flagged == []
    assert screen([1.0, 1.1, 100.0]).flagged == [2]
    assert screen([1.0, 1.1, 100.0], ScreeningPolicy(min_updates=4)).flagged == []


def test_identical_norms_need_the_ratio_too() -> None:
    """MAD 0 makes every deviation an infinite z-score; the ratio keeps 1.5x unflagged."""
    assert screen([2.0, 2.0, 2.0, 2.0, 3.0]).flagged == []
    assert screen([2.0, 2.0, 2.0, 2.0, 20.0]).flagged == [4]
    assert screen([0.0, 0.0, 0.0, 1.0]).flagged == [3]  # a median of 0 does not divide


def test_small_norms_are_not_flagged() -> None:
    assert screen([1.0, 1.1, 0.9, 1.05, 1e-6]).flagged == []


def test_an_infinite_norm_is_always_flagged() -> None:
    result = screen([math.inf, 1.0], ScreeningPolicy(drop_outliers=True))
    assert result.flagged == result.dropped == [0]
    assert "not finite" in result.reasons[0]


def test_facts_are_json_for_the_audit_log() -> None:
    result = screen([1.0, 1.2, 0.9, 50.0], ScreeningPolicy(drop_outliers=True))
    facts = json.loads(json.dumps(result.facts()))
    assert facts["flagged"] == facts["dropped"] == [3]
    assert set(facts["reasons"]) == {"3"}


@pytest.mark.parametrize("factor", [10.0, 100.0, 1e4])
def test_scaled_update_flagged_among_many(factor: float) -> None:
    rng = np.random.default_rng(int(factor))
    norms = list(np.exp(rng.normal(0.0, 0.3, size=20)))
    norms[7] *= factor
    assert screen(norms).flagged == [7]
