"""services/health.py against a model of how gRPC drives a callback-mode stream: a send
returns once the server's one event thread has delivered its completion, and that thread
runs the close callbacks of streams that ended before it. grpc_health's servicer deadlocks
in this model exactly as a suite run did; the gateway's does not, whatever the order of
watches, status changes, ends and peers that take their messages late or never."""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.gateway.services.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, Health

SERVICES = ("", "sluice.v1.TrainerService")
STATUSES = (SERVING, NOT_SERVING)


class Events:
    """gRPC's server thread: runs what it is handed, one at a time, in order."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="test-events", daemon=True).start()

    def run(self, work: Callable[[], object]) -> None:
        self._queue.put(work)

    def _run(self) -> None:
        while True:
            self._queue.get()()


class Aborted(Exception):
    def __init__(self, code: Any, details: str) -> None:
        super().__init__(details)
        self.code = code


class _Context:
    """A callback-mode call: when it ends (cancelled by either side), its callbacks run on
    the event thread."""

    def __init__(self, events: Events) -> None:
        self.events, self.callbacks = events, list[Callable[[], None]]()
        self.sends = list[threading.Event]()  # sends in flight: they fail once it ends
        self.active, self.code = True, None
        self.lock = threading.Lock()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self.lock:
            if not self.active:
                return False
            self.callbacks.append(callback)
            return True

    def is_active(self) -> bool:
        return self.active

    def cancel(self) -> None:
        with self.lock:
            if not self.active:
                return
            self.active = False
        for callback in self.callbacks:
            self.events.run(callback)
        for send in self.sends:  # a send in flight fails: its completion comes after those
            self.events.run(send.set)

    def set_code(self, code: Any) -> None:
        self.code = code

    def abort(self, code: Any, details: str) -> None:
        raise Aborted(code, details)

    def set_details(self, details: str) -> None:
        pass


def Context(events: Events) -> Any:  # a grpc.ServicerContext to the servicer
    return _Context(events)


class Peer:
    """The send_response_callback of one stream, and what its client received. A send
    returns when the event thread delivers its completion: once the peer took the
    message, or failed after the call ended. A peer that takes nothing (no flow-control
    window) never completes one; `late` delays each completion."""

    def __init__(self, events: Events, context: _Context, takes: bool = True, late: float = 0.0):
        self.events, self.context, self.takes, self.late = events, context, takes, late
        self.received: list[int] = []
        self.sending = self.overlapped = 0  # gRPC allows one send in flight per stream

    def __call__(self, response: health_pb2.HealthCheckResponse | None) -> None:
        assert response is not None
        done = threading.Event()
        with self.context.lock:
            if not self.context.active:
                return  # gRPC: a call no longer active sends nothing, at once
            self.context.sends.append(done)
        self.sending += 1
        self.overlapped += self.sending > 1

        def deliver() -> None:
            if self.context.is_active():
                self.received.append(response.status)
            done.set()

        if self.takes:
            if self.late:
                threading.Timer(self.late, self.events.run, (deliver,)).start()
            else:
                self.events.run(deliver)
        done.wait()
        self.sending -= 1


def request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def within(seconds: float, work: Callable[[], object]) -> bool:
    """Whether `work` returned within `seconds` (it runs on a daemon thread: one that
    deadlocks is left behind)."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def stream_ending_while_set(servicer: Any) -> bool:
    """set() sends a status to a Watch stream whose client has just gone: the stream's end
    (its close callback, then the send's failure) reaches the event thread after the send
    began. Whether set() returns."""
    events = Events()
    context = Context(events)
    peer = Peer(events, context)
    servicer.Watch(request(""), context, peer)
    assert wait_for(lambda: peer.received == [SERVING])
    peer.takes = False  # the client went away: nothing more is taken
    hold = threading.Event()
    events.run(hold.wait)  # the event thread is busy for a moment
    setting = threading.Thread(target=servicer.set, args=("", NOT_SERVING), daemon=True)
    setting.start()
    time.sleep(0.05)  # set() has begun its send
    context.cancel()  # the close callback, then the send's failure, wait their turn
    hold.set()
    setting.join(3)
    return not setting.is_alive()


def test_the_model_reproduces_grpc_healths_deadlock() -> None:
    """The library's servicer holds its lock while it waits for the send; the close
    callback ahead of the completion needs that lock."""
    assert not stream_ending_while_set(grpc_health.HealthServicer())


def test_a_stream_ending_while_its_status_is_sent_does_not_deadlock() -> None:
    health = Health()
    assert stream_ending_while_set(health)
    assert wait_for(lambda: health.watching() == 0)


def test_a_peer_that_takes_nothing_holds_neither_check_nor_set_and_is_cut_off() -> None:
    """A window-0 client: its first message never leaves. Check, set() and other streams
    go on; after send_s its stream is cancelled and forgotten."""
    events = Events()
    health = Health(send_s=0.3)
    stuck_context = Context(events)
    stuck = Peer(events, stuck_context, takes=False)
    assert within(1, lambda: health.Watch(request(""), stuck_context, stuck))
    other_context = Context(events)
    other = Peer(events, other_context)
    assert within(1, lambda: health.Watch(request(""), other_context, other))
    assert within(1, lambda: health.set("", NOT_SERVING))
    check = Context(events)
    assert health.Check(request(""), check).status == NOT_SERVING
    assert wait_for(lambda: other.received == [SERVING, NOT_SERVING])
    assert wait_for(lambda: not stuck_context.is_active())  # cancelled after send_s
    assert wait_for(lambda: health.watching() == 1)
    assert stuck.received == []


def test_check_of_a_service_not_listed_is_not_found() -> None:
    health = Health()
    context = Context(Events())
    assert health.Check(request("sluice.v1.AdminService"), context) == (
        health_pb2.HealthCheckResponse()
    )
    assert context.code is not None and context.code.name == "NOT_FOUND"


def received_last(peer: Peer, status: int) -> bool:
    return peer.received[-1:] == [status]


def ended(context: _Context) -> bool:
    return not context.is_active()


@st.composite
def programs(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Watches (by a peer that takes at once, late, or never), status changes and ends,
    in any order."""
    step = st.one_of(
        st.tuples(
            st.just("watch"),
            st.sampled_from(SERVICES),
            st.sampled_from(["now", "late", "never"]),
        ),
        st.tuples(st.just("set"), st.sampled_from(SERVICES), st.sampled_from(STATUSES)),
        st.tuples(st.just("end"), st.integers(0, 15)),
    )
    return draw(st.lists(step, min_size=1, max_size=16))


@settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(program=programs())
def test_every_open_stream_ends_with_the_newest_status_and_nothing_waits(
    program: list[tuple[Any, ...]],
) -> None:
    """Whatever the order: no call of the servicer waits on a peer; each stream receives
    statuses in the order they were set, no two alike in a row, the newest last; a peer
    that takes nothing is cut off; an ended stream is forgotten."""
    events = Events()
    health = Health(send_s=0.2)
    status = {"": SERVING}
    watches: list[tuple[str, Any, Peer, list[int]]] = []  # each with what it may see
    for step in program:
        started = time.monotonic()
        if step[0] == "watch":
            _, service, kind = step
            context = Context(events)
            peer = Peer(events, context, takes=kind != "never", late=0.05 * (kind == "late"))
            health.Watch(request(service), context, peer)
            watches.append((service, context, peer, [status.get(service, SERVICE_UNKNOWN)]))
        elif step[0] == "set":
            _, service, value = step
            health.set(service, value)
            status[service] = value
            for watched, _, _, seen in watches:
                if watched == service:
                    seen.append(value)
        elif watches:
            watches[step[1] % len(watches)][1].cancel()
        assert time.monotonic() - started < 0.1, f"{step[0]} waited on a peer"

    for service, context, peer, may_see in watches:
        if peer.takes and context.is_active():
            newest = status.get(service, SERVICE_UNKNOWN)
            assert wait_for(functools.partial(received_last, peer, newest)), (peer, newest)
        else:
            assert wait_for(functools.partial(ended, context))
        received = peer.received
        assert peer.overlapped == 0, "two messages in flight on one stream"
        assert all(a != b for a, b in itertools.pairwise(received)), received
        it = iter(may_see)
        assert all(any(s == r for s in it) for r in received), (received, may_see)
    open_streams = sum(1 for _, context, _, _ in watches if context.is_active())
    assert wait_for(lambda: health.watching() == open_streams)


def test_set_all_flips_every_listed_service() -> None:
    health = Health()
    health.set("sluice.v1.TrainerService", SERVING)
    health.set_all(NOT_SERVING)
    assert {health.status(s) for s in SERVICES} == {NOT_SERVING}


@pytest.mark.parametrize("service", SERVICES)
def test_a_watch_on_an_unknown_service_says_so_then_follows_it(service: str) -> None:
    events = Events()
    health = Health()
    context = Context(events)
    peer = Peer(events, context)
    health.Watch(request(service + ".Unknown"), context, peer)
    health.set(service + ".Unknown", SERVING)
    assert wait_for(lambda: peer.received == [SERVICE_UNKNOWN, SERVING])


def test_watches_past_max_watches_are_refused_and_check_still_answers() -> None:
    """Each open Watch may hold a thread while a message is on its way: at most
    max_watches are open on a listener, and a Watch past them is told so."""
    events = Events()
    health = Health(max_watches=2)
    contexts = [Context(events) for _ in range(3)]
    for context in contexts[:2]:
        health.Watch(request(""), context, Peer(events, context))
    with pytest.raises(Aborted, match="2 health watches are open") as err:
        health.Watch(request(""), contexts[2], Peer(events, contexts[2]))
    assert err.value.code.name == "RESOURCE_EXHAUSTED"
    assert health.Check(request(""), Context(events)).status == SERVING
    contexts[0].cancel()
    assert wait_for(lambda: health.watching() == 1)
    again = Context(events)
    peer = Peer(events, again)
    health.Watch(request(""), again, peer)  # room again
    assert wait_for(lambda: peer.received == [SERVING])
