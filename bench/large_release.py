"""A release of a model over 2 GiB (the two-file layout): build, write, parity, with timings."""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from sluice.gateway.export.parity import PARITY_TOLERANCE, max_output_diff
from sluice.gateway.export.refresh import write_atomic, write_release_files
from sluice.gateway.export.selftest import self_test
from sluice.gateway.export.template import build_template
from sluice.models import registry
from sluice.models.manifest import DATA_FILE, MODEL_FILE
from sluice.models.registry import ModelEntry
from sluice.models.schema import Schema

LARGE_MODEL = "drivenet-2g"  # 563.6M float32 parameters, 2.25 GB
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_CHUNK_BYTES = 16 << 20
T = TypeVar("T")


def _tensor_chunks(state: dict[str, torch.Tensor], schema: Schema) -> Iterator[memoryview]:
    for spec in schema.tensors:
        raw = state[spec.name].contiguous().numpy().reshape(-1).view(np.uint8)
        for at in range(0, raw.size, _CHUNK_BYTES):
            yield raw[at : at + _CHUNK_BYTES].data


def write_random_payload(entry: ModelEntry, path: Path, seed: int) -> Schema:
    """The weights of a fresh module initialised from seed, as a flat payload file.

    Memory: the module; its tensors are written in chunks, never copied whole.
    """
    state = entry.build(seed).state_dict()
    schema = Schema.of(state)
    write_atomic(path, _tensor_chunks(state, schema))
    return schema


def module_from_payload(entry: ModelEntry, schema: Schema, path: Path) -> nn.Module:
    """entry's module holding the payload file's weights, read straight into its tensors."""
    with torch.device("meta"):
        module = entry.factory()  # no initialisation work: every value is read below
    module = module.to_empty(device="cpu").eval()
    state = module.state_dict()
    if Schema.of(state) != schema:
        raise ValueError(f"payload schema {schema.hash[:16]} is not model {entry.name!r}'s")
    with path.open("rb") as payload:
        for spec, start, end in schema.spans():
            raw = state[spec.name].numpy().reshape(-1).view(np.uint8)
            payload.seek(start)
            for at in range(0, end - start, _CHUNK_BYTES):
                view = raw[at : at + _CHUNK_BYTES]
                if payload.readinto(memoryview(view)) != view.size:
                    raise ValueError(f"{path}: ended inside tensor {spec.name!r}")
    return module


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    peak_rss_bytes: int  # of this stage alone where VmHWM can be reset, else of the process


def _stage(stages: list[Stage], name: str, run: Callable[[], T]) -> T:
    gc.collect()
    _peak_rss_reset()
    started = time.perf_counter()
    out = run()
    stages.append(Stage(name, time.perf_counter() - started, _peak_rss_bytes()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large_release", description=__doc__)
    parser.add_argument("--model", default=LARGE_MODEL, help=f"registry name ({LARGE_MODEL})")
    parser.add_argument("--workdir", type=Path, help="where the files go (default: temp)")
    parser.add_argument("--self-test", action="store_true", help="also time the self-test")
    args = parser.parse_args(argv)
    entry = registry.get(args.model)
    stages: list[Stage] = []
    with tempfile.TemporaryDirectory(prefix="sluice-large-", dir=args.workdir) as tmp:
        work = Path(tmp)
        t = _stage(stages, "template build", lambda: build_template(entry))
        if args.self_test:
            _stage(stages, "template self-test", lambda: self_test(t, entry))
        schema = _stage(
            stages, "random payload file", lambda: write_random_payload(entry, work / "p.bin", 7)
        )
        files = _stage(
            stages,
            "release write",
            lambda: write_release_files(t, schema, work / "p.bin", work / "release"),
        )

        def parity() -> float:
            module = module_from_payload(entry, schema, work / "p.bin")
            return max_output_diff(work / "release" / MODEL_FILE, entry, module)

        diff = _stage(stages, "parity (load + run)", parity)
    sizes = dict((name, size) for name, size, _ in files)
    checks = {
        "two-file layout": t.data_file == DATA_FILE,
        f"{DATA_FILE} > 2 GiB": sizes.get(DATA_FILE, 0) > 2 << 30,
        f"parity {diff:.2e} <= {PARITY_TOLERANCE}": diff <= PARITY_TOLERANCE,
    }
    print(f"\n== {entry.name}: {schema.num_parameters / 1e6:.1f}M parameters")
    for name, size in sizes.items():
        print(f"  {name:<18} {size:>15,} bytes")
    print(f"  {'stage':<22} {'time (s)':>9} {'peak RSS (GiB)':>15}")
    for s in stages:
        print(f"  {s.name:<22} {s.seconds:>9.1f} {s.peak_rss_bytes / 2**30:>15.2f}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"large_release-{entry.name}.json"
    doc = {"model": entry.name, "files": sizes, "stages": [asdict(s) for s in stages]}
    out.write_text(json.dumps({**doc, "checks": checks, "parity": diff}, indent=2) + "\n")
    print(f"\nresults saved to {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
