"""Central DP: norms, clipping, adaptive clipping and noise against Flower; the RDP accountant."""

from __future__ import annotations

import dataclasses
import json
import math
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sluice.gateway.core.aggregation import Contribution, fold_fedavg
from sluice.gateway.core.dp import (
    AdaptiveClipping,
    DpPolicy,
    DpRound,
    GaussianNoise,
    PrivacyLedger,
    adaptive_noise_multiplier,
    add_noise,
    clip_scales,
    dp_facts,
    noise_stddev,
    update_norms,
    with_scales,
)
from sluice.gateway.core.scan import SCAN_WORKERS
from sluice.gateway.export.guard import GuardPolicy, GuardRefused, ReleaseFacts, check_policy
from sluice.gateway.store.direct import window_bytes
from sluice.models.schema import Schema, TensorSpec

with warnings.catch_warnings():
    # flwr 1.42 imports typer 0.20, which imports click.utils names that click 8.5
    # deprecates; not our code, and only at import time.
    warnings.filterwarnings("ignore", r"'click\.utils\.\w+' is deprecated", DeprecationWarning)
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
    from flwr.supercore.differential_privacy import (
        adaptive_clip_inputs_inplace,
        clip_inputs_inplace,
        compute_adaptive_noise_params,
        compute_stdv,
    )

# Every dtype a schema may hold, tensors split across blocks, a 0-d and an empty one.
SCHEMA = Schema(
    (
        TensorSpec("conv.weight", (8, 3, 3, 3), "<f4"),
        TensorSpec("bn.num_batches_tracked", (), "<i8"),
        TensorSpec("half", (333,), "<f2"),
        TensorSpec("big", (3, 1001), "<f4"),
        TensorSpec("counts", (301,), "<i8"),
        TensorSpec("double", (77,), "<f8"),
        TensorSpec("temperature", (), "<f4"),
        TensorSpec("empty", (0,), "<f4"),
    )
)
SMALL_BLOCK_BYTES = 1000  # splits "big", "half" and "counts"; not a multiple of 8


def deltas(seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for spec in SCHEMA.tensors:
        values: np.ndarray
        if spec.is_float:
            values = rng.standard_normal(spec.shape) * scale
        else:
            values = rng.integers(-50, 50, spec.shape)
        out[spec.name] = np.asarray(values, dtype=spec.dtype)
    return out


def spool(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.write_bytes(SCHEMA.flatten(arrays))
    return path


def float_values(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Every float element in schema order, as float64: what a norm is taken over."""
    parts = [arrays[s.name].astype(np.float64).ravel() for s in SCHEMA.tensors if s.is_float]
    return np.concatenate(parts)


# --- norms and clipping --------------------------------------------------------------


@pytest.mark.parametrize("block_bytes", [SMALL_BLOCK_BYTES, 8 << 20])
def test_norms_match_numpy_on_spooled_files(tmp_path: Path, block_bytes: int) -> None:
    updates = [deltas(seed, scale) for seed, scale in enumerate([0.01, 1.0, 3e-5, 0.2])]
    updates.append({k: np.zeros_like(v) for k, v in updates[0].items()})
    contributions = [
        Contribution(spool(tmp_path / f"u{i}.bin", u), 10) for i, u in enumerate(updates)
    ]

    norms = update_norms(SCHEMA, contributions, block_bytes)

    expected = [float(np.linalg.norm(float_values(u))) for u in updates]
    np.testing.assert_allclose(norms, expected, rtol=1e-12)
    assert norms[-1] == 0.0


def test_norms_stay_within_a_few_blocks(tmp_path: Path) -> None:
    schema = Schema((TensorSpec("w", (4 << 20,), "<f4"),))  # 16 MiB per update
    contributions = [
        Contribution(spool_raw(tmp_path / f"u{i}.bin", np.full(4 << 20, i + 1, "<f4")), 1)
        for i in range(4)
    ]
    tracemalloc.start()
    try:
        norms = update_norms(schema, contributions, 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Per worker two 1 MiB read windows (and the pages around them) and a float64 block,
    # and a little more.
    limit = SCAN_WORKERS * (2 * window_bytes(1 << 20) + (1 << 20)) + (1 << 20)
    assert peak < limit, f"peak {peak / 2**20:.1f} MiB for 4 updates of 16 MiB"
    np.testing.assert_allclose(norms, [(i + 1) * 2048 for i in range(4)], rtol=1e-12)


def spool_raw(path: Path, values: np.ndarray) -> Path:
    values.tofile(path)
    return path


def test_norms_run_blas_on_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside the spool checks' hashing threads a second BLAS thread only spins (a 404 MB
    norm pass: 0.6-0.7 s that way, 0.15-0.2 s on one): every dot runs under the fold's limit,
    and the limit is given back after."""
    from sluice.gateway.core.aggregation import _blas

    def threads() -> list[int]:
        return [lib["num_threads"] for lib in _blas().info()]

    before = threads()
    seen: list[list[int]] = []
    real_dot = np.dot

    def dot(a: Any, b: Any) -> Any:
        seen.append(threads())
        return real_dot(a, b)

    monkeypatch.setattr(np, "dot", dot)  # the module core/dp.py calls it through
    path = spool(tmp_path / "u.bin", deltas(1, scale=0.5))
    (norm,) = update_norms(SCHEMA, [Contribution(path, 1)], 4096)
    monkeypatch.undo()
    assert seen and all(set(t) == {1} for t in seen)
    assert threads() == before
    assert norm == pytest.approx(update_norms(SCHEMA, [Contribution(path, 1)])[0])


def test_clip_scales() -> None:
    assert clip_scales([0.0, 0.5, 1.0, 2.0, 8.0], 1.0) == [1.0, 1.0, 1.0, 0.5, 0.125]
    with pytest.raises(ValueError, match="clipping_norm"):
        clip_scales([1.0], 0.0)


def test_clipping_through_the_fold_matches_flower(tmp_path: Path) -> None:
    """Contribution.scale clips as the fold reads, as Flower's clip_inputs_inplace does."""
    update = deltas(1, scale=0.5)
    path = spool(tmp_path / "u.bin", update)
    zero = spool(tmp_path / "zero.bin", {k: np.zeros_like(v) for k, v in update.items()})
    (norm,) = update_norms(SCHEMA, [Contribution(path, 1)])
    clipping_norm = norm / 7
    (scale,) = clip_scales([norm], clipping_norm)
    stale = Contribution(path, 1, scale=0.5)  # FedBuff's staleness weight stays

    (clipped,) = with_scales([Contribution(path, 1)], [scale])
    assert with_scales([stale], [scale])[0].scale == 0.5 * scale
    folded = SCHEMA.views(b"".join(fold_fedavg(SCHEMA, zero, [clipped])))

    floats = [spec for spec in SCHEMA.tensors if spec.is_float]
    flower = [update[spec.name].astype(np.float64) for spec in floats]
    clip_inputs_inplace(flower, clipping_norm)
    for spec, expected in zip(floats, flower, strict=True):
        rtol = 2e-3 if spec.dtype == "<f2" else 1e-6  # the fold scales in the tensor's dtype
        np.testing.assert_allclose(folded[spec.name], expected, rtol=rtol, atol=1e-7)
    assert math.isclose(float(np.linalg.norm(float_values(folded))), clipping_norm, rel_tol=1e-3)


# --- adaptive clipping ---------------------------------------------------------------


def flower_adaptive(
    initial: float, target: float, lr: float
) -> DifferentialPrivacyServerSideAdaptiveClipping:
    # noise_multiplier 0: Flower sets clipped_count_stddev to 0, so its count is exact.
    return DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(),
        0.0,
        10,
        initial_clipping_norm=initial,
        target_clipped_quantile=target,
        clip_norm_lr=lr,
    )


@pytest.mark.parametrize(
    ("norms", "initial", "target", "lr"),
    [
        ([0.5, 0.7, 1.1, 1.3, 2.0], 1.0, 0.5, 0.2),
        ([0.1, 0.2, 0.3], 1.0, 0.9, 0.5),
        ([3.0, 4.0, 5.0, 6.0], 1.0, 0.2, 0.2),
        ([1.0, 1.0, 2.0], 1.0, 0.5, 1.0),  # norm == C counts as unclipped
    ],
)
def test_adaptive_step_is_flowers_geometric_update_of_the_unclipped_fraction(
    norms: list[float], initial: float, target: float, lr: float
) -> None:
    ours = AdaptiveClipping(initial, target, lr, 0.0).updated(norms, np.random.default_rng(0))

    flower = flower_adaptive(initial, target, lr)
    unclipped = sum(
        not adaptive_clip_inputs_inplace([np.array([n])], flower.clipping_norm) for n in norms
    )
    flower._geometric_update(flower._noisy_fraction(unclipped, len(norms)))
    assert ours.clipping_norm == pytest.approx(flower.clipping_norm, rel=1e-12)


def test_adaptive_clipping_tracks_the_target_quantile_where_flowers_runs_away() -> None:
    """Flower 1.42 feeds its geometric update the fraction of updates it *clipped*
    (norm_bit = scaling_factor < 1), so a C below the target quantile shrinks further and
    one above it grows: the fixed point repels. Andrew et al. and TF Privacy's
    QuantileEstimatorQuery use the unclipped fraction, and C settles at the quantile."""
    norms = list(np.linspace(0.5, 1.5, 10))  # median between 0.944 and 1.056
    for initial in (0.2, 0.9, 1.1, 5.0):
        ours = AdaptiveClipping(initial, target_quantile=0.5, clip_norm_lr=0.2)
        flower = flower_adaptive(initial, 0.5, 0.2)
        for _ in range(50):
            ours = ours.updated(norms, np.random.default_rng(0))
            clipped = sum(
                adaptive_clip_inputs_inplace([np.array([n])], flower.clipping_norm) for n in norms
            )
            flower._geometric_update(flower._noisy_fraction(clipped, len(norms)))
        assert 0.9 < ours.clipping_norm < 1.1, initial
        assert flower.clipping_norm < 0.05 or flower.clipping_norm > 50, initial


def test_adaptive_count_noise_is_seeded_and_clamped() -> None:
    state = AdaptiveClipping(1.0, 0.5, 0.2, clipped_count_stddev=2.0)
    norms = [0.5, 0.8, 1.5, 2.0]  # 2 of 4 unclipped
    draw = float(np.random.default_rng(7).standard_normal())
    expected = min(1.0, max(0.0, (2 + 2.0 * draw) / 4))
    assert state.unclipped_fraction(norms, np.random.default_rng(7)) == expected
    loud = AdaptiveClipping(1.0, clipped_count_stddev=1e6)
    fractions = {loud.unclipped_fraction(norms, np.random.default_rng(s)) for s in range(20)}
    assert fractions == {0.0, 1.0}  # TF Privacy clamps the noised fraction too


def test_adaptive_state_json_round_trip() -> None:
    state = AdaptiveClipping(0.731, 0.6, 0.3, 1.25)
    again = AdaptiveClipping.from_json(state.to_json())
    assert again == state
    nxt = state.updated([0.1, 5.0, 7.0])
    assert AdaptiveClipping.from_json(nxt.to_json()) == nxt


@pytest.mark.parametrize(("z", "sigma_b"), [(1.0, 5.0), (0.5, 0.3), (2.0, 1.5), (0.0, 0.0)])
def test_adaptive_noise_multiplier_matches_flower(z: float, sigma_b: float) -> None:
    _, flower = compute_adaptive_noise_params(z, 100, sigma_b)
    assert adaptive_noise_multiplier(z, sigma_b) == pytest.approx(flower, rel=1e-12)


def test_adaptive_policy_refuses_a_count_noise_too_small_for_z() -> None:
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        DpPolicy(1.0, 1.0, max_epsilon=8.0, adaptive=True, clipped_count_stddev=0.25)
    with pytest.raises(ValueError):  # Flower refuses the same setting
        compute_adaptive_noise_params(1.0, 5, 0.25)
    policy = DpPolicy(1.0, 1.0, max_epsilon=8.0, adaptive=True, clipped_count_stddev=5.0)
    assert policy.model_noise_multiplier() == pytest.approx((1 - 0.01) ** -0.5)
    assert policy.initial_clipping().clipped_count_stddev == 5.0


# --- noise ---------------------------------------------------------------------------


def zero_payload(tmp_path: Path, name: str, schema: Schema = SCHEMA) -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(schema.payload_bytes))
    return path


def test_noise_std_is_flowers_for_equal_weights() -> None:
    for z, c, m in [(1.0, 0.1, 10), (0.7, 8.2, 3), (2.5, 1.0, 100)]:
        assert noise_stddev(z, c, [1 / m] * m) == pytest.approx(compute_stdv(z, c, m), rel=1e-12)
    # Unequal weights: the largest bounds what one update can move the mean.
    assert noise_stddev(1.0, 2.0, [0.1, 0.6, 0.3]) == pytest.approx(1.2)


@pytest.mark.parametrize("block_bytes", [SMALL_BLOCK_BYTES, 8 << 20])
def test_noise_changes_float_tensors_only(tmp_path: Path, block_bytes: int) -> None:
    arrays = deltas(3)
    path = spool(tmp_path / "agg.bin", arrays)

    add_noise(SCHEMA, path, GaussianNoise(0.05), block_bytes)

    noised = SCHEMA.views(path.read_bytes())
    for spec in SCHEMA.tensors:
        if not spec.is_float:
            np.testing.assert_array_equal(noised[spec.name], arrays[spec.name])
        elif spec.num_elements:
            moved = noised[spec.name] != arrays[spec.name]
            assert moved.mean() > 0.99, spec.name


def test_noise_empirical_std_matches(tmp_path: Path) -> None:
    n, stddev = 2_000_000, 0.0125
    schema = Schema((TensorSpec("w", (n,), "<f4"),))
    path = zero_payload(tmp_path, "agg.bin", schema)

    add_noise(schema, path, GaussianNoise(stddev), block_bytes=1 << 20)

    x = np.fromfile(path, dtype="<f4").astype(np.float64)
    # The sample std of n normals has std sigma / sqrt(2n): 0.05% here; allow 10 of those.
    assert abs(x.std() / stddev - 1) < 10 / math.sqrt(2 * n)
    assert abs(x.mean()) < 6 * stddev / math.sqrt(n)
    # Normal, not merely the right spread: 4.55% of draws lie beyond 2 sigma.
    assert abs(np.mean(np.abs(x) > 2 * stddev) - 0.0455) < 0.001


def test_two_runs_draw_different_noise_unless_a_generator_is_injected(tmp_path: Path) -> None:
    a, b, c, d = (zero_payload(tmp_path, f"{k}.bin") for k in "abcd")
    add_noise(SCHEMA, a, GaussianNoise(1.0))
    add_noise(SCHEMA, b, GaussianNoise(1.0))
    assert a.read_bytes() != b.read_bytes()
    # The test hook: a seeded generator makes the noise reproducible.
    add_noise(SCHEMA, c, GaussianNoise(1.0, np.random.default_rng(11)))
    add_noise(SCHEMA, d, GaussianNoise(1.0, np.random.default_rng(11)))
    assert c.read_bytes() == d.read_bytes() != a.read_bytes()


def test_noised_values_lie_on_the_grid(tmp_path: Path) -> None:
    arrays = deltas(4, scale=0.3)
    path = spool(tmp_path / "agg.bin", arrays)
    noise = GaussianNoise(0.7)
    assert noise.grid == 2.0**-13  # floor(log2 0.7) = -1, less SNAP_BITS

    add_noise(SCHEMA, path, noise, SMALL_BLOCK_BYTES)

    noised = SCHEMA.views(path.read_bytes())
    for spec in SCHEMA.tensors:
        if spec.is_float and spec.dtype != "<f2":  # float16's own ulp is coarser than the grid
            steps = noised[spec.name].astype(np.float64) / noise.grid
            np.testing.assert_array_equal(steps, np.rint(steps), err_msg=spec.name)


def test_noise_hides_low_bits_that_float32_rounding_would_leak() -> None:
    """A weight's hidden lowest mantissa bit tilts the rounding of w + noise in float32
    when |w| is within a few powers of two of the noise (Mironov 2012; bench/README.md
    measured it on drivenet). Summed in float64 and snapped to the grid, it does not."""
    n, stddev = 400_000, 1.0
    rng = np.random.default_rng(21)
    weights = (rng.uniform(0.125, 1.0, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    secret = rng.integers(0, 2, n, dtype=np.uint32)
    raw = weights.view(np.uint32)
    hidden = ((raw & ~np.uint32(1)) | secret).view(np.float32)

    naive = hidden + (rng.standard_normal(n, dtype=np.float32) * np.float32(stddev))
    naive_accuracy = float(np.mean((naive.view(np.uint32) & 1) == secret))
    snapped = hidden.copy()
    GaussianNoise(stddev, np.random.default_rng(22)).add(snapped)
    accuracy = float(np.mean((snapped.view(np.uint32) & 1) == secret))

    chance = 5 * 0.5 / math.sqrt(n)  # five standard deviations of a fair coin's mean
    assert abs(naive_accuracy - 0.5) > 4 * chance  # 53.2% here: 40 standard deviations
    assert abs(accuracy - 0.5) < chance


def test_noise_refuses_bad_stddev_and_integer_blocks() -> None:
    with pytest.raises(ValueError, match="stddev"):
        GaussianNoise(float("nan"))
    with pytest.raises(ValueError, match="float"):
        GaussianNoise(1.0).add(np.zeros(4, np.int64))
    block = np.ones(5, np.float32)
    GaussianNoise(0.0).add(block)
    np.testing.assert_array_equal(block, 1.0)


# --- accounting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rounds", "q", "z", "delta", "published"),
    [
        # tensorflow/privacy, tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py,
        # test_compute_dp_sgd_privacy 'Test0': n=60000, batch 150, noise 1.3, 15 epochs,
        # delta 1e-5 -> eps 0.7242234026109595 (6000 steps at q = 0.0025, RDP order 19).
        (6000, 150 / 60000, 1.3, 1e-5, 0.7242234026109595),
        # 'Test1': n=100000, batch 100, noise 1.0, 30 epochs, delta 1e-7 -> 1.4154988495444842.
        (30000, 100 / 100000, 1.0, 1e-7, 1.4154988495444842),
    ],
)
def test_epsilon_matches_tf_privacy_published_values(
    rounds: int, q: float, z: float, delta: float, published: float
) -> None:
    ledger = PrivacyLedger((DpRound(z, q),) * rounds)
    assert ledger.epsilon(delta) == pytest.approx(published, rel=1e-9)


def test_epsilon_grows_with_rounds_and_composes_mixed_rounds() -> None:
    ledger, previous = PrivacyLedger(), 0.0
    assert ledger.epsilon(1e-5) == 0.0
    for i in range(6):
        ledger = ledger.record(1.0 + 0.1 * (i % 2), 0.05)
        eps = ledger.epsilon(1e-5)
        assert eps > previous
        previous = eps
    # Composition commutes: the order of the rounds does not change epsilon.
    swapped = PrivacyLedger(tuple(reversed(ledger.rounds)))
    assert swapped.epsilon(1e-5) == pytest.approx(previous, rel=1e-12)
    assert ledger.record(0.0, 1.0).epsilon(1e-5) == math.inf  # a release without noise


def test_ledger_json_round_trip() -> None:
    ledger = PrivacyLedger().record(1.1, 0.01).record(1.1, 0.01).record(0.8, 1.0)
    text = ledger.to_json()
    assert json.loads(text) == {"rounds": [[1.1, 0.01], [1.1, 0.01], [0.8, 1.0]]}
    again = PrivacyLedger.from_json(text)
    assert again == ledger
    assert again.epsilon(1e-5) == ledger.epsilon(1e-5)


def test_egress_policy_refuses_a_release_over_budget() -> None:
    policy = DpPolicy(noise_multiplier=1.0, clipping_norm=2.0, max_epsilon=10.0)
    guard = GuardPolicy(max_epsilon=policy.max_epsilon)
    ledger = PrivacyLedger()
    released = 0
    while True:
        ledger = ledger.record(policy.noise_multiplier, policy.sampling_rate)
        facts = dp_facts(ledger, policy)
        epsilon = facts["epsilon"]
        assert isinstance(epsilon, float)
        try:
            check_policy(ReleaseFacts(5, 0.0, epsilon), guard)
        except GuardRefused as exc:
            assert "epsilon" in exc.reason
            break
        released += 1
    # z = 1, no subsampling, delta 1e-5: 4.73, 7.08, 9.01, then 10.73 over the budget.
    assert released == 3
    assert facts["rounds"] == 4 and facts["epsilon"] == pytest.approx(ledger.epsilon(1e-5))
    assert PrivacyLedger().record(1.0, 1.0).epsilon(1e-5) == pytest.approx(4.7285, abs=1e-4)


def test_dp_facts_name_what_the_manifest_states() -> None:
    policy = DpPolicy(
        1.1, 0.5, max_epsilon=8.0, sampling_rate=0.02, adaptive=True, clipped_count_stddev=2.0
    )
    ledger = PrivacyLedger().record(1.1, 0.02)
    facts = dp_facts(ledger, policy, clipping_norm=0.61)
    assert facts == {
        "epsilon": ledger.epsilon(1e-5),
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "clipping_norm": 0.61,
        "adaptive_clipping": True,
        "sampling_rate": 0.02,
        "rounds": 1,
        "accountant": "rdp",
    }
    json.dumps(facts, allow_nan=False)


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_multiplier": -1.0},
        {"clipping_norm": 0.0},
        {"delta": 1.0},
        {"sampling_rate": 0.0},
        {"sampling_rate": 1.5},
        {"max_epsilon": -1.0},
    ],
)
def test_policy_refuses_bad_values(bad: dict[str, Any]) -> None:
    good = DpPolicy(noise_multiplier=1.0, clipping_norm=1.0, max_epsilon=5.0)
    with pytest.raises(ValueError):
        dataclasses.replace(good, **bad)
