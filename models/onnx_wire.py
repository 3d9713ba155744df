"""A minimal protobuf wire walker that finds each ONNX initializer's raw_data byte range."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5

# Field numbers from onnx.proto (stable since IR version 1).
MODEL_GRAPH = 7  # ModelProto.graph
GRAPH_INITIALIZER = 5  # GraphProto.initializer (repeated TensorProto)
TENSOR_NAME = 8  # TensorProto.name
TENSOR_RAW_DATA = 9  # TensorProto.raw_data

_MAX_VARINT_BYTES = 10
# Fields a walk of one untrusted file may visit. A real model has a few per node and per
# initializer; junk fields cost ~15 us each in Python, so this bounds a walk to seconds
# (upb parses such junk in C, the walker must not be the slow way to refuse a file).
MAX_FIELDS = 1 << 18


class TooManyFields(ValueError):
    """A walk met more fields than MAX_FIELDS: refused, not walked to the end."""


class Budget:
    """Fields left for one walk; shared by every message the walk enters."""

    def __init__(self, fields: int = MAX_FIELDS) -> None:
        self.left = fields

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise TooManyFields(f"more than {MAX_FIELDS} protobuf fields")


@dataclass(frozen=True)
class Field:
    """One field of a message; [start, end) is its payload (the varint, fixed or LEN bytes)."""

    number: int
    wire_type: int
    start: int
    end: int
    value: int  # the decoded varint / fixed value; the payload length for LEN fields
    key_start: int = 0  # where the field's key varint begins: [key_start, end) is the field


@dataclass(frozen=True)
class InitializerSpan:
    """A graph initializer and the [start, end) offsets of its raw_data bytes in the file."""

    name: str
    start: int
    end: int


def _show(name: str) -> str:
    """A name from the file for a message: quoted, and cut short if it is long."""
    return repr(name) if len(name) <= 64 else f"{name[:64]!r}... ({len(name)} chars)"


def read_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at pos; return (value, position after it)."""
    end = min(end, len(buf))  # an end past the buffer is the buffer's end, not an IndexError
    if pos < 0:  # buf[-1] would read from the end
        raise ValueError(f"varint at negative offset {pos}")
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise ValueError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            # A 10th byte may only carry the top bit of a 64-bit value.
            if i == _MAX_VARINT_BYTES - 1 and byte > 1:
                raise ValueError(f"varint over 64 bits ending at byte {pos}")
            return value, pos
    raise ValueError(f"varint longer than {_MAX_VARINT_BYTES} bytes ending at byte {pos}")


def iter_fields(
    buf: bytes | memoryview, start: int = 0, end: int | None = None, budget: Budget | None = None
) -> Iterator[Field]:
    """Walk the fields of one message occupying buf[start:end], in file order.

    Raises ValueError on anything that is not well-formed wire format: truncation,
    field number 0, group wire types (unused by ONNX), or lengths past the message end.
    """
    stop = len(buf) if end is None else end
    if not 0 <= start <= stop <= len(buf):
        raise ValueError(f"message range [{start}, {stop}) outside a buffer of {len(buf)} bytes")
    pos = start
    while pos < stop:
        if budget is not None:
            budget.spend()
        key_start = pos
        key, pos = read_varint(buf, pos, stop)
        number, wire_type = key >> 3, key & 0x7
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        if wire_type == VARINT:
            value, after = read_varint(buf, pos, stop)
            yield Field(number, wire_type, pos, after, value, key_start)
            pos = after
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if pos + size > stop:
                raise ValueError(f"field {number}: truncated fixed{size * 8} at byte {pos}")
            value = int.from_bytes(bytes(buf[pos : pos + size]), "little")
            yield Field(number, wire_type, pos, pos + size, value, key_start)
            pos += size
        elif wire_type == LEN:
            length, pos = read_varint(buf, pos, stop)
            if pos + length > stop:
                raise ValueError(
                    f"field {number}: length {length} at byte {pos} runs past the "
                    f"enclosing message end {stop}"
                )
            yield Field(number, wire_type, pos, pos + length, length, key_start)
            pos += length
        else:
            raise ValueError(f"field {number}: unsupported wire type {wire_type} at byte {pos}")


def _only_len_field(
    buf: bytes | memoryview, start: int, end: int, number: int, what: str, budget: Budget
) -> Field:
    """The single LEN field `number` of a message; protobuf would merge repeats, we refuse."""
    found: Field | None = None
    for f in iter_fields(buf, start, end, budget):
        if f.number == number:
            if found is not None:  # stop at the second: no list of a million repeats
                raise ValueError(f"{what}: expected exactly one field {number}, found more")
            found = f
    if found is None:
        raise ValueError(f"{what}: expected exactly one field {number}, found 0")
    if found.wire_type != LEN:
        raise ValueError(f"{what}: field {number} has wire type {found.wire_type}, not LEN")
    return found


def initializer_spans(
    model: bytes | memoryview, budget: Budget | None = None
) -> tuple[InitializerSpan, ...]:
    """Every graph initializer of a serialized ModelProto with its raw_data byte range.

    In file order. Each initializer must have exactly one name and exactly one raw_data
    field, and names must be unique; anything else raises ValueError, because a caller
    that rewrites or checks these ranges must not be able to be fooled by repeats.
    """
    budget = budget or Budget()
    graph = _only_len_field(model, 0, len(model), MODEL_GRAPH, "ModelProto", budget)
    spans: list[InitializerSpan] = []
    seen: set[str] = set()
    for init in iter_fields(model, graph.start, graph.end, budget):
        if init.number != GRAPH_INITIALIZER:
            continue
        what = f"initializer #{len(spans)}"
        if init.wire_type != LEN:
            raise ValueError(f"{what}: wire type {init.wire_type}, not LEN")
        name_field = _only_len_field(model, init.start, init.end, TENSOR_NAME, what, budget)
        try:
            name = bytes(model[name_field.start : name_field.end]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what}: name is not valid UTF-8") from exc
        raw = _only_len_field(
            model, init.start, init.end, TENSOR_RAW_DATA, f"initializer {_show(name)}", budget
        )
        if name in seen:
            raise ValueError(f"initializer {_show(name)} appears more than once")
        seen.add(name)
        spans.append(InitializerSpan(name, raw.start, raw.end))
    return tuple(spans)


def encode_varint(value: int) -> bytes:
    """The minimal (canonical) varint encoding of a non-negative value."""
    if value < 0:  # >> never reaches 0 for a negative int: this would loop forever
        raise ValueError(f"varint of negative value {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class NotCanonical(ValueError):
    """A key or length varint that a canonical encoder would have written shorter."""


def _header(buf: bytes | memoryview, field: Field, length: int) -> bytes:
    """field's key and a new length, after checking its own key and length were minimal."""
    key = encode_varint((field.number << 3) | LEN)
    if bytes(buf[field.key_start : field.start]) != key + encode_varint(field.value):
        raise NotCanonical(f"field {field.number} at byte {field.key_start}: non-minimal varint")
    return key + encode_varint(length)


def _rebuild(
    buf: bytes | memoryview,
    start: int,
    end: int,
    number: int,
    inner: Callable[[Field], bytes],
    budget: Budget,
) -> bytes:
    """The message buf[start:end] with every LEN field `number` replaced by inner(field)."""
    out = bytearray()
    for f in iter_fields(buf, start, end, budget):
        if f.number == number and f.wire_type == LEN:
            payload = inner(f)
            out += _header(buf, f, len(payload))
            out += payload
        else:
            out += buf[f.key_start : f.end]
    return bytes(out)


def elide_raw_data(model: bytes | memoryview) -> tuple[bytes, tuple[InitializerSpan, ...]]:
    """model with every graph initializer's raw_data emptied, and those raw_data ranges.

    The skeleton is what a parser needs to check everything but the weight values, at a
    fraction of the memory: it parses to the same message with empty raw_data. The model
    is its own canonical encoding exactly when the skeleton is and every rewritten key and
    length (the graph, each initializer, each raw_data) was minimal: NotCanonical otherwise.
    Raises ValueError where initializer_spans does (repeats, malformed wire format), and
    TooManyFields past MAX_FIELDS fields in all.
    """
    budget = Budget()  # one for the whole walk: TooManyFields past MAX_FIELDS
    spans = initializer_spans(model, budget)

    def tensor(f: Field) -> bytes:
        return _rebuild(model, f.start, f.end, TENSOR_RAW_DATA, lambda raw: b"", budget)

    def graph(f: Field) -> bytes:
        return _rebuild(model, f.start, f.end, GRAPH_INITIALIZER, tensor, budget)

    return _rebuild(model, 0, len(model), MODEL_GRAPH, graph, budget), spans
