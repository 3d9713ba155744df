"""`sluice simulate` for people: its options, its lines as trainers go, its exit codes.

The simulation itself is clients/simulate.py; this module only shows it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from sluice.clients.progress import Board
from sluice.clients.simulate import (
    DEFAULT_REGIONS,
    Event,
    Retried,
    RoundReport,
    SimulationConfig,
    SimulationError,
    Stage,
    TrainerFailed,
    TrainerFailure,
    TrainerSpec,
    check_certificates,
    plan_trainers,
    simulate,
)
from sluice.clients.workers import Interrupted


def hint(failure: TrainerFailure, config: SimulationConfig) -> str:
    """What to look at after a trainer's error, by its status; "" when nothing useful."""
    if failure.error == "UNAVAILABLE":
        trust = ", and does it trust the CA in --pki" if config.pki_dir else ""
        return f"is the gateway running at {config.target}{trust}?"
    if failure.error == "UNAUTHENTICATED":
        return "the gateway refused this trainer's certificate: revoked, or from another CA?"
    if failure.error == "NOT_FOUND":
        return f"does the gateway serve model {config.model} (`sluice serve --models`)?"
    return ""


def format_report(r: RoundReport, width: int = 0) -> str:
    return (
        f"round {r.round} {f'{r.trainer} ({r.region})':<{width}} "
        f"held-out loss {r.holdout_before:.4f} -> "
        f"{r.holdout_after:.4f}, {r.num_examples} examples, trained {r.train_seconds:.1f}s, "
        f"pushed {r.payload_bytes / 1e6:.1f} MB in {r.push_seconds:.1f}s"
    )


def format_retry(r: Retried) -> str:
    again = f", rejoining round {r.rejoins} with the same update id" if r.rejoins else ""
    return (
        f"{r.trainer} ({r.region}) lost its Ray actor ({r.doing}): {r.reason}; "
        f"attempt {r.attempt} of {r.attempts} in a new actor{again}"
    )


class RoundsView:
    """simulate's on_event for people: a line per trainer per round as it happens, and a
    row per trainer on a Board (bars on a terminal)."""

    def __init__(self, board: Board, trainers: Sequence[TrainerSpec]) -> None:
        self.board = board
        self.width = max((len(t.trainer) + len(t.region) + 3 for t in trainers), default=0)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Stage):
            self.board.update(event.trainer, event.doing, event.done, event.total)
        elif isinstance(event, Retried):
            self.board.line(format_retry(event))
        else:
            self.board.line(format_report(event, self.width))

    def line(self, text: str) -> None:
        self.board.line(text)


@contextmanager
def watch(trainers: Sequence[TrainerSpec], stream: TextIO | None = None) -> Iterator[RoundsView]:
    with Board([t.trainer for t in trainers], stream) as board:
        yield RoundsView(board, trainers)


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
    from sluice.clients import ray_backend  # not above: Ray options, Ray itself unimported

    ray_backend.add_arguments(p)


def run_from_args(args: argparse.Namespace) -> int:
    """`sluice simulate`: 0 when every round of every trainer was pushed, 1 at the first
    trainer's failure (or when Ray could not run them), 2 when certificates are missing or
    the options do not fit together, 130 on Ctrl-C."""
    from sluice.clients.ray_backend import options_from_args  # Ray itself stays unimported

    if args.pki is None and not args.insecure:
        print(
            "sluice simulate: pass --pki DIR (from `sluice init`), or --insecure", file=sys.stderr
        )
        return 2
    try:
        ray = options_from_args(args)
    except ValueError as exc:
        print(f"sluice simulate: {exc}", file=sys.stderr)
        return 2
    config = SimulationConfig(
        target=args.target,
        model=args.model,
        rounds=args.rounds,
        clips=args.clips,
        epochs=args.epochs,
        proximal_mu=args.proximal_mu,
        pki_dir=None if args.insecure else args.pki,
    )
    trainers = plan_trainers(args.trainers, args.regions.split(","), args.seed)
    problem = check_certificates(config.pki_dir, trainers) if config.pki_dir else None
    if problem:
        print(f"sluice simulate: {problem}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        how = "trainer processes" if ray is None else f"trainers on Ray ({ray.where})"
        print(
            f"{len(trainers)} {how} x {config.rounds} rounds of {config.model} "
            f"against {config.target}: {', '.join(t.trainer for t in trainers)}",
            flush=True,
        )
        with watch(trainers) as view:
            reports = simulate(config, trainers, view, ray)
    except TrainerFailed as exc:
        look = hint(exc.failure, config)
        print(f"sluice simulate: {exc.failure}" + (f"; {look}" if look else ""), file=sys.stderr)
        if getattr(args, "verbose", False):
            print(exc.failure.trace, file=sys.stderr, end="")
        if exc.stopped:
            others = _trainers(exc.stopped).replace(" ", " other ")
            print(f"sluice simulate: stopped {others}", file=sys.stderr)
        return 1
    except SimulationError as exc:  # Ray could not run them
        print(f"sluice simulate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        stopped = exc.stopped if isinstance(exc, Interrupted) else 0
        print(f"interrupted; {_trainers(stopped)} stopped", file=sys.stderr)
        return 130
    before = {r.round: 0.0 for r in reports}
    for r in reports:
        before[r.round] += r.holdout_before / len(trainers)
    print(
        f"{config.rounds} rounds x {len(trainers)} trainers in {time.monotonic() - started:.0f}s; "
        "mean held-out loss of the global model before each round: "
        + ", ".join(f"{v:.4f}" for _, v in sorted(before.items()))
    )
    return 0


def _trainers(n: int) -> str:
    return f"{n} trainer" + ("" if n == 1 else "s")
