"""Chunk messages on the wire, without copying their payload: PushUpdate's requests read
as views of the received bytes, and pull responses serialized by hand.

protobuf's parser copies a chunk's bytes into its message, and every read of the `data`
field copies them again: three copies of each 1 MiB chunk before the gateway looks at it
(parse, the pacing's byte count, the servicer), with fresh pages each time. A chunk message
in the form every client sends (`PushUpdateRequest{chunk: Chunk{offset, data}}`, the offset
omitted when 0) is read here instead, straight off the wire format, as a view of the bytes
gRPC received. Anything else (a header, a trailer, a chunk with fields in another order,
repeated or unknown fields, a ten-byte varint, ...) goes to protobuf's own parser, so what
a valid message means and which bytes are refused is protobuf's decision in every case
(tests/unit/test_chunk_wire.py compares the two on arbitrary bytes).

The pulls go the other way: a response chunk set on a protobuf message is copied into it,
copied again to serialize it, and once more by every read of the field (the pacing's byte
count); chunk_message writes the same bytes as protobuf would with one copy.
"""

from __future__ import annotations

from sluice.models.chunk_codec import ChunkView, chunk_message, chunk_view
from sluice.v1 import trainer_pb2

__all__ = [
    "ChunkView",
    "PushRequest",
    "chunk_bytes",
    "chunk_message",
    "chunk_view",
    "decode_push_request",
]

PushRequest = ChunkView | trainer_pb2.PushUpdateRequest


def chunk_bytes(message: bytes) -> int:
    """The payload bytes of a serialized chunk message (chunk_message's); 0 for any other."""
    view = chunk_view(message)
    return len(view.data) if view is not None else 0


def decode_push_request(data: bytes) -> PushRequest:
    """A PushUpdateRequest's bytes: a ChunkView where chunk_view reads it, else protobuf's
    parse of them (which raises on bytes that are not a valid message)."""
    view = chunk_view(data)
    if view is not None:
        return view
    return trainer_pb2.PushUpdateRequest.FromString(data)
