"""Regional trainer simulator: one process per trainer, local clips, real training, real pushes."""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time: trainer processes import torch themselves
    from sluice.clients.sdk import TrainerClient
    from sluice.v1 import trainer_pb2

DEFAULT_REGIONS = ("shanghai", "beijing", "shenzhen", "chengdu")


@dataclass(frozen=True)
class TrainerSpec:
    trainer: str  # e.g. "shanghai-01"
    region: str
    seed: int  # seeds this trainer's private clips


@dataclass(frozen=True)
class SimulationConfig:
    target: str  # the gateway's internal listener
    model: str = "drivenet"
    rounds: int = 3
    clips: int = 512  # private training clips per trainer
    holdout_clips: int = 128  # private held-out clips per trainer
    epochs: int = 3  # local epochs per round
    batch_size: int = 32
    lr: float = 3e-4  # Adam; at 1e-3 the federated loss curve flattens after round 1
    proximal_mu: float = 0.0  # FedProx term; 0 is plain FedAvg training
    round_timeout_s: float = 600.0  # how long to wait for the next round to open
    pki_dir: Path | None = None  # `sluice init` output: each trainer uses its own cert


@dataclass(frozen=True)
class RoundReport:
    trainer: str
    region: str
    round: int
    base_version: int
    num_examples: int
    train_loss: float
    holdout_before: float  # the global model on this trainer's held-out clips
    holdout_after: float  # after local training
    train_seconds: float
    push_seconds: float


def plan_trainers(num_trainers: int, regions: Sequence[str], seed: int = 0) -> list[TrainerSpec]:
    """Trainers spread over regions round-robin: shanghai-01, beijing-01, ... shanghai-02."""
    return [
        TrainerSpec(
            f"{regions[i % len(regions)]}-{i // len(regions) + 1:02d}",
            regions[i % len(regions)],
            seed + i,
        )
        for i in range(num_trainers)
    ]


def run_trainer(spec: TrainerSpec, config: SimulationConfig) -> list[RoundReport]:
    """One regional trainer for config.rounds rounds; its clips never leave this process."""
    import torch

    from sluice.clients.scenes import make_clips
    from sluice.clients.sdk import TrainerClient
    from sluice.clients.trainer import TrainConfig, compute_delta, evaluate, train_local
    from sluice.models import registry
    from sluice.models.schema import Schema

    torch.set_num_threads(1)  # trainers share the machine's cores
    entry = registry.get(config.model)
    module = entry.build()
    schema = Schema.of(module.state_dict())
    data = make_clips(spec.region, config.clips, seed=spec.seed)
    holdout = make_clips(spec.region, config.holdout_clips, seed=spec.seed + 100_000)
    reports: list[RoundReport] = []
    from sluice.clients.sdk import Identity

    identity = Identity.from_pki(config.pki_dir, spec.trainer) if config.pki_dir else None
    with TrainerClient(config.target, identity=identity) as client:
        last_round = 0
        for _ in range(config.rounds):
            info = _wait_for_round(client, config, after=last_round)
            if info.schema_hash != schema.hash:
                raise RuntimeError(f"gateway schema {info.schema_hash[:12]} is not our model's")
            pulled = client.pull_global(config.model, info.base_version)
            base = schema.to_state_dict(pulled.data)
            module.load_state_dict(base)
            before = evaluate(module, holdout)
            started = time.perf_counter()
            result = train_local(
                module,
                data,
                TrainConfig(
                    epochs=config.epochs,
                    batch_size=config.batch_size,
                    lr=config.lr,
                    proximal_mu=config.proximal_mu or info.proximal_mu,  # FedProx's mu
                    seed=spec.seed * 1000 + info.round,
                ),
            )
            trained_s = time.perf_counter() - started
            after = evaluate(module, holdout)
            payload = schema.flatten(compute_delta(module.state_dict(), base))
            started = time.perf_counter()
            client.push_update(
                model=config.model,
                round_no=info.round,
                base_version=info.base_version,
                schema_hash=schema.hash,
                trainer=spec.trainer,
                region=spec.region,
                num_examples=result.num_examples,
                payload=payload,
                metrics={"train_loss": result.train_loss, "holdout_loss": after},
            )  # the id is derived from (trainer, model, round): a retry never counts twice
            reports.append(
                RoundReport(
                    spec.trainer,
                    spec.region,
                    info.round,
                    info.base_version,
                    result.num_examples,
                    result.train_loss,
                    before,
                    after,
                    trained_s,
                    time.perf_counter() - started,
                )
            )
            last_round = info.round
    return reports


def _wait_for_round(
    client: TrainerClient, config: SimulationConfig, after: int
) -> trainer_pb2.RoundInfo:
    deadline = time.monotonic() + config.round_timeout_s
    while True:
        info = client.round(config.model)
        if info.round > after:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {after} of {config.model} did not close in time")
        time.sleep(0.2)


def simulate(config: SimulationConfig, trainers: Sequence[TrainerSpec]) -> list[RoundReport]:
    """Run every trainer in its own process; returns all round reports."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state shared
    with ProcessPoolExecutor(max_workers=len(trainers), mp_context=ctx) as pool:
        futures = [pool.submit(run_trainer, spec, config) for spec in trainers]
        return [report for f in futures for report in f.result()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="the gateway's internal listener")
    p.add_argument("--model", default="drivenet")
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--regions", default=",".join(DEFAULT_REGIONS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clips", type=int, default=SimulationConfig.clips)
    p.add_argument("--epochs", type=int, default=SimulationConfig.epochs)
    p.add_argument("--proximal-mu", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pki", type=Path, help="`sluice init` directory; trainer NAME uses its cert")
    p.add_argument("--insecure", action="store_true", help="plain text (--insecure-loopback)")


def run_from_args(args: argparse.Namespace) -> int:
    config = SimulationConfig(
        target=args.target,
        model=args.model,
        rounds=args.rounds,
        clips=args.clips,
        epochs=args.epochs,
        proximal_mu=args.proximal_mu,
        pki_dir=None if args.insecure else args.pki,
    )
    if config.pki_dir is None and not args.insecure:
        raise SystemExit("sluice simulate: pass --pki DIR (from `sluice init`), or --insecure")
    trainers = plan_trainers(args.trainers, args.regions.split(","), args.seed)
    for r in sorted(simulate(config, trainers), key=lambda r: (r.round, r.trainer)):
        print(
            f"round {r.round} {r.trainer:>14}: held-out loss {r.holdout_before:.4f} -> "
            f"{r.holdout_after:.4f} after local training ({r.train_seconds:.1f}s)"
        )
    return 0
