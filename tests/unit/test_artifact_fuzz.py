"""Mutations of a genuine release: refused with a reason, never a crash; only the genuine
structure gets past the guard or a pinned verify_release."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.clients.verify import verify_release
from sluice.gateway.export.guard import GuardPolicy, GuardRefused, check_model_bytes
from sluice.models import onnx_wire
from sluice.models.artifact import (
    ArtifactRefused,
    StructureLimits,
    capacity_bytes,
    inspect_onnx,
    op_set,
    structure_hash,
)
from sluice.models.manifest import MODEL_FILE, ManifestRefused
from tests.unit.test_artifact_bounds import Genuine, genuine_release, signed_release

# Bounded: 150 fresh mutants per test and run; no example database on disk (a failure
# prints the @reproduce_failure line that replays it).
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
Field = onnx_wire.Field
Chain = tuple[Field, ...]  # the LEN fields from the model down to one message; () is the model
Step = tuple[str, int | None]  # a field name, and an index into it where it is repeated
Scalar = tuple[tuple[Step, ...], FieldDescriptor]  # a message's path, one of its scalar fields


@dataclass(frozen=True)
class World:
    genuine: Genuine
    key: Ed25519PrivateKey  # signs every mutant: a leaked key, so verify_release reads them
    directory: Path  # where verify_release finds the mutant
    outside: tuple[int, ...]  # offsets of the release outside its weights
    messages: tuple[Chain, ...]  # every message of the release
    scalars: tuple[Scalar, ...]  # every scalar field of every message of the release

    def __repr__(self) -> str:  # hypothesis shows the arguments of a failing example
        return f"World({self.genuine.template.model!r} release)"


def _messages(buf: bytes, start: int, end: int, descriptor: Any, chain: Chain) -> Iterator[Chain]:
    yield chain
    for f in onnx_wire.iter_fields(buf, start, end):
        field = descriptor.fields_by_number.get(f.number)
        if field is not None and field.message_type is not None:
            yield from _messages(buf, f.start, f.end, field.message_type, (*chain, f))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    g = genuine_release()
    weights = {at for r in g.template.ranges for at in range(r.start, r.end)}
    outside = tuple(at for at in range(len(g.release)) if at not in weights)
    messages = tuple(_messages(g.release, 0, len(g.release), onnx.ModelProto.DESCRIPTOR, ()))
    scalars = tuple(_scalars(onnx.ModelProto.FromString(g.release)))
    directory = tmp_path_factory.mktemp("fuzz")
    return World(g, Ed25519PrivateKey.generate(), directory, outside, messages, scalars)


def _judge(world: World, mutant: bytes) -> None:
    """A refusal that says why, or acceptance; only the genuine structure gets past the
    guard or a pinned verify_release.

    The format check alone accepts any well-formed file, a renamed node or a changed dim
    included (it holds no template): what it accepts is within StructureLimits.
    """
    g = world.genuine
    genuine = False
    try:
        report = inspect_onnx(mutant, g.weights, allowed_ops=g.ops)
    except ArtifactRefused as exc:
        assert str(exc), "a refusal must say why"
    else:
        assert report.structure_bytes <= capacity_bytes(StructureLimits())
        genuine = report.structure_hash == g.template.structure_hash
    try:
        check_model_bytes(mutant, g.template, g.schema, GuardPolicy())
    except GuardRefused as exc:
        assert exc.reason and not genuine
    else:
        assert genuine, "the guard let a changed structure through"
    # Signed as whoever holds the key would: the file check and the pin must refuse.
    manifest, signature, files = signed_release(world.directory, world.key, mutant, g)
    pin = g.template.structure_hash
    try:
        verify_release(manifest, signature, world.key.public_key(), files, structure_hash=pin)
    except ManifestRefused as exc:
        assert str(exc) and not genuine
    else:
        assert genuine, "a pinned verify_release let a changed structure through"
    # The helpers a gateway runs on templates and files: a ValueError or an answer.
    for parse in (onnx_wire.elide_raw_data, onnx_wire.initializer_spans, op_set):
        with contextlib.suppress(ValueError):
            parse(mutant)
    with contextlib.suppress(ValueError):
        structure_hash(mutant, g.template.ranges)


# --- bytes --------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_byte_edits(world: World, data: st.DataObject) -> None:
    buf = bytearray(world.genuine.release)
    # Mostly where the structure is: a flip inside a weight is a genuine release.
    at = st.one_of(st.sampled_from(world.outside), st.integers(0, len(buf) - 1))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "duplicate"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            buf[data.draw(at)] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del buf[data.draw(at) :]
    elif kind == "insert":
        pos = data.draw(at)
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        start, size, pos = data.draw(at), data.draw(st.integers(1, 512)), data.draw(at)
        buf[pos:pos] = buf[start : start + size]
    _judge(world, bytes(buf))


# --- protobuf fields, edited on the wire ---------------------------------------------------

NUMBERS = st.one_of(
    st.integers(1, 32), st.sampled_from([99, 1000, 19_000, (1 << 29) - 1]), st.integers(1, 1 << 29)
)
_EDGES = [0, 1, 2, 8, 16, 17, 22, 99, 127, 128, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32]
VARINTS = st.one_of(
    st.sampled_from([*_EDGES, (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)


def _splice(buf: bytes, chain: Chain, start: int, end: int, new: bytes) -> bytes:
    """buf with [start, end) replaced by new; every enclosing length in chain re-measured."""
    if not chain:
        return buf[:start] + new + buf[end:]
    *outer, inner = chain
    payload = buf[inner.start : start] + new + buf[end : inner.end]
    key = onnx_wire.encode_varint(inner.number << 3 | onnx_wire.LEN)
    header = key + onnx_wire.encode_varint(len(payload))
    return _splice(buf, tuple(outer), inner.key_start, inner.end, header + payload)


def _long_varint(value: int, size: int) -> bytes:
    """value in `size` bytes (up to 10 is valid, over-long; 11 is no varint at all)."""
    minimal = onnx_wire.encode_varint(value)
    padded = bytearray(minimal)
    padded[-1] |= 0x80
    padded += b"\x80" * max(0, size - len(minimal) - 1) + b"\x00"
    return bytes(padded)


def _varints(buf: bytes, f: Field) -> list[tuple[int, int]]:
    """[start, end) of each varint in field f: its key, and its value or its length."""
    _, key_end = onnx_wire.read_varint(buf, f.key_start, f.end)
    if f.wire_type == onnx_wire.VARINT:
        return [(f.key_start, key_end), (f.start, f.end)]
    if f.wire_type == onnx_wire.LEN:
        return [(f.key_start, key_end), (key_end, f.start)]
    return [(f.key_start, key_end)]


@FUZZ
@given(data=st.data())
def test_wire_edits(world: World, data: st.DataObject) -> None:
    buf = world.genuine.release
    chain = data.draw(st.sampled_from(world.messages))
    lo, hi = (chain[-1].start, chain[-1].end) if chain else (0, len(buf))
    fields = list(onnx_wire.iter_fields(buf, lo, hi))
    boundaries = [f.key_start for f in fields] + [hi]
    kind = data.draw(st.sampled_from(["insert", "duplicate", "delete", "set", "long", "payload"]))
    if kind == "insert" or not fields:
        number, wire = data.draw(NUMBERS), data.draw(st.sampled_from([0, 1, 2, 5]))
        key = onnx_wire.encode_varint(number << 3 | wire)
        if wire == onnx_wire.VARINT:
            body = onnx_wire.encode_varint(data.draw(VARINTS))
        elif wire == onnx_wire.LEN:
            value = data.draw(st.binary(max_size=40))
            body = onnx_wire.encode_varint(len(value)) + value
        else:
            body = data.draw(
                st.binary(min_size=8 if wire == 1 else 4, max_size=8 if wire == 1 else 4)
            )
        pos = data.draw(st.sampled_from(boundaries))
        mutant = _splice(buf, chain, pos, pos, key + body)
    else:
        f = data.draw(st.sampled_from(fields))
        if kind == "duplicate":
            pos = data.draw(st.sampled_from(boundaries))
            mutant = _splice(buf, chain, pos, pos, buf[f.key_start : f.end])
        elif kind == "delete":
            mutant = _splice(buf, chain, f.key_start, f.end, b"")
        elif kind == "set" and f.wire_type == onnx_wire.VARINT:
            # data_type, elem_type, attribute type, data_location, dims, versions...
            encoded = onnx_wire.encode_varint(data.draw(VARINTS))
            mutant = _splice(buf, chain, f.start, f.end, encoded)
        elif kind in ("set", "long"):
            start, end = data.draw(st.sampled_from(_varints(buf, f)))
            number, _ = onnx_wire.read_varint(buf, start, end)
            size = data.draw(st.integers(end - start + 1, 11))
            mutant = _splice(buf, chain, start, end, _long_varint(number, size))
        elif f.wire_type == onnx_wire.LEN:
            # Strings become any bytes (invalid UTF-8 among them), messages garbage.
            value = data.draw(st.binary(max_size=300))
            (key_start, key_end), _ = _varints(buf, f)
            field = buf[key_start:key_end] + onnx_wire.encode_varint(len(value)) + value
            mutant = _splice(buf, chain, f.key_start, f.end, field)
        else:
            mutant = _splice(
                buf, chain, f.start, f.end, data.draw(st.binary(min_size=1, max_size=10))
            )
    _judge(world, mutant)


# --- protobuf fields, edited on the parsed model -------------------------------------------

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
}
_SPECIAL = [0, 1, -1, 8, 16, 17, 22, 99, 1 << 31, (1 << 31) - 1, -(1 << 31), 1 << 32, 1 << 62]
_SPECIAL += [(1 << 63) - 1, -(1 << 63), (1 << 64) - 1]
_STRINGS = ["", "ai.onnx", "ai.onnx.ml", "com.smuggle", "Relu", "Constant", "frames", "x" * 300]


def _scalars(message: Any, path: tuple[Step, ...] = ()) -> Iterator[Scalar]:
    """(path to a message, scalar field) for every scalar field of every message; enum
    fields are left to the wire edits (a closed enum takes no unknown value in Python)."""
    for field in message.DESCRIPTOR.fields:
        if field.message_type is not None:
            children = getattr(message, field.name)
            if field.is_repeated:
                for i, child in enumerate(children):
                    yield from _scalars(child, (*path, (field.name, i)))
            elif message.HasField(field.name):
                yield from _scalars(children, (*path, (field.name, None)))
        elif field.enum_type is None:
            yield path, field


def _resolve(model: onnx.ModelProto, path: Sequence[Step]) -> Any:
    message: Any = model
    for name, index in path:
        message = getattr(message, name) if index is None else getattr(message, name)[index]
    return message


def _value(data: st.DataObject, field: FieldDescriptor) -> Any:
    if field.type in _INTS:
        lo, hi = _INTS[field.type]
        special = [v for v in _SPECIAL if lo <= v <= hi]
        return data.draw(st.one_of(st.sampled_from(special), st.integers(lo, hi)))
    if field.type == FieldDescriptor.TYPE_STRING:
        return data.draw(st.one_of(st.sampled_from(_STRINGS), st.text(max_size=20)))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return data.draw(st.binary(max_size=100))
    return data.draw(st.floats(width=32 if field.type == FieldDescriptor.TYPE_FLOAT else 64))


@FUZZ
@given(data=st.data())
def test_proto_edits(world: World, data: st.DataObject) -> None:
    model = onnx.ModelProto.FromString(world.genuine.release)
    path, field = data.draw(st.sampled_from(world.scalars))
    message = _resolve(model, path)
    value = _value(data, field)
    if field.is_repeated:
        values = getattr(message, field.name)
        if values and data.draw(st.booleans()):
            values[data.draw(st.integers(0, len(values) - 1))] = value
        else:
            values.append(value)
    else:
        setattr(message, field.name, value)
    _judge(world, model.SerializeToString(deterministic=True))


# --- no descriptor is left open ------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_refused_verifications_leak_no_file_descriptors(world: World, tmp_path: Path) -> None:
    g, key = world.genuine, world.key
    public = key.public_key()
    manifest, signature, files = signed_release(tmp_path, key, g.release, g)
    path = files[MODEL_FILE]
    flipped = bytearray(g.release)
    flipped[world.outside[100]] ^= 0xFF
    bad_file = signed_release(tmp_path / "bad", key, bytes(flipped), g)
    other_graph = signed_release(tmp_path / "pin", key, g.release, g, "0" * 64)

    def wrong_signature() -> None:
        verify_release(manifest, b"\0" * 64, public, files)

    def wrong_size() -> None:  # refused before a byte is read
        path.write_bytes(g.release[:-1])
        verify_release(manifest, signature, public, files)

    def wrong_sha256() -> None:  # refused after the whole file is read
        path.write_bytes(bytes(flipped))
        verify_release(manifest, signature, public, files)

    def a_changed_file_signed() -> None:
        verify_release(*bad_file[:2], public, bad_file[2])

    def not_the_pinned_structure() -> None:
        pin = g.template.structure_hash
        verify_release(*other_graph[:2], public, other_graph[2], structure_hash=pin)

    def not_a_regular_file() -> None:
        path.unlink()
        path.mkdir()
        try:
            verify_release(manifest, signature, public, files)
        finally:
            path.rmdir()

    cases = [
        wrong_signature,
        wrong_size,
        wrong_sha256,
        a_changed_file_signed,
        not_the_pinned_structure,
        not_a_regular_file,
    ]
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        for case in cases:
            with pytest.raises(ManifestRefused):
                case()
    assert len(os.listdir("/proc/self/fd")) <= before
