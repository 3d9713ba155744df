"""Robust strategies against Flower's own aggregation functions and strategy classes.

Float tensors: FedTrimmedAvg, FedMedian, Krum and Bulyan apply the same numpy calls as
Flower to the same columns of the same float32/float16/float64 client weights, so the
result is bit for bit Flower's (asserted exactly). MultiKrum's example-weighted mean sums
w_i * (n_i / total) in the tensor's dtype where Flower sums w_i * n_i then divides (which
overflows float16 sooner), so it agrees within float tolerance. Krum's distances are ours
in float64 and Flower's in the concatenation's dtype (float32 for an all-float32 model);
the choice is the same unless two scores tie within float32 rounding, which random data
here never comes near. Integer tensors follow FedAvg's rule (base.py), checked against
`fold_fedavg`; Flower would take the median, trimmed mean etc. of the counters as floats.
"""

from __future__ import annotations

import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from sluice.gateway.core.aggregation import Contribution, fold_fedavg
from sluice.gateway.core.strategies.base import FedAvg, RoundInput, RoundReport, Strategy
from sluice.gateway.core.strategies.robust import Bulyan, FedMedian, FedTrimmedAvg, Krum
from sluice.models.schema import Schema, TensorSpec
from tests.unit.test_aggregation import Arrays, random_arrays, write

with warnings.catch_warnings():
    # flwr 1.42 imports typer 0.20, which imports click.utils names that click 8.5
    # deprecates; not our code, and only at import time.
    warnings.filterwarnings("ignore", r"'click\.utils\.\w+' is deprecated", DeprecationWarning)
    from flwr.common import (
        Code,
        FitRes,
        NDArrays,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server import strategy as flwr_strategy
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy.aggregate import (
        _compute_distances,
        aggregate_bulyan,
        aggregate_krum,
        aggregate_median,
        aggregate_trimmed_avg,
    )

# Small enough that blocks cut "fc.weight", "big", "half" and the integer tensors.
BLOCK_BYTES = 1000

SCHEMA = Schema(
    (
        TensorSpec("conv.weight", (4, 3, 3, 3), "<f4"),
        TensorSpec("bn.num_batches_tracked", (), "<i8"),  # 0-d, like BatchNorm's
        TensorSpec("temperature", (), "<f4"),  # 0-d float
        TensorSpec("fc.weight", (7, 13), "<f4"),  # 91 elements: odd
        TensorSpec("big", (3, 1001), "<f4"),  # 12012 bytes: 13 blocks
        TensorSpec("counts", (301,), "<i8"),  # an integer tensor over 3 blocks
        TensorSpec("steps", (17,), "<i4"),
        TensorSpec("double", (5,), "<f8"),
        TensorSpec("half", (3, 333), "<f2"),
        TensorSpec("empty", (0,), "<f4"),
    )
)
FLOATS_ONLY = Schema((TensorSpec("w", (2, 999), "<f4"), TensorSpec("b", (3,), "<f4")))


class Round:
    """A base model and N delta updates, spooled to files, and the clients' weights."""

    def __init__(
        self,
        tmp_path: Path,
        n: int,
        seed: int,
        schema: Schema = SCHEMA,
        scales: Sequence[float] = (),
    ) -> None:
        rng = np.random.default_rng(seed)
        self.tmp_path, self.schema = tmp_path, schema
        self.base = random_arrays(schema, rng, delta=False)
        self.deltas = [random_arrays(schema, rng, delta=True) for _ in range(n)]
        self.num_examples = [int(x) for x in rng.integers(1, 1000, size=n)]
        self.scales = list(scales) or [1.0] * n
        self.spool()

    def spool(self) -> None:
        self.base_path = write(self.tmp_path / "base.bin", self.schema, self.base)
        self.contributions = [
            Contribution(write(self.tmp_path / f"update-{i}.bin", self.schema, d), k, s)
            for i, (d, k, s) in enumerate(
                zip(self.deltas, self.num_examples, self.scales, strict=True)
            )
        ]

    def weights(self, i: int) -> NDArrays:
        """Client i's weights as Flower would receive them: base + scale * delta. Float16
        tensors are given to Flower widened to float32, as Sluice combines them (rounded
        to float16 once, at the end)."""
        out = []
        for spec in self.schema.tensors:
            delta = self.deltas[i][spec.name]
            if spec.is_float:
                delta = delta * delta.dtype.type(self.scales[i])
            if spec.is_half:
                wide = self.base[spec.name].astype(np.float32) + delta.astype(np.float32)
                out.append(wide)
                continue
            out.append(np.array(self.base[spec.name] + delta, dtype=spec.dtype))
        return out

    def results(self) -> list[tuple[NDArrays, int]]:
        return [(self.weights(i), k) for i, k in enumerate(self.num_examples)]

    def named(self, ndarrays: NDArrays) -> Arrays:
        return {s.name: np.asarray(a) for s, a in zip(self.schema.tensors, ndarrays, strict=True)}

    def run(self, strategy: Strategy, block_bytes: int = BLOCK_BYTES) -> tuple[bytes, RoundReport]:
        out = self.tmp_path / "out.bin"
        inp = RoundInput(self.schema, self.base_path, self.contributions, 1, None, block_bytes)
        report = strategy.aggregate(inp, out, self.tmp_path)
        return out.read_bytes(), report

    def aggregate(self, strategy: Strategy, block_bytes: int = BLOCK_BYTES) -> Arrays:
        return self.schema.views(self.run(strategy, block_bytes)[0])

    def fedavg_integers(self) -> Arrays:
        payload = b"".join(fold_fedavg(self.schema, self.base_path, self.contributions, 1000))
        return self.schema.views(payload)


def assert_matches(
    rnd: Round, got: Arrays, flower: NDArrays | Arrays, *, exact: bool = True
) -> None:
    """Float tensors equal Flower's; integer tensors equal FedAvg's rule (fold_fedavg)."""
    expected = flower if isinstance(flower, dict) else rnd.named(flower)
    fedavg = rnd.fedavg_integers()
    for spec in rnd.schema.tensors:
        name = spec.name
        assert got[name].dtype == np.dtype(spec.dtype), name
        if not spec.is_float:
            np.testing.assert_array_equal(got[name], fedavg[name], err_msg=name)
        elif spec.is_half:
            # Flower combined the float32-widened weights; ours rounds that once. Sums in
            # another order may differ in float32's last bit, so one float16 ulp at most.
            want = np.asarray(expected[name]).astype(np.float16)
            np.testing.assert_array_max_ulp(got[name], want, maxulp=1)
        elif exact:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        else:
            # Weights are O(1); a few roundings of the sum at the dtype's epsilon.
            tol = 2e-3 if spec.dtype == "<f2" else 1e-6
            np.testing.assert_allclose(got[name], expected[name], rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.45])
@pytest.mark.parametrize("n", [5, 7, 9, 11])
def test_trimmed_avg_matches_flower(tmp_path: Path, n: int, beta: float) -> None:
    rnd = Round(tmp_path, n, seed=n)
    got = rnd.aggregate(FedTrimmedAvg(beta=beta))
    assert_matches(rnd, got, aggregate_trimmed_avg(rnd.results(), beta))


@pytest.mark.parametrize("n", [5, 6, 7, 11])
def test_median_matches_flower(tmp_path: Path, n: int) -> None:
    rnd = Round(tmp_path, n, seed=100 + n)
    assert_matches(rnd, rnd.aggregate(FedMedian()), aggregate_median(rnd.results()))


KRUM_CASES = [(n, f, keep) for n in (5, 7, 9, 11) for f in (0, 1, 2) for keep in (0, 1, 3)]


@pytest.mark.parametrize(("n", "f", "keep"), [c for c in KRUM_CASES if c[0] >= 2 * c[1] + 3])
def test_krum_and_multikrum_match_flower(tmp_path: Path, n: int, f: int, keep: int) -> None:
    rnd = Round(tmp_path, n, seed=200 + 10 * n + f)
    data, report = rnd.run(Krum(num_malicious_clients=f, num_clients_to_keep=keep))
    # MultiKrum: Flower's `aggregate` rounds w * n / n, even for one kept update.
    assert_matches(rnd, SCHEMA.views(data), aggregate_krum(rnd.results(), f, keep), exact=keep == 0)
    selected = cast(list[int], report.facts["selected"])
    assert len(selected) == max(keep, 1)
    if keep == 0:
        chosen = rnd.named(rnd.weights(selected[0]))
        np.testing.assert_array_equal(SCHEMA.views(data)["big"], chosen["big"])


@pytest.mark.parametrize(("n", "f"), [(5, 0), (7, 1), (8, 1), (9, 1), (11, 2)])
def test_bulyan_matches_flower(tmp_path: Path, n: int, f: int) -> None:
    rnd = Round(tmp_path, n, seed=300 + n)
    data, report = rnd.run(Bulyan(num_malicious_clients=f))
    flower = aggregate_bulyan(rnd.results(), f, aggregate_krum, to_keep=0)
    assert_matches(rnd, SCHEMA.views(data), flower)
    assert report.facts["theta"] == n - 2 * f
    assert report.facts["beta"] == n - 4 * f


@pytest.mark.parametrize("schema", [SCHEMA, FLOATS_ONLY], ids=["mixed", "floats"])
def test_distances_match_flower(tmp_path: Path, schema: Schema) -> None:
    rnd = Round(tmp_path, 7, seed=400, schema=schema)
    scores = cast(list[float], rnd.run(Krum(num_malicious_clients=1))[1].facts["scores"])
    # Flower: float64 for the mixed model (concatenation promotes), float32 for floats only.
    flower = _compute_distances([w for w, _ in rnd.results()])
    num_closest = 7 - 1 - 2
    expected = [np.sort(row)[1 : num_closest + 1].sum() for row in flower]
    np.testing.assert_allclose(scores, expected, rtol=1e-5 if schema is SCHEMA else 1e-4)


def fit_results(rnd: Round) -> list[tuple[ClientProxy, FitRes]]:
    # Flower's strategies never look at the ClientProxy.
    return [
        (cast(ClientProxy, None), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), k, {}))
        for w, k in rnd.results()
    ]


@pytest.mark.parametrize(
    ("ours", "theirs", "exact"),
    [
        (FedTrimmedAvg(beta=0.2), lambda: flwr_strategy.FedTrimmedAvg(beta=0.2), True),
        (FedMedian(), lambda: flwr_strategy.FedMedian(), True),
        (Krum(num_malicious_clients=1), lambda: flwr_strategy.Krum(num_malicious_clients=1), True),
        (
            Krum(num_malicious_clients=1, num_clients_to_keep=3),
            lambda: flwr_strategy.Krum(num_malicious_clients=1, num_clients_to_keep=3),
            False,
        ),
        (
            Bulyan(num_malicious_clients=1),
            lambda: flwr_strategy.Bulyan(num_malicious_clients=1, to_keep=0),
            True,
        ),
    ],
    ids=["FedTrimmedAvg", "FedMedian", "Krum", "MultiKrum", "Bulyan"],
)
def test_matches_flower_strategy_classes(
    tmp_path: Path, ours: Strategy, theirs: Callable[[], Any], exact: bool
) -> None:
    rnd = Round(tmp_path, 7, seed=500)
    parameters, _ = theirs().aggregate_fit(1, fit_results(rnd), [])
    assert ours.name == type(theirs()).__name__
    assert_matches(rnd, rnd.aggregate(ours), parameters_to_ndarrays(parameters), exact=exact)


Oracle = Callable[[list[tuple[NDArrays, int]]], NDArrays]
# Each strategy (f = 1 where it applies), Flower's function for it, and whether bits match.
ORACLES: list[tuple[Strategy, Oracle, bool]] = [
    (FedTrimmedAvg(), lambda results: aggregate_trimmed_avg(results, 0.2), True),
    (FedMedian(), aggregate_median, True),
    (Krum(num_malicious_clients=1), lambda results: aggregate_krum(results, 1, 0), True),
    (
        Krum(num_malicious_clients=1, num_clients_to_keep=3),
        lambda results: aggregate_krum(results, 1, 3),
        False,
    ),
    (
        Bulyan(num_malicious_clients=1),
        lambda results: aggregate_bulyan(results, 1, aggregate_krum, to_keep=0),
        True,
    ),
]
IDS = ["trimmed", "median", "krum", "multikrum", "bulyan"]
ALL = [strategy for strategy, _, _ in ORACLES]


@pytest.mark.parametrize(("strategy", "flower", "exact"), ORACLES, ids=IDS)
def test_scale_multiplies_float_deltas_before_the_maths(
    tmp_path: Path, strategy: Strategy, flower: Oracle, exact: bool
) -> None:
    rnd = Round(tmp_path, 7, seed=600, scales=[1.0, 0.5, 0.25, 1.0, 0.1, 0.75, 1.0])
    assert_matches(rnd, rnd.aggregate(strategy), flower(rnd.results()), exact=exact)


def test_multikrum_keeping_everyone_is_the_weighted_fedavg(tmp_path: Path) -> None:
    rnd = Round(tmp_path, 5, seed=700)
    got = rnd.aggregate(Krum(num_clients_to_keep=5))
    fedavg = rnd.aggregate(FedAvg())
    for spec in SCHEMA.tensors:
        tol = 2e-3 if spec.dtype == "<f2" else 1e-6
        np.testing.assert_allclose(got[spec.name], fedavg[spec.name], rtol=tol, atol=tol)


def test_only_multikrum_weights_by_num_examples(tmp_path: Path) -> None:
    rnd = Round(tmp_path, 7, seed=701)
    before = [rnd.aggregate(s) for s in ALL]
    rnd.num_examples = [1, 1, 1, 1, 1, 1, 1000]
    rnd.spool()
    after = [rnd.aggregate(s) for s in ALL]
    for strategy, first, second in zip(ALL, before, after, strict=True):
        weighted = isinstance(strategy, Krum) and strategy.num_clients_to_keep > 0
        assert not np.array_equal(first["counts"], second["counts"])  # FedAvg's integer rule
        assert np.array_equal(first["big"], second["big"]) != weighted, strategy


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
@pytest.mark.parametrize("block_bytes", [1, 7, 64, 4096, 1 << 20])
def test_block_size_does_not_change_a_bit(
    tmp_path: Path, strategy: Strategy, block_bytes: int
) -> None:
    rnd = Round(tmp_path, 7, seed=800)
    assert rnd.run(strategy, block_bytes)[0] == rnd.run(strategy, BLOCK_BYTES)[0]


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_same_inputs_give_the_same_bytes(tmp_path: Path, strategy: Strategy) -> None:
    rnd = Round(tmp_path, 9, seed=801)
    first, report = rnd.run(strategy)
    again, report_again = rnd.run(strategy)
    assert first == again
    assert report == report_again
    assert len(first) == SCHEMA.payload_bytes


def attack(kind: str, delta: Arrays) -> Arrays:
    factor = -1.0 if kind == "sign-flip" else 100.0
    return {k: v * v.dtype.type(factor) if v.dtype.kind == "f" else v for k, v in delta.items()}


@pytest.mark.parametrize("kind", ["sign-flip", "scaled-100x"])
def test_one_hostile_update_moves_fedavg_but_not_the_robust_strategies(
    tmp_path: Path, kind: str
) -> None:
    n, hostile = 7, 3
    rnd = Round(tmp_path, n, seed=900, schema=FLOATS_ONLY)
    rng = np.random.default_rng(901)
    # Honest trainers agree on a direction, up to 5% noise; one sends the attack.
    direction = random_arrays(FLOATS_ONLY, rng, delta=True)
    rnd.deltas = [
        {
            k: (v + rng.standard_normal(v.shape) * 0.05 * np.abs(v)).astype(v.dtype)
            for k, v in direction.items()
        }
        for _ in range(n)
    ]
    honest_mean = {k: np.mean([d[k] for d in rnd.deltas], axis=0) for k in direction}
    rnd.deltas[hostile] = attack(kind, rnd.deltas[hostile])
    rnd.spool()

    def error(strategy: Strategy) -> float:
        got = rnd.aggregate(strategy)
        moved = [got[k].astype(np.float64) - rnd.base[k] - honest_mean[k] for k in direction]
        size = [honest_mean[k] for k in direction]
        return float(np.sqrt(sum(np.sum(m**2) for m in moved) / sum(np.sum(s**2) for s in size)))

    # FedAvg moves by 2/7 (sign flip) or 99/7 (100x) of the honest mean; the robust ones
    # stay within the honest spread (a single honest update is ~5% off: Krum keeps one).
    assert error(FedAvg()) > (0.25 if kind == "sign-flip" else 10.0)
    for strategy in ALL:
        assert error(strategy) < 0.08, strategy
    assert hostile not in cast(
        list[int], rnd.run(Krum(num_malicious_clients=1))[1].facts["selected"]
    )
    bulyan = rnd.run(Bulyan(num_malicious_clients=1))[1].facts["selected"]
    assert hostile not in cast(list[int], bulyan)


@pytest.fixture(scope="module")
def large_round(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Schema, Path, list[Contribution]]:
    """8 updates of a 4M-parameter float32 model (16 MiB each) on disk."""
    root = tmp_path_factory.mktemp("large")
    num_elements = 4 << 20
    schema = Schema((TensorSpec("w", (num_elements,), "<f4"),))
    rng = np.random.default_rng(1000)
    base = write(root / "base.bin", schema, {"w": rng.random(num_elements, dtype=np.float32)})
    contributions = []
    for i in range(8):
        delta = {"w": rng.standard_normal(num_elements, dtype=np.float32)}
        contributions.append(Contribution(write(root / f"u{i}.bin", schema, delta), 10 + i))
    return schema, base, contributions


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_memory_is_a_block_per_update_not_a_model_per_update(
    tmp_path: Path, strategy: Strategy, large_round: tuple[Schema, Path, list[Contribution]]
) -> None:
    schema, base, contributions = large_round
    n, block_bytes = len(contributions), 1 << 20
    out = tmp_path / "out.bin"
    inp = RoundInput(schema, base, contributions, 1, None, block_bytes)
    tracemalloc.start()
    try:
        # Control: tracemalloc sees numpy's buffers, so a small peak is a real measurement.
        probe = np.empty(block_bytes * 4, dtype=np.uint8)
        assert tracemalloc.get_traced_memory()[1] >= block_bytes * 4
        del probe
        tracemalloc.reset_peak()
        strategy.aggregate(inp, out, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.stat().st_size == schema.payload_bytes
    # A block of each update, the base block and temporaries; N x model would be 128 MiB.
    assert peak < (n + 4) * block_bytes, f"peak {peak / 2**20:.1f} MiB"


def test_bulyan_needs_4f_plus_3_updates(tmp_path: Path) -> None:
    rnd = Round(tmp_path, 6, seed=1100)
    with pytest.raises(ValueError, match=r"at least 4f \+ 3 = 7 updates, got 6.*at most 0"):
        rnd.run(Bulyan(num_malicious_clients=1))
    # Flower refuses the same round.
    with pytest.raises(ValueError, match="4 \\* num_malicious \\+ 3"):
        aggregate_bulyan(rnd.results(), 1, aggregate_krum, to_keep=0)


def test_bulyan_refuses_multikrum_as_first_rule() -> None:
    with pytest.raises(ValueError, match="to_keep must be 0"):
        Bulyan(num_malicious_clients=1, to_keep=2)


def test_krum_needs_2f_plus_3_updates(tmp_path: Path) -> None:
    rnd = Round(tmp_path, 6, seed=1101)
    with pytest.raises(ValueError, match=r"at least 2f \+ 3 = 7 updates \(N > 2f \+ 2\), got 6"):
        rnd.run(Krum(num_malicious_clients=2))
    with pytest.raises(ValueError, match="num_clients_to_keep=7 is more than the 6 updates"):
        rnd.run(Krum(num_clients_to_keep=7))


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedTrimmedAvg(beta=0.5),
        lambda: FedTrimmedAvg(beta=-0.1),
        lambda: Krum(num_malicious_clients=-1),
        lambda: Krum(num_clients_to_keep=-1),
        lambda: Bulyan(num_malicious_clients=-1),
    ],
)
def test_bad_hyperparameters_are_refused(make: Callable[[], Strategy]) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_no_updates_is_an_error(tmp_path: Path, strategy: Strategy) -> None:
    rnd = Round(tmp_path, 1, seed=1102)
    rnd.contributions = []
    with pytest.raises(ValueError, match="at least"):
        rnd.run(strategy)


def test_single_update_krum_median_trimmed_return_it(tmp_path: Path) -> None:
    rnd = Round(tmp_path, 1, seed=1103)
    for strategy in (FedTrimmedAvg(), FedMedian(), Krum()):
        assert_matches(rnd, rnd.aggregate(strategy), rnd.weights(0))
