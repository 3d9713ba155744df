"""The SDK's pre-serialized push stream is, byte for byte, what protobuf would send."""

from __future__ import annotations

import pytest

from sluice.clients.sdk import chunk_wire, push_messages, push_wire
from sluice.v1 import trainer_pb2


@pytest.mark.parametrize(
    ("size", "chunk_bytes"),
    [
        (0, 4),
        (1, 4),
        (5, 2),
        (300, 128),
        (1 << 14, 1 << 14),
        (200_000, 16 << 10),
        (3 << 20, 1 << 20),
    ],
)
def test_push_wire_is_what_protobuf_serializes(size: int, chunk_bytes: int) -> None:
    header = trainer_pb2.UpdateHeader(model="m", trainer="t", payload_bytes=size)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    want = [m.SerializeToString() for m in push_messages(header, payload, chunk_bytes)]
    assert list(push_wire(header, payload, chunk_bytes)) == want
    assert list(push_wire(header, memoryview(payload), chunk_bytes)) == want


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 16383, 16384, 2**21, 2**35, 2**53 - 1])
@pytest.mark.parametrize("size", [1, 127, 128, 16384, (1 << 20) + 1])
def test_chunk_wire_parses_back(offset: int, size: int) -> None:
    data = bytes([offset % 251]) * size
    parsed = trainer_pb2.PushUpdateRequest.FromString(chunk_wire(offset, data))
    assert parsed.WhichOneof("kind") == "chunk"
    assert (parsed.chunk.offset, parsed.chunk.data) == (offset, data)
