"""An idle timeout for client streams: a push that stops sending is dropped, not waited on."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

from gateway.core.errors import Idle

T = TypeVar("T")
_END = object()


def with_idle_timeout(source: Iterator[T], seconds: float) -> Iterator[T]:
    """Items of source; raises Idle when the next one takes longer than `seconds`.

    A reader thread pulls from gRPC's blocking request iterator into a queue of two items
    (so at most two chunks wait in memory); it ends when the call ends, however it ends.
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

    threading.Thread(target=pump, name="push-reader", daemon=True).start()
    try:
        while True:
            try:
                item = items.get(timeout=seconds)
            except queue.Empty:
                raise Idle(f"no message for {seconds:g} s; the push stream is dropped") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]  # anything else came from source
    finally:
        stop.set()
