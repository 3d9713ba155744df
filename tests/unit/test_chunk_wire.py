"""The raw chunk reader (models/chunk_codec.py: the gateway's PushUpdate decoder, the SDK's
pull reader) means what protobuf's parser means, byte for byte: the same chunk for every
input it reads itself, protobuf's own verdict for everything else; the chunk writer (the
gateway's pull responses, the SDK's push) writes protobuf's bytes. The SDK and the gateway
use the one module (the SDK does not import the gateway)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.clients import sdk
from sluice.clients.sdk import chunk_wire, push_wire
from sluice.gateway.services.chunk_wire import (
    ChunkView,
    chunk_bytes,
    chunk_message,
    chunk_view,
    decode_push_request,
)
from sluice.v1 import egress_pb2, tensors_pb2, trainer_pb2

Request = trainer_pb2.PushUpdateRequest


def _varint(n: int, pad: int = 0) -> bytes:
    """n as a varint, with `pad` redundant continuation bytes (an overlong encoding)."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    if pad:
        out.append(n | 0x80)
        out += b"\x80" * (pad - 1)
        out.append(0)
    else:
        out.append(n)
    return bytes(out)


def _protobuf(data: bytes) -> Request | None:
    try:
        return Request.FromString(data)
    except Exception:  # protobuf's DecodeError: not a valid message
        return None


def _ours(data: bytes) -> ChunkView | Request | None:
    try:
        return decode_push_request(data)
    except Exception:  # whatever protobuf's parser raised on the fallback
        return None


def assert_same(data: bytes) -> None:
    """decode_push_request(data) is protobuf's parse of data, or both refuse it; the SDK's
    chunk_view reads the same chunk or leaves it to protobuf."""
    want, got = _protobuf(data), _ours(data)
    sdk_view = sdk.chunk_view(data)
    gateway_view = chunk_view(data)
    assert (sdk_view is None) == (gateway_view is None)
    if sdk_view is not None and gateway_view is not None:
        assert sdk_view.offset == gateway_view.offset
        assert bytes(sdk_view.data) == bytes(gateway_view.data) and sdk_view.data.readonly
        pulled = egress_pb2.PullReleaseResponse.FromString(data)  # the same field, the same
        assert (pulled.chunk.offset, pulled.chunk.data) == (sdk_view.offset, bytes(sdk_view.data))
    if want is None:
        assert got is None, f"{data!r}: protobuf refuses it, the decoder read {got!r}"
        return
    assert got is not None, f"{data!r}: protobuf reads it, the decoder refused it"
    if isinstance(got, ChunkView):
        assert isinstance(got.data, memoryview) and got.data.readonly
        assert want.WhichOneof("kind") == "chunk"
        assert (got.offset, bytes(got.data)) == (want.chunk.offset, want.chunk.data)
        # Nothing else in the message: no unknown fields, no other field set.
        rebuilt = Request(chunk=tensors_pb2.Chunk(offset=got.offset, data=bytes(got.data)))
        assert rebuilt == want
        assert rebuilt.SerializeToString() == want.SerializeToString()
    else:
        assert got == want
        assert got.SerializeToString() == want.SerializeToString()


offsets = st.one_of(
    st.integers(0, 2**7 + 1),
    st.integers(0, 2**35),
    st.integers(2**62, 2**64 - 1),
    st.sampled_from([0, 1, 127, 128, 2**21 - 1, 2**21, 2**53 - 1, 2**63 - 1, 2**63, 2**64 - 1]),
)


@settings(max_examples=2000)
@given(st.binary(max_size=64))
def test_arbitrary_bytes(data: bytes) -> None:
    assert_same(data)


@settings(max_examples=500)
@given(st.binary(max_size=40), st.binary(max_size=8))
def test_arbitrary_bytes_after_a_chunk_key(body: bytes, tail: bytes) -> None:
    assert_same(b"\x12" + _varint(len(body)) + body)
    assert_same(b"\x12" + _varint(len(body) + len(tail)) + body + tail)
    assert_same(b"\x12" + _varint(len(body)) + body + tail)


@settings(max_examples=1000)
@given(offsets, st.binary(max_size=300))
def test_valid_chunk_messages_are_read_without_protobuf(offset: int, data: bytes) -> None:
    wire = Request(chunk=tensors_pb2.Chunk(offset=offset, data=data)).SerializeToString()
    assert_same(wire)
    view = chunk_view(wire)
    if offset < 2**63 and data:
        assert view is not None
        assert (view.offset, bytes(view.data)) == (offset, data)
    if offset < 2**63 and data:  # protobuf leaves out an empty data field
        assert chunk_wire(offset, data) == wire


@settings(max_examples=300)
@given(
    st.builds(
        trainer_pb2.UpdateHeader,
        update_id=st.text(max_size=10),
        model=st.text(max_size=10),
        round=st.integers(0, 2**64 - 1),
        metrics=st.dictionaries(st.text(max_size=5), st.floats(allow_nan=False), max_size=3),
        payload_bytes=st.integers(0, 2**64 - 1),
    ),
    st.integers(0, 2**64 - 1),
)
def test_headers_and_trailers_go_to_protobuf(header: trainer_pb2.UpdateHeader, n: int) -> None:
    for message in (
        Request(header=header),
        Request(trailer=trainer_pb2.UpdateTrailer(num_chunks=n)),
    ):
        wire = message.SerializeToString()
        assert chunk_view(wire) is None
        assert_same(wire)
        assert decode_push_request(wire) == message


# Near misses of the one form the decoder reads: every part of a chunk message varied.
_field = st.one_of(
    st.tuples(st.just(0x08), offsets, st.integers(0, 2)).map(
        lambda t: bytes([t[0]]) + _varint(t[1], t[2])
    ),
    st.tuples(
        st.sampled_from([0x12, 0x0A, 0x1A, 0x22]), st.binary(max_size=20), st.integers(0, 2)
    ).map(lambda t: bytes([t[0]]) + _varint(len(t[1]), t[2]) + t[1]),
    st.tuples(
        st.sampled_from([0x09, 0x0D, 0x10, 0x11, 0x15, 0x18, 0x0B, 0x0C, 0x13, 0x14, 0x0E, 0x0F]),
        st.binary(max_size=9),
    ).map(lambda t: bytes([t[0]]) + t[1]),
    st.binary(min_size=1, max_size=4),
)


@settings(max_examples=3000)
@given(
    st.lists(_field, max_size=4),
    st.sampled_from([0x12, 0x0A, 0x1A, 0x13, 0x02]),
    st.integers(-2, 2),
    st.integers(0, 2),
    st.binary(max_size=3),
)
def test_near_misses(
    inner: list[bytes], key: int, length_delta: int, pad: int, trailing: bytes
) -> None:
    body = b"".join(inner)
    wire = bytes([key]) + _varint(max(0, len(body) + length_delta), pad) + body
    assert_same(wire)
    assert_same(wire + trailing)
    assert_same(wire + wire)


@pytest.mark.parametrize("size", [0, 1, 5, 300, 1 << 14, (1 << 20) + 3])
def test_the_sdks_stream_decodes_to_protobufs_messages(size: int) -> None:
    header = trainer_pb2.UpdateHeader(model="m", trainer="t", payload_bytes=size)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for wire in push_wire(header, payload, 1 << 12):
        assert_same(wire)
        if Request.FromString(wire).WhichOneof("kind") == "chunk":
            assert isinstance(decode_push_request(wire), ChunkView)


def test_view_is_of_the_received_bytes() -> None:
    wire = chunk_wire(5, b"abc")
    view = chunk_view(wire)
    assert view is not None and view.data.obj is wire


@settings(max_examples=500)
@given(offsets, st.binary(max_size=300))
def test_chunk_message_is_what_protobuf_serializes(offset: int, data: bytes) -> None:
    for message in (
        egress_pb2.PullReleaseResponse,
        trainer_pb2.PullGlobalResponse,
        trainer_pb2.PushUpdateRequest,
    ):
        want = message(chunk=tensors_pb2.Chunk(offset=offset, data=data)).SerializeToString()
        assert chunk_message(offset, data) == want
        assert chunk_message(offset, memoryview(data)) == want
    wire = chunk_message(offset, data)
    assert chunk_bytes(wire) == (len(data) if offset < 2**63 and data else 0)
    assert_same(wire)


def test_the_sdk_and_the_gateway_share_one_codec() -> None:
    from sluice.gateway.services import chunk_wire as gateway_side
    from sluice.models import chunk_codec

    assert sdk.chunk_view is gateway_side.chunk_view is chunk_codec.chunk_view
    assert sdk.chunk_wire is gateway_side.chunk_message is chunk_codec.chunk_message
    assert sdk.ChunkView is gateway_side.ChunkView is chunk_codec.ChunkView
