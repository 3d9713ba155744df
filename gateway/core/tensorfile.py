"""A safetensors file read against a schema: its header checked, its values checked as copied.

    length     8 bytes, little-endian; the JSON header at most header_limit(schema)
    header     valid UTF-8 JSON, no repeated key, __metadata__ strings only; every schema
               tensor exactly once with the schema's dtype and shape, data offsets end to
               end; none the schema lacks; only KEPT_BUFFERS may be absent (they keep the
               previous version's values)
    ties       a tied parameter's other name (Schema.aliases) may be present, with its
               first name's dtype and shape, and must then hold exactly its bytes
    values     finite floats of magnitude at most max_abs, integers within 2**53 - 1

Every refusal is an InvalidInput that names the tensor and says what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from sluice.gateway.core.errors import InvalidInput, bounded
from sluice.gateway.core.records import MAX_SAFE_INT
from sluice.gateway.store.blobs import TempBlob
from sluice.models.schema import Schema, TensorSpec

# State_dict entries an ONNX graph never holds (so a release, and a safetensors exported
# from one, lacks them): absent from the file, they keep the previous version's values.
KEPT_BUFFERS = frozenset({"num_batches_tracked"})
# safetensors dtype -> the schema's dtype string (models/schema.py)
DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "bfloat16", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
_NAMES = {schema: name for name, schema in DTYPES.items()}
_BLOCK_BYTES = 1 << 20  # read and checked at a time: a multiple of every item size
_FLOATS = {"<f2": np.float16, "<f4": np.float32, "<f8": np.float64}
_INTS = {"<i4": np.int32, "<i8": np.int64}

Span = tuple[int, int]  # absolute file offsets [begin, end)


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a checked safetensors file lies."""

    spans: dict[str, Span]  # schema tensors the file holds
    kept: tuple[str, ...]  # schema tensors it lacks (KEPT_BUFFERS only)
    metadata: dict[str, str]
    ties: dict[str, Span]  # a tied parameter's other names the file holds (Schema.aliases)


def _names(schema: Schema) -> list[str]:
    return [t.name for t in schema.tensors] + [alias for alias, _ in schema.aliases]


def header_limit(schema: Schema) -> int:
    """Largest safetensors JSON header accepted for this schema: each tensor's entry (and
    each tied name's), with room for escaped names and padding, plus 64 KiB of metadata."""
    return (64 << 10) + sum(6 * len(name.encode()) + 256 for name in _names(schema))


def max_file_bytes(schema: Schema) -> int:
    specs = {t.name: t for t in schema.tensors}
    tied = sum(specs[first].num_bytes for _, first in schema.aliases)
    return 8 + header_limit(schema) + schema.payload_bytes + tied


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json keeps the last of a repeated key)."""
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise InvalidInput(f"safetensors header: key {bounded(key)!r} appears twice")
        doc[key] = value
    return doc


def _no_constant(name: str) -> None:
    raise InvalidInput(f"safetensors header: {name} is not JSON")


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, not float


def parse_layout(raw: bytes, schema: Schema, data_bytes: int) -> Layout:
    """Check a safetensors JSON header against the schema; raises InvalidInput saying what
    is wrong. raw is the header (the N bytes after the length); data_bytes what follows."""
    try:
        doc = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"safetensors header is not JSON: {bounded(str(exc), 120)}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("safetensors header: expected a JSON object")
    entries: dict[str, Any] = doc  # JSON object keys are strings
    metadata = entries.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidInput("safetensors header: __metadata__ must map strings to strings")
    specs = {t.name: t for t in schema.tensors}
    alias_of = schema.alias_of
    extra = [name for name in entries if name not in specs and name not in alias_of]
    if extra:
        raise InvalidInput(
            f"the file holds {len(extra)} tensors the model does not have, such as "
            f"{bounded(extra[0])!r}"
        )
    missing = [t.name for t in schema.tensors if t.name not in entries]
    needed = [n for n in missing if n.rsplit(".", 1)[-1] not in KEPT_BUFFERS]
    if needed:
        raise InvalidInput(
            f"the file lacks {len(needed)} tensors of the model, such as {needed[0]!r}"
        )
    for name in entries:
        if name in alias_of and alias_of[name] not in entries:
            raise InvalidInput(
                f"tensor {name!r} is another name of {alias_of[name]!r} (tied), which the "
                "file lacks: a tied parameter travels under its first name"
            )
    # A tied name is placed as its first name's tensor: same dtype, shape and size.
    placed = sorted(
        (_place(name, entry, specs[alias_of.get(name, name)]), name)
        for name, entry in entries.items()
    )
    pos = 0
    for (begin, end), name in placed:
        if begin != pos:
            raise InvalidInput(
                f"tensor {name!r} starts at data offset {begin}, expected {pos}: tensors lie "
                "end to end, without gaps or overlaps"
            )
        pos = end
    if pos != data_bytes:
        raise InvalidInput(
            f"the tensors hold {pos} bytes; the file has {data_bytes} after its header"
        )
    start = 8 + len(raw)
    spans = {name: (start + begin, start + end) for (begin, end), name in placed}
    ties = {name: spans.pop(name) for name in list(spans) if name in alias_of}
    return Layout(spans, tuple(missing), metadata, ties)


def _place(name: str, entry: object, spec: TensorSpec) -> Span:
    """An entry's data_offsets, once its dtype and shape are the schema's."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidInput(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or DTYPES.get(dtype) != spec.dtype:
        got = bounded(dtype) if isinstance(dtype, str) else type(dtype).__name__
        raise InvalidInput(
            f"tensor {name!r}: dtype {got!r}, expected {_NAMES.get(spec.dtype, spec.dtype)}"
        )
    if not isinstance(shape, list) or not all(map(_is_int, shape)):
        raise InvalidInput(f"tensor {name!r}: shape must be a list of integers")
    if tuple(shape) != spec.shape:
        raise InvalidInput(
            f"tensor {name!r}: shape {bounded(str(shape))}, expected {list(spec.shape)}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise InvalidInput(f"tensor {name!r}: data_offsets must be two integers")
    begin, end = offsets
    if end - begin != spec.num_bytes:
        raise InvalidInput(
            f"tensor {name!r}: data_offsets span {end - begin} bytes; {spec.num_bytes} expected"
        )
    return begin, end


class HeadReader:
    """Collects a safetensors file's length and JSON header from its chunks as they come,
    and checks it as soon as all of it is in, before the data arrives."""

    def __init__(self, schema: Schema, model: str, file_bytes: int) -> None:
        self.schema = schema
        self.model = model
        self.file_bytes = file_bytes
        self._head = bytearray()

    def feed(self, data: bytes) -> Layout | None:
        """The checked layout once the header is whole, None until then."""
        head, view = self._head, memoryview(data)
        if len(head) < 8:
            take = 8 - len(head)
            head += view[:take]
            view = view[take:]
            if len(head) < 8:
                return None
            size, limit = int.from_bytes(head[:8], "little"), header_limit(self.schema)
            if size > limit:
                raise InvalidInput(
                    f"safetensors header of {size} bytes; one for {self.model!r} is at most {limit}"
                )
            if 8 + size > self.file_bytes:
                raise InvalidInput(
                    f"safetensors header of {size} bytes in a {self.file_bytes}-byte file"
                )
        want = 8 + int.from_bytes(head[:8], "little")
        head += view[: want - len(head)]
        if len(head) < want:
            return None
        return parse_layout(bytes(head[8:]), self.schema, self.file_bytes - want)


def check_ties(src: BinaryIO, layout: Layout, schema: Schema) -> None:
    """Each tied name the file holds has exactly its first name's bytes (a tied parameter
    is one tensor: two values under its names would be two models)."""
    for alias, (begin, end) in layout.ties.items():
        first = schema.alias_of[alias]
        other = layout.spans[first][0]
        done = 0
        while done < end - begin:
            size = min(_BLOCK_BYTES, end - begin - done)
            src.seek(begin + done)
            a = src.read(size)
            src.seek(other + done)
            if len(a) != size or a != src.read(size):
                raise InvalidInput(
                    f"tensors {first!r} and {alias!r} are tied (one parameter), but the file "
                    "holds different values under them"
                )
            done += size


def check_values(spec: TensorSpec, raw: bytes, index: int, max_abs: float) -> None:
    """Refuse a non-finite or out-of-range value; index: the block's first element."""
    if spec.dtype in _INTS:
        values: np.ndarray = np.frombuffer(raw, dtype=_INTS[spec.dtype])
        bound, what = float(MAX_SAFE_INT), f"integers of magnitude at most {MAX_SAFE_INT}"
        ok = np.abs(values.astype(np.float64)) <= bound
    else:
        if spec.dtype == "bfloat16":  # the upper half of a float32: exact, without ml_dtypes
            halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            values = halves.view(np.float32)
        elif spec.dtype in _FLOATS:
            values = np.frombuffer(raw, dtype=_FLOATS[spec.dtype])
        else:
            raise InvalidInput(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be imported")
        bound, what = max_abs, f"finite values of magnitude at most {max_abs:g}"
        ok = np.abs(values.astype(np.float64)) <= bound  # NaN compares false
    if not ok.all():
        bad = int(np.argmin(ok))
        raise InvalidInput(
            f"tensor {spec.name!r}: element {index + bad} is {values[bad]}; a base holds {what}"
        )


def copy_checked(
    src: BinaryIO, start: int, spec: TensorSpec, out: TempBlob, max_abs: float
) -> None:
    """Copy one tensor from src at start into out, checking every value on the way."""
    item = spec.num_bytes // max(spec.num_elements, 1)
    src.seek(start)
    done = 0
    while done < spec.num_bytes:
        raw = src.read(min(_BLOCK_BYTES, spec.num_bytes - done))
        if not raw:
            raise OSError(f"{src.name} ended while tensor {spec.name!r} was read")
        check_values(spec, raw, done // item, max_abs)
        out.write(raw)
        done += len(raw)
