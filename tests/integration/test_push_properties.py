"""Property: whatever sequence of PushUpdate messages a trainer sends (any order, sizes and
offsets, empty and oversized chunks, a cancellation anywhere), the answer is never INTERNAL
or UNKNOWN, a refused push leaves nothing behind, and the gateway stays SERVING."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.models.schema import Schema
from sluice.v1 import tensors_pb2, trainer_pb2, trainer_pb2_grpc
from tests.conftest import Running, random_delta, start_gateway, stored_state, update_header

Request = trainer_pb2.PushUpdateRequest
TIMEOUT_S = 10.0
MAX_CHUNK_BYTES = 4 << 20
U64 = st.integers(0, (1 << 64) - 1)
TRAINERS = [f"t{i}-01" for i in range(4)]  # few: a trainer's second update is refused too

# Bounded: ~40 pushes against one gateway, well under a minute; no example database.
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Push:
    """A message sequence, and where (if anywhere) the client cancels the call."""

    messages: Sequence[Request]
    cancel_after: int | None

    def __repr__(self) -> str:  # short, for hypothesis's report of a failing example
        kinds = []
        for m in self.messages:
            kind = m.WhichOneof("kind")
            if kind == "chunk":
                kinds.append(f"chunk({m.chunk.offset},{len(m.chunk.data)})")
            elif kind == "trailer":
                kinds.append(f"trailer({m.trailer.num_chunks})")
            else:
                kinds.append(str(kind))
        return f"Push([{', '.join(kinds)}], cancel_after={self.cancel_after})"


@st.composite
def headers(draw: st.DrawFn, schema: Schema, payload: bytes) -> trainer_pb2.UpdateHeader:
    trainer = draw(st.sampled_from(TRAINERS))
    fields: dict[str, Any] = {
        "update_id": draw(st.uuids()).hex,
        "trainer": trainer,
        "region": trainer.split("-")[0],
    }
    bad = draw(
        st.sampled_from(
            [
                None,
                "round_no",
                "base_version",
                "num_examples",
                "payload_bytes",
                "payload_sha256",
                "schema_hash",
                "update_id",
                "metrics",
            ]
        )
    )
    if bad in ("round_no", "base_version", "num_examples", "payload_bytes"):
        fields[bad] = draw(U64)
    elif bad in ("payload_sha256", "schema_hash"):
        fields[bad] = draw(st.sampled_from(["0" * 64, "", "z" * 64, "a" * 65]))
    elif bad == "update_id":
        fields[bad] = draw(st.sampled_from(["", "a/b", "x" * 65, "ok.id"]))
    elif bad == "metrics":
        fields[bad] = {draw(st.text(max_size=70)): draw(st.floats())}
    return update_header(schema, payload, **fields)


@st.composite
def pushes(draw: st.DrawFn, schema: Schema, payload: bytes) -> Push:
    header = draw(headers(schema, payload))
    # A well-formed stream cut at random points, then damaged at random.
    cuts = sorted(draw(st.sets(st.integers(1, len(payload) - 1), max_size=5)))
    edges = [0, *cuts, len(payload)]
    chunks = [
        Request(chunk=tensors_pb2.Chunk(offset=a, data=payload[a:b])) for a, b in pairwise(edges)
    ]
    messages: list[Request] = [
        Request(header=header),
        *chunks,
        Request(trailer=trainer_pb2.UpdateTrailer(num_chunks=len(chunks))),
    ]
    odd_chunk = st.builds(
        lambda offset, size: Request(chunk=tensors_pb2.Chunk(offset=offset, data=bytes(size))),
        st.one_of(st.integers(0, len(payload) + 8), U64),
        st.sampled_from([0, 0, 1, 3, 4096, MAX_CHUNK_BYTES + 1]),
    )
    odd = st.one_of(
        odd_chunk,
        st.builds(lambda n: Request(trailer=trainer_pb2.UpdateTrailer(num_chunks=n)), U64),
        st.just(Request(header=header)),
        st.just(Request()),  # no kind at all
    )
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["insert", "drop", "swap", "truncate"]))
        if action == "insert":
            messages.insert(draw(st.integers(0, len(messages))), draw(odd))
        elif action == "drop" and messages:
            messages.pop(draw(st.integers(0, len(messages) - 1)))
        elif action == "swap" and len(messages) > 1:
            i = draw(st.integers(0, len(messages) - 2))
            messages[i], messages[i + 1] = messages[i + 1], messages[i]
        elif action == "truncate":
            messages = messages[: draw(st.integers(0, len(messages)))]
    cancel = draw(st.one_of(st.none(), st.integers(0, len(messages))))
    return Push(messages, cancel)


def send(stub: trainer_pb2_grpc.TrainerServiceStub, push: Push) -> grpc.StatusCode | None:
    """The call's status; None when the client cancelled it."""
    if push.cancel_after is None:
        try:
            stub.PushUpdate(iter(push.messages), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
    reached, resume = threading.Event(), threading.Event()

    def messages() -> Iterator[Request]:
        yield from push.messages[: push.cancel_after]
        reached.set()
        resume.wait(TIMEOUT_S)

    future = stub.PushUpdate.future(messages(), timeout=TIMEOUT_S)
    future.add_done_callback(lambda _: reached.set())  # answered before it was all sent
    try:
        reached.wait(TIMEOUT_S)
        time.sleep(0.01)  # let the server take in what was sent
        if future.cancel():
            return None
    finally:
        resume.set()
    try:
        future.result()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def settled(running: Running, before: tuple[list[str], int], timeout_s: float = 5.0) -> bool:
    """Whether the stored state returns to `before` (a cancelled handler unwinds after the
    client saw the cancellation)."""
    deadline = time.monotonic() + timeout_s
    while stored_state(running) != before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_any_push_message_sequence_gets_a_clear_status_and_leaves_nothing(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=1000)
    payload = random_delta(tiny_schema, seed=1)
    options = [("grpc.max_send_message_length", 16 << 20)]
    try:
        with grpc.insecure_channel(running.endpoints.internal, options=options) as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            health: Any = health_pb2_grpc.HealthStub(ch)  # its methods are untyped

            @PROPERTY
            @given(push=pushes(tiny_schema, payload))
            def check(push: Push) -> None:
                before = stored_state(running)
                code = send(stub, push)
                assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), push
                if code == grpc.StatusCode.OK:
                    rows = stored_state(running)[1]
                    assert rows in (before[1], before[1] + 1)
                    assert not list((running.data_dir / "blobs" / "tmp").iterdir())
                else:
                    assert settled(running, before), f"{push} left {stored_state(running)}"
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

            check()
    finally:
        running.gateway.stop()
