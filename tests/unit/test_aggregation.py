"""Streaming FedAvg against Flower's own aggregation functions as the numerical oracle."""

from __future__ import annotations

import importlib
import threading
import tracemalloc
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from sluice.gateway.core.aggregation import Contribution, fold_fedavg
from sluice.models.schema import Schema, TensorSpec

with warnings.catch_warnings():
    # flwr 1.42 imports typer 0.20, which imports click.utils names that click 8.5
    # deprecates; not our code, and only at import time.
    warnings.filterwarnings("ignore", r"'click\.utils\.\w+' is deprecated", DeprecationWarning)
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.common import Code, FitRes, NDArrays, Status, ndarrays_to_parameters
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy.aggregate import aggregate, aggregate_inplace
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

RTOL, ATOL = 1e-5, 1e-6
# Small enough that blocks split "fc.weight", "big" and "counts", and not a multiple of 8.
SMALL_BLOCK_BYTES = 1000

MIXED = Schema(
    (
        TensorSpec("conv.weight", (4, 3, 3, 3), "<f4"),
        TensorSpec("bn.weight", (4,), "<f4"),
        TensorSpec("bn.running_mean", (4,), "<f4"),
        TensorSpec("bn.num_batches_tracked", (), "<i8"),  # 0-d, like BatchNorm's
        TensorSpec("temperature", (), "<f4"),  # 0-d float
        TensorSpec("fc.weight", (7, 13), "<f4"),  # 91 elements: odd
        TensorSpec("fc.bias", (7,), "<f4"),
        TensorSpec("big", (3, 1001), "<f4"),  # 12012 bytes: split over 13 blocks
        TensorSpec("counts", (301,), "<i8"),  # 2408 bytes: an integer tensor split too
        TensorSpec("steps", (17,), "<i4"),
        TensorSpec("double", (5,), "<f8"),
        TensorSpec("empty", (0,), "<f4"),
    )
)
FLOATS_ONLY = Schema((TensorSpec("w", (2, 999), "<f4"), TensorSpec("b", (3,), "<f4")))
SCHEMAS = {"mixed": MIXED, "floats": FLOATS_ONLY}

Arrays = dict[str, np.ndarray]


def random_arrays(schema: Schema, rng: np.random.Generator, *, delta: bool) -> Arrays:
    out: Arrays = {}
    for spec in schema.tensors:
        values: np.ndarray
        if spec.is_float:
            scale = 0.01 if delta else 1.0
            values = rng.standard_normal(spec.shape) * scale
        else:
            # Counters: a base count, and deltas that are small non-negative steps.
            high = 50 if delta else 100_000
            values = rng.integers(0, high, size=spec.shape)
        # np.array, not .astype: a 0-d draw is a numpy scalar, and Flower wants ndarrays.
        out[spec.name] = np.array(values, dtype=spec.dtype)
    return out


def write(path: Path, schema: Schema, arrays: Arrays) -> Path:
    path.write_bytes(schema.flatten(arrays))
    return path


def fold(
    schema: Schema,
    base: Path,
    contributions: Sequence[Contribution],
    block_bytes: int = SMALL_BLOCK_BYTES,
) -> bytes:
    return b"".join(fold_fedavg(schema, base, contributions, block_bytes=block_bytes))


class Setup:
    """A base model and N delta updates, in memory and spooled to files."""

    def __init__(self, tmp_path: Path, schema: Schema, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.schema = schema
        self.base = random_arrays(schema, rng, delta=False)
        self.deltas = [random_arrays(schema, rng, delta=True) for _ in range(n)]
        self.num_examples = [int(x) for x in rng.integers(1, 1000, size=n)]
        self.base_path = write(tmp_path / "base.bin", schema, self.base)
        self.contributions = [
            Contribution(write(tmp_path / f"update-{i}.bin", schema, d), k)
            for i, (d, k) in enumerate(zip(self.deltas, self.num_examples, strict=True))
        ]

    def ndarrays(self, arrays: Arrays) -> NDArrays:
        return [arrays[spec.name] for spec in self.schema.tensors]

    def fold(self, block_bytes: int = SMALL_BLOCK_BYTES) -> Arrays:
        return self.schema.views(fold(self.schema, self.base_path, self.contributions, block_bytes))

    def flower_aggregate(self) -> Arrays:
        mean = aggregate(
            [(self.ndarrays(d), k) for d, k in zip(self.deltas, self.num_examples, strict=True)]
        )
        return {spec.name: np.asarray(m) for spec, m in zip(self.schema.tensors, mean, strict=True)}

    def flower_aggregate_inplace(self) -> Arrays:
        # aggregate_inplace never looks at the ClientProxy.
        results = [
            (cast(ClientProxy, None), fit_res(self.ndarrays(d), k))
            for d, k in zip(self.deltas, self.num_examples, strict=True)
        ]
        mean = aggregate_inplace(results)
        return {spec.name: np.asarray(m) for spec, m in zip(self.schema.tensors, mean, strict=True)}

    def flower_arrayrecords(self) -> Arrays:
        """FedAvg of Flower's Message API (what `FedAvg.aggregate_train` calls)."""
        records = [
            RecordDict(
                {
                    "arrays": ArrayRecord({name: Array(a) for name, a in d.items()}),
                    "metrics": MetricRecord({"num-examples": k}),
                }
            )
            for d, k in zip(self.deltas, self.num_examples, strict=True)
        ]
        mean = aggregate_arrayrecords(records, "num-examples")
        return {name: array.numpy() for name, array in mean.items()}

    def expected_integer(self, name: str) -> np.ndarray:
        """Our rule, computed exactly: base + round_half_even(sum(n_i * d_i) / sum(n_i))."""
        total = sum(self.num_examples)
        base = self.base[name]
        out = np.empty_like(base)
        for idx in np.ndindex(base.shape):
            weighted = sum(
                int(d[name][idx]) * k for d, k in zip(self.deltas, self.num_examples, strict=True)
            )
            out[idx] = int(base[idx]) + round(Fraction(weighted, total))  # round() is half-even
        return out


def fit_res(arrays: NDArrays, num_examples: int) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {})


def assert_floats_close(schema: Schema, got: Arrays, base: Arrays, mean_delta: Arrays) -> None:
    for spec in schema.tensors:
        if not spec.is_float:
            continue
        assert got[spec.name].dtype == np.dtype(spec.dtype), spec.name
        expected = base[spec.name] + mean_delta[spec.name]
        np.testing.assert_allclose(
            got[spec.name], expected, rtol=RTOL, atol=ATOL, err_msg=spec.name
        )


@pytest.mark.parametrize("schema_name", sorted(SCHEMAS))
@pytest.mark.parametrize("n", [1, 3, 8])
def test_matches_flower_aggregate(tmp_path: Path, schema_name: str, n: int) -> None:
    setup = Setup(tmp_path, SCHEMAS[schema_name], n, seed=n)
    assert_floats_close(setup.schema, setup.fold(), setup.base, setup.flower_aggregate())


@pytest.mark.parametrize("n", [1, 3, 8])
def test_matches_flower_aggregate_inplace(tmp_path: Path, n: int) -> None:
    setup = Setup(tmp_path, MIXED, n, seed=10 + n)
    assert_floats_close(MIXED, setup.fold(), setup.base, setup.flower_aggregate_inplace())


@pytest.mark.parametrize("n", [1, 3, 8])
def test_matches_flower_message_api(tmp_path: Path, n: int) -> None:
    setup = Setup(tmp_path, MIXED, n, seed=20 + n)
    assert_floats_close(MIXED, setup.fold(), setup.base, setup.flower_arrayrecords())


@pytest.mark.parametrize("n", [1, 3, 8])
def test_integer_tensors_take_rounded_weighted_mean_delta(tmp_path: Path, n: int) -> None:
    setup = Setup(tmp_path, MIXED, n, seed=30 + n)
    got = setup.fold()
    flower_mean = setup.flower_aggregate()
    for spec in MIXED.tensors:
        if spec.is_float:
            continue
        assert got[spec.name].dtype == np.dtype(spec.dtype)
        np.testing.assert_array_equal(got[spec.name], setup.expected_integer(spec.name))
        # Same thing through Flower: its (float64) mean of the deltas, rounded half-to-even.
        via_flower = setup.base[spec.name] + np.rint(flower_mean[spec.name]).astype(spec.dtype)
        np.testing.assert_array_equal(got[spec.name], via_flower)


def test_integer_rounding_is_half_to_even(tmp_path: Path) -> None:
    schema = Schema((TensorSpec("count", (4,), "<i8"),))
    base = write(tmp_path / "base.bin", schema, {"count": np.array([10, 10, 10, 10])})
    a = write(tmp_path / "a.bin", schema, {"count": np.array([0, 1, 2, 3])})
    b = write(tmp_path / "b.bin", schema, {"count": np.array([1, 2, 3, 4])})
    # Equal weights: mean deltas 0.5, 1.5, 2.5, 3.5 round to 0, 2, 2, 4.
    got = schema.views(fold(schema, base, [Contribution(a, 5), Contribution(b, 5)]))
    np.testing.assert_array_equal(got["count"], [10, 12, 12, 14])


def test_flower_integer_tensors_are_zeroed_or_turned_to_float(tmp_path: Path) -> None:
    """Documents (measured on flwr 1.42) what Flower's FedAvg does to integer tensors."""
    setup = Setup(tmp_path, MIXED, 3, seed=40)
    inplace = setup.flower_aggregate_inplace()
    plain = setup.flower_aggregate()
    message = setup.flower_arrayrecords()
    for spec in MIXED.tensors:
        if spec.is_float:
            continue
        name = spec.name
        # aggregate_inplace: the float scaling factor n_i/sum(n) cannot be cast "same_kind"
        # to int64, so it is cast with np.array(factor, int64), which truncates it to 0; every
        # update is multiplied by 0 and the sum is 0. The dtype stays integer.
        assert inplace[name].dtype == np.dtype(spec.dtype)
        np.testing.assert_array_equal(inplace[name], np.zeros(spec.shape))
        # aggregate and the Message API's aggregate_arrayrecords: an unrounded float64 mean,
        # so a counter silently changes dtype (and would no longer fit the schema).
        for mean in (plain[name], message[name]):
            assert mean.dtype == np.float64
            np.testing.assert_allclose(
                mean + setup.base[name], setup.expected_integer(name), atol=0.5
            )
    # With one update the factor is exactly 1.0, which survives the cast: nothing is zeroed.
    (tmp_path / "single").mkdir()
    single = Setup(tmp_path / "single", MIXED, 1, seed=41)
    once = single.flower_aggregate_inplace()
    np.testing.assert_array_equal(once["counts"], single.deltas[0]["counts"])


def test_float16_does_not_overflow_where_flower_aggregate_does(tmp_path: Path) -> None:
    schema = Schema((TensorSpec("half", (3,), "<f2"),))
    delta = {"half": np.full(3, 2.0, "<f2")}
    base = write(tmp_path / "base.bin", schema, {"half": np.full(3, 1.0, "<f2")})
    a, b = write(tmp_path / "a.bin", schema, delta), write(tmp_path / "b.bin", schema, delta)
    got = schema.views(fold(schema, base, [Contribution(a, 40_000), Contribution(b, 1)]))
    np.testing.assert_allclose(got["half"], 3.0, rtol=1e-3)
    # Flower multiplies by num_examples before dividing: 2.0 * 40000 is inf in float16.
    with pytest.warns(RuntimeWarning, match="overflow"):
        flower = aggregate([([delta["half"]], 40_000), ([delta["half"]], 1)])
    assert np.isinf(flower[0]).all()


def test_same_order_gives_identical_bytes(tmp_path: Path) -> None:
    setup = Setup(tmp_path, MIXED, 8, seed=50)
    first = fold(MIXED, setup.base_path, setup.contributions)
    again = fold(MIXED, setup.base_path, setup.contributions)
    assert first == again
    assert len(first) == MIXED.payload_bytes


def test_order_changes_floats_only_within_tolerance(tmp_path: Path) -> None:
    setup = Setup(tmp_path, MIXED, 8, seed=51)
    forward = MIXED.views(fold(MIXED, setup.base_path, setup.contributions))
    backward = MIXED.views(fold(MIXED, setup.base_path, setup.contributions[::-1]))
    for spec in MIXED.tensors:
        if spec.is_float:
            np.testing.assert_allclose(
                forward[spec.name], backward[spec.name], rtol=RTOL, atol=ATOL
            )
        else:
            np.testing.assert_array_equal(forward[spec.name], backward[spec.name])


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 4096, 8 << 20])
def test_block_size_does_not_change_the_result(tmp_path: Path, block_bytes: int) -> None:
    setup = Setup(tmp_path, MIXED, 3, seed=52)
    reference = setup.fold(block_bytes=SMALL_BLOCK_BYTES)
    got = setup.fold(block_bytes=block_bytes)
    for spec in MIXED.tensors:
        if spec.is_float:
            np.testing.assert_allclose(got[spec.name], reference[spec.name], rtol=RTOL, atol=ATOL)
        else:
            np.testing.assert_array_equal(got[spec.name], reference[spec.name])


def test_no_contributions_is_an_error(tmp_path: Path) -> None:
    setup = Setup(tmp_path, FLOATS_ONLY, 1, seed=60)
    with pytest.raises(ValueError, match="at least one contribution"):
        fold(FLOATS_ONLY, setup.base_path, [])


@pytest.mark.parametrize("num_examples", [0, -3])
def test_non_positive_num_examples_is_an_error(tmp_path: Path, num_examples: int) -> None:
    setup = Setup(tmp_path, FLOATS_ONLY, 2, seed=61)
    bad = [*setup.contributions, Contribution(setup.contributions[0].path, num_examples)]
    with pytest.raises(ValueError, match="num_examples"):
        fold(FLOATS_ONLY, setup.base_path, bad)


@pytest.mark.parametrize("which", ["update", "base"])
def test_short_file_is_an_error(tmp_path: Path, which: str) -> None:
    setup = Setup(tmp_path, MIXED, 3, seed=62)
    victim = setup.contributions[1].path if which == "update" else setup.base_path
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(ValueError, match="short read"):
        fold(MIXED, setup.base_path, setup.contributions)


WORKERS = 2  # the memory tests fold with this many threads


def fold_traced(
    schema: Schema, base: Path, contributions: Sequence[Contribution], block_bytes: int, out: Path
) -> int:
    """Fold into `out` as the gateway does (block by block to a file); tracemalloc's peak."""
    # The fold's BLAS is imported at the first fold (the gateway's warm-up does it before
    # any round): imported here, its ~18 MiB of module state is not the fold's memory.
    importlib.import_module("scipy.linalg.blas")
    tracemalloc.start()
    try:
        # Control: tracemalloc sees numpy's buffers, so a small peak is a real measurement.
        probe = np.empty(block_bytes * 4, dtype=np.uint8)
        _, probe_peak = tracemalloc.get_traced_memory()
        del probe
        assert probe_peak >= block_bytes * 4
        tracemalloc.reset_peak()
        with out.open("wb") as sink:
            for chunk in fold_fedavg(schema, base, contributions, block_bytes, WORKERS):
                sink.write(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.stat().st_size == schema.payload_bytes
    return peak


def test_memory_stays_a_few_blocks_whatever_n(tmp_path: Path) -> None:
    n, num_elements, block_bytes = 16, 4 << 20, 1 << 20  # 16 updates of 16 MiB each
    schema = Schema((TensorSpec("w", (num_elements,), "<f4"),))
    rng = np.random.default_rng(70)
    base = write(tmp_path / "base.bin", schema, {"w": rng.random(num_elements, dtype=np.float32)})
    contributions = [
        Contribution(
            write(tmp_path / f"u{i}.bin", schema, {"w": np.full(num_elements, i, "<f4")}), 1
        )
        for i in range(n)
    ]
    out = tmp_path / "out.bin"

    peak = fold_traced(schema, base, contributions, block_bytes, out)

    # Per worker an accumulator and a read buffer; finished blocks waiting (workers + 1)
    # and the one the caller holds: 3w + 2 blocks, whatever n (the docstring's bound).
    bound = (3 * WORKERS + 2) * block_bytes + (64 << 10)
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB for {n} updates of 16 MiB"
    head = np.fromfile(out, dtype="<f4", count=4) - np.fromfile(base, dtype="<f4", count=4)
    np.testing.assert_allclose(head, (n - 1) / 2)


def test_the_same_bytes_whatever_the_number_of_workers(tmp_path: Path) -> None:
    schema = Schema(
        (
            TensorSpec("w", (300_001,), "<f4"),
            TensorSpec("steps", (7,), "<i8"),
            TensorSpec("h", (5_003,), "<f2"),
            TensorSpec("d", (70_001,), "<f8"),
        )
    )
    rng = np.random.default_rng(71)

    def arrays() -> dict[str, np.ndarray]:
        return {
            spec.name: (rng.standard_normal(spec.shape) * 3).astype(spec.dtype)
            for spec in schema.tensors
        }

    base = write(tmp_path / "base.bin", schema, arrays())
    contributions = [
        Contribution(write(tmp_path / f"u{i}.bin", schema, arrays()), 10 + 7 * i, 0.5 + i / 10)
        for i in range(5)
    ]
    folds = {
        workers: b"".join(fold_fedavg(schema, base, contributions, 64 << 10, workers))
        for workers in (1, 2, 5)
    }
    assert folds[1] == folds[2] == folds[5]
    assert len(folds[1]) == schema.payload_bytes


def test_stopping_early_leaves_no_worker_reading(tmp_path: Path) -> None:
    schema = Schema((TensorSpec("w", (1 << 20,), "<f4"),))
    base = write(tmp_path / "base.bin", schema, {"w": np.zeros(1 << 20, "<f4")})
    update = write(tmp_path / "u.bin", schema, {"w": np.ones(1 << 20, "<f4")})
    blocks = fold_fedavg(schema, base, [Contribution(update, 1)], 4096, workers=3)
    first = next(blocks)
    blocks.close()  # the caller gives up after one block: workers stop, descriptors close
    assert np.frombuffer(first, "<f4")[0] == 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("fold")]


def test_overlapping_folds_give_the_blas_threads_back(tmp_path: Path) -> None:
    from sluice.gateway.core.aggregation import _blas

    def threads() -> list[int]:
        return [lib["num_threads"] for lib in _blas().info()]

    before = threads()
    schema = Schema((TensorSpec("w", (1 << 16,), "<f4"),))
    base = write(tmp_path / "base.bin", schema, {"w": np.zeros(1 << 16, "<f4")})
    update = write(tmp_path / "u.bin", schema, {"w": np.ones(1 << 16, "<f4")})
    first = fold_fedavg(schema, base, [Contribution(update, 1)], 4096)
    second = fold_fedavg(schema, base, [Contribution(update, 1)], 4096)
    next(first)
    next(second)  # both running: BLAS held to one thread
    assert set(threads()) == {1}
    first.close()  # the first one out must not restore the second's limit...
    assert set(threads()) == {1}
    second.close()  # ...the last one out restores what was there before
    assert threads() == before


@pytest.mark.parametrize("dtype", ["<i8", "<i4"])
def test_integer_tensors_stay_within_the_memory_bound(tmp_path: Path, dtype: str) -> None:
    n, block_bytes = 16, 1 << 20
    num_elements = (16 << 20) // np.dtype(dtype).itemsize
    schema = Schema((TensorSpec("count", (num_elements,), dtype),))
    base = write(tmp_path / "base.bin", schema, {"count": np.full(num_elements, 100, dtype)})
    # Four distinct files, each folded four times: the bound does not depend on which.
    files = [
        write(tmp_path / f"u{i}.bin", schema, {"count": np.full(num_elements, i, dtype)})
        for i in range(4)
    ]
    contributions = [Contribution(files[i % 4], 1) for i in range(n)]
    out = tmp_path / "out.bin"

    peak = fold_traced(schema, base, contributions, block_bytes, out)

    # Each worker's scratch block comes on top of the float case: 4w + 2 blocks.
    bound = (4 * WORKERS + 2) * block_bytes + (64 << 10)
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB for {n} updates of 16 MiB"
    got = np.fromfile(out, dtype=dtype)
    np.testing.assert_array_equal(got[[0, -1]], [102, 102])  # mean delta 1.5 rounds to 2


FOLD_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path

import numpy as np
import threadpoolctl

from sluice.gateway.core.aggregation import Contribution, fold_fedavg
from sluice.models.schema import Schema, TensorSpec

assert "scipy.linalg.blas" not in sys.modules  # imported at the first fold, not before
root = Path(sys.argv[1])
schema = Schema((TensorSpec("w", (1 << 20,), "<f4"),))
for name in ("base", "update"):
    (root / name).write_bytes(np.ones(1 << 20, "<f4").tobytes())
blocks = fold_fedavg(schema, root / "base", [Contribution(root / "update", 1)])
next(blocks)
during = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
list(blocks)
print("scipy" in " ".join(i["filepath"] for i in threadpoolctl.threadpool_info()), during)
"""


def test_every_blas_runs_on_one_thread_during_a_fold_even_one_imported_by_it(
    tmp_path: Path,
) -> None:
    # scipy's OpenBLAS is loaded by the first fold; on more threads it made folds 3x slower.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FOLD_IN_A_FRESH_PROCESS, str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    loaded, during = done.stdout.strip().split(" ", 1)
    assert loaded == "True"
    assert during.strip("[]") and set(during.strip("[]").split(", ")) == {"1"}, during
