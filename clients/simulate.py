"""Regional trainer simulator: one process per trainer, local clips, real training, real pushes.

Trainers report as they go (Stage and RoundReport events, through clients/workers.py); the
first trainer's failure stops every other one. With --backend ray, trainers' rounds run on
Ray actors instead (clients/ray_backend.py).
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Self

from sluice.clients.workers import Failure, WorkerFailed, describe, run_workers

if TYPE_CHECKING:  # imported lazily at run time: trainer processes import torch themselves
    from sluice.clients.ray_backend import RayOptions
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

    @property
    def steps_per_round(self) -> int:
        """Progress units of one round: the pull, every optimiser step, the push."""
        return self.epochs * math.ceil(self.clips / self.batch_size) + 2


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
    payload_bytes: int = 0  # the pushed update


@dataclass(frozen=True)
class Stage:
    """What a trainer is doing now, and how far along its whole run it is."""

    trainer: str
    round: int  # the round it works on; 0 until its first round opened
    doing: str  # "waiting for round 2", "round 2: training 12/48", ...
    done: int  # progress units, of rounds * SimulationConfig.steps_per_round
    total: int
    base_version: int | None = None  # the round's base, once the round is known


@dataclass(frozen=True)
class Retried:
    """The Ray backend lost a trainer's actor (its process died); the round runs again in a
    new one (clients/ray_backend.py)."""

    trainer: str
    region: str
    doing: str  # the stage it was in
    reason: str  # Ray's word for the death
    attempt: int  # of the round, from 2
    attempts: int  # at most
    rejoins: int  # the round it rejoins with the same update id; 0: none joined yet


@dataclass(frozen=True)
class TrainerFailure:
    """A trainer's error, as plain data (see clients/workers.py)."""

    trainer: str
    region: str
    round: int  # 0: before its first round opened
    doing: str  # the stage it was in
    error: str  # a gRPC status name (NOT_FOUND) or an exception class (ValueError)
    details: str  # the status details or the exception's message, and its cause
    trace: str = ""  # the trainer's traceback (shown with `sluice -v`)

    def __str__(self) -> str:
        return (
            f"trainer {self.trainer} ({self.region}) failed ({self.doing}): "
            f"{self.error}: {self.details}"
        )


Event = Stage | RoundReport | Retried


class SimulationError(Exception):
    """A simulation that could not start or did not finish."""


class MissingCertificates(SimulationError):
    """--pki lacks a trainer's certificate or key; the message names them and the fix."""


class TrainerFailed(SimulationError):
    def __init__(self, failure: TrainerFailure, stopped: int) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.stopped = stopped  # other trainers still running, stopped because of it


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


def check_certificates(pki_dir: Path, trainers: Sequence[TrainerSpec]) -> str | None:
    """None when ca.pem and every trainer's clients/NAME.pem and .key exist; otherwise one
    line naming the missing files and the `sluice init` that makes them."""
    files = [] if (pki_dir / "ca.pem").is_file() else ["ca.pem"]
    lacking = []
    for t in trainers:
        absent = [f"clients/{t.trainer}{ext}" for ext in (".pem", ".key")]
        absent = [name for name in absent if not (pki_dir / name).is_file()]
        files += absent
        lacking += [t] if absent else []
    if not files:
        return None
    shown = ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
    init = ["sluice", "init", str(pki_dir)]
    for t in lacking or trainers:
        init += ["--trainer", f"{t.trainer}:{t.region}"]
    return f"missing in {pki_dir}: {shown}; `{shlex.join(init)}` makes them"


class LocalTrainer:
    """One regional trainer's model, private clips and connection to the gateway; `join`
    takes part in one round. Its clips never leave the process it runs in."""

    def __init__(
        self,
        spec: TrainerSpec,
        config: SimulationConfig,
        emit: Callable[[Event], None],
        after: int = 0,
        at: int = 0,
    ) -> None:
        """after: the last round it pushed to; at: its progress so far (both 0 at its start)."""
        import torch

        from sluice.clients.scenes import make_clips
        from sluice.clients.sdk import Identity, TrainerClient
        from sluice.models import registry
        from sluice.models.schema import Schema

        self.spec, self.config, self.emit = spec, config, emit
        self.per_round = config.steps_per_round
        self.total = config.rounds * self.per_round
        torch.set_num_threads(1)  # trainers share the machine's cores
        self._stage(after, "making its clips", at)
        self.module = registry.get(config.model).build()
        self.schema = Schema.of(self.module.state_dict())
        self.data = make_clips(spec.region, config.clips, seed=spec.seed)
        self.holdout = make_clips(spec.region, config.holdout_clips, seed=spec.seed + 100_000)
        identity = Identity.from_pki(config.pki_dir, spec.trainer) if config.pki_dir else None
        self.client = TrainerClient(config.target, identity=identity)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def join(self, index: int, after: int, rejoin: Stage | None = None) -> RoundReport:
        """Its index-th round (from 0): the first round after round `after` to open, or with
        `rejoin` (the last Stage of an attempt that died) that round again, on the same base,
        even if it has closed since: the push has the same update id, so the gateway answers
        an update it already committed instead of counting it twice."""
        from sluice.clients.trainer import TrainConfig, compute_delta, evaluate, train_local

        config, spec, schema, module = self.config, self.spec, self.schema, self.module
        at = index * self.per_round
        self._stage(after, f"waiting for round {after + 1}", at)
        info = _wait_for_round(self.client, config, after=rejoin.round - 1 if rejoin else after)
        if info.schema_hash != schema.hash:
            raise RuntimeError(f"gateway schema {info.schema_hash[:12]} is not our model's")
        r, base_version = info.round, info.base_version
        if rejoin is not None and rejoin.base_version is not None and r != rejoin.round:
            r, base_version = rejoin.round, rejoin.base_version  # closed since it was joined
        stage = partial(self._stage, base_version=base_version)
        stage(r, f"round {r}: pulling v{base_version}", at)
        pulled = self.client.pull_global(config.model, base_version, size=schema.payload_bytes)
        base = schema.to_state_dict(pulled.data)
        module.load_state_dict(base)
        stage(r, f"round {r}: evaluating", at + 1)
        before = evaluate(module, self.holdout)
        started = time.perf_counter()
        result = train_local(
            module,
            self.data,
            TrainConfig(
                epochs=config.epochs,
                batch_size=config.batch_size,
                lr=config.lr,
                proximal_mu=config.proximal_mu or info.proximal_mu,  # FedProx's mu
                seed=spec.seed * 1000 + r,
            ),
            on_step=_training(stage, r, at),
        )
        trained_s = time.perf_counter() - started
        after_loss = evaluate(module, self.holdout)
        payload = schema.flatten(compute_delta(module.state_dict(), base))
        stage(r, f"round {r}: pushing {len(payload) / 1e6:.1f} MB", at + self.per_round - 1)
        started = time.perf_counter()
        try:
            self.client.push_update(
                model=config.model,
                round_no=r,
                base_version=base_version,
                schema_hash=schema.hash,
                trainer=spec.trainer,
                region=spec.region,
                num_examples=result.num_examples,
                payload=payload,
                metrics={"train_loss": result.train_loss, "holdout_loss": after_loss},
            )  # the id is derived from (trainer, model, round): a retry never counts twice
        except Exception as exc:
            # Rejoining, the same update is answered as a replay. A different one is refused
            # (ALREADY_EXISTS): the attempt that died had committed its own, which counts,
            # once. Different when its base can no longer be pulled (pull_global's version
            # 0 is the newest: round 1's base after round 1 closed) or another CPU trained.
            if rejoin is None or describe(exc)[0] != "ALREADY_EXISTS":
                raise
        report = RoundReport(
            spec.trainer,
            spec.region,
            r,
            base_version,
            result.num_examples,
            result.train_loss,
            before,
            after_loss,
            trained_s,
            time.perf_counter() - started,
            len(payload),
        )
        self.emit(report)
        return report

    def _stage(self, round_no: int, doing: str, done: int, base_version: int | None = None) -> None:
        self.emit(Stage(self.spec.trainer, round_no, doing, done, self.total, base_version))


def run_trainer(
    spec: TrainerSpec, config: SimulationConfig, on_event: Callable[[Event], None] | None = None
) -> list[RoundReport]:
    """One regional trainer for config.rounds rounds, in this process.
    on_event gets a Stage at every step and a RoundReport after every push."""
    emit = on_event or (lambda event: None)
    reports: list[RoundReport] = []
    with LocalTrainer(spec, config, emit) as trainer:
        for index in range(config.rounds):
            reports.append(trainer.join(index, after=reports[-1].round if reports else 0))
    last_round = reports[-1].round if reports else 0
    emit(Stage(spec.trainer, last_round, "done", trainer.total, trainer.total))
    return reports


def run_round(
    spec: TrainerSpec,
    config: SimulationConfig,
    index: int,
    after: int,
    rejoin: Stage | None,
    on_event: Callable[[Event], None],
) -> RoundReport:
    """One round of a trainer's run on its own (the Ray backend): its model and clips are
    made again from its seed, then LocalTrainer.join(index, after, rejoin)."""
    with LocalTrainer(spec, config, on_event, after, at=index * config.steps_per_round) as t:
        return t.join(index, after, rejoin)


def _training(
    stage: Callable[[int, str, int], None], round_no: int, at: int
) -> Callable[[int, int], None]:
    def step(done: int, steps: int) -> None:
        stage(round_no, f"round {round_no}: training {done}/{steps}", at + 1 + done)

    return step


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


def simulate(
    config: SimulationConfig,
    trainers: Sequence[TrainerSpec],
    on_event: Callable[[Event], None] | None = None,
    ray: RayOptions | None = None,
) -> list[RoundReport]:
    """Run every trainer in its own process, or with `ray` its rounds on Ray actors
    (clients/ray_backend.py); returns all round reports, in arrival order.

    on_event sees every event as it arrives. Raises MissingCertificates before starting
    anything, TrainerFailed (after stopping the others) at the first trainer's failure,
    Interrupted on Ctrl-C (after stopping every trainer); with `ray`, SimulationError when
    Ray is missing or has no room for a trainer.
    """
    problem = check_certificates(config.pki_dir, trainers) if config.pki_dir else None
    if problem:
        raise MissingCertificates(problem)
    reports: list[RoundReport] = []

    def take(event: Event) -> None:
        if isinstance(event, RoundReport):
            reports.append(event)
        if on_event is not None:
            on_event(event)

    try:
        if ray is None:
            run_workers({t.trainer: partial(run_trainer, t, config) for t in trainers}, take)
        else:
            from sluice.clients.ray_backend import run_on_ray

            run_on_ray(config, trainers, take, ray)
    except WorkerFailed as exc:
        (spec,) = [t for t in trainers if t.trainer == exc.failure.worker]
        raise TrainerFailed(_trainer_failure(spec, exc.failure), exc.stopped) from None
    return reports


def _trainer_failure(spec: TrainerSpec, failure: Failure) -> TrainerFailure:
    stage = failure.last if isinstance(failure.last, Stage) else None
    return TrainerFailure(
        spec.trainer,
        spec.region,
        stage.round if stage else 0,
        stage.doing if stage else "starting",
        failure.error,
        failure.details,
        failure.trace,
    )
