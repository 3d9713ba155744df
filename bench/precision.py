"""The fold for half-precision models next to float32 (issue 13.3): same parameter count,
float16 and bfloat16 summed in float32 and rounded once. Time, bytes read per second,
and the error against the exact mean (float64) in units of the output dtype's last place,
with Flower's `aggregate` on the float16 inputs (it sums in float16) for comparison."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import Options, Report, workdir
from sluice.gateway.core.aggregation import Contribution, fold_fedavg
from sluice.models.schema import Schema, TensorSpec, numpy_dtype

FULL = (25_000_000, (4, 16))
QUICK = (2_500_000, (4,))
DTYPES = ("<f4", "<f2", "bfloat16")
SAMPLE = 4099  # every SAMPLE-th parameter is checked against the exact mean


def _schema(p: int, dtype: str) -> Schema:
    big, mid = p * 2 // 3, p // 3 // 1000 * 1000
    return Schema(
        (
            TensorSpec("backbone.weight", (big,), dtype),
            TensorSpec("neck.weight", (mid // 1000, 1000), dtype),
            TensorSpec("head.weight", (p - big - mid,), dtype),
        )
    )


def _spool(tmp: Path, p: int, n: int, dtype: str) -> tuple[Path, list[Contribution]]:
    rng = np.random.default_rng(13)
    noise = rng.standard_normal(p, dtype=np.float32)
    target = numpy_dtype(dtype)
    base = tmp / f"base-{dtype}.bin"
    noise.astype(target).tofile(base)
    out = []
    for i in range(n):
        path = tmp / f"update-{dtype}-{i}.bin"
        (np.roll(noise, 7919 * (i + 1)) * np.float32(0.01 * (1 + i / n))).astype(target).tofile(
            path
        )
        out.append(Contribution(path, int(rng.integers(100, 5000))))
    return base, out


def _exact(base: Path, contributions: list[Contribution], dtype: str) -> np.ndarray:
    """base + sum(n_i d_i) / sum(n_i) in float64 at the sampled parameters."""
    t = numpy_dtype(dtype)
    total = sum(c.num_examples for c in contributions)
    acc = np.fromfile(base, dtype=t)[::SAMPLE].astype(np.float64)
    for c in contributions:
        acc += np.fromfile(c.path, dtype=t)[::SAMPLE].astype(np.float64) * (c.num_examples / total)
    return acc


def _ulps(got: np.ndarray, exact: np.ndarray, dtype: str) -> float:
    """Largest error in units in the last place of dtype, at each exact value."""
    t = numpy_dtype(dtype)
    eps = {"<f4": 2.0**-23, "<f2": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    rounded = exact.astype(t).astype(np.float64)
    ulp = np.maximum(np.abs(rounded), np.float64(np.finfo(np.float32).tiny)) * eps
    del t
    return float(np.max(np.abs(got.astype(np.float64) - exact) / ulp))


def bench_precision(options: Options) -> Report:
    p, counts = QUICK if options.quick else FULL
    report = Report(
        "precision",
        f"Fold of half-precision models vs float32: P={p / 1e6:g}M parameters, N in {counts}",
    )
    report.rows.append(["N", "dtype", "time (med)", "GB/s read", "vs float32", "error (ulp)"])
    cells = []
    with workdir(options, "precision") as tmp:
        for n in counts:
            times: dict[str, float] = {}
            for dtype in DTYPES:
                schema = _schema(p, dtype)
                base, contributions = _spool(Path(tmp), p, n, dtype)
                runs = []
                for _ in range(max(options.repeats, 1) + 1):  # the first warms the page cache
                    started = time.perf_counter()
                    payload = b"".join(bytes(b) for b in fold_fedavg(schema, base, contributions))
                    runs.append(time.perf_counter() - started)
                median = statistics.median(runs[1:])
                times[dtype] = median
                got = np.frombuffer(payload, dtype=numpy_dtype(dtype))[::SAMPLE]
                error = _ulps(got, _exact(base, contributions, dtype), dtype)
                flower = ""
                if dtype == "<f2":
                    flower = _flower_error(base, contributions)
                gb = n * schema.payload_bytes / median / 1e9
                ratio = median / times["<f4"]
                report.rows.append(
                    [str(n), dtype, f"{median:.3f} s", f"{gb:.2f}", f"{ratio:.2f}x",
                     f"{error:.2f}" + (f" (Flower: {flower})" if flower else "")]
                )  # fmt: skip
                cells.append({"N": n, "dtype": dtype, "median_s": median, "error_ulp": error})
                if dtype != "<f4":
                    report.check(
                        f"precision N={n} {dtype}: rounded once (error <= 0.5 ulp + float32's)",
                        error <= 0.51,
                        f"{error:.3f} ulp",
                    )
                for path in [base, *(c.path for c in contributions)]:
                    path.unlink()
            report.check(
                f"precision N={n}: bfloat16 fold <= 1.5x the float32 fold's time",
                times["bfloat16"] <= 1.5 * times["<f4"],
                f"{times['bfloat16']:.3f} s vs {times['<f4']:.3f} s",
            )
    report.data = {"cells": cells, "parameters": p}
    report.notes.append(
        "error: max |fold - exact| over every 4099th parameter, in ulps of the output dtype; "
        "float16/bfloat16 are widened to float32 per block, summed with BLAS saxpy and rounded "
        "to the model's dtype once (0.5 ulp is the rounding itself)"
    )
    return report


def _flower_error(base: Path, contributions: list[Contribution]) -> str:
    """Flower's aggregate() on float16 deltas (as a NumPyClient sends a float16 model)."""
    from flwr.server.strategy.aggregate import aggregate

    t = numpy_dtype("<f2")
    results = [
        (np.fromfile(c.path, dtype=t)[::SAMPLE].copy(), c.num_examples) for c in contributions
    ]
    with np.errstate(over="ignore", invalid="ignore"):
        mean = aggregate([([d], n) for d, n in results])[0]
        got = np.fromfile(base, dtype=t)[::SAMPLE] + mean.astype(t)
    exact = _exact(base, contributions, "<f2")
    if not np.isfinite(got.astype(np.float64)).all():
        return "overflows to inf"
    return f"{_ulps(got, exact, '<f2'):.1f}"
