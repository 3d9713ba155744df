"""Aggregation: Sluice's streaming fold against Flower's three FedAvg functions and the
machine's limit, on the same spooled updates, for N updates of P float32 parameters.

Every (method, N, P) cell runs in a fresh `spawn` process: load what the method needs (not
timed, reported), one call sampled for RSS, one under tracemalloc, then timed calls.
"""

from __future__ import annotations

import importlib
import itertools
import multiprocessing
import os
import time
import tracemalloc
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil  # type: ignore[import-untyped]  # psutil ships no type hints

from bench.common import Options, PeakRss, Report, median, settle, workdir
from sluice.gateway.core.aggregation import Contribution, fold_fedavg
from sluice.models.schema import Schema, TensorSpec

LIMIT_READ_BYTES = 8 << 20  # the limit's read size
TIMED_SECONDS, MAX_REPEATS = 1.0, 15  # timed runs per cell: at least --repeats, up to this
SAMPLE_STRIDE = 9973  # every k-th parameter of the result is compared across methods
FULL_GRID = ((4, 16, 64), (25_000_000, 100_000_000))
QUICK_GRID = ((4, 16, 64), (2_500_000,))
# A Flower method runs only where its inputs plus its expected extra memory fit in this
# share of the machine's RAM; otherwise the cell says why it was skipped.
RAM_SHARE = 0.75


@dataclass(frozen=True)
class Spool:
    """What the gateway has on disk when a round closes: a base and N delta payloads."""

    directory: Path
    schema: Schema
    num_examples: tuple[int, ...]  # one per update, in fold order

    @property
    def base_path(self) -> Path:
        return self.directory / "base.bin"

    def update_path(self, i: int) -> Path:
        return self.directory / f"update-{i}.bin"

    @property
    def model_bytes(self) -> int:
        return self.schema.payload_bytes

    def first(self, n: int) -> Spool:
        return Spool(self.directory, self.schema, self.num_examples[:n])


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


def write_spool(directory: Path, schema: Schema, num_updates: int) -> Spool:
    """Base and updates as distinct files; update i is a rotated, rescaled copy of one noise
    draw (distinct bytes, so nothing is shared in the page cache, at a fraction of the cost
    of drawing N times)."""
    rng = np.random.default_rng(2024)
    num_examples = tuple(int(n) for n in rng.integers(100, 5000, size=num_updates))
    spool = Spool(directory, schema, num_examples)
    n = schema.num_parameters
    noise = rng.standard_normal(n, dtype=np.float32)
    noise.tofile(spool.base_path)
    noise *= np.float32(0.01)
    for i in range(num_updates):
        delta = np.roll(noise, 7919 * (i + 1))
        delta *= np.float32(1.0 + i / num_updates)
        delta.tofile(spool.update_path(i))
    return spool


# --- the methods under test ---------------------------------------------------------
# Each `prepare_*` loads what the method needs into memory (reported, not timed), and
# returns how to run it once, sample its result and drop it.


@dataclass(frozen=True)
class Prepared:
    run: Callable[[], Any]
    sample: Callable[[Any], np.ndarray]  # mean delta at every SAMPLE_STRIDE-th parameter
    discard: Callable[[Any], None]


def _sample_indices(spool: Spool) -> np.ndarray:
    return np.arange(0, spool.schema.num_parameters, SAMPLE_STRIDE)


def _flat_sample(spool: Spool, arrays: Sequence[np.ndarray]) -> np.ndarray:
    idx = _sample_indices(spool)
    out, offset = [], 0
    for a in arrays:  # gather per tensor: concatenating would allocate a model's worth
        flat = np.ravel(a)
        local = idx[(idx >= offset) & (idx < offset + flat.size)] - offset
        out.append(np.asarray(flat[local], dtype=np.float64))
        offset += flat.size
    return np.concatenate(out)


def _load_arrays(spool: Spool, i: int) -> list[np.ndarray]:
    """An update as Flower holds it after deserialising: one ndarray per tensor."""
    raw = np.fromfile(spool.update_path(i), dtype=np.uint8)
    return list(spool.schema.views(raw).values())


def prepare_sluice(spool: Spool) -> Prepared:
    # What a gateway's warm-up imports once it is ready (server.py: WARM_MODULES): the fold's
    # BLAS, loaded here, not inside the first (RSS-sampled) call.
    importlib.import_module("scipy.linalg.blas")
    contributions = [
        Contribution(spool.update_path(i), n) for i, n in enumerate(spool.num_examples)
    ]
    counter = itertools.count()

    def run() -> Path:
        out = spool.directory / f"sluice-out-{os.getpid()}-{next(counter)}.bin"
        with out.open("wb") as sink:
            for block in fold_fedavg(spool.schema, spool.base_path, contributions):
                sink.write(block)
        return out

    def sample(out: Path) -> np.ndarray:
        idx = _sample_indices(spool)
        new = np.asarray(np.memmap(out, dtype="<f4", mode="r")[idx], dtype=np.float64)
        base = np.asarray(np.memmap(spool.base_path, dtype="<f4", mode="r")[idx], dtype=np.float64)
        return new - base

    return Prepared(run, sample, lambda out: out.unlink())


def prepare_limit(spool: Spool) -> Prepared:
    """The machine's limit: every update file read once, front to back in 8 MiB reads, and
    `numpy.add(..., out=)` into a model-sized accumulator. No weights, no base, no output,
    and the kindest access pattern for the disk: the least any fold has to do. (Its
    accumulator is the whole model: this is a time limit, its memory is not judged.)"""
    chunk = LIMIT_READ_BYTES // 4

    def run() -> np.ndarray:
        acc = np.zeros(spool.model_bytes // 4, dtype=np.float32)
        buf = np.empty(chunk, dtype=np.float32)
        for i in range(len(spool.num_examples)):
            fd = os.open(spool.update_path(i), os.O_RDONLY)
            try:
                for at in range(0, acc.size, chunk):
                    count = min(chunk, acc.size - at)
                    os.preadv(fd, [buf[:count].view(np.uint8).data], at * 4)
                    np.add(acc[at : at + count], buf[:count], out=acc[at : at + count])
            finally:
                os.close(fd)
        return acc

    return Prepared(run, lambda out: np.zeros(0), lambda out: None)


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


@dataclass(frozen=True)
class Method:
    label: str
    prepare: Callable[[Spool], Prepared]
    # Memory it needs beyond the spool files, in models: inputs held + expected extra.
    ram_models: Callable[[int], float]


METHODS: dict[str, Method] = {
    "sluice": Method("Sluice fold_fedavg -> file", prepare_sluice, lambda n: 0.0),
    "aggregate": Method("Flower aggregate", prepare_flower_aggregate, lambda n: 2.0 * n + 2),
    "aggregate_inplace": Method(
        "Flower aggregate_inplace", prepare_flower_inplace, lambda n: n + 3.0
    ),
    "arrayrecords": Method(
        "Flower aggregate_arrayrecords", prepare_flower_message_api, lambda n: n + 3.0
    ),
    "limit": Method("limit: read + numpy.add", prepare_limit, lambda n: 0.0),
}


# --- measuring one cell in a fresh process ------------------------------------------


@dataclass(frozen=True)
class Measurement:
    method: str
    num_updates: int
    num_parameters: int
    load_s: float  # loading the inputs into memory (Flower) or nothing (Sluice, limit)
    first_s: float  # the first call in the process (RSS-sampled): pays for fresh pages
    times_s: tuple[float, ...]  # the timed calls after it
    extra_rss_bytes: int  # peak RSS above the RSS with inputs loaded, sampled every ~1 ms
    extra_traced_bytes: int  # tracemalloc peak of allocations made during the call
    sample: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return median(self.times_s)

    @property
    def extra_bytes(self) -> int:
        """The larger of the two measures: each can miss what the other sees."""
        return max(self.extra_rss_bytes, self.extra_traced_bytes)


def measure(method: str, spool: Spool, repeats: int) -> Measurement:
    """Runs in a fresh process: load inputs, one RSS-sampled run, one traced run, timed runs."""
    _import_flwr()  # for every method alike, and outside the load time
    started = time.perf_counter()
    prepared = METHODS[method].prepare(spool)
    load_s = time.perf_counter() - started

    settle()
    with PeakRss() as rss:
        started = time.perf_counter()
        result = prepared.run()
        first_s = time.perf_counter() - started
    sample = prepared.sample(result)
    prepared.discard(result)
    del result

    settle()
    tracemalloc.start()
    try:
        result = prepared.run()
        _, traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    prepared.discard(result)
    del result

    # Short calls get more timed runs (about a second's worth, at most MAX_REPEATS): a
    # median of three 50 ms calls on a shared 2-core machine is mostly noise.
    times = []
    for _ in range(max(repeats, min(MAX_REPEATS, int(TIMED_SECONDS / max(first_s, 1e-3))))):
        settle()
        started = time.perf_counter()
        result = prepared.run()
        times.append(time.perf_counter() - started)
        prepared.discard(result)
        del result
    return Measurement(
        method,
        len(spool.num_examples),
        spool.schema.num_parameters,
        load_s,
        first_s,
        tuple(times),
        rss.extra,
        traced,
        tuple(sample.tolist()),
    )


def measure_in_fresh_process(method: str, spool: Spool, repeats: int) -> Measurement:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, method, spool, repeats).result()


# --- the benchmark ------------------------------------------------------------------


def bench_aggregation(options: Options) -> Report:
    counts, sizes = QUICK_GRID if options.quick else FULL_GRID
    ram = psutil.virtual_memory().total
    report = Report(
        "aggregation",
        f"Aggregation: N in {counts} updates of P in "
        f"{tuple(f'{p / 1e6:g}M' for p in sizes)} float32 parameters, spooled on disk, "
        f"{os.cpu_count()} CPUs, {ram / 2**30:.0f} GiB RAM",
    )
    report.rows.append(
        ["P", "N", "method", "time (med)", "GB/s", "extra mem", "time / aggregate", "vs limit"]
    )
    cells: list[dict[str, Any]] = []
    for num_parameters in sizes:
        schema = bench_schema(num_parameters)
        model = schema.payload_bytes
        with workdir(options, "agg") as tmp:
            started = time.perf_counter()
            full = write_spool(Path(tmp), schema, max(counts))
            os.sync()  # no write-back of the spool competing with the measured calls
            report.notes.append(
                f"P={num_parameters / 1e6:g}M: spooled base + {max(counts)} updates "
                f"({(max(counts) + 1) * model / 1e9:.1f} GB) "
                f"in {time.perf_counter() - started:.1f} s"
            )
            for n in counts:
                spool = full.first(n)
                results: dict[str, Measurement] = {}
                for name, method in METHODS.items():
                    need = method.ram_models(n) * model
                    if need > RAM_SHARE * ram:
                        cells.append(
                            {
                                "P": num_parameters,
                                "N": n,
                                "method": name,
                                "skipped": f"needs ~{need / 2**30:.0f} GiB of RAM "
                                f"(inputs held in memory), machine has {ram / 2**30:.0f} GiB",
                            }
                        )
                        continue
                    results[name] = measure_in_fresh_process(name, spool, options.repeats)
                cells += _cell_rows(report, spool, results)
    report.data = {"cells": cells}
    _checks(report, cells)
    report.notes += [
        "time (med): median of the timed calls (at least --repeats, up to 15 for calls under "
        "~0.3 s) after a first (RSS-sampled) and a traced call, each method in a fresh process; "
        "GB/s: the N updates' bytes read / time",
        "extra mem: peak above the loaded inputs as a multiple of the model size (larger of "
        "sampled RSS and tracemalloc); Flower holds its N inputs in memory before the call, "
        "Sluice and the limit read them from the spool files",
        "limit: each file read once front to back + numpy.add(out=) into a model-sized "
        "accumulator; from the page cache while the spool fits in it, else from disk",
    ]
    return report


def _cell_rows(
    report: Report, spool: Spool, results: dict[str, Measurement]
) -> list[dict[str, Any]]:
    n, model = len(spool.num_examples), spool.model_bytes
    plain, limit = results.get("aggregate"), results.get("limit")
    expected = np.asarray(results["sluice"].sample)
    cells = []
    for name, m in results.items():
        if name != "limit" and not np.allclose(m.sample, expected, rtol=1e-5, atol=1e-6):
            report.check(f"{name} computes the same mean as Sluice, N={n}", False, "differs")
        cells.append(
            {
                **{k: v for k, v in asdict(m).items() if k != "sample"},
                "P": m.num_parameters,
                "N": n,
                "median_s": m.median_s,
                "gb_s": n * model / m.median_s / 1e9,
                "extra_model": m.extra_bytes / model,
            }
        )
        report.rows.append(
            [
                f"{m.num_parameters / 1e6:g}M",
                str(n),
                METHODS[name].label,
                f"{m.median_s:.3f} s",
                f"{n * model / m.median_s / 1e9:.2f}",
                f"{m.extra_bytes / model:.2f}x",
                f"{m.median_s / plain.median_s:.2f}x" if plain else "n/a",
                f"{m.median_s / limit.median_s:.2f}x" if limit else "n/a",
            ]
        )
    return cells


def _checks(report: Report, cells: list[dict[str, Any]]) -> None:
    by = {(c["P"], c["N"], c["method"]): c for c in cells if "skipped" not in c}
    sluice = [c for c in cells if c["method"] == "sluice"]
    for c in sluice:
        key = (c["P"], c["N"])
        label = f"P={c['P'] / 1e6:g}M N={c['N']}"
        plain, inplace = by.get((*key, "aggregate")), by.get((*key, "aggregate_inplace"))
        if plain:
            ratio = plain["median_s"] / c["median_s"]
            report.check(
                f"aggregation {label}: >= 2x faster than aggregate",
                ratio >= 2,
                f"{ratio:.1f}x ({c['median_s']:.3f} s vs {plain['median_s']:.3f} s)",
            )
        if inplace:
            report.check(
                f"aggregation {label}: no slower than aggregate_inplace",
                c["median_s"] <= inplace["median_s"],
                f"{c['median_s']:.3f} s vs {inplace['median_s']:.3f} s",
            )
        report.check(
            f"aggregation {label}: extra memory <= 1.25x model",
            c["extra_model"] <= 1.25,
            f"{c['extra_model']:.2f}x",
        )
    for p in sorted({c["P"] for c in sluice}):
        mems = {
            c["N"]: max(c["extra_rss_bytes"], c["extra_traced_bytes"])
            for c in sluice
            if c["P"] == p
        }
        report.check(
            f"aggregation P={p / 1e6:g}M: Sluice memory flat in N (spread <= 0.05x model)",
            max(mems.values()) - min(mems.values()) <= 0.05 * p * 4,
            ", ".join(f"N={n}: {m / 2**20:.1f} MiB" for n, m in sorted(mems.items())),
        )
