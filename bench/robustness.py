"""Robustness over real simulated training: 1 of 5 trainers attacks, which strategies hold?

Run: python -m bench.robustness [--quick]. Five regional trainers train DriveNet-tiny on
their own synthetic clips for several rounds; the gateway's strategies aggregate the
spooled deltas exactly as in a round. Trainer 0 is honest (clean), flips the sign of its
update (sign-flip) or scales it 100x (scaled). The table shows the merged model's
held-out loss on benchmark scenes of every region after the last round, per strategy and
scenario, and whether it stays within the stated margin of the same strategy's clean run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sluice.clients.scenes import make_clips
from sluice.clients.trainer import TrainConfig, compute_delta, evaluate, train_local
from sluice.gateway.core.aggregation import Contribution
from sluice.gateway.core.strategies import build_strategy
from sluice.gateway.core.strategies.base import RoundInput
from sluice.models import registry
from sluice.models.schema import Schema

# Two populations: five trainers of one region (IID, where the robust strategies'
# assumptions hold) and five regions (non-IID on purpose, as Sluice's deployments are).
SETTINGS: Mapping[str, tuple[str, ...]] = {
    "one region": ("shanghai",) * 5,
    "five regions": ("shanghai", "beijing", "shenzhen", "chengdu", "guangzhou"),
}
SCENARIOS = ("clean", "sign-flip", "scaled-100x")
STRATEGIES: Mapping[str, Mapping[str, Any]] = {
    "FedAvg": {"name": "FedAvg"},
    "FedMedian": {"name": "FedMedian"},
    "FedTrimmedAvg": {"name": "FedTrimmedAvg", "beta": 0.2},
    "Krum": {"name": "Krum", "num_malicious_clients": 1},
    "MultiKrum": {"name": "Krum", "num_malicious_clients": 1, "num_clients_to_keep": 3},
}
MARGIN = 1.0  # stated margin: an attacked run may reach at most twice its clean loss
LR = 1e-3  # local Adam learning rate; higher makes every run, clean or not, noisier
RESULTS = Path(__file__).resolve().parent / "results"


def run(
    strategy_spec: Mapping[str, Any],
    scenario: str,
    rounds: int,
    clips: int,
    regions: tuple[str, ...],
) -> float:
    entry = registry.get("drivenet-tiny")
    module = entry.build(entry.init_seed)
    schema = Schema.of(module.state_dict())
    data = [make_clips(r, clips, seed=100 + i) for i, r in enumerate(regions)]
    bench = [make_clips(r, 128, seed=9_000 + i) for i, r in enumerate(sorted(set(regions)))]
    strategy = build_strategy(strategy_spec)
    with tempfile.TemporaryDirectory(prefix="sluice-robust-") as tmp:
        root = Path(tmp)
        base_path = root / "v0.bin"
        base_path.write_bytes(schema.flatten(module.state_dict()))
        state: Path | None = None
        for rnd in range(1, rounds + 1):
            base = schema.to_state_dict(base_path.read_bytes())
            contributions = []
            for i, batch in enumerate(data):
                module.load_state_dict(base)
                train_local(module, batch, TrainConfig(epochs=2, lr=LR, seed=rnd * 10 + i))
                delta = compute_delta(module.state_dict(), base)
                if i == 0 and scenario == "sign-flip":
                    delta = {k: -v if v.is_floating_point() else v for k, v in delta.items()}
                elif i == 0 and scenario == "scaled-100x":
                    delta = {k: v * 100 if v.is_floating_point() else v for k, v in delta.items()}
                path = root / f"r{rnd}-u{i}.bin"
                path.write_bytes(schema.flatten(delta))
                contributions.append(Contribution(path, len(batch)))
            out, state_out = root / f"v{rnd}.bin", root / f"state{rnd}"
            state_out.mkdir()
            strategy.aggregate(
                RoundInput(schema, base_path, contributions, rnd, state), out, state_out
            )
            base_path, state = out, state_out
        module.load_state_dict(schema.to_state_dict(base_path.read_bytes()))
        return float(np.mean([evaluate(module, b) for b in bench]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.robustness", description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 rounds, fewer clips")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rounds, clips = (2, 96) if args.quick else (4, 192)
    started = time.perf_counter()
    tables: dict[str, dict[str, dict[str, float]]] = {}
    verdicts: dict[str, dict[str, bool]] = {}
    for setting, regions in SETTINGS.items():
        table = tables[setting] = {
            name: {s: run(spec, s, rounds, clips, regions) for s in SCENARIOS}
            for name, spec in STRATEGIES.items()
        }
        print(f"\n{setting}: held-out loss after {rounds} rounds, 5 trainers, trainer 0 attacks")
        print(f"{'strategy':<15}" + "".join(f"{s:>14}" for s in SCENARIOS) + "   within margin")
        verdicts[setting] = {}
        for name, row in table.items():
            ok = all(row[s] <= row["clean"] * (1 + MARGIN) for s in SCENARIOS[1:])
            verdicts[setting][name] = ok
            cells = "".join(f"{row[s]:>14.4f}" for s in SCENARIOS)
            print(f"{name:<15}{cells}   {'yes' if ok else 'NO'}")
    # The claim is checked where its assumptions hold (one population); the non-IID table
    # is reported as measured: robust aggregation over non-IID trainers is an open problem.
    iid = verdicts["one region"]
    checks = [
        ("FedAvg degrades under attack (one region)", not iid["FedAvg"]),
        *(
            (f"{n} stays within {MARGIN:.0%} of its clean run (one region)", iid[n])
            for n in STRATEGIES
            if n != "FedAvg"
        ),
    ]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "robustness.json").write_text(
        json.dumps({"rounds": rounds, "margin": MARGIN, "tables": tables}, indent=1)
    )
    print(f"{time.perf_counter() - started:.0f} s")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
