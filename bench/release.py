"""Release: time from round close to a signed, guarded ONNX release in a `sluice serve`
process (CloseRound: fold, template refresh, parity in onnxruntime, egress guard, signing,
audit), next to `torch.onnx.export` of the same model and to writing the same bytes; and the
gateway's start-up, until ready, on a data dir that holds its templates."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench import gateway_proc
from bench.common import (
    MB,
    Options,
    Report,
    io_floor_seconds,
    median,
    settle,
    workdir,
    write_seconds,
)
from sluice.clients.sdk import AdminClient, TrainerClient
from sluice.models import registry

FULL = ("drivenet-5m", "drivenet-xl", "drivenet-600m")
QUICK = ("drivenet-5m",)
# torch.onnx.export of the largest model takes tens of seconds and ~3x its memory: once.
PEER_REPEATS = {"drivenet-600m": 1}
# Issue 14's floors: (fewest parameters, most, close <= this x torch.onnx.export or None,
# close <= this x a raw write + fsync of the release's bytes).
FLOORS = ((50e6, 200e6, None, 3.0), (500e6, 1e9, 1.0, 2.5))
READY_MODEL, READY_MODEL_QUICK = "drivenet-xl", "drivenet-5m"  # start-up on its data dir
READY_STARTS = 5
READY_S = 2.0  # gateway ready on an existing data dir
SETTLE_S = 2.0  # idle before each close and before the raw write after it
# The gateway's own lines for each close (gateway/core/folding.py, gateway/export/publish.py).
_FOLD_LINE = re.compile(r"closed: \d+ updates -> version \d+ in [\d.]+s \(aggregation ([\d.]+)s\)")
_RELEASE_LINE = re.compile(r"release \d+ of \S+: (.*)$")
_STAGE = re.compile(r"(\w+) ([\d.]+)s")


def close_stages(log: str) -> dict[str, list[float]]:
    """Seconds per stage of each close, from the gateway's log: aggregation (the fold, the
    spool files' re-hash beside it, adopting the version blob: hashed, NaN-scanned, fsynced),
    then the release's trim, write, parity, guard and sync."""
    stages: dict[str, list[float]] = {}
    for line in log.splitlines():
        if fold := _FOLD_LINE.search(line):
            stages.setdefault("aggregation", []).append(float(fold.group(1)))
        elif release := _RELEASE_LINE.search(line):
            for name, seconds in _STAGE.findall(release.group(1)):
                stages.setdefault(name, []).append(float(seconds))
    order = ["aggregation", "trim", "write", "parity", "guard", "sync"]
    return dict(sorted(stages.items(), key=lambda kv: [*order, kv[0]].index(kv[0])))


def torch_export_seconds(model: str, directory: str) -> float:
    """Runs in a fresh process: torch.onnx.export of the model with its defaults (dynamo,
    optimize=True, external data), as a user exporting the merged weights would call it."""
    import logging
    import warnings

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"

    entry = registry.get(model)
    module = entry.build(seed=0)
    example = entry.example_inputs()
    settle()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        started = time.perf_counter()
        torch.onnx.export(
            module,
            example,
            str(Path(directory) / "exported.onnx"),
            input_names=list(entry.input_names),
            output_names=list(entry.output_names),
            verbose=False,
        )
        return time.perf_counter() - started


def _peer_seconds(model: str, directory: Path, repeats: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    times = []
    for _ in range(repeats):
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            times.append(pool.submit(torch_export_seconds, model, str(directory)).result())
        for f in directory.glob("exported.onnx*"):
            f.unlink()
    return times


@dataclass(frozen=True)
class ReleaseRun:
    close_s: list[float]  # CloseRound until the release is published, per round
    release_bytes: int
    startup_s: float  # the first start on this data dir, until ready
    built: list[str]  # models whose templates that start exported
    live_s: float  # that start: until /healthz answered (ports bound)
    says_exporting: bool  # its log named the export step and the bound ports before ready
    ready_s: list[float]  # later starts on the same data dir, until ready
    stages: dict[str, list[float]]  # seconds per stage of each close (close_stages)
    linked: bool = False  # the release's data file is the version blob (a hard link)
    raw_write_s: list[float] = dataclasses.field(default_factory=list)  # after each close
    # After each raw write: the update read (O_DIRECT) while the release's bytes are written
    # and fsynced, at once (common.io_floor_seconds)
    io_floor_s: list[float] = dataclasses.field(default_factory=list)


def _release_seconds(
    model: str, root: Path, templates: Path, repeats: int, ready_starts: int
) -> ReleaseRun:
    """A first start (it exports the model's template unless an earlier benchmark of this
    run did: its facts are the first-start check's); then, in a gateway started on the
    built template, push one update per round and time CloseRound until the release is
    published; then, given ready_starts, start the gateway that many times again on the
    data dir it left (templates, versions, releases in place) and time each until ready.

    Closes run in a gateway that did not export in the same process, as a deployment's
    do (it builds a template once, ever): the exporter's leftovers (its modules, a heap
    it grew) cost the closes after it ~0.4 s each at 100M here (2.75-3.28 vs 2.36-2.58 s)."""
    schema = gateway_proc.schema_of(model)
    payload = gateway_proc.random_payload(schema, seed=3)
    first = gateway_proc.start(root / "first", (model,), templates)
    gateway_proc.stop(first, templates)
    first_log = (root / "first" / "gateway.log").read_text(errors="replace")
    gw = gateway_proc.start(root / "gw", (model,), templates)
    closes: list[float] = []
    raw: list[float] = []
    io_floor: list[float] = []
    sha = hashlib.sha256(payload).hexdigest()
    update = root / "gw" / "blobs" / sha[:2] / sha  # every round pushes the same bytes
    zeros = b""
    try:
        with TrainerClient(gw.internal) as trainer, AdminClient(gw.internal) as admin:
            for r in range(repeats):
                info = trainer.round(model)
                trainer.push_update(
                    model=model,
                    round_no=info.round,
                    base_version=info.base_version,
                    schema_hash=schema.hash,
                    trainer=f"release-{r}",
                    region="shanghai",
                    num_examples=100,
                    payload=payload,
                )
                time.sleep(SETTLE_S)  # after the push's writes, as the raw write after them
                started = time.perf_counter()
                resp = admin.close_round(model, info.round)
                closes.append(time.perf_counter() - started)
                if not resp.released:
                    raise RuntimeError(f"{model}: no release: {resp.release_refused}")
                # The disk's rate after this close, each after the same pause after a burst
                # of writes (the push's, the close's): this VM's disk slows after bursts, so
                # a close is judged against the disk of its own moment.
                release = root / "gw" / "registry" / model / str(resp.version)
                release_bytes = sum(f.stat().st_size for f in release.iterdir())
                zeros = zeros if len(zeros) == release_bytes else bytes(release_bytes)
                time.sleep(SETTLE_S)
                raw.append(write_seconds(zeros, root))
                time.sleep(SETTLE_S)
                io_floor.append(io_floor_seconds(update, zeros, root))
        linked = any(f.stat().st_nlink > 1 for f in release.iterdir() if f.name.endswith(".data"))
        log = (root / "gw" / "gateway.log").read_text(errors="replace")
    finally:
        gateway_proc.stop(gw, templates)
    del payload, zeros
    ready = gateway_proc.ready_seconds(root / "gw", (model,), templates, ready_starts)
    return ReleaseRun(
        close_s=closes,
        release_bytes=release_bytes,
        startup_s=first.startup_s,
        built=list(first.built),
        live_s=first.live_s,
        says_exporting="exporting the" in first_log and "not ready yet" in first_log,
        ready_s=ready,
        stages=close_stages(log),
        linked=linked,
        raw_write_s=raw,
        io_floor_s=io_floor,
    )


def bench_release(options: Options, templates: Path) -> Report:
    models = QUICK if options.quick else FULL
    ready_model = READY_MODEL_QUICK if options.quick else READY_MODEL
    report = Report(
        "release",
        "Release: round close to a signed, guarded ONNX release, vs torch.onnx.export and a raw "
        "write of the same bytes; gateway start-up",
    )
    report.rows.append(
        ["model", "parameters", "release", "Sluice close", "torch.onnx.export", "raw write",
         "Sluice / export", "Sluice / raw write"]
    )  # fmt: skip
    runs: dict[str, ReleaseRun] = {}
    results: dict[str, dict[str, object]] = {}
    stage_notes: list[str] = []
    for model in models:
        params = gateway_proc.schema_of(model).num_parameters
        starts = READY_STARTS if model == ready_model else 0
        with workdir(options, "release") as tmp:
            r = runs[model] = _release_seconds(model, Path(tmp), templates, options.repeats, starts)
            size = r.release_bytes
            peer = _peer_seconds(model, Path(tmp), PEER_REPEATS.get(model, options.repeats))
        raw = r.raw_write_s
        close, export, write = median(r.close_s), median(peer), median(raw)
        # Each close against the raw write made right after it, then the median.
        vs_raw = [c / w for c, w in zip(r.close_s, raw, strict=True)]
        results[model] = {
            **dataclasses.asdict(r), "parameters": params, "torch_export_s": peer,
            "raw_write_s": raw, "close_median_s": close, "torch_export_median_s": export,
            "raw_write_median_s": write,
        }  # fmt: skip
        report.rows.append(
            [model, f"{params / 1e6:.1f}M", f"{size / MB:.0f} MB", f"{close:.2f} s",
             f"{export:.2f} s", f"{write:.2f} s", f"{close / export:.2f}x",
             f"{median(vs_raw):.1f}x"]
        )  # fmt: skip
        if r.stages:
            stage_notes.append(
                f"{model} close by stage (medians, from the gateway's log): "
                + ", ".join(f"{k} {median(v):.2f} s" for k, v in r.stages.items())
                + f"; raw write + fsync of the release's bytes {write:.2f} s; the update "
                f"read while those bytes are written + fsynced {median(r.io_floor_s):.2f} s"
            )
        name = f"release {params / 1e6:.0f}M parameters"
        for low, high, vs_export, vs_write in FLOORS:
            if not low <= params <= high:
                continue
            if vs_export is not None:
                # A fold writes the version blob durably; the release links it as its data
                # file (the payload layout) or copies it: one or two durable writes of these
                # bytes, where the exporter makes one, unsynced.
                writes = (
                    f"the release links the version blob as its data file: one raw write + "
                    f"fsync of these bytes takes {write:.2f} s"
                    if r.linked
                    else f"two raw writes + fsync of the release's bytes (the version blob, "
                    f"the release) take {2 * write:.2f} s"
                )
                floor = median(r.io_floor_s)
                reach = (
                    "out of reach here: the disk work alone takes longer than the exporter"
                    if floor > vs_export * export
                    else f"{vs_export * export - floor:.2f} s left for the computing"
                )
                report.check(
                    f"{name}: <= {vs_export:g}x the time of torch.onnx.export",
                    close <= vs_export * export,
                    f"{close:.2f} s vs {export:.2f} s ({close / export:.2f}x); {writes}; "
                    f"the disk work no close avoids (reading the update while the version's "
                    f"bytes are written + fsynced, nothing computed) takes {floor:.2f} s "
                    f"({reach})",
                )
            report.check(
                f"{name}: <= {vs_write:g}x a raw write + fsync of the same bytes",
                median(vs_raw) <= vs_write,
                f"{median(vs_raw):.1f}x: each close over the raw write after it "
                + ", ".join(
                    f"{c:.2f}/{w:.2f} s = {c / w:.1f}x" for c, w in zip(r.close_s, raw, strict=True)
                )
                + f" (medians {close:.2f} s vs {write:.2f} s)",
            )
    built = [(m, r) for m, r in runs.items() if r.built]
    if built:  # templates cached by an earlier benchmark of this run: nothing to show
        model, first = built[0]
        report.check(
            "start-up: a first start that builds templates binds its ports and says what it "
            "does before it is ready",
            first.says_exporting and first.live_s < first.startup_s,
            f"{model}: /healthz answered after {first.live_s:.1f} s, ready after "
            f"{first.startup_s:.1f} s (ONNX export and self-test); its log names the export "
            f"and the bound ports: {'yes' if first.says_exporting else 'no'}",
        )
    ready_times = runs[ready_model].ready_s
    ready_med = median(ready_times)
    report.check(
        f"start-up: gateway ready on an existing data dir in <= {READY_S:g} s",
        ready_med <= READY_S,
        f"{ready_model}: {ready_med:.2f} s (median of {len(ready_times)} starts: "
        + ", ".join(f"{t:.2f}" for t in ready_times)
        + ")",
    )
    report.notes += [
        f"Sluice close: median of {options.repeats} CloseRound calls, each folding one pushed "
        "update, in a gateway started on the model's built template (a first start exports "
        "it once per model, as a deployment does once, ever; not in the closes)",
        "torch.onnx.export: defaults (dynamo, optimize, external data for large models) in a "
        "fresh process, the export call alone; raw write: the release's size, written + fsync "
        f"after each close; each close and each raw write starts {SETTLE_S:g} s after the burst "
        "of writes before it (the push's, the close's): this VM's disk slows after bursts, so "
        "each close is judged against the disk of its moment, the median of those ratios",
        f"start-up: from spawning `sluice serve` until its /readyz answers 200, on the data dir "
        f"that {ready_model}'s release rounds left (templates, versions, releases in place); "
        "first start: the first start of each model in this run, which exports its template",
        *stage_notes,
    ]
    report.data = results
    return report
