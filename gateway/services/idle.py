"""What one caller may hold on a listener, and for how long (README: availability).

Pace and paced(): a client stream that stalls or drips is dropped, not waited on.
CallLimits, Budget and Slot: handler threads per listener and calls per principal.
HeldStream and Watchdog: a response stream gives its thread back however it ends, and is
cancelled when its client stops reading.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from sluice.gateway.config import check_call_room
from sluice.gateway.core.errors import Idle, SluiceError
from sluice.gateway.services import errors

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


@dataclass(frozen=True)
class Pace:
    """How slowly a client stream may send before the gateway drops it (DEADLINE_EXCEEDED)."""

    first_message_seconds: float = 10.0  # from the call's start to its first message
    idle_seconds: float = 60.0  # between two messages
    # After grace_seconds, the stream must have averaged min_bytes_per_second of progress
    # (what `progress` counts) since it started: N bytes take at most grace + N / rate.
    grace_seconds: float = 30.0
    min_bytes_per_second: float = 0.0  # 0: no rate floor


def paced(
    source: Iterator[T], pace: Pace, progress: Callable[[T], int] | None = None
) -> Iterator[T]:
    """Items of source; raises Idle when the next one is later than `pace` allows.

    A reader thread pulls from gRPC's blocking request iterator into a queue of two items
    (so at most two messages wait in memory); it ends when the call ends, however it ends.
    The caller must end the call when Idle is raised (abort), which ends the reader too.
    """
    items: queue.Queue[object] = queue.Queue(maxsize=2)
    stop = threading.Event()  # the consumer gave up: the reader must not block on put

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in source:
                if not put(item):
                    return
        except BaseException as exc:  # the call was cancelled or failed: hand it over
            put(exc)
            return
        put(_END)

    threading.Thread(target=pump, name="stream-reader", daemon=True).start()
    started = time.monotonic()
    received, first = 0, True
    rate = pace.min_bytes_per_second
    try:
        while True:
            wait = pace.first_message_seconds if first else pace.idle_seconds
            slow = False
            if rate > 0 and not first:
                # The moment the average since the start falls below the floor.
                behind = started + pace.grace_seconds + received / rate - time.monotonic()
                if behind < wait:
                    wait, slow = max(behind, 0.0), True
            try:
                item = items.get(timeout=wait) if wait > 0 else items.get_nowait()
            except queue.Empty:
                if slow:
                    why = (
                        f"too slow: {received} bytes in {time.monotonic() - started:.1f} s; "
                        f"at least {rate:g} bytes/s are expected after the first "
                        f"{pace.grace_seconds:g} s"
                    )
                elif first:
                    why = f"no first message within {wait:g} s"
                else:
                    why = f"no message for {wait:g} s"
                raise Idle(f"{why}; the stream is dropped") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            first = False
            if progress is not None:
                received += progress(item)  # type: ignore[arg-type]  # it came from source
            yield item  # type: ignore[misc]  # anything else came from source
    finally:
        stop.set()


@dataclass(frozen=True)
class CallLimits:
    """What callers may hold on one listener (README: what one principal can hold)."""

    max_calls_per_principal: int = 4  # calls of one principal open at once
    workers: int = 32  # the listener's handler threads
    reserved_workers: int = 4  # never held by admitted calls: admission stays prompt
    stream: Pace = field(default_factory=Pace)  # every client stream (first message, idle)
    push: Pace = field(default_factory=lambda: Pace(min_bytes_per_second=1e6))  # PushUpdate
    # A response stream blocked this long on a client that does not read is cancelled; a
    # pull must also be taken at push.min_bytes_per_second, counting only the time spent
    # waiting on the client, once that exceeds push.grace_seconds.
    send_stall_seconds: float = 60.0
    # A PushUpdate message whose header is larger is refused before it is parsed.
    max_header_bytes: int = 16 << 10

    def check(self) -> None:
        check_call_room(self.workers, self.reserved_workers, self.max_calls_per_principal)


class Slot:
    """One admitted call: it holds a handler thread until its behaviour (or response
    stream) is done, and its principal's call until both that and the RPC have ended."""

    def __init__(self, budget: Budget, key: str | None) -> None:
        self._budget = budget
        self._key = key
        self._thread = True
        self._call = True

    def end_thread(self) -> None:
        self._budget.end(self, thread=True)

    def end_call(self) -> None:
        self._budget.end(self, thread=False)


class Budget:
    """Handler threads held on one listener in all, and calls held per principal."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        # Reentrant: HeldStream.__del__ gives a thread back wherever the collector runs it.
        self._lock = threading.RLock()
        self._threads = 0
        self._calls: dict[str, int] = {}

    def take(self, key: str | None) -> Slot | tuple[grpc.StatusCode, str]:
        cap = self.limits.max_calls_per_principal
        budget = self.limits.workers - self.limits.reserved_workers
        with self._lock:
            if key is not None and self._calls.get(key, 0) >= cap:
                return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                    f"{key!r} already has {cap} calls open on this listener; wait for one to finish"
                )
            if self._threads >= budget:
                return grpc.StatusCode.UNAVAILABLE, (
                    f"the listener is busy ({self._threads} calls hold its threads); "
                    "try again shortly"
                )
            self._threads += 1
            if key is not None:
                self._calls[key] = self._calls.get(key, 0) + 1
        return Slot(self, key)

    def end(self, slot: Slot, *, thread: bool) -> None:
        with self._lock:
            if thread and slot._thread:
                slot._thread = False
                self._threads -= 1
            elif not thread and slot._call:
                slot._call = False
            else:
                return
            if not (slot._thread or slot._call) and slot._key is not None:
                self._calls[slot._key] -= 1
                if not self._calls[slot._key]:
                    del self._calls[slot._key]

    def calls(self, key: str) -> int:
        with self._lock:
            return self._calls.get(key, 0)

    def threads(self) -> int:
        with self._lock:
            return self._threads


class HeldStream:
    """A response stream that gives its handler thread back when it ends or is dropped,
    and tells the watchdog how long gRPC has been blocked sending its last message."""

    def __init__(
        self,
        inner: Iterator[Any],
        slot: Slot,
        context: grpc.ServicerContext,
        progress: Callable[[Any], int] | None,
    ) -> None:
        self._inner = inner
        self._slot = slot
        self._context = context
        self.progress = progress  # payload bytes a response carries
        self.sent = 0  # payload bytes handed to gRPC
        self.sending_since: float | None = None  # set while gRPC sends, None while we work
        self.sending_before = 0.0  # seconds gRPC spent sending earlier messages

    def sending_seconds(self, now: float) -> float:
        """How long this stream has waited on its client: the client's pace, not ours."""
        since = self.sending_since
        return self.sending_before + (now - since if since is not None else 0.0)

    def __iter__(self) -> HeldStream:
        return self

    def __next__(self) -> Any:
        if self.sending_since is not None:
            self.sending_before += time.monotonic() - self.sending_since
            self.sending_since = None
        try:
            message = next(self._inner)
        except SluiceError as exc:  # raised outside a Sluice servicer (a paced stream)
            self._slot.end_thread()
            errors.abort(self._context, exc)
        except BaseException:
            self._slot.end_thread()
            raise
        if self.progress is not None:
            self.sent += self.progress(message)
        self.sending_since = time.monotonic()
        return message

    def __del__(self) -> None:
        # gRPC drops the iterator when the call ends, even one it never started.
        self._slot.end_thread()


class Watchdog:
    """Cancels response streams whose client stopped reading (gRPC blocked in a send), or
    reads a pull below the rate floor once it has kept the gateway waiting past the grace
    period. Time the servicer spends working does not count: that is the gateway's pace."""

    def __init__(self, limits: CallLimits, name: str) -> None:
        self.limits = limits
        self.name = name
        self._streams: weakref.WeakKeyDictionary[HeldStream, grpc.ServicerContext] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"{self.name}-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def watch(self, held: HeldStream, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._streams[held] = context

    def _run(self) -> None:
        while not self._stop.wait(timeout=0.5):
            self.scan(time.monotonic())

    def scan(self, now: float) -> None:
        """One pass; a function of its own, so no reference to a stream outlives it."""
        push = self.limits.push
        with self._lock:
            streams = list(self._streams.items())
        for held, context in streams:
            since = held.sending_since
            if since is None:
                continue  # the servicer is working, or the stream is done
            waited = held.sending_seconds(now)
            stalled = now - since > self.limits.send_stall_seconds
            floor = push.min_bytes_per_second * (waited - push.grace_seconds)
            slow = held.progress is not None and floor > 0 and held.sent < floor
            if stalled or slow:
                log.warning(
                    "%s listener: cancelling a response stream its client does not read "
                    "(%d payload bytes taken in %.0f s of sending)",
                    self.name,
                    held.sent,
                    waited,
                )
                context.cancel()
                with self._lock:
                    self._streams.pop(held, None)
