"""The soak: many trainers against one `sluice serve` for minutes of rounds, retention on.

Run: python -m bench.soak [--minutes 10] [--trainers 64] [--workdir DIR] [--json PATH]
A real gateway process (bench/gateway_proc.py, plain text on loopback) serves drivenet-tiny
with quorum = trainers, keep_rounds = keep_versions = 2 and a handler thread for every
trainer's call (workers = trainers + 16, see EXTRA_WORKERS). Each trainer is a thread of this
process with its own connection: it polls GetRound, pulls the round's base when the version
changed, "trains" (sleeps), pushes one random delta per round and waits for the next round.
psutil samples the gateway's RSS, open files and threads, and the data dir's disk use.
PASS/FAIL: no errors, RSS growth after warm-up, flat open files, bounded threads, disk
bounded by retention, a clean stop, an intact audit chain with retention entries. Exits 1
on a FAIL; bench/README.md (Soak) says how each is judged.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import psutil  # type: ignore[import-untyped]  # psutil ships no type hints

from bench import gateway_proc
from bench.common import MB
from bench.soak_probe import (
    SAMPLE_S,
    Sampler,
    audit_facts,
    disk_use,
    log_problems,
    orphans,
)
from bench.soak_report import Run, render, summarise
from bench.soak_settings import (
    EXTRA_WORKERS,
    KEEP_ROUNDS,
    KEEP_VERSIONS,
    MIN_TRAINERS,
    MODEL,
    POLL_S,
    RACE,
    REGIONS,
    STALL_S,
    TRAIN_S,
    WARMUP_FRACTION,
    WARMUP_MAX_S,
)
from sluice.clients import sdk
from sluice.clients.sdk import RetryPolicy, TrainerClient
from sluice.models.schema import Schema

T = TypeVar("T")


@dataclass
class Tally:
    """What the trainers did, shared by their threads."""

    t0: float  # perf_counter() when the trainers started
    pushes: int = 0
    pulls: int = 0
    push_s: list[tuple[float, float]] = field(default_factory=list)  # (run time, latency)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    races: collections.Counter[str] = field(default_factory=collections.Counter)
    first_errors: list[str] = field(default_factory=list)  # the first few, in full
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, rpc: str, fn: Callable[[], T]) -> tuple[T | None, bool]:
        """(fn(), False), or (None, whether its failure was the expected race with a
        round's close), the failure counted."""
        try:
            return fn(), False
        except Exception as exc:  # every failure is counted; the trainer goes on
            return None, self.failed(rpc, exc)

    def failed(self, rpc: str, exc: BaseException) -> bool:
        """Count a failure; True if it is the expected race with a round's close."""
        if isinstance(exc, grpc.RpcError):
            code, details = exc.code(), str(exc.details())
            race = code == grpc.StatusCode.FAILED_PRECONDITION and bool(RACE.search(details))
            kind = f"{rpc} {code.name}"
        else:
            race, details, kind = False, str(exc), f"{rpc} {type(exc).__name__}"
        with self.lock:
            (self.races if race else self.errors)[kind] += 1
            if not race and len(self.first_errors) < 10:
                at_s = time.perf_counter() - self.t0
                self.first_errors.append(f"{at_s:.1f}s {kind}: {details[:300]}")
        return race


class Trainer(TrainerClient):
    """The SDK's client on a connection of its own, as on a machine of its own (gRPC would
    otherwise share one connection among a process's channels to the same target), with
    no retries: every refusal the gateway sends is counted."""

    def __init__(self, target: str) -> None:
        super().__init__(target, retry=RetryPolicy(attempts=1), timeout_s=60)
        self._channel.close()
        options = [*sdk._CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = self._stub_type(self._channel)


def random_delta(schema: Schema, rng: np.random.Generator, scale: float = 0.01) -> bytes:
    """A valid delta payload (tests/conftest.py's): small floats, small integer steps."""
    arrays = {}
    for spec in schema.tensors:
        if spec.is_float:
            arrays[spec.name] = (rng.standard_normal(spec.shape) * scale).astype(spec.np_dtype)
        else:
            arrays[spec.name] = rng.integers(0, 10, spec.shape).astype(spec.np_dtype)
    return schema.flatten(arrays)


def run_trainer(i: int, target: str, end: float, stop: threading.Event, tally: Tally) -> None:
    """One trainer until `end` (perf_counter): one push per round, the base pulled when new."""
    name, region = f"soak-{i:03d}", REGIONS[i % len(REGIONS)]
    schema = gateway_proc.schema_of(MODEL)
    rng = np.random.default_rng(i)
    pushed_round, have_version = 0, -1
    with Trainer(target) as client:
        while not stop.is_set() and time.perf_counter() < end:
            info, _ = tally.call("GetRound", functools.partial(client.round, MODEL))
            if info is None or info.round <= pushed_round:
                stop.wait(rng.uniform(*POLL_S) if info else 1.0)
                continue
            if info.base_version != have_version:
                pull = functools.partial(client.pull_global, MODEL, info.base_version)
                pulled, _ = tally.call("PullGlobal", pull)
                if pulled is None:
                    stop.wait(1.0)
                    continue
                have_version = pulled.version
                with tally.lock:
                    tally.pulls += 1
            stop.wait(rng.uniform(*TRAIN_S))
            push = functools.partial(
                client.push_update,
                model=MODEL,
                round_no=info.round,
                base_version=info.base_version,
                schema_hash=info.schema_hash,
                trainer=name,
                region=region,
                num_examples=int(rng.integers(50, 500)),
                payload=random_delta(schema, rng),
            )
            started = time.perf_counter()
            ack, raced = tally.call("PushUpdate", push)
            if ack is not None:
                with tally.lock:
                    tally.pushes += 1
                    tally.push_s.append((started - tally.t0, time.perf_counter() - started))
            if ack is not None or raced:  # raced: it closed without us, wait for the next
                pushed_round = info.round
            else:
                stop.wait(1.0)


def soak(minutes: float, trainers: int, workers: int, workdir: Path | None, keep: bool) -> Run:
    run_s = minutes * 60
    schema = gateway_proc.schema_of(MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-soak-", dir=workdir))
    templates = tmp / "templates"
    gateway_proc.warm_templates(tmp, (MODEL,), templates)
    env = {
        "SLUICE_KEEP_ROUNDS": str(KEEP_ROUNDS),
        "SLUICE_KEEP_VERSIONS": str(KEEP_VERSIONS),
        "SLUICE_WORKERS": str(workers),
    }
    gw = gateway_proc.start(
        tmp / "gw", (MODEL,), templates, quorum=trainers, min_trainers=MIN_TRAINERS, env=env
    )
    print(f"gateway pid {gw.pid} up in {gw.startup_s:.1f} s, data dir {gw.data_dir}", flush=True)
    warmup_s = min(WARMUP_FRACTION * run_s, WARMUP_MAX_S)
    stop = threading.Event()
    client_cpu = sum(psutil.Process().cpu_times()[:2])
    t0 = time.perf_counter()
    tally = Tally(t0)
    sampler = Sampler(gw, MODEL, t0)
    idle_before, idle_after = sampler.samples[0], None
    threads = [
        threading.Thread(
            target=run_trainer, args=(i, gw.internal, t0 + run_s, stop, tally),
            name=f"trainer-{i}", daemon=True,
        )
        for i in range(trainers)
    ]  # fmt: skip
    for t in threads:
        t.start()
    try:
        watch(threads, sampler, tally, run_s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
        sampler.stop()
        time.sleep(SAMPLE_S)  # the trainers' connections close
        idle_after = sampler.sample()
        sampler.client.close()
        client_cpu = sum(psutil.Process().cpu_times()[:2]) - client_cpu
        stop_started = time.perf_counter()
        gateway_proc.stop(gw, templates)
        stop_s = time.perf_counter() - stop_started
    end_disk, end_blob_files = disk_use(gw.data_dir)
    run = Run(
        trainers, workers, run_s, warmup_s, schema.payload_bytes,
        tally, [s for s in sampler.samples if s.t_s <= run_s], idle_before, idle_after,
        audit_facts(gw.data_dir), orphans(gw.data_dir), end_disk, end_blob_files,
        gw.proc.returncode, gw.startup_s, stop_s, log_problems(gw.data_dir), client_cpu,
    )  # fmt: skip
    if keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return run


def watch(threads: list[threading.Thread], sampler: Sampler, tally: Tally, run_s: float) -> None:
    """Until the trainers are done: a line every 30 s, and a stall counted as an error."""
    last_round, last_change, next_report = 0, 0.0, 30.0
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        now = time.perf_counter() - tally.t0
        s = sampler.samples[-1]
        if s.round != last_round:
            last_round, last_change = s.round, now
        elif now - last_change > STALL_S and now < run_s:
            tally.failed("soak", RuntimeError(f"no round closed in {STALL_S:.0f} s"))
            last_change = now
        if now >= next_report:
            print(f"  {now:4.0f} s: round {s.round}, {tally.pushes} pushes, "
                  f"{sum(tally.errors.values())} errors, {sum(tally.races.values())} races, "
                  f"RSS {s.rss / MB:.0f} MB, {s.fds} fds, {s.threads} threads, "
                  f"blobs/ {s.disk['blobs'] / MB:.1f} MB", flush=True)  # fmt: skip
            next_report += 30.0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (10)")
    p.add_argument("--trainers", type=int, default=64, help="trainer threads, = quorum (64)")
    p.add_argument(
        "--workers",
        type=int,
        help=f"the gateway's handler threads per listener (trainers + {EXTRA_WORKERS}; its "
        "default is 32)",
    )
    p.add_argument("--workdir", type=Path, help="the gateway's data dir goes under it (temp)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number here")
    p.add_argument("--keep", action="store_true", help="keep the data dir afterwards")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.trainers < MIN_TRAINERS:
        p.error(f"--minutes must be positive and --trainers at least {MIN_TRAINERS}")
    workers = args.workers or args.trainers + EXTRA_WORKERS
    result = summarise(soak(args.minutes, args.trainers, workers, args.workdir, args.keep))
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
