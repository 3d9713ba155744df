"""Worker processes that report as they go.

Each worker runs a function in a fresh interpreter (spawn) and sends events to the parent
through a queue; the parent hands them on as they arrive, stops every worker at the first
failure or at Ctrl-C, and leaves no process behind. Only plain data crosses the process
boundary: a worker's exception travels as a Failure made of strings (a grpc.RpcError
holds a lock and cannot be pickled).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

Emit = Callable[[Any], None]  # a worker's events must pickle
STOP_GRACE_S = 5.0  # a stopped worker gets this long after SIGTERM before SIGKILL


@dataclass(frozen=True)
class Failure:
    """Why a worker stopped, as plain data."""

    worker: str
    error: str  # a gRPC status name (NOT_FOUND), an exception class, "killed" or "exited"
    details: str  # the status details or the exception's message, and its cause
    last: Any = None  # the last event the worker sent before it failed
    trace: str = ""  # the worker's traceback


class WorkerFailed(Exception):
    def __init__(self, failure: Failure, stopped: int) -> None:
        super().__init__(f"{failure.worker}: {failure.error}: {failure.details}")
        self.failure = failure
        self.stopped = stopped  # other workers still running, stopped because of it


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: every worker process was stopped."""

    def __init__(self, stopped: int) -> None:
        super().__init__(stopped)
        self.stopped = stopped


def describe(exc: BaseException) -> tuple[str, str]:
    """(error, details): a gRPC call's status name and details, or the exception's class
    and message; either with its cause."""
    error, details = type(exc).__name__, str(exc)
    code, text = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(text):  # grpc.RpcError of a call (grpc stays unimported)
        error, details = code().name, text() or ""
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        details += f" (caused by {type(cause).__name__}: {cause})"
    return error, details


def run_workers(workers: Mapping[str, Callable[[Emit], object]], on_event: Emit) -> None:
    """Run each worker(emit) in a process of its own, named by its key; on_event gets every
    event as it arrives. Returns when all have finished.

    Raises WorkerFailed at the first worker that raised or died (after stopping the
    others), Interrupted on Ctrl-C (after stopping them all). Workers ignore SIGINT: the
    parent stops them, so a Ctrl-C at a terminal, sent to every process of the group,
    prints one line rather than one traceback per worker.
    """
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state shared
    events = ctx.Queue()
    procs = {
        name: ctx.Process(target=_worker, args=(name, work, events), name=name)
        for name, work in workers.items()
    }
    try:
        with _sigint_ignored():  # children inherit SIG_IGN through exec
            for p in procs.values():
                p.start()
        failure = _follow(procs, events, on_event)
        if failure is not None:
            others = [p for name, p in procs.items() if name != failure.worker]
            raise WorkerFailed(failure, _stop(others))
    except KeyboardInterrupt:
        raise Interrupted(_stop(list(procs.values()))) from None
    finally:
        _stop(list(procs.values()))
        events.close()


def _worker(name: str, work: Callable[[Emit], object], events: Any) -> None:
    """A worker process's body: every event onto `events`, an error as a Failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = os.getppid()

    def orphaned() -> None:  # the parent was killed outright: nobody is listening
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    last: list[object] = [None]

    def emit(event: object) -> None:
        last[0] = event
        events.put((name, event))

    try:
        work(emit)
    except BaseException as exc:  # reported as data: exceptions may not pickle
        error, details = describe(exc)
        trace = "".join(traceback.format_exception(exc))
        events.put((name, Failure(name, error, details, last[0], trace)))
        raise SystemExit(1) from None


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile (main thread only): children started now inherit SIG_IGN
    through exec, and stopping children is not itself interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(procs: Sequence[BaseProcess]) -> int:
    """Terminate every running process and reap them all; returns how many were running."""
    with _sigint_ignored():
        running = [p for p in procs if p.pid is not None and p.exitcode is None]
        for p in running:
            p.terminate()
        for p in running:
            p.join(STOP_GRACE_S)
            if p.exitcode is None:
                p.kill()
                p.join()
    return len(running)


def _follow(procs: Mapping[str, BaseProcess], events: Any, on_event: Emit) -> Failure | None:
    """Hand events on until every process has exited; the first failure ends it early."""
    last: dict[str, object] = {}
    exited: set[str] = set()

    def take(item: tuple[str, object]) -> Failure | None:
        name, event = item
        if isinstance(event, Failure):
            return event
        last[name] = event
        on_event(event)
        return None

    while True:
        try:
            if (failure := take(events.get(timeout=0.2))) is not None:
                return failure
            continue
        except queue.Empty:
            pass
        gone = [n for n, p in procs.items() if n not in exited and p.exitcode is not None]
        if not gone:
            continue
        # What they sent before exiting is in the pipe by now: take it first.
        while True:
            try:
                item = events.get(timeout=0.1)
            except queue.Empty:
                break
            if (failure := take(item)) is not None:
                return failure
        for name in gone:
            exited.add(name)
            code = procs[name].exitcode
            if code:  # ended without a word: a signal, out of memory
                how = f" ({signal.Signals(-code).name})" if code < 0 else ""
                error = "killed" if code < 0 else "exited"
                return Failure(name, error, f"exit code {code}{how}", last.get(name))
        if len(exited) == len(procs):
            return None
