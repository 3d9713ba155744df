"""`sluice simulate --backend ray`: trainers' rounds run on a pool of Ray actors.

Each actor reserves one trainer's resources (--trainer-cpus, --trainer-memory-mb) and runs
one trainer's round at a time (simulate.run_round: model and clips made again from the
trainer's seed, the pull, training, the push), so 32 virtual trainers on 2 CPUs need two
worker processes, not 32. Events are the process backend's, as plain data (a failure as
workers.Failure); the driver polls every actor with ray.wait and hands them on as they
come. An actor that dies has its round started again in a new actor; having joined a
round, the retry rejoins it on the same base, so its push carries the same update id and
the gateway answers an update it already committed instead of counting it twice.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import importlib.util
import itertools
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sluice.clients.simulate import (
    Event,
    Retried,
    RoundReport,
    SimulationConfig,
    SimulationError,
    Stage,
    TrainerSpec,
    run_round,
)
from sluice.clients.workers import Emit, Failure, Interrupted, WorkerFailed, describe

POLL_S = 1.0  # an actor's take() answers after this long even without events
LOCAL_OBJECT_STORE_BYTES = 100 * 2**20  # only events cross it, a few hundred bytes each
# A test hook (tests/e2e/test_simulate_ray.py): "TRAINER:ROUND" makes that trainer's actor
# exit right after its push to that round was acknowledged, on the round's first attempt.
EXIT_AFTER_PUSH_ENV = "SLUICE_RAY_EXIT_AFTER_PUSH"

log = logging.getLogger("sluice.clients.ray")


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # an existing cluster ("auto", "ray://HOST:10001"); None: start one
    cpus: int | None = None  # CPUs of the instance started here (None: this machine's cores)
    trainer_cpus: float = 1.0  # each actor's num_cpus: what one trainer's round may use
    trainer_memory_mb: int = 0  # each actor's memory reservation; 0: none
    max_attempts: int = 3  # of a round whose actor keeps dying, before the trainer fails

    @property
    def where(self) -> str:
        cluster = self.address or f"started here, {self.cpus or os.cpu_count()} CPUs"
        memory = f", {self.trainer_memory_mb} MB" if self.trainer_memory_mb else ""
        return f"{cluster}; {self.trainer_cpus:g} CPU{memory} per trainer"


_RAY_FLAGS = {  # flag -> its argparse dest; every one is None when not given
    "--ray-address": "ray_address",
    "--ray-cpus": "ray_cpus",
    "--trainer-cpus": "trainer_cpus",
    "--trainer-memory-mb": "trainer_memory_mb",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("process", "ray"),
        default="process",
        help="process: one process per trainer here; ray: trainers' rounds on Ray actors",
    )
    g = p.add_argument_group("with --backend ray (docs/SIMULATE.md)")
    g.add_argument(
        "--ray-address",
        help="an existing Ray cluster: auto (`ray start` on this machine) or ray://HOST:10001 "
        "(default: a Ray instance started here for this run)",
    )
    g.add_argument("--ray-cpus", type=int, help="CPUs of the Ray started here (default: all)")
    g.add_argument(
        "--trainer-cpus",
        type=float,
        help="CPUs each trainer's actor reserves (default 1; 0.5 runs two per core)",
    )
    g.add_argument(
        "--trainer-memory-mb", type=int, help="memory each trainer's actor reserves (default: none)"
    )


def options_from_args(args: argparse.Namespace) -> RayOptions | None:
    """None for --backend process; raises ValueError naming the flags that do not fit."""
    given = [flag for flag, dest in _RAY_FLAGS.items() if getattr(args, dest, None) is not None]
    if getattr(args, "backend", "process") == "process":
        if given:
            raise ValueError(f"{', '.join(given)}: only with --backend ray")
        return None
    if args.ray_address is not None and args.ray_cpus is not None:
        raise ValueError("--ray-cpus sizes the Ray started here: not with --ray-address")
    if args.ray_cpus is not None and args.ray_cpus < 1:
        raise ValueError(f"--ray-cpus: expected at least 1, got {args.ray_cpus}")
    trainer_cpus = 1.0 if args.trainer_cpus is None else args.trainer_cpus
    if not trainer_cpus > 0:
        raise ValueError(f"--trainer-cpus: expected more than 0, got {trainer_cpus:g}")
    memory_mb = args.trainer_memory_mb or 0
    if memory_mb < 0:
        raise ValueError(f"--trainer-memory-mb: expected at least 0, got {memory_mb}")
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--backend ray needs Ray: pip install 'sluicegate[ray]'")
    return RayOptions(args.ray_address, args.ray_cpus, trainer_cpus, memory_mb)


@dataclass(frozen=True)
class _Finished:
    """The last event of a round that ended well."""


class _Host:
    """A Ray actor's body (see _Run): one trainer's round at a time, in a thread of its own;
    take() hands out what it has said since."""

    def __init__(self) -> None:
        self._events: queue.Queue[object] = queue.Queue()

    def start(
        self, name: str, work: Callable[[Emit], object], exit_after: tuple[str, int] | None
    ) -> None:
        threading.Thread(target=self._run, args=(name, work, exit_after), daemon=True).start()

    def take(self, wait_s: float) -> list[object]:
        """Every event not yet taken; waits up to wait_s for the first."""
        try:
            taken = [self._events.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while True:
            try:
                taken.append(self._events.get_nowait())
            except queue.Empty:
                return taken

    def _run(
        self, name: str, work: Callable[[Emit], object], exit_after: tuple[str, int] | None
    ) -> None:
        last: list[object] = [None]

        def emit(event: object) -> None:
            if isinstance(event, RoundReport) and (event.trainer, event.round) == exit_after:
                deadline = time.monotonic() + 10  # the driver has seen the round: see the hook
                while not self._events.empty() and time.monotonic() < deadline:
                    time.sleep(0.05)
                os._exit(1)
            last[0] = event
            self._events.put(event)

        try:
            work(emit)
        except BaseException as exc:  # reported as data, as clients/workers.py does
            error, details = describe(exc)
            trace = "".join(traceback.format_exception(exc))
            self._events.put(Failure(name, error, details, last[0], trace))
        else:
            self._events.put(_Finished())


@dataclass
class _Round:
    """A trainer's round to run: which of its rounds, and after which round it pushed."""

    spec: TrainerSpec
    index: int  # 0 .. config.rounds - 1
    after: int  # the last round it pushed to; 0: none
    attempt: int = 1
    rejoin: Stage | None = None  # a dead attempt's last Stage, in the round it had joined
    last: Stage | None = None  # this attempt's last Stage
    report: RoundReport | None = None


def run_on_ray(
    config: SimulationConfig,
    trainers: Sequence[TrainerSpec],
    on_event: Callable[[Event], None],
    options: RayOptions,
) -> None:
    """Every trainer's config.rounds rounds on Ray actors; on_event gets every event as it
    arrives. Connects to options.address, or starts Ray here (and stops it at the end)
    unless this process already did ray.init.

    Raises SimulationError when Ray is missing, unreachable or has no room for a trainer;
    WorkerFailed (after stopping the rest) at the first trainer that failed or whose
    actors died options.max_attempts times in one round; Interrupted on Ctrl-C (after
    killing every actor).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read when Ray starts: no reports
    if options.address is None:
        # A Ray started here serves this machine only: its single-machine mode (macOS's and
        # Windows' default) takes 127.0.0.1 as the node's address, so every Ray server
        # listens on loopback, never on the host's interfaces. Read when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as exc:
        raise SimulationError("--backend ray needs Ray: pip install 'sluicegate[ray]'") from exc
    started_here = not ray.is_initialized()
    if started_here:
        total = config.rounds * config.steps_per_round
        for spec in trainers:  # Ray takes a few seconds to start
            on_event(Stage(spec.trainer, 0, "waiting for Ray to start", 0, total))
        try:
            _init(ray, options)
        except KeyboardInterrupt:
            raise Interrupted(len(trainers)) from None
    run = _Run(ray, config, trainers, on_event, options)
    try:
        with _raylet_errors_logged(ray):
            run.run()
    finally:
        run.stop()
        if started_here:
            ray.shutdown()


@contextlib.contextmanager
def _raylet_errors_logged(ray: Any) -> Iterator[None]:
    """The raylet's word on a dead worker goes to the debug log (`sluice -v`), not stdout:
    the driver prints it from a thread of its own (ray._private.worker, Ray 2.58), in the
    middle of the rounds' lines, and a Retried line already says it."""
    module: Any = getattr(getattr(ray, "_private", None), "worker", None)
    printer = getattr(module, "print_to_stdstream", None)
    if printer is None:  # another Ray: leave it be
        yield
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        for line in data.get("lines", []):
            log.debug("raylet: %s", line)

    module.print_to_stdstream = filtered
    try:
        yield
    finally:
        module.print_to_stdstream = printer


def _init(ray: Any, options: RayOptions) -> None:
    try:
        quiet = logging.WARNING  # not "Started a local Ray instance." and the like
        if options.address is None:
            ray.init(
                "local",  # even where RAY_ADDRESS names a cluster
                num_cpus=options.cpus or os.cpu_count(),
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                log_to_driver=False,  # workers' logs stay in /tmp/ray/session_latest/logs
                logging_level=quiet,
            )
        elif options.address.startswith("ray://"):  # Ray Client: no driver options
            ray.init(options.address, logging_level=quiet)
        else:
            ray.init(options.address, log_to_driver=False, logging_level=quiet)
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError: all say the same
        where = options.address or "here"
        raise SimulationError(f"could not start Ray {where}: {exc}") from exc


class _Run:
    """The driver: a pool of actors, the rounds waiting for one, and what they say."""

    def __init__(
        self,
        ray: Any,
        config: SimulationConfig,
        trainers: Sequence[TrainerSpec],
        on_event: Callable[[Event], None],
        options: RayOptions,
    ) -> None:
        self.ray, self.config, self.on_event, self.options = ray, config, on_event, options
        resources: dict[str, float] = {"num_cpus": options.trainer_cpus}
        if options.trainer_memory_mb:
            resources["memory"] = options.trainer_memory_mb * 2**20
        self.actor_class = ray.remote(_Host).options(**resources)
        self.unfinished = {t.trainer for t in trainers}
        self.trainers = trainers
        self.waiting: list[tuple[int, int, int, _Round]] = []  # a heap, earliest round first
        self.order = itertools.count()
        self.idle: list[Any] = []  # actor handles
        self.busy: dict[Any, tuple[Any, _Round]] = {}  # take()'s ref -> (actor, its round)
        hook = os.environ.get(EXIT_AFTER_PUSH_ENV, "")
        trainer, _, round_no = hook.rpartition(":")
        self.exit_after = (trainer, int(round_no)) if trainer else None

    def _room(self) -> int:
        """How many trainers' actors the cluster holds at once."""
        total = self.ray.cluster_resources()
        fits = int(total.get("CPU", 0) / self.options.trainer_cpus + 1e-9)
        memory_mb = self.options.trainer_memory_mb
        if memory_mb:
            fits = min(fits, int(total.get("memory", 0) / 2**20 / memory_mb))
        if fits < 1:
            memory = f", {memory_mb} MB" if memory_mb else ""
            asks = f"{self.options.trainer_cpus:g} CPUs{memory}"
            has = f"{total.get('CPU', 0):g} CPUs, {total.get('memory', 0) / 2**20:.0f} MB"
            raise SimulationError(f"Ray has no room for a trainer: it asks {asks}, Ray has {has}")
        return fits

    def run(self) -> None:
        per_round = self.config.steps_per_round
        try:
            pool_size = min(len(self.trainers), self._room())
            self.idle = [self.actor_class.remote() for _ in range(pool_size)]
            for spec in self.trainers:
                self._queue(_Round(spec, 0, 0))
            while self.unfinished:
                self._dispatch()
                ready, _ = self.ray.wait(list(self.busy), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    actor, job = self.busy.pop(ref)
                    try:
                        events = self.ray.get(ref)
                    except self.ray.exceptions.RayActorError as exc:
                        self._lost(actor, job, exc)
                        continue
                    if self._take(job, events):
                        self.busy[actor.take.remote(POLL_S)] = (actor, job)
                        continue
                    self.idle.append(actor)
                    assert job.report is not None  # a round ends well with its report
                    if job.index + 1 < self.config.rounds:
                        self._queue(_Round(job.spec, job.index + 1, job.report.round))
                    else:
                        self.unfinished.discard(job.spec.trainer)
                        done = self.config.rounds * per_round
                        self.on_event(Stage(job.spec.trainer, job.report.round, "done", done, done))
        except KeyboardInterrupt:
            raise Interrupted(len(self.unfinished)) from None

    def stop(self) -> None:
        for actor in [*self.idle, *(actor for actor, _ in self.busy.values())]:
            self._kill(actor)
        self.idle, self.busy = [], {}

    def _kill(self, actor: Any) -> None:
        with contextlib.suppress(Exception):  # dead already, or Ray is going (Ctrl-C reached it)
            self.ray.kill(actor)

    def _queue(self, job: _Round, first: bool = False) -> None:
        """Queue a round: earliest rounds first, so that no actor waits for a round to open
        while a round it needs to close is queued behind it; retries before others."""
        heapq.heappush(self.waiting, (job.index, 0 if first else 1, next(self.order), job))
        total = self.config.rounds * self.config.steps_per_round
        at = job.index * self.config.steps_per_round
        doing = "waiting for a Ray actor"
        self.on_event(Stage(job.spec.trainer, job.after, doing, at, total))

    def _dispatch(self) -> None:
        while self.idle and self.waiting:
            job = heapq.heappop(self.waiting)[-1]
            actor = self.idle.pop()
            work = partial(run_round, job.spec, self.config, job.index, job.after, job.rejoin)
            exit_after = self.exit_after if job.attempt == 1 else None
            actor.start.remote(job.spec.trainer, work, exit_after)
            self.busy[actor.take.remote(POLL_S)] = (actor, job)

    def _take(self, job: _Round, events: list[object]) -> bool:
        """Hand events on; False when the round ended well. Raises WorkerFailed at a failure."""
        for event in events:
            if isinstance(event, _Finished):
                return False
            if isinstance(event, Failure):
                raise WorkerFailed(event, len(self.unfinished) - 1)
            if isinstance(event, Stage):
                job.last = event
            elif isinstance(event, RoundReport):
                job.report = event
            else:
                raise TypeError(f"an actor sent {event!r}")
            self.on_event(event)
        return True

    def _lost(self, actor: Any, job: _Round, exc: Exception) -> None:
        """An actor died (or Ray lost it): its round again in a new one, up to max_attempts."""
        self._kill(actor)  # an ActorUnavailableError's actor may come back: not for us
        self.idle.append(self.actor_class.remote())
        reason = _reason(exc)
        doing = job.last.doing if job.last else "starting"
        spec, attempts = job.spec, self.options.max_attempts
        if job.attempt >= attempts:
            details = f"its Ray actor died in {attempts} attempts; the last time: {reason}"
            failure = Failure(spec.trainer, "ActorDied", details, job.last)
            raise WorkerFailed(failure, len(self.unfinished) - 1)
        joined = job.last if job.last and job.last.base_version is not None else job.rejoin
        again = _Round(spec, job.index, job.after, job.attempt + 1, joined)
        rejoins = joined.round if joined else 0
        self.on_event(
            Retried(spec.trainer, spec.region, doing, reason, again.attempt, attempts, rejoins)
        )
        self._queue(again, first=True)


def _reason(exc: Exception) -> str:
    """Ray's cause of an actor's death in a line: its message less the actor's ids and the
    list of common causes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    told = [line for line in lines if line.split(":")[0] not in _ID_FIELDS]
    text = " ".join(told[1:] or told).split(" Some common causes")[0].rstrip(". ")
    return text if len(text) <= 240 else text[:237] + "..."


_ID_FIELDS = {"class_name", "actor_id", "pid", "name", "namespace", "ip"}
