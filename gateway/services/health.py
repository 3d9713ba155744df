"""grpc.health.v1 for every listener, whose state never waits on a peer.

grpc_health's HealthServicer sends each status change to every Watch stream while it holds
the one lock that Check, Watch and set() take, and waits until each message is sent:
- a Watch client that opens no flow-control window (HTTP/2 SETTINGS_INITIAL_WINDOW_SIZE 0)
  never lets its first message go: every Check after it then waits forever, each on a
  thread of the listener, and so do readiness and a gateway's stop();
- a Watch stream that ends while set() sends to it runs its close callback on the gRPC
  server's own thread, which needs that lock, while set() waits for a completion only that
  thread delivers: a deadlock (a suite run hung there, in a gateway's stop()).

Here the lock guards only the table of statuses and streams, and nothing waits while
holding it. Each Watch stream has a sender of its own: the newest status the stream has
not had, one message in flight at a time, on a short-lived thread. A message its peer has
not taken within send_s (the gateway's send_stall_seconds) cancels the stream; the client
may watch again. A stream that falls behind skips to the newest status, as the protocol
allows.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
MAX_WATCHES = 64  # Watch streams open at once on one listener
SEND_S = 60.0  # a Watch message not taken by its peer in this long cancels the stream
# (the gateway passes its send_stall_seconds, the same bound as for every response stream)


class _Send(Protocol):
    """gRPC's send_response_callback for a callback-mode stream: returns once the message
    has left (or the call ended); None ends the stream with OK."""

    def __call__(self, response: health_pb2.HealthCheckResponse | None) -> None: ...


class _Watch:
    """One Watch stream's sender: the newest status not yet sent, one message at a time."""

    def __init__(self, send: _Send, context: grpc.ServicerContext, send_s: float) -> None:
        self._send, self._context, self._send_s = send, context, send_s
        self._lock = threading.Lock()
        self._newest: int | None = None
        self._sent: int | None = None
        self._busy = self._ended = self._in_flight = False
        self._sending = 0  # the number of the latest send

    def offer(self, status: int) -> None:
        """Never waits: the status is sent by this stream's own thread."""
        with self._lock:
            self._newest = status
            if self._busy or self._ended:
                return
            self._busy = True
        try:
            threading.Thread(target=self._drain, name="health-watch", daemon=True).start()
        except RuntimeError:  # no thread to be had: this stream ends, the servicer goes on
            self._give_up("no thread to send on")

    def end(self) -> None:
        with self._lock:
            self._ended = True

    def _give_up(self, why: str) -> None:
        log.warning("health: a Watch stream was cancelled (%s)", why)
        with self._lock:
            self._ended, self._busy = True, False
        self._context.cancel()

    def _next(self) -> int | None:
        with self._lock:
            if self._ended or self._newest == self._sent:
                self._busy = False
                return None
            self._sent = self._newest
            self._sending += 1
            self._in_flight = True
            return self._sent

    def _expire(self, sending: int) -> None:
        """send_s after a send began: cancel the stream if that send is still in flight."""
        with self._lock:
            stuck = self._sending == sending and self._in_flight
        if stuck:
            self._context.cancel()  # the peer takes nothing: the send ends with the call

    def _drain(self) -> None:
        while (status := self._next()) is not None:
            # A peer that takes nothing (no flow-control window) would hold this thread and
            # its stream for good: past send_s the stream is cancelled, which ends the send.
            try:
                timer = threading.Timer(self._send_s, self._expire, (self._sending,))
                timer.daemon = True
                timer.start()
                try:
                    self._send(health_pb2.HealthCheckResponse(status=status))
                finally:
                    with self._lock:
                        self._in_flight = False  # before the timer may still fire
                    timer.cancel()
            except Exception as exc:  # gRPC's, or no thread for the timer: this stream ends
                self._give_up(type(exc).__name__)
                return
            if not self._context.is_active():
                self.end()


class Health(health_pb2_grpc.HealthServicer):
    """Check and Watch answered from a table that set() changes; the overall status ""
    starts SERVING. A Watch (callback mode) holds no thread of its listener; a thread of
    its own only while a message is on its way. At most `max_watches` are open at once;
    past that a Watch is RESOURCE_EXHAUSTED (Check always answers)."""

    def __init__(self, send_s: float | None = None, max_watches: int = MAX_WATCHES) -> None:
        self._send_s = SEND_S if send_s is None else send_s
        self._max_watches = max_watches
        self._lock = threading.Lock()  # the table only: nothing waits while holding it
        self._status: dict[str, int] = {"": SERVING}
        self._watches: dict[str, set[_Watch]] = {}

    def set(self, service: str, status: int) -> None:
        with self._lock:
            self._status[service] = status
            for watch in self._watches.get(service, ()):
                watch.offer(status)

    def set_all(self, status: int) -> None:
        """Every service this listener lists, and "", to `status`."""
        with self._lock:
            services = list(self._status)
        for service in services:
            self.set(service, status)

    def status(self, service: str) -> int | None:
        with self._lock:
            return self._status.get(service)

    def watching(self) -> int:
        """Watch streams open now (their close callbacks not yet run)."""
        with self._lock:
            return self._open()

    def _open(self) -> int:
        return sum(len(watches) for watches in self._watches.values())

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("no such service on this listener")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: _Send | None = None,
    ) -> None:
        if send_response_callback is None:  # gRPC calls Watch in callback mode (below)
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch needs callback mode")
        watch = _Watch(send_response_callback, context, self._send_s)
        service = request.service
        with self._lock:
            full = self._open() >= self._max_watches
            if not full:
                self._watches.setdefault(service, set()).add(watch)
                watch.offer(self._status.get(service, SERVICE_UNKNOWN))
        if full:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._max_watches} health watches are open on this listener; "
                "use Check, or watch again later",
            )
        if not context.add_callback(lambda: self._ended(service, watch)):
            self._ended(service, watch)  # the call had ended already

    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]  # gRPC reads it
    Watch.experimental_thread_pool = None  # type: ignore[attr-defined]

    def _ended(self, service: str, watch: _Watch) -> None:
        """The stream's close callback: gRPC runs it on its own thread, so it only takes
        the table's lock, which nothing holds while waiting."""
        watch.end()
        with self._lock:
            watches = self._watches.get(service)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[service]
