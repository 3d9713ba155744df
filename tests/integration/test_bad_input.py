"""Bad pushes over loopback gRPC: the exact status, a message naming the fault, nothing kept."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from pathlib import Path

import grpc
import pytest

from sluice.clients.sdk import TrainerClient, push_messages
from sluice.models.schema import Schema
from sluice.v1 import tensors_pb2, trainer_pb2, trainer_pb2_grpc
from tests.conftest import TINY, Running, random_delta, stored_state, update_header

Request = trainer_pb2.PushUpdateRequest
Messages = Callable[[Schema], Sequence[Request]]
Code = grpc.StatusCode

TIMEOUT_S = 10.0  # every call: a gateway that hangs fails the test instead of blocking it
CHUNK_BYTES = 16 << 10  # small chunks, so a push has several and order faults have room
MAX_CHUNK_BYTES = 4 << 20  # the gateway's own per-chunk limit
# The SDK channel caps what it sends at the gateway's limit; these tests must get past it.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 16 << 20)]


# What a rejected push must leave as it was.


@dataclass(frozen=True)
class Snapshot:
    stored: tuple[list[str], int]  # blob files, update rows
    accepted: int  # the open round's committed updates, as GetRound reports them


def open_round(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.RoundInfo:
    info: trainer_pb2.RoundInfo = stub.GetRound(
        trainer_pb2.GetRoundRequest(model=TINY), timeout=TIMEOUT_S
    )
    return info


def snapshot(gateway: Running, stub: trainer_pb2_grpc.TrainerServiceStub) -> Snapshot:
    return Snapshot(stored_state(gateway), open_round(stub).accepted)


def temp_files(gateway: Running) -> list[Path]:
    return sorted((gateway.data_dir / "blobs" / "tmp").iterdir())


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def assert_nothing_kept(
    gateway: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,
    before: Snapshot,
    settle_s: float = 0.0,
) -> None:
    """settle_s: a call ended by the client or by gRPC itself returns before the handler has
    unwound, so give the server that long to remove its temp file; a status the handler sent
    comes after the cleanup and needs none."""
    if settle_s:
        wait_for(lambda: not temp_files(gateway), "the temp file stayed", settle_s)
    assert temp_files(gateway) == []
    assert snapshot(gateway, stub) == before


def assert_rejected(
    gateway: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,
    messages: Sequence[Request],
    code: grpc.StatusCode,
    text: str,
    settle_s: float = 0.0,
) -> None:
    before = snapshot(gateway, stub)
    with pytest.raises(grpc.RpcError) as err:
        stub.PushUpdate(iter(messages), timeout=TIMEOUT_S)
    assert err.value.code() == code, err.value.details()
    assert text in (err.value.details() or "")
    assert_nothing_kept(gateway, stub, before, settle_s)


@pytest.fixture
def stub(gateway: Running) -> Iterator[trainer_pb2_grpc.TrainerServiceStub]:
    with grpc.insecure_channel(gateway.endpoints.internal, options=_CHANNEL_OPTIONS) as ch:
        yield trainer_pb2_grpc.TrainerServiceStub(ch)


# Building streams, good and bad.


def chunk(offset: int, data: bytes) -> Request:
    return Request(chunk=tensors_pb2.Chunk(offset=offset, data=data))


def trailer(num_chunks: int) -> Request:
    return Request(trailer=trainer_pb2.UpdateTrailer(num_chunks=num_chunks))


def stream(
    header: trainer_pb2.UpdateHeader, payload: bytes, chunk_bytes: int = CHUNK_BYTES
) -> list[Request]:
    return list(push_messages(header, payload, chunk_bytes))


def valid(
    schema: Schema, *, round_no: int = 1, base_version: int = 0, **fields: object
) -> list[Request]:
    """A well-formed push of a random delta; fields override the header's."""
    delta = random_delta(schema, seed=1)
    header = update_header(schema, delta, round_no=round_no, base_version=base_version, **fields)
    return stream(header, delta)


def honest(schema: Schema, payload: bytes) -> list[Request]:
    """A push whose header matches its payload, whatever the payload is."""
    return stream(update_header(schema, payload), payload)


def declared_then(schema: Schema, payload: bytes) -> list[Request]:
    """The header of a well-formed delta, followed by another payload."""
    delta = random_delta(schema, seed=1)
    return stream(update_header(schema, delta), payload)


def split_at(
    header: trainer_pb2.UpdateHeader, payload: bytes, cuts: Sequence[int]
) -> list[Request]:
    """header, payload cut into chunks at the given byte positions, trailer."""
    edges = [0, *cuts, len(payload)]
    chunks = [chunk(a, payload[a:b]) for a, b in pairwise(edges)]
    return [Request(header=header), *chunks, trailer(len(chunks))]


def poisoned(schema: Schema, tensor: str, element: int, value: float) -> bytes:
    """A random delta with one element of one float tensor replaced."""
    buf = bytearray(random_delta(schema, seed=1))
    views = schema.views(memoryview(buf))  # zero-copy: writing a view writes buf
    views[tensor].reshape(-1)[element] = value
    return bytes(buf)


def poisoned_push(tensor: str, element: int, value: float) -> Messages:
    return lambda schema: honest(schema, poisoned(schema, tensor, element, value))


def reordered(pick: Callable[[list[Request]], list[Request]]) -> Messages:
    return lambda schema: pick(valid(schema))


def with_body(body: Callable[[], list[Request]]) -> Messages:
    """A well-formed header, then hand-built messages (built late: some are megabytes)."""

    def build(schema: Schema) -> list[Request]:
        header = update_header(schema, random_delta(schema, seed=1))
        return [Request(header=header), *body()]

    return build


def second_header(m: list[Request]) -> list[Request]:
    return [*m[:2], m[0], *m[2:]]


def shifted_chunk(m: list[Request]) -> list[Request]:
    bad = chunk(m[2].chunk.offset + 4, m[2].chunk.data)
    return [*m[:2], bad, *m[3:]]


def miscounted(m: list[Request]) -> list[Request]:
    return [*m[:-1], trailer(m[-1].trailer.num_chunks + 1)]


REJECTED = [
    # the payload against the schema
    pytest.param(
        lambda s: valid(s, schema_hash="0" * 64),
        Code.FAILED_PRECONDITION,
        "schema hash 000000000000... does not match",
        id="wrong-schema-hash",
    ),
    pytest.param(
        lambda s: honest(s, random_delta(s, 1)[:-4]),
        Code.INVALID_ARGUMENT,
        "updates are exactly 84248 bytes",
        id="payload-bytes-not-the-schemas",
    ),
    pytest.param(
        lambda s: declared_then(s, random_delta(s, 1) + bytes(8)),
        Code.INVALID_ARGUMENT,
        "payload runs past its declared 84248 bytes",
        id="payload-longer-than-declared",
    ),
    pytest.param(
        lambda s: declared_then(s, random_delta(s, 1)[:-8]),
        Code.INVALID_ARGUMENT,
        "payload is 84240 bytes; header said 84248",
        id="payload-shorter-than-declared",
    ),
    pytest.param(
        poisoned_push("backbone.0.0.weight", 5, float("nan")),
        Code.INVALID_ARGUMENT,
        "tensor 'backbone.0.0.weight': element 5 is nan",
        id="nan",
    ),
    pytest.param(
        poisoned_push("lane_head.bias", 3, float("inf")),
        Code.INVALID_ARGUMENT,
        "tensor 'lane_head.bias': element 3 is inf",
        id="inf-in-a-later-tensor",
    ),
    pytest.param(
        lambda s: valid(s, payload_sha256=hashlib.sha256(b"other").hexdigest()),
        Code.DATA_LOSS,
        "payload sha256 is",
        id="sha256-mismatch",
    ),
    # the round
    pytest.param(
        lambda s: valid(s, round_no=99),
        Code.NOT_FOUND,
        "round 99 of model 'drivenet-tiny' does not exist",
        id="unknown-round",
    ),
    # limits
    pytest.param(
        lambda s: valid(s, metrics={"k" * (20 << 10): 1.0}),
        Code.RESOURCE_EXHAUSTED,
        "update header is",
        id="header-too-large",
    ),
    pytest.param(
        lambda s: valid(s, metrics={f"m{i}": float(i) for i in range(65)}),
        Code.RESOURCE_EXHAUSTED,
        "65 metrics; at most 64",
        id="too-many-metrics",
    ),
    pytest.param(
        with_body(lambda: [chunk(0, bytes(MAX_CHUNK_BYTES + 1)), trailer(1)]),
        Code.RESOURCE_EXHAUSTED,
        f"chunk 0 is {MAX_CHUNK_BYTES + 1} bytes; at most {MAX_CHUNK_BYTES}",
        id="chunk-over-the-limit",
    ),
    # header fields
    *(
        pytest.param(
            lambda s, bad=bad: valid(s, update_id=bad),
            Code.INVALID_ARGUMENT,
            "update_id",
            id=f"update-id-{label}",
        )
        for label, bad in [
            ("slash", "../../etc/passwd"),
            ("space", "has space"),
            ("empty", ""),
            ("too-long", "x" * 65),
            ("trailing-newline", "abc\n"),  # `$` also matches before a final newline
        ]
    ),
    *(
        pytest.param(
            lambda s, bad=bad: valid(s, trainer=bad),
            Code.INVALID_ARGUMENT,
            f"trainer {bad!r}",
            id=f"trainer-{label}",
        )
        for label, bad in [("upper-case", "Shanghai-01"), ("trailing-newline", "shanghai-01\n")]
    ),
    pytest.param(
        lambda s: valid(s, payload_sha256="z" * 64),
        Code.INVALID_ARGUMENT,
        "payload_sha256: expected 64 lowercase hex",
        id="sha256-not-hex",
    ),
    pytest.param(
        lambda s: valid(s, num_examples=0),
        Code.INVALID_ARGUMENT,
        "num_examples must be > 0",
        id="zero-examples",
    ),
    pytest.param(
        lambda s: valid(s, model="no-such-model"),
        Code.NOT_FOUND,
        "model 'no-such-model' is not served",
        id="unknown-model",
    ),
    # message order
    pytest.param(
        lambda s: [],
        Code.INVALID_ARGUMENT,
        "starts with exactly one header",
        id="empty-stream",
    ),
    pytest.param(
        reordered(lambda m: m[1:]),
        Code.INVALID_ARGUMENT,
        "starts with exactly one header",
        id="first-message-not-a-header",
    ),
    pytest.param(
        reordered(second_header),
        Code.INVALID_ARGUMENT,
        "unexpected header message",
        id="second-header-mid-stream",
    ),
    pytest.param(
        reordered(shifted_chunk),
        Code.INVALID_ARGUMENT,
        f"chunk 1 at offset {CHUNK_BYTES + 4}; expected {CHUNK_BYTES}",
        id="chunk-at-wrong-offset",
    ),
    pytest.param(
        reordered(lambda m: [*m, chunk(84248, b"\0")]),
        Code.INVALID_ARGUMENT,
        "message after the trailer",
        id="chunk-after-trailer",
    ),
    pytest.param(
        reordered(lambda m: [*m, m[-1]]),
        Code.INVALID_ARGUMENT,
        "message after the trailer",
        id="second-trailer",
    ),
    pytest.param(
        reordered(miscounted),
        Code.INVALID_ARGUMENT,
        "trailer counts",
        id="trailer-count-wrong",
    ),
    pytest.param(
        reordered(lambda m: m[:3]),
        Code.INVALID_ARGUMENT,
        f"stream ended after {2 * CHUNK_BYTES} of 84248 bytes without a trailer",
        id="half-closed-without-trailer",
    ),
]


@pytest.mark.parametrize(("messages", "code", "text"), REJECTED)
def test_bad_push_is_rejected_and_leaves_nothing(
    gateway: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,
    tiny_schema: Schema,
    messages: Messages,
    code: grpc.StatusCode,
    text: str,
) -> None:
    assert tiny_schema.payload_bytes == 84248  # the literal sizes in the table above
    assert_rejected(gateway, stub, messages(tiny_schema), code, text)


def test_chunk_over_grpcs_own_limit_is_refused(
    gateway: Running, stub: trainer_pb2_grpc.TrainerServiceStub, tiny_schema: Schema
) -> None:
    # 8 MiB is past the listener's max message size: gRPC refuses it before our check runs.
    messages = with_body(lambda: [chunk(0, bytes(8 << 20)), trailer(1)])(tiny_schema)
    assert_rejected(
        gateway, stub, messages, Code.RESOURCE_EXHAUSTED, "larger than max", settle_s=5.0
    )


# A NaN whose four bytes arrive in two, three or four chunks of these sizes.
@pytest.mark.parametrize(
    "pieces",
    [(1, 3), (2, 2), (3, 1), (1, 1, 2), (2, 1, 1), (1, 1, 1, 1)],
    ids=lambda pieces: "+".join(map(str, pieces)),
)
def test_nan_split_across_chunks_is_caught(
    gateway: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,
    tiny_schema: Schema,
    pieces: tuple[int, ...],
) -> None:
    name, element = "trunk.1.weight", 1000
    payload = poisoned(tiny_schema, name, element, float("nan"))
    index = [t.name for t in tiny_schema.tensors].index(name)
    start = tiny_schema.offsets[index] + element * 4
    # Cut elsewhere too, so the NaN's chunk is neither the first nor the last.
    edges = [start - 5000, *(start + c for c in accumulate(pieces[:-1])), start + 5000]
    messages = split_at(update_header(tiny_schema, payload), payload, edges)
    text = f"tensor '{name}': element {element} is nan"
    assert_rejected(gateway, stub, messages, Code.INVALID_ARGUMENT, text)


def test_cancelled_push_leaves_nothing(
    gateway: Running, stub: trainer_pb2_grpc.TrainerServiceStub, tiny_schema: Schema
) -> None:
    messages = valid(tiny_schema)
    resume = threading.Event()

    def stalled() -> Iterator[Request]:
        yield from messages[:3]
        resume.wait(TIMEOUT_S)
        yield from messages[3:]

    before = snapshot(gateway, stub)
    future = stub.PushUpdate.future(stalled(), timeout=TIMEOUT_S)
    try:
        wait_for(lambda: bool(temp_files(gateway)), "the gateway never started spooling")
        assert future.cancel()
    finally:
        resume.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert_nothing_kept(gateway, stub, before, settle_s=5.0)


# Rounds that moved on.


@pytest.fixture
def second_round(gateway: Running, tiny_schema: Schema) -> Running:
    """Round 1 closed by its quorum of 3 pushes; round 2 open, training from version 1."""
    with TrainerClient(gateway.endpoints.internal) as client:
        for i, trainer in enumerate(["shanghai-01", "beijing-01", "chengdu-01"]):
            client.push_update(
                model=TINY,
                round_no=1,
                base_version=0,
                schema_hash=tiny_schema.hash,
                trainer=trainer,
                region=trainer.split("-")[0],
                num_examples=10,
                payload=random_delta(tiny_schema, seed=10 + i),
            )
        wait_for(lambda: client.round(TINY).round == 2, "round 2 never opened", 30.0)
    return gateway


@pytest.mark.parametrize(
    ("round_no", "base_version", "text"),
    [
        (2, 0, "stale base version 0: round 2 trains from version 1"),
        (1, 0, "round 1 of 'drivenet-tiny' is closed"),
    ],
    ids=["stale-base-version", "closed-round"],
)
def test_push_outside_the_open_round_fails_precondition(
    second_round: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,
    tiny_schema: Schema,
    round_no: int,
    base_version: int,
    text: str,
) -> None:
    messages = valid(tiny_schema, round_no=round_no, base_version=base_version)
    assert_rejected(second_round, stub, messages, Code.FAILED_PRECONDITION, text)


# Retries.


def test_replayed_update_is_acknowledged_but_counted_once(
    gateway: Running, stub: trainer_pb2_grpc.TrainerServiceStub, tiny_schema: Schema
) -> None:
    messages = valid(tiny_schema)
    first = stub.PushUpdate(iter(messages), timeout=TIMEOUT_S)
    assert (first.created, first.round, first.accepted) == (True, 1, 1)
    after_first = snapshot(gateway, stub)
    assert after_first.stored[1] == 1 and after_first.accepted == 1

    again = stub.PushUpdate(iter(messages), timeout=TIMEOUT_S)
    assert (again.update_id, again.created, again.round, again.accepted) == (
        first.update_id,
        False,
        1,
        1,
    )
    assert_nothing_kept(gateway, stub, after_first)


def test_reused_update_id_for_other_content_is_refused(
    gateway: Running, stub: trainer_pb2_grpc.TrainerServiceStub, tiny_schema: Schema
) -> None:
    first = stub.PushUpdate(iter(valid(tiny_schema)), timeout=TIMEOUT_S)
    other = random_delta(tiny_schema, seed=2)
    messages = stream(update_header(tiny_schema, other, update_id=first.update_id), other)
    assert_rejected(gateway, stub, messages, Code.ALREADY_EXISTS, "already used")
