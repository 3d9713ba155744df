"""Release: time from round close to a signed, guarded ONNX release in a `sluice serve`
process (CloseRound: fold, template refresh, parity in onnxruntime, egress guard, signing,
audit), next to `torch.onnx.export` of the same model and to writing the same bytes."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench import gateway_proc
from bench.common import MB, Options, Report, median, settle, workdir, write_seconds
from sluice.clients.sdk import AdminClient, TrainerClient
from sluice.models import registry

FULL = ("drivenet-5m", "drivenet-xl", "drivenet-600m")
QUICK = ("drivenet-5m",)
# torch.onnx.export of the largest model takes tens of seconds and ~3x its memory: once.
PEER_REPEATS = {"drivenet-600m": 1}


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


def _release_seconds(model: str, root: Path, templates: Path, repeats: int) -> dict[str, object]:
    """Push one update per round, then time CloseRound until the release is published."""
    schema = gateway_proc.schema_of(model)
    payload = gateway_proc.random_payload(schema, seed=3)
    gw = gateway_proc.start(root / "gw", (model,), templates)
    closes = []
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
                started = time.perf_counter()
                resp = admin.close_round(model, info.round)
                closes.append(time.perf_counter() - started)
                if not resp.released:
                    raise RuntimeError(f"{model}: no release: {resp.release_refused}")
        release = root / "gw" / "registry" / model / str(resp.version)
        release_bytes = sum(f.stat().st_size for f in release.iterdir())
    finally:
        gateway_proc.stop(gw, templates)
    return {"close_s": closes, "release_bytes": release_bytes, "startup_s": gw.startup_s}


def bench_release(options: Options, templates: Path) -> Report:
    models = QUICK if options.quick else FULL
    report = Report(
        "release",
        "Release: round close to a signed, guarded ONNX release, vs torch.onnx.export and a raw "
        "write of the same bytes",
    )
    report.rows.append(
        ["model", "parameters", "release", "Sluice close", "torch.onnx.export", "raw write",
         "export / Sluice", "Sluice / raw write"]
    )  # fmt: skip
    results = {}
    for model in models:
        params = gateway_proc.schema_of(model).num_parameters
        with workdir(options, "release") as tmp:
            r = _release_seconds(model, Path(tmp), templates, options.repeats)
            size = int(r["release_bytes"])  # type: ignore[call-overload]  # an int, set above
            peer = _peer_seconds(model, Path(tmp), PEER_REPEATS.get(model, options.repeats))
            raw = [write_seconds(bytes(size), Path(tmp)) for _ in range(options.repeats)]
        close = median(r["close_s"])  # type: ignore[arg-type]  # a list of floats, set above
        export, write = median(peer), median(raw)
        results[model] = {
            **r, "parameters": params, "torch_export_s": peer, "raw_write_s": raw,
            "close_median_s": close, "torch_export_median_s": export,
            "raw_write_median_s": write,
        }  # fmt: skip
        report.rows.append(
            [model, f"{params / 1e6:.1f}M", f"{size / MB:.0f} MB", f"{close:.2f} s",
             f"{export:.2f} s", f"{write:.2f} s", f"{export / close:.1f}x",
             f"{close / write:.1f}x"]
        )  # fmt: skip
        if 50e6 <= params <= 200e6:
            report.check(
                f"release {params / 1e6:.0f}M parameters: >= 5x faster than torch.onnx.export",
                export >= 5 * close,
                f"{export / close:.1f}x ({close:.2f} s vs {export:.2f} s)",
            )
    report.notes += [
        f"Sluice close: median of {options.repeats} CloseRound calls, each folding one pushed "
        "update; the ONNX template is built once per model at gateway start (not in it)",
        "torch.onnx.export: defaults (dynamo, optimize, external data for large models) in a "
        "fresh process, the export call alone; raw write: the release's size, written + fsync",
    ]
    report.data = results
    return report
