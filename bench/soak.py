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
import datetime
import functools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import psutil  # type: ignore[import-untyped]  # psutil ships no type hints

from bench import gateway_proc
from bench.common import MB, Check, machine
from sluice.clients import sdk
from sluice.clients.sdk import RetryPolicy, TrainerClient
from sluice.models.schema import Schema

MODEL = "drivenet-tiny"
KEEP_ROUNDS = 2
KEEP_VERSIONS = 2
# The gateway's handler threads per listener: every trainer's one call at a time, the
# sampler's, and its reserved 4 (refusals stay prompt). With its default 32 (28 calls
# admitted), 64 trainers polling on a loaded 2-core machine pile up past 28 calls whenever
# the gateway stalls for a second, and the listener refuses the rest with UNAVAILABLE: its
# back-pressure, which the SDK retries and the soak counts as errors (--workers 32).
EXTRA_WORKERS = 16
MIN_TRAINERS = 2  # k: a release needs this many distinct trainers (every round has all)
REGIONS = ("shanghai", "beijing", "shenzhen", "chengdu")
SAMPLE_S = 2.0  # between samples of the gateway process and its data dir
TRAIN_S = (0.5, 2.0)  # "local training" between reading a round and pushing: spreads pushes
POLL_S = (0.5, 1.0)  # between GetRound calls while waiting for the next round
WARMUP_FRACTION, WARMUP_MAX_S = 0.2, 120.0
RSS_GROWTH = 0.05  # allowed growth of the gateway's RSS from the end of warm-up to the end
# Open files, after warm-up: the lowest count of each tenth of the run within FD_SLACK.
# A sample can land on files that come and go (a push's spool file, a pull's blob: up to
# 14 in a sample of the 10-minute run); a leak raises the floor.
FD_SLACK = 4
# Threads come and go too (a close's fold workers, gRPC's pollers: up to 15 in a sample),
# and gRPC's handler pool grows on a pile-up of calls, never shrinks, in steps at any time
# (47 -> 70 -> 76 threads in the 10-minute run; 48 -> 63 in the middle of a 1-minute one):
# not flat, but bounded, since each trainer has at most one call open. So: every sample
# <= the idle count + trainers + 1 (the sampler) + TRANSIENT_THREADS, and the lowest
# counts of the last three tenths within THREAD_SLACK (no growth at the end).
TRANSIENT_THREADS = 16
THREAD_SLACK = 4
STALL_S = 60.0  # no round closed this long: reported as an error (a stuck quorum)
# A push that raced the round's close (read open, arrived after the quorum closed it).
RACE = re.compile(r"round \d+ of '[^']+' is (aggregating|closed|failed)")

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


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the trainers started
    rss: int
    fds: int
    threads: int
    cpu_s: float  # the gateway's user + system CPU seconds so far
    round: int  # the open round then
    disk: dict[str, int]  # bytes per part of the data dir (see disk_use)
    blob_files: int


def disk_use(data_dir: Path) -> tuple[dict[str, int], int]:
    """Bytes in blobs/ (spooled updates, weights), state/ (optimizer state), registry/
    (releases), sluice.db (and its -wal, -shm), the rest, and the gateway's log (our
    redirect of its stderr, not in `total`); and the number of files in blobs/."""
    parts = dict.fromkeys(("blobs", "state", "registry", "db", "other", "log"), 0)
    blob_files = 0
    for root, _dirs, files in os.walk(data_dir):
        top = Path(root).relative_to(data_dir).parts[:1]
        for name in files:
            try:
                size = os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while we walked
                continue
            if top and top[0] in parts:
                parts[top[0]] += size
                blob_files += top[0] == "blobs"
            elif not top and name.startswith("sluice.db"):
                parts["db"] += size
            elif not top and name == "gateway.log":
                parts["log"] += size
            else:
                parts["other"] += size
    parts["total"] = sum(v for k, v in parts.items() if k != "log")
    return parts, blob_files


class Sampler:
    """The gateway process and its data dir, sampled every SAMPLE_S in a thread; the open
    round is read on a connection of its own, made before the first sample."""

    def __init__(self, gw: gateway_proc.GatewayProcess, t0: float) -> None:
        self.process = psutil.Process(gw.pid)
        self.data_dir = gw.data_dir
        self.t0 = t0
        self.client = TrainerClient(gw.internal, retry=RetryPolicy(attempts=3))
        self.client.round(MODEL)
        self.samples: list[Sample] = []
        first = self.sample()
        if first is None:
            raise RuntimeError(f"the gateway exited; see {gw.data_dir / 'gateway.log'}")
        self.samples.append(first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> Sample | None:
        """One sample now; None once the gateway is gone (the run reports its exit)."""
        previous = self.samples[-1].round if self.samples else 0
        try:
            with self.process.oneshot():
                rss, fds = self.process.memory_info().rss, self.process.num_fds()
                threads, cpu = self.process.num_threads(), self.process.cpu_times()
        except psutil.Error:
            return None
        try:
            round_no = self.client.round(MODEL).round
        except grpc.RpcError:
            round_no = previous
        disk, blob_files = disk_use(self.data_dir)
        at = time.perf_counter() - self.t0
        return Sample(at, rss, fds, threads, cpu.user + cpu.system, round_no, disk, blob_files)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S) and (sample := self.sample()) is not None:
            self.samples.append(sample)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def audit_facts(data_dir: Path) -> dict[str, Any]:
    """`sluice audit verify` on the stopped gateway's data dir, and its entries by kind."""
    cli = [sys.executable, "-m", "sluice.gateway.cli", "audit"]
    verify = subprocess.run(
        [*cli, "verify", "--data-dir", str(data_dir)], capture_output=True, text=True
    )
    export = subprocess.run(
        [*cli, "export", "--data-dir", str(data_dir)], capture_output=True, text=True, check=True
    )
    kinds: collections.Counter[str] = collections.Counter()
    deleted: collections.Counter[str] = collections.Counter()
    for line in export.stdout.splitlines():
        entry = json.loads(line)
        kinds[entry["kind"]] += 1
        if entry["kind"] == "retention.deleted":
            deleted[entry["subject"].split("/")[1]] += 1  # MODEL/round/N or MODEL/version/V
    return {
        "verify_rc": verify.returncode,
        "verify_output": (verify.stdout + verify.stderr).strip(),
        "kinds": dict(kinds),
        "retention_deleted": dict(deleted),
    }


def orphans(data_dir: Path) -> tuple[int, int, int]:
    """(files in blobs/ that no live row names, files left in blobs/tmp, live blobs) of a
    stopped gateway: retention's exact account, where sampled bytes are only a bound."""
    db = sqlite3.connect(f"file:{data_dir / 'sluice.db'}?mode=ro", uri=True)
    try:
        live = {
            row[0]
            for row in db.execute(
                "SELECT payload_sha256 FROM updates WHERE removed_ms IS NULL"
                " UNION SELECT weights_sha256 FROM versions WHERE removed_ms IS NULL"
            )
        }
    finally:
        db.close()
    blobs = data_dir / "blobs"
    stored = {p.name for p in blobs.glob("??/*") if p.is_file()}
    tmp = sum(1 for p in (blobs / "tmp").iterdir() if p.is_file())
    return len(stored - live), tmp, len(live)


def log_problems(data_dir: Path) -> list[str]:
    """The gateway log's warnings, errors and tracebacks, but --insecure-loopback's own."""
    path = data_dir / "gateway.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return [
        ln
        for ln in lines
        if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", ln) and "INSECURE:" not in ln
    ]


def floors(values: Sequence[int], parts: int = 10) -> list[int]:
    """The lowest value of each of `parts` consecutive stretches of values."""
    return [int(p.min()) for p in np.array_split(np.array(values), min(parts, len(values)))]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Run:
    """What one soak measured, for summarise()."""

    trainers: int
    workers: int
    run_s: float
    warmup_s: float
    payload_bytes: int
    tally: Tally
    samples: list[Sample]  # while the trainers ran
    idle_before: Sample  # before the first trainer connected
    idle_after: Sample | None  # after the last one disconnected
    audit: dict[str, Any]
    at_rest: tuple[int, int, int]  # orphans(): of the stopped gateway
    end_disk: dict[str, int]
    end_blob_files: int
    returncode: int | None
    startup_s: float
    stop_s: float
    log_problems: list[str]
    client_cpu_s: float


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
    sampler = Sampler(gw, t0)
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


def rss_median(samples: Sequence[Sample], start: float, end: float) -> int:
    values = [s.rss for s in samples if start <= s.t_s <= end]
    return int(np.median(values)) if values else 0


def summarise(run: Run) -> dict[str, Any]:
    """Every number of the run, and its PASS/FAIL checks."""
    samples, tally, trainers = run.samples, run.tally, run.trainers
    after = [s for s in samples if s.t_s >= run.warmup_s] or samples[-1:]
    # RSS at the end of warm-up and at the end: medians of a window, so that one sample
    # taken while a round closes (fold buffers, the release) does not decide it.
    window = max(3 * SAMPLE_S, min(30.0, 0.1 * run.run_s))
    rss_warm = rss_median(samples, run.warmup_s, run.warmup_s + window)
    rss_end = rss_median(samples, run.run_s - window, run.run_s)
    growth = rss_end / rss_warm - 1 if rss_warm else float("inf")
    # The trend after warm-up (least squares): a leak that stays under RSS_GROWTH in ten
    # minutes still shows here, per minute and per 100 rounds.
    slope_per_s = float(np.polyfit([s.t_s for s in after], [s.rss for s in after], 1)[0])
    rounds_per_s = (after[-1].round - after[0].round) / max(1e-9, after[-1].t_s - after[0].t_s)
    fds, threads = [s.fds for s in after], [s.threads for s in after]
    fd_floors, thread_floors = floors(fds), floors(threads)
    latencies = [lat for _, lat in tally.push_s]
    latencies_after = [lat for at, lat in tally.push_s if at >= run.warmup_s]
    kinds, deleted = run.audit["kinds"], run.audit["retention_deleted"]
    errors = sum(tally.errors.values())
    thread_bound = run.idle_before.threads + trainers + 1 + TRANSIENT_THREADS
    settling = thread_floors[-3:]

    # Live bound on blobs/ + state/: the kept ended rounds' updates, those of the round
    # being closed (until its retention pass) and of the open one; the kept versions'
    # weights (the open round's base is the newest) and the one a close writes. FedAvg
    # keeps no optimizer state. A version's weights are the schema's flat payload.
    update_bound = (KEEP_ROUNDS + 2) * trainers * run.payload_bytes
    weights_bound = (KEEP_VERSIONS + 1) * run.payload_bytes
    bound = update_bound + weights_bound
    blobs_max = max(s.disk["blobs"] + s.disk["state"] for s in after)
    orphan_files, tmp_files, live_blobs = run.at_rest
    rest_files = run.end_blob_files - tmp_files
    # At rest (stopped): the kept rounds, the open round's pushes, the kept versions.
    rest_bound = (KEEP_ROUNDS + 1) * trainers + KEEP_VERSIONS
    first, last = after[0], samples[-1]
    rounds_after = max(1, last.round - first.round)
    idle = run.idle_after or last

    checks = [
        Check("no errors (any gRPC error but the close race; a stalled round)", errors == 0,
              f"{errors}: {dict(tally.errors) or 'none'}"),
        Check(f"gateway RSS growth after warm-up <= {RSS_GROWTH:.0%}", growth <= RSS_GROWTH,
              f"{rss_warm / MB:.1f} MB -> {rss_end / MB:.1f} MB ({growth:+.1%})"),
        Check(f"open files flat (lowest of each tenth after warm-up within {FD_SLACK})",
              max(fd_floors) - min(fd_floors) <= FD_SLACK,
              f"{min(fd_floors)}..{max(fd_floors)} (all samples {min(fds)}..{max(fds)}); "
              f"{run.idle_before.fds} before the trainers connected, {idle.fds} after they left"),
        Check(f"threads bounded (idle + trainers + 1 + {TRANSIENT_THREADS}) and flat at the "
              f"end (lowest of the last three tenths within {THREAD_SLACK})",
              max(threads) <= thread_bound and max(settling) - min(settling) <= THREAD_SLACK,
              f"max {max(threads)} <= {thread_bound}; last three tenths {settling}"),
        Check("blobs/ + state/ within retention's bound at every sample after warm-up",
              blobs_max <= bound, f"max {blobs_max / MB:.2f} MB <= {bound / MB:.2f} MB"),
        Check("stopped: every blob named by a live row, no temp spool, within retention's",
              orphan_files == 0 and tmp_files == 0 and rest_files <= rest_bound,
              f"{orphan_files} unnamed, {tmp_files} temp, {rest_files} blobs <= {rest_bound} "
              f"({live_blobs} named)"),
        Check("audit chain verifies (sluice audit verify)", run.audit["verify_rc"] == 0,
              run.audit["verify_output"].replace("\n", "; ")),
        Check("retention deleted (retention.deleted entries > 0)", sum(deleted.values()) > 0,
              f"{deleted.get('round', 0)} rounds' updates, {deleted.get('version', 0)} versions"),
        Check("every acknowledged push is audited (push.accepted)",
              kinds.get("push.accepted", 0) == tally.pushes,
              f"{kinds.get('push.accepted', 0)} entries, {tally.pushes} acknowledged"),
        Check("no warning or error in the gateway's log", not run.log_problems,
              f"{len(run.log_problems)} lines"),
        Check("gateway stopped cleanly (SIGTERM, exit 0)", run.returncode == 0,
              f"exit {run.returncode} after {run.stop_s:.1f} s"),
    ]  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"model": MODEL, "trainers": trainers, "minutes": run.run_s / 60,
                     "quorum": trainers, "min_trainers": MIN_TRAINERS, "workers": run.workers,
                     "keep_rounds": KEEP_ROUNDS, "keep_versions": KEEP_VERSIONS,
                     "payload_bytes": run.payload_bytes, "warmup_s": run.warmup_s,
                     "sample_s": SAMPLE_S, "train_s": TRAIN_S, "poll_s": POLL_S},
        "rounds_closed": kinds.get("round.closed", 0),
        "releases": kinds.get("release.published", 0),
        "pushes": tally.pushes,
        "pulls": tally.pulls,
        "errors": dict(tally.errors),
        "first_errors": tally.first_errors,
        "races": dict(tally.races),
        "push_latency_s": {
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
            "p50_after_warmup": percentile(latencies_after, 50),
            "p99_after_warmup": percentile(latencies_after, 99),
        },
        "rss": {"warmup_end": rss_warm, "end": rss_end, "growth": growth, "window_s": window,
                "slope_per_min": slope_per_s * 60,
                "slope_per_100_rounds": slope_per_s * 100 / max(rounds_per_s, 1e-9),
                "max_after_warmup": max(s.rss for s in after)},
        "fds": {"min": min(fds), "max": max(fds), "floors": fd_floors,
                "idle_before": run.idle_before.fds, "idle_after": idle.fds},
        "threads": {"min": min(threads), "max": max(threads), "floors": thread_floors,
                    "bound": thread_bound,
                    "idle_before": run.idle_before.threads, "idle_after": idle.threads},
        "cpu_s": {"gateway_after_warmup": last.cpu_s - first.cpu_s,
                  "gateway": last.cpu_s - run.idle_before.cpu_s, "trainers": run.client_cpu_s},
        "disk": {
            "blobs_state_max": blobs_max, "bound": bound, "bound_updates": update_bound,
            "bound_weights": weights_bound, "blob_files_max": max(s.blob_files for s in after),
            "end": run.end_disk, "end_blobs": rest_files, "rest_bound": rest_bound,
            "registry_per_round": (last.disk["registry"] - first.disk["registry"]) / rounds_after,
            "db_per_round": (last.disk["db"] - first.disk["db"]) / rounds_after,
        },
        "gateway": {"returncode": run.returncode, "startup_s": run.startup_s,
                    "stop_s": run.stop_s, "log_problems": run.log_problems[:20]},
        "audit": run.audit,
        "samples": [asdict(s) for s in samples],
        "checks": [asdict(c) for c in checks],
    }  # fmt: skip


def counted(kinds: dict[str, int]) -> str:
    return f"{sum(kinds.values())} {kinds}" if kinds else "0"


def render(r: dict[str, Any]) -> str:
    """The summary: what ran, the numbers, then the PASS/FAIL lines."""
    s, lat, rss, d, cpu = r["settings"], r["push_latency_s"], r["rss"], r["disk"], r["cpu_s"]
    fds, threads, end, ms = r["fds"], r["threads"], d["end"], 1e3
    lines = [
        f"soak {r['date']}: {s['trainers']} trainers of {s['model']} for {s['minutes']:g} min, "
        f"quorum {s['quorum']}, keep_rounds {s['keep_rounds']}, keep_versions "
        f"{s['keep_versions']}, warm-up {s['warmup_s']:.0f} s; {r['machine']['cpus']} CPUs, "
        f"load average {r['machine']['load_average']} at the end",
        f"rounds closed {r['rounds_closed']}, releases {r['releases']}, pushes {r['pushes']}, "
        f"pulls {r['pulls']}, errors {counted(r['errors'])}, close races {counted(r['races'])}",
        f"push latency p50 {lat['p50'] * ms:.0f} ms, p99 {lat['p99'] * ms:.0f} ms, max "
        f"{lat['max'] * ms:.0f} ms (after warm-up: p50 {lat['p50_after_warmup'] * ms:.0f}, "
        f"p99 {lat['p99_after_warmup'] * ms:.0f} ms)",
        f"gateway RSS {rss['warmup_end'] / MB:.1f} MB after warm-up, {rss['end'] / MB:.1f} MB "
        f"at the end ({rss['growth']:+.1%}; medians over {rss['window_s']:.0f} s), max "
        f"{rss['max_after_warmup'] / MB:.1f} MB; trend after warm-up "
        f"{rss['slope_per_min'] / MB:+.2f} MB a minute, "
        f"{rss['slope_per_100_rounds'] / MB:+.2f} MB per 100 rounds",
        f"open files {fds['min']}..{fds['max']} after warm-up (lowest of each tenth "
        f"{fds['floors']}), {fds['idle_before']} before the trainers, {fds['idle_after']} after",
        f"threads {threads['min']}..{threads['max']} after warm-up (lowest of each tenth "
        f"{threads['floors']}), {threads['idle_before']} before the trainers, "
        f"{threads['idle_after']} after",
        f"CPU seconds: gateway {cpu['gateway']:.0f} ({cpu['gateway_after_warmup']:.0f} after "
        f"warm-up), trainers (this process) {cpu['trainers']:.0f}",
        f"disk: blobs/+state/ max {d['blobs_state_max'] / MB:.2f} MB, bound "
        f"{d['bound'] / MB:.2f} MB; {d['blob_files_max']} blob files max; stopped: blobs/ "
        f"{end['blobs'] / MB:.2f} MB ({d['end_blobs']} blobs <= {d['rest_bound']})",
        f"growing by design: registry/ {end['registry'] / MB:.1f} MB "
        f"({d['registry_per_round'] / 1e3:.0f} kB a round), sluice.db "
        f"{end['db'] / MB:.1f} MB ({d['db_per_round'] / 1e3:.1f} kB a round); data dir "
        f"{end['total'] / MB:.1f} MB",
        f"audit: {sum(r['audit']['kinds'].values())} entries, retention.deleted "
        f"{r['audit']['retention_deleted']}",
    ]
    lines += [f"  error: {e}" for e in r["first_errors"]]
    lines += [f"  gateway log: {ln}" for ln in r["gateway"]["log_problems"][:5]]
    lines += [f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}" for c in r["checks"]]
    return "\n".join(lines)


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
