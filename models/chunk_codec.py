"""Chunk messages on the wire, without copying their payload, for both sides: the
gateway (`gateway/services/chunk_wire.py`) and the SDK (`clients/sdk.py`), which must not
import the gateway.

Every message with a chunk (PushUpdateRequest, PullGlobalResponse, PullReleaseResponse)
holds it as field 2 of its oneof, a Chunk{offset = 1, data = 2}. chunk_message writes
`M(chunk=Chunk(offset, data)).SerializeToString()`'s bytes with one copy of data (protobuf's
own path copies it several times); chunk_view reads exactly that form as a view of the
received bytes and returns None for anything else, which the caller hands to protobuf's
parser, so that what a valid message means is protobuf's decision in every case
(tests/unit/test_chunk_wire.py compares the two on arbitrary bytes).
"""

from __future__ import annotations

from typing import Final

from sluice.v1 import egress_pb2, trainer_pb2
from sluice.v1.tensors_pb2 import Chunk

# Wire-format keys (field number << 3 | wire type) of the one form read here.
_CHUNK_KEY: Final = 2 << 3 | 2  # PushUpdateRequest.chunk, length-delimited
_OFFSET_KEY: Final = 1 << 3 | 0  # Chunk.offset, varint
_DATA_KEY: Final = 2 << 3 | 2  # Chunk.data, length-delimited
_MAX_VARINT_BYTES: Final = 9  # < 2**63: no ten-byte varint (protobuf truncates those)

# Every message with a chunk (PushUpdateRequest, PullGlobalResponse, PullReleaseResponse)
# holds it as field 2 of its oneof: one form, one reader and one writer for all of them.
for _message in (
    trainer_pb2.PushUpdateRequest,
    trainer_pb2.PullGlobalResponse,
    egress_pb2.PullReleaseResponse,
):
    assert _message.DESCRIPTOR.fields_by_name["chunk"].number == 2
    assert _message.DESCRIPTOR.fields_by_name["chunk"].message_type is Chunk.DESCRIPTOR
assert (
    Chunk.DESCRIPTOR.fields_by_name["offset"].number,
    Chunk.DESCRIPTOR.fields_by_name["data"].number,
) == (1, 2)


class ChunkView:
    """A chunk message: its offset, and its payload as a read-only view of the message."""

    __slots__ = ("data", "offset")

    def __init__(self, offset: int, data: memoryview) -> None:
        self.offset = offset
        self.data = data

    def __repr__(self) -> str:
        return f"ChunkView(offset={self.offset}, {len(self.data)} bytes)"


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def chunk_message(offset: int, data: bytes | memoryview) -> bytes:
    """`M(chunk=Chunk(offset=offset, data=data)).SerializeToString()` for any M above, the
    same bytes (protobuf leaves out a zero offset and empty data), with data copied once."""
    inner = b""
    if offset:
        inner += bytes((_OFFSET_KEY,)) + _encode_varint(offset)
    if len(data):
        inner += bytes((_DATA_KEY,)) + _encode_varint(len(data))
    outer = bytes((_CHUNK_KEY,)) + _encode_varint(len(inner) + len(data))
    return b"".join((outer, inner, data))


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it); (-1, pos) if there is no varint of at most
    _MAX_VARINT_BYTES bytes before end."""
    value, shift, start = 0, 0, pos
    while pos < end and pos - start < _MAX_VARINT_BYTES:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, start


def chunk_view(data: bytes) -> ChunkView | None:
    """The chunk a serialized chunk message (any of the messages above) of exactly the form
    `[chunk key][length]([offset key][varint])?[data key][length][payload]` carries, with
    every length consistent and nothing after it; None for any other bytes."""
    end = len(data)
    if end < 2 or data[0] != _CHUNK_KEY:
        return None
    length, pos = _varint(data, 1, end)
    if length < 0 or pos + length != end:
        return None
    offset = 0
    if pos < end and data[pos] == _OFFSET_KEY:
        offset, pos = _varint(data, pos + 1, end)
        if offset < 0:
            return None
    if pos >= end or data[pos] != _DATA_KEY:
        return None
    size, pos = _varint(data, pos + 1, end)
    if size < 0 or pos + size != end:
        return None
    return ChunkView(offset, memoryview(data)[pos:])
