"""Availability over real mTLS: no two principals can starve a third, and no stream can
hold the gateway longer than its pace allows (README: what one principal can hold)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sluice.clients.sdk import EgressClient, Identity, RetryPolicy, TrainerClient, channel
from sluice.gateway.pki import PkiLayout, init_pki
from sluice.models.schema import Schema
from sluice.v1 import tensors_pb2, trainer_pb2, trainer_pb2_grpc
from tests.conftest import TINY, Running, random_delta, start_gateway, stored_state, update_header

Code = grpc.StatusCode
Request = trainer_pb2.PushUpdateRequest

TRAINERS = (
    ("shanghai-01", "shanghai"),
    ("beijing-01", "beijing"),
    ("chengdu-01", "chengdu"),
    ("harbin-01", "harbin"),
    ("shenzhen-01", "shenzhen"),
)
READERS = ("global-team", "global-team-2")
OPERATORS = ("ops", "ops-2")
VICTIM = "chengdu-01"
PROMPT_S = 5.0  # what "completes promptly" means here, on a loaded 2-core machine
# Abuse outlives the test: the point is that the victim is served while it is held.
PATIENT = {
    "first_message_seconds": 120.0,
    "idle_stream_seconds": 120.0,
    "push_grace_seconds": 120.0,
    "send_stall_seconds": 120.0,
}


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(
        tmp_path_factory.mktemp("availability-pki") / "pki",
        trainers=TRAINERS,
        readers=READERS,
        operators=OPERATORS,
    )


def identity(layout: PkiLayout, name: str) -> Identity:
    return Identity.from_pki(layout.directory, name)


def mtls(tmp_path: Path, template_cache: Path, layout: PkiLayout, **settings: Any) -> Running:
    return start_gateway(
        tmp_path / "gw",
        template_cache,
        insecure_loopback=False,
        pki_dir=layout.directory,
        **settings,
    )


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = PROMPT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@dataclass
class Abuse:
    """Calls held open on purpose; release() ends them all."""

    stop: threading.Event = field(default_factory=threading.Event)
    calls: list[Any] = field(default_factory=list)  # futures and response iterators

    def silence(self) -> Iterator[Any]:
        """A request stream that sends nothing until released."""
        self.stop.wait(timeout=60)
        return
        yield

    def drip(self, header: trainer_pb2.UpdateHeader) -> Iterator[Request]:
        yield Request(header=header)
        for offset in range(header.payload_bytes):
            if self.stop.wait(timeout=0.1):
                return
            chunk = tensors_pb2.Chunk(offset=offset, data=b"\0")
            yield Request(chunk=chunk)

    def release(self) -> None:
        self.stop.set()
        for call in self.calls:
            call.cancel()


def _open(abuse: Abuse, kind: str, ch: grpc.Channel, who: str, schema: Schema) -> None:
    trainer = trainer_pb2_grpc.TrainerServiceStub(ch)
    if kind == "headerless-push":
        abuse.calls.append(trainer.PushUpdate.future(abuse.silence(), timeout=60))
    elif kind == "drip":
        payload = random_delta(schema, seed=1)
        header = update_header(
            schema, payload, trainer=who, region=who.split("-")[0], update_id=uuid.uuid4().hex
        )
        abuse.calls.append(trainer.PushUpdate.future(abuse.drip(header), timeout=60))
    elif kind == "watch":
        health: Any = health_pb2_grpc.HealthStub(ch)
        abuse.calls.append(health.Watch(health_pb2.HealthCheckRequest(), timeout=60))
    elif kind == "reflection":
        reflect: Any = reflection_pb2_grpc.ServerReflectionStub(ch)
        abuse.calls.append(reflect.ServerReflectionInfo(abuse.silence(), timeout=60))
    elif kind == "unread-pull":  # the client never reads: the server blocks sending
        pull = trainer.PullGlobal(trainer_pb2.PullGlobalRequest(model=TINY), timeout=60)
        abuse.calls.append(pull)
    else:
        raise AssertionError(kind)


KINDS = ("headerless-push", "watch", "drip", "reflection", "unread-pull")


def _victim_is_served(running: Running, layout: PkiLayout, schema: Schema) -> None:
    """A third principal's round, pull and push, a reader's listing and health checks on
    both listeners, each within PROMPT_S."""
    no_retry = RetryPolicy(attempts=1)
    me = identity(layout, VICTIM)
    started = time.monotonic()
    with TrainerClient(
        running.endpoints.internal, retry=no_retry, timeout_s=PROMPT_S, identity=me
    ) as client:
        info = client.round(TINY)
        pulled = client.pull_global(TINY)
        payload = random_delta(schema, seed=42)
        resp = client.push_update(
            model=TINY,
            round_no=info.round,
            base_version=pulled.version,
            schema_hash=schema.hash,
            trainer=VICTIM,
            region="chengdu",
            num_examples=10,
            payload=payload,
        )
        assert resp.created
    for side in ("internal", "egress"):
        with channel(getattr(running.endpoints, side), me) as ch:
            stub: Any = health_pb2_grpc.HealthStub(ch)
            got = stub.Check(health_pb2.HealthCheckRequest(), timeout=PROMPT_S)
            assert got.status == health_pb2.HealthCheckResponse.SERVING
    reader = identity(layout, READERS[1])
    with EgressClient(running.endpoints.egress, retry=no_retry, identity=reader) as egress:
        egress.releases()
    elapsed = time.monotonic() - started
    assert elapsed < 3 * PROMPT_S, f"the third principal waited {elapsed:.1f} s"


@pytest.mark.parametrize(
    "abusers",
    [("shanghai-01", "beijing-01"), ("global-team", "ops")],
    ids=["two-trainers", "reader-and-operator"],
)
@pytest.mark.parametrize("kinds", [(k,) for k in KINDS] + [KINDS], ids=[*KINDS, "mixed"])
def test_two_principals_at_their_cap_do_not_starve_a_third(
    tmp_path: Path,
    template_cache: Path,
    layout: PkiLayout,
    tiny_schema: Schema,
    abusers: tuple[str, str],
    kinds: tuple[str, ...],
) -> None:
    running = mtls(tmp_path, template_cache, layout, **PATIENT)
    cap = running.config.max_streams_per_principal
    abuse = Abuse()
    with ExitStack() as stack:
        stack.callback(running.gateway.stop)
        stack.callback(abuse.release)
        for side in ("internal", "egress"):
            for who in abusers:
                ch = stack.enter_context(
                    channel(getattr(running.endpoints, side), identity(layout, who))
                )
                for i in range(cap + 2):  # past the cap: the extra calls are refused
                    _open(abuse, kinds[i % len(kinds)], ch, who, tiny_schema)
        # Every abuse the role may use holds its calls; the cap holds too.
        for side, interceptor in running.gateway.auth.items():
            for who in abusers:
                time.sleep(0.3)  # admissions and refusals settle
                assert interceptor.open_calls(who) <= cap, (side, who)
        _victim_is_served(running, layout, tiny_schema)


def test_abuse_really_holds_calls(
    tmp_path: Path, template_cache: Path, layout: PkiLayout, tiny_schema: Schema
) -> None:
    # The starvation test is only meaningful if the abuse is held: trainers at their cap
    # with silent pushes and drips, Watch holding calls but no thread.
    running = mtls(tmp_path, template_cache, layout, **PATIENT)
    cap = running.config.max_streams_per_principal
    internal = running.gateway.auth["internal"]
    abuse = Abuse()
    with ExitStack() as stack:
        stack.callback(running.gateway.stop)
        stack.callback(abuse.release)
        for who, kind in (("shanghai-01", "headerless-push"), ("beijing-01", "drip")):
            ch = stack.enter_context(channel(running.endpoints.internal, identity(layout, who)))
            for _ in range(cap):
                _open(abuse, kind, ch, who, tiny_schema)
            wait_until(lambda w=who: internal.open_calls(w) == cap, f"{who} holds {cap}")  # type: ignore[misc]
        assert internal.held_threads() == 2 * cap
        ch = stack.enter_context(channel(running.endpoints.internal, identity(layout, "harbin-01")))
        for _ in range(cap):
            _open(abuse, "watch", ch, "harbin-01", tiny_schema)
        wait_until(lambda: internal.open_calls("harbin-01") == cap, "Watch streams are held")
        assert internal.held_threads() == 2 * cap  # non-blocking: a Watch holds no thread
        # One more of anything from a principal at its cap: refused at once.
        with TrainerClient(
            running.endpoints.internal,
            retry=RetryPolicy(attempts=1),
            identity=identity(layout, "shanghai-01"),
        ) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.round(TINY)
            assert err.value.code() == Code.RESOURCE_EXHAUSTED
        abuse.release()
        for who in ("shanghai-01", "beijing-01", "harbin-01"):
            wait_until(lambda w=who: internal.open_calls(w) == 0, f"{who}'s calls end")  # type: ignore[misc]
        wait_until(lambda: internal.held_threads() == 0, "threads come back")


def test_a_full_listener_refuses_at_once_and_health_still_answers(
    tmp_path: Path, template_cache: Path, layout: PkiLayout, tiny_schema: Schema
) -> None:
    # A small listener: 8 threads, 2 reserved, 2 calls each. Three principals fill the
    # budget of 6; a fourth is told UNAVAILABLE (retryable) at once, health still answers.
    running = mtls(
        tmp_path, template_cache, layout, workers=8, reserved_workers=2,
        max_streams_per_principal=2, **PATIENT,
    )  # fmt: skip
    internal = running.gateway.auth["internal"]
    abuse = Abuse()
    with ExitStack() as stack:
        stack.callback(running.gateway.stop)
        stack.callback(abuse.release)
        for who in ("shanghai-01", "beijing-01", "harbin-01"):
            ch = stack.enter_context(channel(running.endpoints.internal, identity(layout, who)))
            for _ in range(2):
                _open(abuse, "headerless-push", ch, who, tiny_schema)
        wait_until(lambda: internal.held_threads() == 6, "three principals fill the budget")
        me = identity(layout, VICTIM)
        with TrainerClient(
            running.endpoints.internal, retry=RetryPolicy(attempts=1), identity=me
        ) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.round(TINY)
            assert err.value.code() == Code.UNAVAILABLE
            assert "busy" in (err.value.details() or "")
            with channel(running.endpoints.internal, me) as ch:
                stub: Any = health_pb2_grpc.HealthStub(ch)
                got = stub.Check(health_pb2.HealthCheckRequest(), timeout=PROMPT_S)
                assert got.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < PROMPT_S
            abuse.release()
            wait_until(lambda: internal.held_threads() == 0, "the budget comes back")
            assert client.round(TINY).round >= 1
        refused = running.gateway.store.audit_entries("auth.limited")
        assert any(e.actor == VICTIM and e.detail["status"] == "UNAVAILABLE" for e in refused)


# Pacing: every stream has a first-message deadline, an idle limit and (pushes, pulls) a
# minimum average rate after a grace period.


@pytest.fixture(scope="module")
def paced(
    tmp_path_factory: pytest.TempPathFactory, template_cache: Path, layout: PkiLayout
) -> Iterator[Running]:
    running = mtls(
        tmp_path_factory.mktemp("paced"),
        template_cache,
        layout,
        first_message_seconds=1.0,
        idle_stream_seconds=2.0,
        push_grace_seconds=1.0,
        send_stall_seconds=1.0,
    )
    yield running
    running.gateway.stop()


def _push(running: Running, layout: PkiLayout, requests: Iterator[Request]) -> grpc.RpcError:
    with channel(running.endpoints.internal, identity(layout, "shenzhen-01")) as ch:
        stub = trainer_pb2_grpc.TrainerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.PushUpdate(requests, timeout=30)
    return err.value


def _nothing_left(running: Running, before: tuple[list[str], int]) -> None:
    wait_until(
        lambda: not list((running.data_dir / "blobs" / "tmp").iterdir()), "the temp file goes"
    )
    assert stored_state(running) == before
    internal = running.gateway.auth["internal"]
    wait_until(lambda: internal.open_calls("shenzhen-01") == 0, "the call is given back")


def test_a_drip_push_is_cut_by_the_minimum_rate(
    paced: Running, layout: PkiLayout, tiny_schema: Schema
) -> None:
    payload = random_delta(tiny_schema, seed=5)
    header = update_header(tiny_schema, payload, trainer="shenzhen-01", region="shenzhen")
    abuse = Abuse()
    before = stored_state(paced)
    started = time.monotonic()
    try:
        err = _push(paced, layout, abuse.drip(header))  # 1 byte per 100 ms, never idle
    finally:
        abuse.release()
    elapsed = time.monotonic() - started
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert "too slow" in (err.details() or "")
    assert elapsed < 1.0 + PROMPT_S, f"cut after {elapsed:.1f} s; grace 1 s"
    _nothing_left(paced, before)
    (rejected,) = [
        e
        for e in paced.gateway.store.audit_entries("push.rejected")
        if e.detail["update_id"] == header.update_id
    ]
    assert "too slow" in str(rejected.detail["reason"])


def test_empty_chunks_are_refused(paced: Running, layout: PkiLayout, tiny_schema: Schema) -> None:
    payload = random_delta(tiny_schema, seed=6)
    header = update_header(tiny_schema, payload, trainer="shenzhen-01", region="shenzhen")
    before = stored_state(paced)

    def empties() -> Iterator[Request]:
        yield Request(header=header)
        for _ in range(1000):
            yield Request(chunk=tensors_pb2.Chunk(offset=0, data=b""))

    err = _push(paced, layout, empties())
    assert err.code() == Code.INVALID_ARGUMENT
    assert "empty chunk" in (err.details() or "")
    _nothing_left(paced, before)


def test_a_push_without_a_first_message_is_dropped(paced: Running, layout: PkiLayout) -> None:
    before = stored_state(paced)
    abuse = Abuse()
    started = time.monotonic()
    try:
        err = _push(paced, layout, abuse.silence())
    finally:
        abuse.release()
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert "no first message within 1 s" in (err.details() or "")
    assert time.monotonic() - started < 1.0 + PROMPT_S
    _nothing_left(paced, before)


def test_a_silent_reflection_stream_is_dropped(paced: Running, layout: PkiLayout) -> None:
    # Not a Sluice servicer: the interceptor's pacing and error mapping still apply.
    abuse = Abuse()
    with channel(paced.endpoints.egress, identity(layout, "global-team")) as ch:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(ch)
        try:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ServerReflectionInfo(abuse.silence(), timeout=30))
        finally:
            abuse.release()
        assert err.value.code() == Code.DEADLINE_EXCEEDED
        # A live one still works.
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=PROMPT_S))
        assert resp.list_services_response.service
    egress = paced.gateway.auth["egress"]
    wait_until(lambda: egress.open_calls("global-team") == 0, "the call is given back")
