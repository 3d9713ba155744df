"""The pieces of the availability model on their own: pacing, the listener budget, the
response-stream watchdog, and coalesced audit rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from sluice.gateway.core.errors import Idle
from sluice.gateway.services.auth import AuthInterceptor, Certificates
from sluice.gateway.services.idle import Budget, CallLimits, HeldStream, Pace, paced
from sluice.gateway.store.audit import Coalescer
from sluice.gateway.store.sqlite import Store

# Pacing.


def timed(items: list[tuple[float, bytes]]) -> Iterator[bytes]:
    """Each item after its delay in seconds."""
    for delay, item in items:
        time.sleep(delay)
        yield item


def drain(source: Iterator[bytes], pace: Pace) -> tuple[list[bytes], float, str]:
    """What got through before Idle, after how long, and why."""
    started, got = time.monotonic(), []
    with pytest.raises(Idle) as err:
        for item in paced(source, pace, len):
            got.append(item)
    return got, time.monotonic() - started, str(err.value)


def test_a_stream_that_never_starts_is_dropped_at_the_first_message_deadline() -> None:
    got, took, why = drain(timed([(5.0, b"late")]), Pace(first_message_seconds=0.2))
    assert got == [] and took < 1.0 and "no first message within 0.2 s" in why


def test_a_silent_stream_is_dropped_at_the_idle_limit() -> None:
    pace = Pace(first_message_seconds=1, idle_seconds=0.2)
    got, took, why = drain(timed([(0, b"a"), (5.0, b"b")]), pace)
    assert got == [b"a"] and took < 1.0 and "no message for 0.2 s" in why


def test_a_drip_is_cut_by_the_rate_floor_after_the_grace_period() -> None:
    # 1 byte per 20 ms never goes idle; at 1000 bytes/s after 0.3 s it falls behind.
    pace = Pace(
        first_message_seconds=1, idle_seconds=1, grace_seconds=0.3, min_bytes_per_second=1000
    )
    got, took, why = drain(timed([(0.02, b"x")] * 500), pace)
    assert 0.3 < took < 1.5 and "too slow" in why and len(got) < 100


def test_a_fast_stream_passes_whole() -> None:
    pace = Pace(
        first_message_seconds=1, idle_seconds=1, grace_seconds=0.1, min_bytes_per_second=1000
    )
    items = [b"x" * 4096] * 200
    assert list(paced(iter(items), pace, len)) == items


def test_a_failing_source_hands_its_error_over() -> None:
    def broken() -> Iterator[bytes]:
        yield b"a"
        raise ValueError("the call was cancelled")

    with pytest.raises(ValueError, match="cancelled"):
        list(paced(broken(), Pace()))


# The listener budget.


def test_two_principals_at_their_cap_leave_room_for_a_third() -> None:
    budget = Budget(CallLimits(max_calls_per_principal=2, workers=9, reserved_workers=3))
    held = [budget.take(who) for who in ("a", "a", "b", "b")]
    assert all(not isinstance(s, tuple) for s in held)
    refused = budget.take("a")
    assert isinstance(refused, tuple) and refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not isinstance(budget.take("c"), tuple)
    assert not isinstance(budget.take("c"), tuple)
    refused = budget.take("d")  # 6 of 9 - 3 threads held: the reserve is kept
    assert isinstance(refused, tuple)
    assert refused[0] == grpc.StatusCode.UNAVAILABLE and "busy" in refused[1]


def test_a_slot_is_free_only_when_both_its_thread_and_its_call_are_done() -> None:
    budget = Budget(CallLimits(max_calls_per_principal=1, workers=8, reserved_workers=1))
    slot = budget.take("a")
    assert not isinstance(slot, tuple)
    slot.end_call()  # the client gave up; the handler still runs (a lock, a slow disk)
    assert budget.calls("a") == 1 and budget.threads() == 1
    assert isinstance(budget.take("a"), tuple)  # it cannot start another meanwhile
    slot.end_thread()
    slot.end_thread()  # idempotent
    assert budget.calls("a") == 0 and budget.threads() == 0
    watch = budget.take("a")  # a non-blocking Watch: no thread, but a call until it ends
    assert not isinstance(watch, tuple)
    watch.end_thread()
    assert budget.calls("a") == 1 and budget.threads() == 0
    watch.end_call()
    assert budget.calls("a") == 0


def test_limits_that_let_two_principals_fill_a_listener_are_refused() -> None:
    with pytest.raises(ValueError, match="room for a third"):
        CallLimits(max_calls_per_principal=8, workers=16, reserved_workers=1).check()
    with pytest.raises(ValueError, match="reserved_workers at least 1"):
        CallLimits(max_calls_per_principal=1, workers=16, reserved_workers=0).check()


# The watchdog: a response stream whose client stopped reading is cancelled.


class FakeContext:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@pytest.fixture
def interceptor(tmp_path: Path) -> Iterator[AuthInterceptor]:
    store = Store(tmp_path / "sluice.db")
    limits = CallLimits(send_stall_seconds=0.3)
    audit = Coalescer(store.record, 10.0)
    made = AuthInterceptor(store, "internal", limits, audit, Certificates(store, None))
    made.start()
    yield made
    made.close()
    store.close()


def test_a_stalled_response_stream_is_cancelled_and_gives_its_thread_back(
    interceptor: AuthInterceptor,
) -> None:
    budget = interceptor.budget
    slot = budget.take("a")
    assert not isinstance(slot, tuple)
    context: Any = FakeContext()
    held = HeldStream(iter([b"one", b"two"]), slot, context, None)
    interceptor.watchdog.watch(held, context)
    assert next(held) == b"one"  # gRPC now sends it, and the client does not read
    assert context.cancelled.wait(timeout=3.0)
    del held  # gRPC drops the iterator once the call is cancelled
    assert budget.threads() == 0


def test_a_working_servicer_is_not_cancelled(interceptor: AuthInterceptor) -> None:
    slot = interceptor.budget.take("a")
    assert not isinstance(slot, tuple)
    context: Any = FakeContext()

    def slow() -> Iterator[bytes]:
        time.sleep(1.0)  # the gate re-checks a release before its first byte, say
        yield b"one"

    held = HeldStream(slow(), slot, context, None)
    interceptor.watchdog.watch(held, context)
    assert next(held) == b"one"
    assert not context.cancelled.is_set()
    assert list(held) == []
    assert interceptor.budget.threads() == 0


# Coalesced audit rows.


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeats_are_one_row_per_window_and_still_counted() -> None:
    rows: list[tuple[str, str, str, Mapping[str, object]]] = []
    clock = Clock()
    audit = Coalescer(lambda *row: rows.append(row), 10.0, clock=clock)
    for i in range(1000):
        clock.now = i * 0.05  # 1000 refusals over 50 s
        audit.record("auth.denied", "mallory", "/m", {"peer": i})
    audit.record("auth.denied", "eve", "/m", {"peer": 0})  # another key: its own row at once
    assert len([r for r in rows if r[1] == "mallory"]) <= 6
    audit.stop()  # what is pending is written
    mallory = [r for r in rows if r[1] == "mallory"]
    assert sum(int(str(r[3].get("count", 1))) for r in mallory) == 1000
    assert mallory[0][3] == {"peer": 0}  # the first one as it was
    assert [r[1] for r in rows].count("eve") == 1


def test_the_flusher_writes_a_window_that_ended_quietly() -> None:
    rows: list[Any] = []
    clock = Clock()
    audit = Coalescer(lambda *row: rows.append(row), 10.0, clock=clock)
    for _ in range(5):
        audit.record("auth.denied", "mallory", "/m", {})
    assert len(rows) == 1
    audit.flush()
    assert len(rows) == 1  # the window is still open
    clock.now = 11.0
    audit.flush()
    assert rows[-1][3] == {"count": 4}
    clock.now = 22.0
    audit.flush()  # nothing pending: the key is forgotten, the next refusal written at once
    audit.record("auth.denied", "mallory", "/m", {})
    assert len(rows) == 3 and rows[-1][3] == {}


def test_a_failing_write_does_not_break_the_refusal() -> None:
    def full(*row: object) -> None:
        raise OSError(28, "No space left on device")

    audit = Coalescer(full, 10.0)
    audit.record("auth.denied", "mallory", "/m", {})  # logged, not raised


def test_too_many_keys_flush_everything(tmp_path: Path) -> None:
    rows: list[Any] = []
    audit = Coalescer(lambda *row: rows.append(row), 10.0, max_keys=3)
    for who in ("a", "b", "c"):
        audit.record("k", who, "/m", {})
        audit.record("k", who, "/m", {})
    audit.record("k", "d", "/m", {})  # a fourth key: the three pending counts go out first
    assert sum(int(str(r[3].get("count", 1))) for r in rows) == 7


def test_a_pull_read_too_slowly_is_cancelled_counting_only_the_clients_time(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "sluice.db")
    pace = Pace(grace_seconds=1.0, min_bytes_per_second=1000)
    limits = CallLimits(push=pace, send_stall_seconds=60.0)
    interceptor = AuthInterceptor(
        store, "egress", limits, Coalescer(store.record, 10.0), Certificates(store, None)
    )
    try:
        slot = interceptor.budget.take("reader")
        assert not isinstance(slot, tuple)
        context: Any = FakeContext()
        held = HeldStream(iter([b"abc", b"def"]), slot, context, len)
        interceptor.watchdog.watch(held, context)
        assert next(held) == b"abc"
        now = time.monotonic()
        interceptor.watchdog.scan(now + 0.5)  # within the grace period
        assert not context.cancelled.is_set()
        held.sending_before = 5.0  # the client took 5 s to read 3 bytes
        interceptor.watchdog.scan(now)
        assert context.cancelled.is_set()
    finally:
        interceptor.close()
        store.close()
