"""First benchmark: Sluice's streaming FedAvg against Flower's, on the same spooled updates.

Run: python -m bench.bench_first [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil  # type: ignore[import-untyped]  # psutil ships no type hints

from bench.push import LARGE_MODEL, bench_push
from gateway.core.aggregation import DEFAULT_BLOCK_BYTES, Contribution, fold_fedavg
from models.schema import Schema, TensorSpec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RSS_INTERVAL_S = 0.001
SAMPLE_STRIDE = 9973  # every k-th parameter of the result is compared across methods


@dataclass(frozen=True)
class Options:
    quick: bool
    workdir: Path | None  # where updates are spooled; None: the system temp dir
    repeats: int  # timed runs per method; the median is reported


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    """What one benchmark prints and saves: a titled table and PASS/FAIL checks."""

    title: str
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


# --- the spooled round: what the gateway has on disk when a round closes -------------


@dataclass(frozen=True)
class Spool:
    directory: Path
    schema: Schema
    num_examples: tuple[int, ...]  # one per update, in fold order
    block_bytes: int  # Sluice's fold block size

    @property
    def base_path(self) -> Path:
        return self.directory / "base.bin"

    def update_path(self, i: int) -> Path:
        return self.directory / f"update-{i}.bin"

    @property
    def model_bytes(self) -> int:
        return self.schema.payload_bytes


def bench_schema(num_parameters: int) -> Schema:
    """A few float32 tensors summing to `num_parameters`, like a small vision backbone."""
    big = num_parameters * 2 // 3
    mid = num_parameters // 3 // 1000 * 1000
    tail = num_parameters - big - mid
    return Schema(
        (
            TensorSpec("backbone.weight", (big,), "<f4"),
            TensorSpec("neck.weight", (mid // 1000, 1000), "<f4"),
            TensorSpec("head.weight", (tail,), "<f4"),
        )
    )


def write_spool(directory: Path, schema: Schema, num_updates: int, block_bytes: int) -> Spool:
    rng = np.random.default_rng(2024)
    num_examples = tuple(int(n) for n in rng.integers(100, 5000, size=num_updates))
    spool = Spool(directory, schema, num_examples, block_bytes)
    n = schema.num_parameters
    rng.standard_normal(n, dtype=np.float32).tofile(spool.base_path)
    for i in range(num_updates):
        delta = rng.standard_normal(n, dtype=np.float32)
        delta *= np.float32(0.01)
        delta.tofile(spool.update_path(i))
    return spool


# --- the methods under test ---------------------------------------------------------
# Each `prepare_*` loads what the method needs into memory (not timed as part of the
# method, but reported), and returns how to run it once, sample its result and drop it.


@dataclass(frozen=True)
class Prepared:
    run: Callable[[], Any]
    sample: Callable[[Any], np.ndarray]  # mean delta at every SAMPLE_STRIDE-th parameter
    discard: Callable[[Any], None]


def _sample_indices(spool: Spool) -> np.ndarray:
    return np.arange(0, spool.schema.num_parameters, SAMPLE_STRIDE)


def _flat_sample(spool: Spool, arrays: Sequence[np.ndarray]) -> np.ndarray:
    flat = np.concatenate([np.ravel(a) for a in arrays])
    return np.asarray(flat[_sample_indices(spool)], dtype=np.float64)


def _load_arrays(spool: Spool, i: int) -> list[np.ndarray]:
    """An update as Flower holds it after deserialising: one ndarray per tensor."""
    raw = np.fromfile(spool.update_path(i), dtype=np.uint8)
    return list(spool.schema.views(raw).values())


def prepare_sluice(spool: Spool) -> Prepared:
    contributions = [
        Contribution(spool.update_path(i), n) for i, n in enumerate(spool.num_examples)
    ]
    counter = itertools.count()

    def run() -> Path:
        out = spool.directory / f"sluice-out-{next(counter)}.bin"
        with out.open("wb") as sink:
            for block in fold_fedavg(
                spool.schema, spool.base_path, contributions, block_bytes=spool.block_bytes
            ):
                sink.write(block)
        return out

    def sample(out: Path) -> np.ndarray:
        idx = _sample_indices(spool)
        new = np.asarray(np.memmap(out, dtype="<f4", mode="r")[idx], dtype=np.float64)
        base = np.asarray(np.memmap(spool.base_path, dtype="<f4", mode="r")[idx], dtype=np.float64)
        return new - base

    return Prepared(run, sample, lambda out: out.unlink())


def _import_flwr() -> None:
    # flwr pulls in typer, which warns about click; keep the bench output clean.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import flwr.common  # noqa: F401


def prepare_flower_aggregate(spool: Spool) -> Prepared:
    _import_flwr()
    from flwr.server.strategy.aggregate import aggregate

    results = [(_load_arrays(spool, i), n) for i, n in enumerate(spool.num_examples)]
    return Prepared(
        lambda: aggregate(results), lambda out: _flat_sample(spool, out), lambda out: None
    )


def prepare_flower_inplace(spool: Spool) -> Prepared:
    _import_flwr()
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy.aggregate import aggregate_inplace

    # FitRes carries np.save bytes, as they arrive from the wire; aggregate_inplace
    # deserialises them itself (that is part of its time). It ignores the ClientProxy.
    results = [
        (
            cast(ClientProxy, None),
            FitRes(Status(Code.OK, ""), ndarrays_to_parameters(_load_arrays(spool, i)), n, {}),
        )
        for i, n in enumerate(spool.num_examples)
    ]
    return Prepared(
        lambda: aggregate_inplace(results), lambda out: _flat_sample(spool, out), lambda out: None
    )


def prepare_flower_message_api(spool: Spool) -> Prepared:
    _import_flwr()
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    names = [spec.name for spec in spool.schema.tensors]
    records = [
        RecordDict(
            {
                "arrays": ArrayRecord(
                    {name: Array(a) for name, a in zip(names, _load_arrays(spool, i), strict=True)}
                ),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        for i, n in enumerate(spool.num_examples)
    ]

    def sample(out: Any) -> np.ndarray:
        return _flat_sample(spool, [out[name].numpy() for name in names])

    return Prepared(
        lambda: aggregate_arrayrecords(records, "num-examples"), sample, lambda out: None
    )


# name -> (label in the table, loader)
METHODS: dict[str, tuple[str, Callable[[Spool], Prepared]]] = {
    "sluice": ("Sluice fold_fedavg -> file", prepare_sluice),
    "aggregate": ("Flower aggregate", prepare_flower_aggregate),
    "aggregate_inplace": ("Flower aggregate_inplace", prepare_flower_inplace),
    "message_api": ("Flower aggregate_arrayrecords", prepare_flower_message_api),
}


# --- measuring one method in a fresh process ----------------------------------------


@dataclass(frozen=True)
class Measurement:
    method: str
    load_s: float  # loading the inputs into memory (Flower) or nothing (Sluice)
    first_s: float  # the first call in the process (RSS-sampled): pays for fresh pages
    times_s: tuple[float, ...]  # the timed calls after it
    extra_rss_bytes: int  # peak RSS above the RSS with inputs loaded, sampled every ~1 ms
    extra_traced_bytes: int  # tracemalloc peak of allocations made during the call
    sample: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def extra_bytes(self) -> int:
        """The larger of the two measures: each can miss what the other sees."""
        return max(self.extra_rss_bytes, self.extra_traced_bytes)


class PeakRss:
    """Samples this process's RSS in a thread; `extra` is the peak above the entry value."""

    def __init__(self, interval_s: float = RSS_INTERVAL_S) -> None:
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = 0
        self.peak = 0

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


def _settle() -> None:
    """Free garbage and give freed heap back to the OS, so baselines are honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(method: str, spool: Spool, repeats: int) -> Measurement:
    """Runs in a fresh process: load inputs, one RSS-sampled run, one traced run, timed runs."""
    _import_flwr()  # for every method alike, and outside the load time
    started = time.perf_counter()
    prepared = METHODS[method][1](spool)
    load_s = time.perf_counter() - started

    _settle()
    with PeakRss() as rss:
        started = time.perf_counter()
        result = prepared.run()
        first_s = time.perf_counter() - started
    sample = prepared.sample(result)
    prepared.discard(result)
    del result

    _settle()
    tracemalloc.start()
    try:
        result = prepared.run()
        _, traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    prepared.discard(result)
    del result

    times = []
    for _ in range(repeats):
        _settle()
        started = time.perf_counter()
        result = prepared.run()
        times.append(time.perf_counter() - started)
        prepared.discard(result)
        del result
    return Measurement(
        method, load_s, first_s, tuple(times), rss.extra, traced, tuple(sample.tolist())
    )


def measure_in_fresh_process(method: str, spool: Spool, repeats: int) -> Measurement:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, method, spool, repeats).result()


# --- benchmark 1: aggregation -------------------------------------------------------


def bench_aggregation(options: Options) -> Report:
    num_updates = 8
    num_parameters = 2_500_000 if options.quick else 25_000_000
    block_bytes = (1 << 20) if options.quick else DEFAULT_BLOCK_BYTES
    schema = bench_schema(num_parameters)
    report = Report(
        f"Aggregation: {num_updates} updates of {num_parameters / 1e6:g}M float32 parameters "
        f"({schema.payload_bytes / 1e6:g} MB model), Sluice block_bytes={block_bytes >> 10} KiB, "
        f"{os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="sluice-bench-", dir=options.workdir) as tmp:
        started = time.perf_counter()
        spool = write_spool(Path(tmp), schema, num_updates, block_bytes)
        os.sync()  # no write-back of the spool competing with the first measured calls
        spool_s = time.perf_counter() - started
        report.lines.append(f"spooled base + {num_updates} updates to {tmp} in {spool_s:.1f} s")
        results = {m: measure_in_fresh_process(m, spool, options.repeats) for m in METHODS}

    model = schema.payload_bytes
    ref = results["aggregate_inplace"]
    header = (
        f"{'method':<32}{'load (untimed)':>15}{'1st call':>10}{'time (med)':>12}{'extra RSS':>11}"
        f"{'extra traced':>14}{'time/inplace':>14}{'mem/inplace':>13}"
    )
    report.lines += [header, "-" * len(header)]
    for name, m in results.items():
        report.lines.append(
            f"{METHODS[name][0]:<32}{m.load_s:>13.2f} s{m.first_s:>8.3f} s{m.median_s:>10.3f} s"
            f"{m.extra_rss_bytes / model:>10.2f}x{m.extra_traced_bytes / model:>13.2f}x"
            f"{m.median_s / ref.median_s:>13.2f}x{m.extra_bytes / ref.extra_bytes:>12.2f}x"
        )
    report.lines += [
        f"time (med): median of {options.repeats} calls after the first; 1st call: the first "
        "call in a fresh process, which also pays for fresh pages",
        "extra memory: peak above the loaded inputs, as a multiple of the model size; "
        "time/inplace and mem/inplace compare with aggregate_inplace (mem: larger of RSS, traced)",
    ]

    sluice, plain = results["sluice"], results["aggregate"]
    report.checks.append(
        Check(
            "Sluice extra memory < both Flower methods",
            sluice.extra_bytes < min(plain.extra_bytes, ref.extra_bytes),
            f"{sluice.extra_bytes / model:.2f}x vs aggregate {plain.extra_bytes / model:.2f}x, "
            f"aggregate_inplace {ref.extra_bytes / model:.2f}x",
        )
    )
    report.checks.append(
        Check(
            "Sluice time <= aggregate_inplace time",
            sluice.median_s <= ref.median_s,
            f"{sluice.median_s:.3f} s vs {ref.median_s:.3f} s",
        )
    )
    expected = np.asarray(sluice.sample)
    worst = max(float(np.max(np.abs(np.asarray(m.sample) - expected))) for m in results.values())
    report.checks.append(
        Check(
            "all methods compute the same mean (sampled)",
            all(np.allclose(m.sample, expected, rtol=1e-5, atol=1e-6) for m in results.values()),
            f"max |difference| {worst:.2e} over {expected.size} parameters",
        )
    )
    report.data = {
        "num_updates": num_updates,
        "num_parameters": num_parameters,
        "model_bytes": model,
        "block_bytes": block_bytes,
        "cpus": os.cpu_count(),
        "methods": {
            name: {**asdict(m), "sample": None, "median_s": m.median_s}
            for name, m in results.items()
        },
    }
    return report


# --- benchmark 2: one large update pushed over loopback gRPC ---------------------------


def bench_push_report(options: Options) -> Report:
    model = "drivenet" if options.quick else LARGE_MODEL
    r = bench_push(model, repeats=options.repeats)
    report = Report(
        f"Push: one {r['payload_mb']:.0f} MB update of {model} over loopback gRPC to a "
        "`sluice serve` process, until the commit is acknowledged"
    )
    report.lines += [
        f"gateway start (template export + self-test): {r['gateway_startup_s']:.1f} s",
        f"push (median of {options.repeats}): {r['push_s']:.2f} s = {r['push_mb_s']:.0f} MB/s",
        f"raw TCP loopback socket, same bytes: {r['raw_socket_mb_s']:.0f} MB/s "
        f"(push reaches {r['push_mb_s'] / r['raw_socket_mb_s']:.0%} of it)",
    ]
    if not options.quick:
        report.checks.append(
            Check(
                "pushed update is at least 400 MB",
                r["payload_mb"] >= 400,
                f"{r['payload_mb']:.0f} MB",
            )
        )
    report.data = dict(r)
    return report


# The benchmarks `main` runs, in order; each takes Options and returns a Report.
BENCHMARKS: list[Callable[[Options], Report]] = [bench_aggregation, bench_push_report]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_first", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 10x smaller model")
    parser.add_argument("--workdir", type=Path, help="where to spool updates (default: temp)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method")
    args = parser.parse_args(argv)
    options = Options(quick=args.quick, workdir=args.workdir, repeats=args.repeats)

    reports = []
    for bench in BENCHMARKS:
        report = bench(options)
        reports.append(report)
        print(f"\n== {report.title}")
        for line in report.lines:
            print(line)
        for check in report.checks:
            print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        sys.stdout.flush()

    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"first{'-quick' if options.quick else ''}.json"
    saved = [
        {"title": r.title, "checks": [asdict(c) for c in r.checks], "data": r.data} for r in reports
    ]
    out.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"\nresults saved to {out}")
    return 0 if all(c.ok for r in reports for c in r.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
