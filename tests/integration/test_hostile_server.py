"""The SDK against a server that lies about what it sends (a faulty gateway, or someone on
the path): a pull takes no byte past the total its header announced, and no chunk before
that header, so a server that goes on sending fills neither the puller's disk nor its
memory before the sha256 check would refuse it; nothing is left at the destination."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.clients.sdk import EgressClient, RetryPolicy, Stalled, TrainerClient, _watched
from sluice.v1 import egress_pb2, tensors_pb2, trainer_pb2

DATA = bytes(range(256)) * 64  # 16 KiB: what the header announces, and its sha256
PIECE = 4096


class Lying:
    """A TrainerService.PullGlobal and an EgressService.PullRelease that announce DATA, then
    send `extra` more pieces (or a chunk before the header)."""

    def __init__(self) -> None:
        self.extra, self.early = 0, False
        self.stall_after: int | None = None  # pieces sent before going silent
        self.offsets: list[int] = []  # the offset each call asked for

    def stall(self, ctx: Any) -> None:
        """Send nothing more, and end only once the client has given up (or after 60 s)."""
        deadline = time.monotonic() + 60
        while ctx.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)

    def chunks(self, start: int = 0) -> Iterator[tensors_pb2.Chunk]:
        offset = start
        for at in range(start, len(DATA), PIECE):
            yield tensors_pb2.Chunk(offset=at, data=DATA[at : at + PIECE])
            offset = at + PIECE
        for _ in range(self.extra):
            yield tensors_pb2.Chunk(offset=offset, data=b"\0" * PIECE)
            offset += PIECE

    def pull_global(self, req: Any, ctx: Any) -> Iterator[trainer_pb2.PullGlobalResponse]:
        header = trainer_pb2.GlobalHeader(
            model=req.model, version=1, schema_hash="a" * 64, total_bytes=len(DATA),
            sha256=hashlib.sha256(DATA).hexdigest(),
        )  # fmt: skip
        self.offsets.append(req.offset)
        chunks = (trainer_pb2.PullGlobalResponse(chunk=c) for c in self.chunks(req.offset))
        if self.early:
            yield next(chunks)
        yield trainer_pb2.PullGlobalResponse(header=header)
        yield from self._until_stall(chunks, ctx)

    def pull_release(self, req: Any, ctx: Any) -> Iterator[egress_pb2.PullReleaseResponse]:
        header = egress_pb2.PullReleaseHeader(
            model=req.model, version=1, file="model.onnx", total_bytes=len(DATA),
            sha256=hashlib.sha256(DATA).hexdigest(),
        )  # fmt: skip
        self.offsets.append(req.offset)
        chunks = (egress_pb2.PullReleaseResponse(chunk=c) for c in self.chunks(req.offset))
        if self.early:
            yield next(chunks)
        yield egress_pb2.PullReleaseResponse(header=header)
        yield from self._until_stall(chunks, ctx)

    def _until_stall(self, chunks: Iterator[Any], ctx: Any) -> Iterator[Any]:
        for sent, chunk in enumerate(chunks):
            if self.stall_after is not None and sent == self.stall_after:
                self.stall(ctx)
                return
            yield chunk


@pytest.fixture(scope="module")
def lying() -> Iterator[tuple[Lying, str]]:
    fake = Lying()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "sluice.v1.TrainerService",
                {
                    "PullGlobal": grpc.unary_stream_rpc_method_handler(
                        fake.pull_global,
                        request_deserializer=trainer_pb2.PullGlobalRequest.FromString,
                        response_serializer=trainer_pb2.PullGlobalResponse.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                "sluice.v1.EgressService",
                {
                    "PullRelease": grpc.unary_stream_rpc_method_handler(
                        fake.pull_release,
                        request_deserializer=egress_pb2.PullReleaseRequest.FromString,
                        response_serializer=egress_pb2.PullReleaseResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


ONCE = RetryPolicy(attempts=1)


def test_honest_streams_are_pulled(lying: tuple[Lying, str], tmp_path: Path) -> None:
    fake, target = lying
    fake.extra, fake.early = 0, False
    with TrainerClient(target, retry=ONCE, timeout_s=10) as trainer:
        assert trainer.pull_global("m").data == DATA
    with EgressClient(target, retry=ONCE, timeout_s=10) as egress:
        egress.pull("m", tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == DATA


@given(extra=st.integers(1, 64))
@settings(max_examples=8, deadline=None)
def test_bytes_past_the_announced_total_are_refused_at_the_first(
    lying: tuple[Lying, str], tmp_path_factory: pytest.TempPathFactory, extra: int
) -> None:
    fake, target = lying
    fake.extra, fake.early = extra, False
    too_many = f"more than the {len(DATA)} bytes it announced"
    with (
        TrainerClient(target, retry=ONCE, timeout_s=10) as trainer,
        pytest.raises(ValueError, match=too_many),
    ):
        trainer.pull_global("m")
    dest = tmp_path_factory.mktemp("pull") / "model.onnx"
    with EgressClient(target, retry=ONCE, timeout_s=10) as egress:
        with pytest.raises(ValueError, match=too_many):
            egress.pull("m", dest)
        digest = hashlib.sha256(DATA).hexdigest()
        with pytest.raises(ValueError, match="announced"):  # the resumable, manifest-led way
            egress.pull("m", dest, expect=(len(DATA), digest))
    assert list(dest.parent.iterdir()) == []  # no file, no partial past the announced size


def test_a_trainer_that_knows_its_model_s_size_refuses_another_before_a_byte(
    lying: tuple[Lying, str],
) -> None:
    fake, target = lying
    fake.extra, fake.early = 0, False
    with TrainerClient(target, retry=ONCE, timeout_s=10) as trainer:
        with pytest.raises(ValueError, match=f"announced {len(DATA)} bytes of 'm'; its weights"):
            trainer.pull_global("m", size=len(DATA) - 1)
        assert trainer.pull_global("m", size=len(DATA)).data == DATA


def test_a_chunk_before_the_header_is_refused(lying: tuple[Lying, str], tmp_path: Path) -> None:
    fake, target = lying
    fake.extra, fake.early = 0, True
    early = "chunk before its header"
    with (
        TrainerClient(target, retry=ONCE, timeout_s=10) as trainer,
        pytest.raises(ValueError, match=early),
    ):
        trainer.pull_global("m")
    with (
        EgressClient(target, retry=ONCE, timeout_s=10) as egress,
        pytest.raises(ValueError, match=early),
    ):
        egress.pull("m", tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pull", ["release", "global"])
def test_a_server_that_stops_sending_is_given_up_after_the_idle_timeout_and_resumed(
    lying: tuple[Lying, str], tmp_path: Path, pull: str
) -> None:
    """A stream that brings nothing for idle_s is cancelled and resumed from the bytes it
    brought (Stalled: retried like a deadline), not waited on for the whole deadline."""
    fake, target = lying
    fake.extra, fake.early, fake.stall_after, fake.offsets = 0, False, 1, []
    retry = RetryPolicy(attempts=3, first_backoff_s=0.01)
    started = time.monotonic()
    try:
        with pytest.raises(Stalled, match=r"no bytes from the gateway for 0\.3 s") as err:
            if pull == "release":
                with EgressClient(target, retry=retry, timeout_s=60, idle_s=0.3) as egress:
                    digest = hashlib.sha256(DATA).hexdigest()
                    egress.pull("m", tmp_path / "model.onnx", expect=(len(DATA), digest))
            else:
                with TrainerClient(target, retry=retry, timeout_s=60, idle_s=0.3) as trainer:
                    trainer.pull_global("m")
    finally:
        fake.stall_after = None
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 30  # three idle periods, not the 60 s deadline
    assert fake.offsets == [0, PIECE, 2 * PIECE]  # each try resumed where the last stopped
    assert not (tmp_path / "model.onnx").exists()


def test_an_idle_timeout_must_be_positive_and_bounded() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e10):
        with pytest.raises(ValueError, match="idle_s must be > 0"):
            EgressClient("127.0.0.1:1", idle_s=bad)


class _Call:
    """A streaming call's stand-in: messages after given delays; cancel() ends it."""

    def __init__(self, delays: list[float]) -> None:
        self.delays, self.cancelled = delays, threading.Event()

    def __iter__(self) -> Iterator[int]:
        for i, delay in enumerate(self.delays):
            if self.cancelled.wait(delay):
                raise grpc.RpcError("cancelled")
            yield i

    def cancel(self) -> None:
        self.cancelled.set()


def test_only_silence_after_the_header_while_waited_on_counts_as_idle() -> None:
    """The header may take longer than idle_s (a gateway checking a whole file first), and
    a caller may hold each message longer than idle_s (a slow disk): neither is a stall.
    A gap between messages while the pull waits is."""
    slow_header = _Call([0.6, 0.0, 0.0])
    assert list(_watched(slow_header, 0.2)) == [0, 1, 2]
    held = []
    for msg in _watched(_Call([0.0, 0.0, 0.0]), 0.2):
        time.sleep(0.5)  # the caller writes the chunk out
        held.append(msg)
    assert held == [0, 1, 2]
    with pytest.raises(Stalled):
        list(_watched(_Call([0.0, 0.0, 5.0]), 0.2))
