"""The bench's peers and payloads do what their figures claim: the least-work push peer stores
every byte, in order, answers their sha256 and leaves no file behind; the plain stream
counts what it was sent; repeated pushes send distinct valid updates."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench import gateway_proc, grpc_sink
from sluice.gateway.core.finite import FiniteCheck
from sluice.models.chunk_codec import chunk_message
from sluice.v1 import tensors_pb2
from tests.conftest import TINY


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("sink")
    with grpc_sink.running(directory) as (target, _pid):
        yield target, directory


@pytest.mark.parametrize("size", [1, 4095, (1 << 20) + 7, (5 << 20) - 1])
def test_spool_peer_takes_every_byte_and_leaves_nothing(sink: tuple[str, Path], size: int) -> None:
    target, directory = sink
    payload = os.urandom(size)
    before = set(directory.iterdir())
    assert grpc_sink.spool(target, payload, 1 << 20) == size
    assert set(directory.iterdir()) == before  # its spool file is gone once answered


def test_spool_peer_refuses_a_chunk_out_of_order(sink: tuple[str, Path]) -> None:
    target, _ = sink
    messages = [chunk_message(0, b"a" * 10), chunk_message(20, b"b" * 10)]
    with grpc.insecure_channel(target) as channel:
        call: grpc.StreamUnaryMultiCallable[bytes, tensors_pb2.Chunk] = channel.stream_unary(
            grpc_sink.SPOOL, response_deserializer=tensors_pb2.Chunk.FromString
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(iter(messages), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_spool_peer_answers_the_sha256_of_what_it_stored(sink: tuple[str, Path]) -> None:
    target, _ = sink
    payload = os.urandom(3 << 20)
    messages = [
        chunk_message(at, payload[at : at + (1 << 20)]) for at in range(0, len(payload), 1 << 20)
    ]
    with grpc.insecure_channel(target) as channel:
        call: grpc.StreamUnaryMultiCallable[bytes, tensors_pb2.Chunk] = channel.stream_unary(
            grpc_sink.SPOOL, response_deserializer=tensors_pb2.Chunk.FromString
        )
        reply = call(iter(messages), timeout=30)
    assert reply.offset == len(payload)
    assert reply.data.decode() == hashlib.sha256(payload).hexdigest()


def test_plain_stream_counts_what_it_was_sent(sink: tuple[str, Path]) -> None:
    target, _ = sink
    assert grpc_sink.drain(target, os.urandom((2 << 20) + 3), 1 << 20) == (2 << 20) + 3


def test_repeated_bench_pushes_send_distinct_valid_updates() -> None:
    # A push of bytes the gateway holds replaces that blob (and frees the old file in its
    # commit): the bench's repeats push distinct updates, each one a valid update.
    schema = gateway_proc.schema_of(TINY)
    payload = gateway_proc.random_payload(schema, seed=1)
    updates = [gateway_proc.distinct(payload, schema, i) for i in range(3)]
    assert len({hashlib.sha256(u).digest() for u in [payload, *updates]}) == 4
    spec, start, _ = [span for span in schema.spans() if span[0].is_float][-1]
    for update in updates:
        assert len(update) == len(payload)
        changed = [i for i, (a, b) in enumerate(zip(payload, update, strict=True)) if a != b]
        assert changed and start <= min(changed) and max(changed) < start + spec.np_dtype.itemsize
        FiniteCheck(schema, max_abs=1.0).feed(update)  # what a push's scan lets through
