"""The parse-level artifact check: an ONNX file holds the expected weights and nothing else."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import defs, helper

from sluice.models import onnx_wire
from sluice.models.schema import numpy_dtype
from sluice.models.zero_runs import ZERO_RUNS

# How a caller may name the default domain in allowed_ops. A file spells it one way only:
# "", as torch's exporter writes it in nodes and opset_import.
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
_MAX_SINGLE_FILE_BYTES = (2 << 30) - 1  # protobuf cannot parse a message this large
_SHOWN_CHARS = 64  # of a file-controlled string in a refusal
_INT64_END = 1 << 63

# Fields each message may carry; everything else (doc_string, metadata_props,
# sparse_initializer, functions, training_info, quantization annotations, device
# configurations, overloads, denotations, ...) is refused wherever it appears.
_MODEL_FIELDS = frozenset(
    {"ir_version", "opset_import", "producer_name", "producer_version", "domain", "model_version"}
    | {"graph"}
)
_GRAPH_FIELDS = frozenset({"node", "name", "initializer", "input", "output", "value_info"})
_NODE_FIELDS = frozenset({"input", "output", "name", "op_type", "domain", "attribute"})
_VALUE_INFO_FIELDS = frozenset({"name", "type"})
_TYPE_FIELDS = frozenset({"tensor_type"})
_TENSOR_TYPE_FIELDS = frozenset({"elem_type", "shape"})
_DIM_FIELDS = frozenset({"dim_value", "dim_param"})
_OPSET_FIELDS = frozenset({"domain", "version"})
_WEIGHT_FIELDS = frozenset({"name", "dims", "data_type", "raw_data"})
_EXTERNAL_WEIGHT_FIELDS = frozenset({"name", "dims", "data_type", "data_location", "external_data"})
_CONSTANT_TENSOR_FIELDS = frozenset({"name", "dims", "data_type", "raw_data"})
_EXTERNAL_KEYS = ("location", "offset", "length")

_T = onnx.TensorProto
# Bytes per element of the fixed-width types a Constant or a weight may hold in raw_data.
# Any other data_type (UNDEFINED, STRING, the packed sub-byte types, a value no ONNX
# version defines such as 99) is refused here, never looked up anywhere else.
_ITEM_BYTES: dict[int, int] = {
    _T.FLOAT: 4,
    _T.UINT8: 1,
    _T.INT8: 1,
    _T.UINT16: 2,
    _T.INT16: 2,
    _T.INT32: 4,
    _T.INT64: 8,
    _T.BOOL: 1,
    _T.FLOAT16: 2,
    _T.DOUBLE: 8,
    _T.UINT32: 4,
    _T.UINT64: 8,
    _T.COMPLEX64: 8,
    _T.COMPLEX128: 16,
    _T.BFLOAT16: 2,
    _T.FLOAT8E4M3FN: 1,
    _T.FLOAT8E4M3FNUZ: 1,
    _T.FLOAT8E5M2: 1,
    _T.FLOAT8E5M2FNUZ: 1,
    _T.FLOAT8E8M0: 1,
}
# Element types a value_info may declare: any this onnx version defines, but UNDEFINED.
_ELEM_TYPES = frozenset(_T.DataType.values()) - {_T.UNDEFINED}

_A = onnx.AttributeProto
# The one field that holds an attribute's value, per attribute type we accept at all.
_ATTRIBUTE_VALUE_FIELD = {
    _A.FLOAT: "f",
    _A.INT: "i",
    _A.STRING: "s",
    _A.TENSOR: "t",
    _A.FLOATS: "floats",
    _A.INTS: "ints",
    _A.STRINGS: "strings",
}

# OpSchema's attribute type enum -> AttributeProto's, for the types we accept.
_SCHEMA_ATTRIBUTE_TYPES = {
    getattr(defs.OpSchema.AttrType, _A.AttributeType.Name(t)): t for t in _ATTRIBUTE_VALUE_FIELD
}


class ArtifactRefused(ValueError):
    """The file is not an artifact the gateway may publish; the message says what and where."""


@dataclass(frozen=True)
class StructureLimits:
    """How much an accepted file may hold, in all, outside its weights' values.

    Per item, inspect_onnx's max_constant_bytes and max_string_bytes apply; these bound
    counts and totals, so that the format check alone has a stated capacity
    (capacity_bytes). The defaults accept the DriveNet family (6.5 KB of structure at any
    width) and transformer encoders exported by torch up to about 6 layers (2 layers:
    19.7 KB and a third of every total; 6 layers: 58 KB); a 98,304-byte video frame fits
    through none of them. A bigger graph needs limits of its own, and a capacity to match.
    """

    structure_bytes: int = 64 << 10  # the file less its weights' raw_data; two-file: model.onnx
    nodes: int = 1024  # graph.node entries
    node_arity: int = 64  # inputs, and outputs, of a node whose op has no smaller maximum
    graph_inputs: int = 64  # graph.input entries
    graph_outputs: int = 64  # graph.output entries
    value_infos: int = 1024  # graph.value_info entries
    dims: int = 8  # dims of one value's type, one Constant tensor or one weight
    total_dims: int = 4096  # dims of all of those together
    name_bytes: int = 48 << 10  # UTF-8 bytes of all names, ops, domains, dim_params, keys
    header_bytes: int = 64  # each of producer_name, producer_version, model domain, graph name
    constant_bytes: int = 4096  # values of all Constant nodes together
    attribute_bytes: int = 8192  # values (ints, floats, strings) of all other attributes


def capacity_bytes(limits: StructureLimits) -> int:
    """An upper bound on the bytes of free-form content a file that inspect_onnx accepts
    under `limits` can carry outside its weights' values.

    Sound because everything in an accepted file but those values is its structure (the
    weights' raw_data sit where the structure's own length fields put them, and their
    names, dims and types are structure too), and the structure is at most
    limits.structure_bytes = n bytes. There are fewer than 256**(n + 1) byte strings of
    at most n bytes, so whatever a file carries besides weight values is at most n + 1
    bytes (the 1: the choice of length). The other limits bound channels inside the
    structure (names, attribute and Constant values, dims); each is smaller, and they are
    not added. Not bounded here: the weight values themselves. Their low bits are a
    channel that k and central DP bound (bench/lowbits.py measures it), and whoever signs
    the manifest chooses which weights there are, which only a structure hash pinned by
    the receiver (clients.verify.verify_release) holds fixed.
    """
    return limits.structure_bytes + 1


class WeightSpec(Protocol):
    """A tensor the file must hold (models.schema.TensorSpec is one)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...  # numpy dtype string, little-endian ("<f4"), or "bfloat16"


class _Range(Protocol):
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


@dataclass(frozen=True)
class ArtifactReport:
    """What inspect_onnx found in a file it accepted."""

    ranges: tuple[onnx_wire.InitializerSpan, ...]  # weights' raw_data, file order; () if external
    structure_hash: str  # sha256 of the file with every range zeroed
    ops: frozenset[tuple[str, str]]  # (domain, op_type), the default domain as ""
    external_data_bytes: int  # exact size the external data file must have; 0 for one file
    structure_bytes: int  # the file less its weights' raw_data (StructureLimits.structure_bytes)


def outside_graph_description(weights: Sequence[WeightSpec], outside: Collection[str]) -> bytes:
    """The tensors a two-file release's data file holds outside the graph, as structure:
    name, dims, dtype and offset of each, in data-file order (canonical JSON); b"" for none.

    It is part of the structure hash, so a pinned structure hash pins them too, and it
    counts against StructureLimits.structure_bytes like the graph's own structure."""
    if not outside:
        return b""
    entries, pos = [], 0
    for spec in weights:
        if spec.name in outside:
            entries.append([spec.name, [int(d) for d in spec.shape], spec.dtype, pos])
        pos += tensor_bytes(spec)
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode()


def structure_hash(
    data: bytes | memoryview, ranges: Iterable[_Range], outside_graph: bytes = b""
) -> str:
    """Hex sha256 of data with every weight range zeroed: the same for any weight values.

    ranges are in file order and do not overlap (a template's, or inspect_onnx's).
    outside_graph: outside_graph_description() of a two-file release; b"" leaves the hash
    what it was before tensors outside the graph existed.
    """
    digest = hashlib.sha256()
    view = memoryview(data)
    pos = 0
    for r in ranges:
        if not pos <= r.start <= r.end <= len(view):
            raise ValueError(f"range [{r.start}, {r.end}) is out of order or past the end")
        digest.update(view[pos : r.start])
        digest = ZERO_RUNS.feed(digest, r.end - r.start)  # remembered: the same every release
        pos = r.end
    digest.update(view[pos:])
    if outside_graph:
        digest.update(b"\0sluice outside-graph tensors\0" + outside_graph)
    return digest.hexdigest()


def tensor_bytes(spec: WeightSpec) -> int:
    """Bytes of the tensor's raw little-endian values (exact: no int64 overflow)."""
    return math.prod(int(d) for d in spec.shape) * numpy_dtype(spec.dtype).itemsize


def _onnx_type(spec: WeightSpec) -> int:
    where = f"expected weight {_show(spec.name)}"
    try:
        dtype = numpy_dtype(spec.dtype)  # "bfloat16": ml_dtypes' type, as onnx maps it
    except TypeError as exc:
        raise ArtifactRefused(f"{where}: {_show(str(spec.dtype))} is not a dtype") from exc
    if dtype.byteorder == ">":
        raise ArtifactRefused(f"tensor {spec.name!r}: big-endian {spec.dtype} has no ONNX layout")
    try:
        data_type = int(helper.np_dtype_to_tensor_dtype(dtype))
    except (KeyError, TypeError, ValueError):
        data_type = _T.UNDEFINED
    if _ITEM_BYTES.get(data_type) != dtype.itemsize:
        raise ArtifactRefused(f"{where}: dtype {dtype.str} has no fixed-width ONNX type")
    return data_type


def check_weight_specs(weights: Sequence[WeightSpec]) -> None:
    """Refuse (ArtifactRefused) a list of expected weights that no file could match:
    names twice or not strings, dims that are not non-negative integers, dtypes with no
    fixed-width little-endian ONNX type. inspect_onnx runs it first; the global team runs
    it on a manifest's description, to blame the manifest rather than the file."""
    seen: set[str] = set()
    for spec in weights:
        if not isinstance(spec.name, str):
            raise ArtifactRefused(f"expected weight name {_show(str(spec.name))} is not a string")
        if spec.name in seen:
            raise ArtifactRefused(f"expected weights name {spec.name!r} twice")
        seen.add(spec.name)
        if not isinstance(spec.shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < _INT64_END
            for d in spec.shape
        ):
            raise ArtifactRefused(
                f"expected weight {_show(spec.name)}: shape {_show(str(spec.shape))} is not "
                "a tuple of non-negative int64 values"
            )
        _onnx_type(spec)


def _from_buffer(data: bytes | memoryview) -> onnx.ModelProto:
    model = onnx.ModelProto()
    # upb parses any buffer; bytes(data) would copy a file of up to 2 GiB once more.
    model.ParseFromString(data)  # type: ignore[arg-type]
    return model


def _parse(data: bytes | memoryview, elided: bool = False) -> onnx.ModelProto:
    try:
        model = _from_buffer(data)
    except Exception as exc:  # upb raises its own DecodeError type; any failure is a refusal
        raise ArtifactRefused(f"not a parseable ONNX ModelProto: {_clip(str(exc))}") from exc
    # Canonical form: unknown fields, a scalar given twice (the parser keeps the last),
    # a message given twice (the parser merges), packed or reordered fields, over-long
    # varints and trailing bytes all make the re-encoding differ from the input.
    model.DiscardUnknownFields()
    canonical = model.SerializeToString(deterministic=True)
    first = _first_difference(canonical, data)
    if first is not None:
        where = " (with its raw_data elided)" if elided else ""
        raise ArtifactRefused(
            f"file is not the canonical encoding of its own content{where} ({len(data)} "
            f"bytes, canonical {len(canonical)}, first difference at byte {first}): unknown "
            "fields, repeated scalars or trailing bytes"
        )
    return model


def _check_structure_bytes(size: int, limits: StructureLimits) -> int:
    if size > limits.structure_bytes:
        raise ArtifactRefused(
            f"file: {size} bytes outside the weights' values, more than the "
            f"{limits.structure_bytes} allowed (limit structure_bytes)"
        )
    return size


def _span_bytes(spans: Iterable[onnx_wire.InitializerSpan]) -> int:
    return sum(s.end - s.start for s in spans)


def _parse_skeleton(
    data: bytes | memoryview, external: bool
) -> tuple[onnx.ModelProto, tuple[onnx_wire.InitializerSpan, ...] | None]:
    """The parsed model and, for the single-file layout, its initializers' raw_data spans.

    A single file is parsed with every initializer's raw_data elided (onnx_wire): the same
    checks on the same message, without two more copies of the weights. Where it cannot be
    elided (no or repeated raw_data, malformed wire format), the whole file is parsed, so
    the refusal names what the parser finds (such a file is always refused: its spans
    cannot be found).
    """
    if len(data) > _MAX_SINGLE_FILE_BYTES:
        raise ArtifactRefused(f"file of {len(data)} bytes is over protobuf's 2 GiB limit")
    if not external:
        try:
            skeleton, spans = onnx_wire.elide_raw_data(data)
        except onnx_wire.NotCanonical as exc:
            raise ArtifactRefused(
                f"file is not the canonical encoding of its own content: {exc}"
            ) from exc
        except onnx_wire.TooManyFields as exc:  # refused at once, never walked to the end
            raise ArtifactRefused(f"not a model this check accepts: {exc}") from exc
        except ValueError:
            pass  # refused below by the full parse, or by the initializer checks
        else:
            return _parse(skeleton, elided=True), spans
    return _parse(data), None


def _first_difference(a: bytes | memoryview, b: bytes | memoryview) -> int | None:
    """Offset of the first byte where a and b differ, None if they are equal."""
    n = min(len(a), len(b))
    x = np.frombuffer(a, dtype=np.uint8, count=n)
    y = np.frombuffer(b, dtype=np.uint8, count=n)
    if np.array_equal(x, y):
        return None if len(a) == len(b) else n
    return int(np.argmax(x != y))


def _present(message: Any) -> list[str]:
    """Names of the fields set in message, read without copying any bytes value."""
    found = []
    for field in message.DESCRIPTOR.fields:
        if field.is_repeated:
            if len(getattr(message, field.name)):
                found.append(field.name)
        elif message.HasField(field.name):
            found.append(field.name)
    return found


def _only(message: Any, allowed: frozenset[str], where: str) -> None:
    for name in _present(message):
        if name not in allowed:
            raise ArtifactRefused(f"{where}: {name} is not allowed")


def _show(text: str | bytes) -> str:
    """A file-controlled string for a message: quoted, and cut short if it is long."""
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}... ({len(text)} chars)"


def _clip(text: str | bytes) -> str:
    """Like _show, unquoted where the text is a plain string (an op name in a message)."""
    if isinstance(text, bytes):
        return _show(text)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} chars)"


def _show_list(values: Sequence[object], most: int = 8) -> str:
    """A list from the file for a message: at most `most` items, each cut short."""
    shown = [_show(v) if isinstance(v, str | bytes) else _clip(str(v)) for v in values[:most]]
    more = [f"... ({len(values)} in all)"] if len(values) > most else []
    return "[" + ", ".join(shown + more) + "]"


def _domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


def op_set(data: bytes | memoryview) -> frozenset[tuple[str, str]]:
    """The (domain, op_type) pairs of a model's graph; a template's is the allowed set.

    Parsed without the initializers' raw_data where the layout allows: the weights are
    never read (a mapped template's stay on disk). Bytes that are no model raise
    ArtifactRefused, whatever they hold."""
    try:
        try:
            skeleton, _ = onnx_wire.elide_raw_data(data)
        except ValueError:
            skeleton = bytes(data) if isinstance(data, memoryview) else data
        model = _from_buffer(skeleton)
        ops = frozenset((_domain(n.domain), n.op_type) for n in model.graph.node)
    except Exception as exc:  # upb's DecodeError is no ValueError: any failure is a refusal
        raise ArtifactRefused(f"not a parseable ONNX ModelProto: {type(exc).__name__}") from exc
    if not all(isinstance(part, str) for op in ops for part in op):
        raise ArtifactRefused("an op_type or domain of the graph is not valid UTF-8")
    return ops


class _Tally:
    """One file's running totals against its limits; refuses as soon as one is passed."""

    def __init__(self, limits: StructureLimits, max_string_bytes: int) -> None:
        self.limits = limits
        self.max_string_bytes = max_string_bytes
        self.used: dict[str, int] = {}

    def add(self, limit: str, amount: int, where: str) -> None:
        """Count amount against the StructureLimits field `limit`."""
        total = self.used.get(limit, 0) + amount
        self.used[limit] = total
        allowed = getattr(self.limits, limit)
        if total > allowed:
            raise ArtifactRefused(
                f"{where}: {total} in all, more than the {allowed} allowed (limit {limit})"
            )

    def count(self, limit: str, found: int, where: str) -> None:
        """A count that must not pass the StructureLimits field `limit` (O(1): no walk)."""
        allowed = getattr(self.limits, limit)
        if found > allowed:
            raise ArtifactRefused(
                f"{where}: {found} entries, more than the {allowed} allowed (limit {limit})"
            )

    def name(self, value: str | bytes, where: str, header: bool = False) -> None:
        """A name or identifier: valid UTF-8, short, and counted in name_bytes."""
        size = _text_bytes(value, where)
        most = self.max_string_bytes
        if header and self.limits.header_bytes < most:
            most = self.limits.header_bytes
        if size > most:
            bound = " (limit header_bytes)" if most == self.limits.header_bytes else ""
            raise ArtifactRefused(f"{where}: length {size}, more than the {most} allowed{bound}")
        self.add("name_bytes", size, where)

    def dims(self, count: int, where: str) -> None:
        """How many dims one tensor or tensor type has: few, and counted in total_dims."""
        if count > self.limits.dims:
            raise ArtifactRefused(
                f"{where}: {count} dims, more than the {self.limits.dims} allowed (limit dims)"
            )
        self.add("total_dims", count, where)


def _text_bytes(value: str | bytes, where: str) -> int:
    """UTF-8 length of a string field (upb gives bytes where the file's are not UTF-8)
    or of a bytes field that must hold text (a STRING attribute)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8"))
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactRefused(f"{where}: {_show(value)} is not valid UTF-8") from None
    return len(value)


def _check_opset(model: onnx.ModelProto, tally: _Tally) -> int:
    if len(model.opset_import) != 1:
        found = _show_list([f"{_clip(o.domain)} v{o.version}" for o in model.opset_import[:8]])
        raise ArtifactRefused(f"opset_import: expected only the default domain, found {found}")
    opset = model.opset_import[0]
    _only(opset, _OPSET_FIELDS, "opset_import[0]")
    _check_domain(opset.domain, "opset_import", tally)
    if opset.domain != "":
        raise ArtifactRefused(f"opset_import: domain {_show(opset.domain)} is not allowed")
    if not 1 <= opset.version <= defs.onnx_opset_version():
        raise ArtifactRefused(f"opset_import: version {opset.version} is not a known opset")
    return int(opset.version)


def _check_domain(domain: str | bytes, where: str, tally: _Tally) -> None:
    tally.name(domain, f"{where} domain")
    if domain == "ai.onnx":  # one spelling per file: a second would be a bit to hide
        raise ArtifactRefused(f"{where}: the default domain is spelled '' here, not 'ai.onnx'")


def _check_value_info(info: onnx.ValueInfoProto, where: str, tally: _Tally) -> None:
    _only(info, _VALUE_INFO_FIELDS, where)
    tally.name(info.name, f"{where} name")
    if not info.HasField("type"):
        return
    _only(info.type, _TYPE_FIELDS, f"{where} type")
    tensor_type = info.type.tensor_type
    _only(tensor_type, _TENSOR_TYPE_FIELDS, f"{where} type")
    if tensor_type.elem_type not in _ELEM_TYPES:
        raise ArtifactRefused(f"{where} type: elem_type {tensor_type.elem_type} is not a data type")
    dims = tensor_type.shape.dim
    tally.dims(len(dims), f"{where} type")  # before the walk: a million dims are not visited
    for i, dim in enumerate(dims):
        _only(dim, _DIM_FIELDS, f"{where} dim {i}")
        if dim.dim_value < 0:
            raise ArtifactRefused(f"{where} dim {i}: negative dim_value {dim.dim_value}")
        tally.name(dim.dim_param, f"{where} dim {i} dim_param")


def _constant_bytes(
    attr: onnx.AttributeProto, where: str, max_constant_bytes: int, tally: _Tally
) -> int:
    """Bytes of a Constant node's value; its tensor must be a plain raw_data tensor."""
    if attr.type == _A.TENSOR:
        t = attr.t
        _only(t, _CONSTANT_TENSOR_FIELDS, f"{where} tensor")
        tally.name(t.name, f"{where} tensor name")
        itemsize = _ITEM_BYTES.get(t.data_type)
        if itemsize is None:
            raise ArtifactRefused(f"{where}: tensor data_type {t.data_type} is not allowed")
        tally.dims(len(t.dims), f"{where} tensor")
        if any(d < 0 for d in t.dims):
            raise ArtifactRefused(f"{where}: negative dims {_show_list(t.dims)}")
        size = math.prod(t.dims) * itemsize  # Python ints: dims whose product wraps int64 fail
        # A value over max_constant_bytes is refused by the caller, its raw_data never read.
        if size <= max_constant_bytes and len(t.raw_data) != size:
            raise ArtifactRefused(
                f"{where}: raw_data holds {len(t.raw_data)} bytes, dims "
                f"{_show_list(t.dims)} need {size}"
            )
        return size
    if attr.type == _A.STRING:
        return _text_bytes(attr.s, where)
    if attr.type == _A.STRINGS:
        return sum(_text_bytes(s, where) for s in attr.strings)
    scalar = {_A.FLOAT: 4, _A.INT: 8}.get(attr.type, 0)
    return scalar + 4 * len(attr.floats) + 8 * len(attr.ints)


def _check_attribute(
    node: onnx.NodeProto,
    attr: onnx.AttributeProto,
    where: str,
    schema: defs.OpSchema | None,
    max_constant_bytes: int,
    tally: _Tally,
) -> None:
    value_field = _ATTRIBUTE_VALUE_FIELD.get(attr.type)
    if value_field is None:
        kind = _A.AttributeType.Name(attr.type) if attr.type in _A.AttributeType.values() else "?"
        raise ArtifactRefused(f"{where}: attribute type {kind} ({attr.type}) is not allowed")
    # A second value field (an INT attribute that also carries `s`) is ignored by
    # runtimes and would be a hiding place; only the one matching `type` may be set.
    _only(attr, frozenset({"name", "type", value_field}), where)
    tally.name(attr.name, f"{where} name")
    if schema is not None:
        known = schema.attributes.get(attr.name)
        if known is None:
            raise ArtifactRefused(f"{where}: {node.op_type} has no attribute {_show(attr.name)}")
        want = _SCHEMA_ATTRIBUTE_TYPES.get(known.type)
        if want != attr.type:
            raise ArtifactRefused(
                f"{where}: {node.op_type}.{attr.name} must have type {want}, not {attr.type}"
            )
    if node.op_type == "Constant" and node.domain == "":
        size = _constant_bytes(attr, where, max_constant_bytes, tally)
        if size > max_constant_bytes:
            raise ArtifactRefused(
                f"{where}: Constant value of {size} bytes, more than the {max_constant_bytes} "
                "allowed"
            )
        tally.add("constant_bytes", size, f"{where}: Constant values")
        return
    if attr.type == _A.TENSOR:
        raise ArtifactRefused(f"{where}: a TENSOR attribute is only allowed on Constant")
    # Ordinary attributes (pads, strides, auto_pad) are tiny; a long one is a payload.
    text = 0
    if attr.type == _A.STRING:
        text = _text_bytes(attr.s, where)
    elif attr.type == _A.STRINGS:
        text = sum(_text_bytes(s, where) for s in attr.strings)
    if text > tally.max_string_bytes:
        raise ArtifactRefused(
            f"{where}: length {text}, more than the {tally.max_string_bytes} allowed"
        )
    numbers = 8 * len(attr.ints) + 4 * len(attr.floats)
    if numbers > tally.max_string_bytes:
        count = len(attr.ints) + len(attr.floats)
        raise ArtifactRefused(f"{where}: {count} values, more than any attribute needs")
    scalar = {_A.FLOAT: 4, _A.INT: 8}.get(attr.type, 0)
    tally.add("attribute_bytes", text + numbers + scalar, f"{where}: attribute values")


def _op_schema(node: onnx.NodeProto, opset: int, where: str) -> defs.OpSchema | None:
    """The default-domain op's schema, to check attribute names and types against."""
    if node.domain != "":
        return None  # a custom op the template itself uses; nothing to check it against
    try:
        return defs.get_schema(node.op_type, opset, "")
    except defs.SchemaError as exc:
        raise ArtifactRefused(
            f"{where}: {_clip(node.op_type)} is not an op of opset {opset}"
        ) from exc


def _check_arity(
    node: onnx.NodeProto, schema: defs.OpSchema | None, where: str, limits: StructureLimits
) -> None:
    """No more inputs or outputs than the op's schema allows, and never more than node_arity."""
    for kind, found, most in (
        ("inputs", len(node.input), None if schema is None else schema.max_input),
        ("outputs", len(node.output), None if schema is None else schema.max_output),
    ):
        if most is not None and most < limits.node_arity:
            if found > most:
                raise ArtifactRefused(
                    f"{where}: {found} {kind}, {_clip(node.op_type)} takes at most {most} "
                    "(its schema)"
                )
        elif found > limits.node_arity:
            raise ArtifactRefused(
                f"{where}: {found} {kind}, more than the {limits.node_arity} allowed "
                "(limit node_arity)"
            )


def _check_nodes(
    graph: onnx.GraphProto,
    opset: int,
    allowed_ops: frozenset[tuple[str, str]],
    max_constant_bytes: int,
    tally: _Tally,
) -> frozenset[tuple[str, str]]:
    allowed = frozenset((_domain(d), op) for d, op in allowed_ops)
    ops = set()
    for i, node in enumerate(graph.node):
        where = f"graph.node[{i}] {_show(node.name)}"
        _only(node, _NODE_FIELDS, where)
        tally.name(node.name, f"{where} name")
        tally.name(node.op_type, f"{where} op_type")
        _check_domain(node.domain, where, tally)
        op = (node.domain, node.op_type)
        if op not in allowed:
            raise ArtifactRefused(
                f"{where}: op {_clip(op[0] or 'ai.onnx')}::{_clip(op[1])} is not allowed"
            )
        ops.add(op)
        schema = _op_schema(node, opset, where)
        _check_arity(node, schema, where, tally.limits)
        for value in (*node.input, *node.output):
            tally.name(value, f"{where} input or output name")
        is_constant = node.op_type == "Constant" and op[0] == ""
        if is_constant and len(node.attribute) != 1:
            names = _show_list([attr.name for attr in node.attribute])
            raise ArtifactRefused(f"{where}: a Constant needs exactly one value, has {names}")
        seen: set[str | bytes] = set()
        for attr in node.attribute:
            if attr.name in seen:
                raise ArtifactRefused(f"{where}: attribute {_show(attr.name)} given twice")
            seen.add(attr.name)
            _check_attribute(
                node,
                attr,
                f"{where} attribute {_show(attr.name)}",
                schema,
                max_constant_bytes,
                tally,
            )
    return frozenset(ops)


def _check_weight(init: onnx.TensorProto, spec: WeightSpec, external: bool, tally: _Tally) -> None:
    where = f"initializer {init.name!r}"
    allowed = _EXTERNAL_WEIGHT_FIELDS if external else _WEIGHT_FIELDS
    for name in _present(init):
        if name not in allowed:
            where_value = "the external data file" if external else "raw_data"
            raise ArtifactRefused(f"{where}: {name} is not allowed (values go in {where_value})")
    tally.dims(len(init.dims), where)
    dims = tuple(init.dims)
    if dims != tuple(spec.shape):
        raise ArtifactRefused(
            f"{where}: dims {_show_list(dims)}, expected {_show_list(tuple(spec.shape))}"
        )
    if init.data_type != _onnx_type(spec):
        raise ArtifactRefused(
            f"{where}: data_type {init.data_type}, expected {_onnx_type(spec)} ({spec.dtype})"
        )
    if external and init.data_location != onnx.TensorProto.EXTERNAL:
        raise ArtifactRefused(f"{where}: expected data_location EXTERNAL")
    if not external and "raw_data" not in _present(init):
        raise ArtifactRefused(f"{where}: no raw_data")


def _external_offset(init: onnx.TensorProto, data_file: str, length: int, tally: _Tally) -> int:
    where = f"initializer {init.name!r}"
    if len(init.external_data) != 3:
        keys = _show_list([e.key for e in init.external_data[:9]])
        raise ArtifactRefused(f"{where}: external_data keys {keys}, expected {_EXTERNAL_KEYS}")
    for e in init.external_data:
        _only(e, frozenset({"key", "value"}), f"{where} external_data")
        tally.name(e.key, f"{where} external_data key")
        tally.name(e.value, f"{where} external_data value")
    entries = {e.key: e.value for e in init.external_data}
    if sorted(entries) != sorted(_EXTERNAL_KEYS):
        keys = _show_list([e.key for e in init.external_data])
        raise ArtifactRefused(f"{where}: external_data keys {keys}, expected {_EXTERNAL_KEYS}")
    if entries["location"] != data_file:
        raise ArtifactRefused(
            f"{where}: external data in {_show(entries['location'])}, expected {data_file!r}"
        )
    numbers = {}
    for key in ("offset", "length"):
        text = entries[key]
        # Only the canonical decimal spelling: " 12", "+12" and "012" parse the same.
        if not text.isascii() or not text.isdigit() or len(text) > 19 or str(int(text)) != text:
            raise ArtifactRefused(f"{where}: external data {key} {_show(text)} is not canonical")
        numbers[key] = int(text)
    if numbers["length"] != length:
        raise ArtifactRefused(
            f"{where}: external data length {numbers['length']}, the tensor has {length} bytes"
        )
    return numbers["offset"]


def _check_initializers(
    graph: onnx.GraphProto,
    weights: Sequence[WeightSpec],
    external_data_file: str | None,
    outside_graph: frozenset[str],
    tally: _Tally,
) -> int:
    """Refuse anything but exactly `weights` less outside_graph; return the external data
    file's size."""
    specs = {spec.name: spec for spec in weights if spec.name not in outside_graph}
    seen: dict[str, onnx.TensorProto] = {}
    for init in graph.initializer:
        tally.name(init.name, "initializer name")
        if init.name not in specs:
            raise ArtifactRefused(f"initializer {_show(init.name)} is not an expected weight")
        if init.name in seen:
            raise ArtifactRefused(f"initializer {init.name!r} appears more than once")
        _check_weight(init, specs[init.name], external_data_file is not None, tally)
        seen[init.name] = init
    missing = [name for name in specs if name not in seen]
    if missing:
        raise ArtifactRefused(f"weights missing from the graph: {_show_list(missing)}")
    if external_data_file is None:
        return 0
    # The data file holds the weights end to end in the expected (schema) order, those
    # outside the graph included: every byte of it is one listed tensor's.
    pos = 0
    for spec in weights:
        length = tensor_bytes(spec)
        if spec.name not in outside_graph:
            offset = _external_offset(seen[spec.name], external_data_file, length, tally)
            if offset != pos:
                raise ArtifactRefused(
                    f"initializer {spec.name!r}: external data offset {offset}, expected {pos} "
                    "(weights end to end in schema order)"
                )
        pos += length
    return pos


def _check_outside_graph(
    weights: Sequence[WeightSpec], external_data_file: str | None, outside_graph: frozenset[str]
) -> None:
    """Tensors outside the graph only lie in a data file, and only listed ones."""
    if not outside_graph:
        return
    if external_data_file is None:
        raise ArtifactRefused(
            "tensors outside the graph are listed, but a single-file model has no data file "
            "to hold them"
        )
    unknown = sorted(outside_graph - {spec.name for spec in weights})
    if unknown:
        raise ArtifactRefused(
            f"tensors outside the graph not among the weights: {_show_list(unknown)}"
        )


def _check_raw_lengths(
    spans: Sequence[onnx_wire.InitializerSpan], weights: Mapping[str, WeightSpec]
) -> None:
    for span in spans:
        spec = weights.get(span.name)
        if spec is None:  # the parse found other names: cannot happen, refused all the same
            raise ArtifactRefused(f"initializer {_show(span.name)} is not an expected weight")
        want = tensor_bytes(spec)
        if span.end - span.start != want:
            raise ArtifactRefused(
                f"initializer {span.name!r}: raw_data holds {span.end - span.start} bytes, "
                f"the tensor has {want}"
            )


def _check_graph_counts(graph: onnx.GraphProto, tally: _Tally) -> None:
    """Counts first: a graph of a million entries is refused before any is visited."""
    tally.count("nodes", len(graph.node), "graph.node")
    tally.count("graph_inputs", len(graph.input), "graph.input")
    tally.count("graph_outputs", len(graph.output), "graph.output")
    tally.count("value_infos", len(graph.value_info), "graph.value_info")


def inspect_onnx(
    data: bytes | memoryview,
    weights: Sequence[WeightSpec],
    *,
    allowed_ops: frozenset[tuple[str, str]],
    max_constant_bytes: int = 64,
    max_string_bytes: int = 256,
    external_data_file: str | None = None,
    limits: StructureLimits = StructureLimits(),
    outside_graph: Collection[str] = (),
) -> ArtifactReport:
    """Accept a serialized ONNX model only if it holds `weights` and nothing else.

    Needs no template, so the global team can run it offline on a pulled file. The file
    must be its own canonical protobuf encoding; its initializers exactly `weights` by
    name, dims and dtype with values in raw_data only (or, with external_data_file, all
    in that file end to end in `weights` order, where the tensors named in outside_graph
    (state the graph does not read: BatchNorm's num_batches_tracked) hold their place in
    the data file and are not initializers); no doc strings, metadata, sparse
    initializers, local functions, training info, subgraphs, other opset domains or ops
    outside allowed_ops; the default domain spelled ""; every name and string valid
    UTF-8; each Constant value at most max_constant_bytes and each name or string at most
    max_string_bytes; counts and totals within `limits`, so that it carries at most
    capacity_bytes(limits) bytes outside its weights' values. Raises ArtifactRefused
    naming the first problem, and on any input whatsoever nothing else: a check that
    meets what it did not expect refuses the file as malformed.
    Memory: a single file's structure without its weights (parsed with raw_data elided); a
    file that cannot be elided, two copies of data (the parse and its re-encoding).
    """
    try:
        return _inspect(
            data,
            weights,
            allowed_ops,
            max_constant_bytes,
            external_data_file,
            frozenset(outside_graph),
            _Tally(limits, max_string_bytes),
        )
    except ArtifactRefused:
        raise
    except Exception as exc:  # the last net: never a crash, a refusal that says what broke
        raise ArtifactRefused(f"malformed model: {type(exc).__name__}: {_show(str(exc))}") from exc


def _inspect(
    data: bytes | memoryview,
    weights: Sequence[WeightSpec],
    allowed_ops: frozenset[tuple[str, str]],
    max_constant_bytes: int,
    external_data_file: str | None,
    outside_graph: frozenset[str],
    tally: _Tally,
) -> ArtifactReport:
    if external_data_file is not None and (
        external_data_file in ("", ".", "..") or any(c in external_data_file for c in "/\\\0")
    ):
        raise ArtifactRefused(f"external data file {external_data_file!r} is not a plain name")
    check_weight_specs(weights)
    _check_outside_graph(weights, external_data_file, outside_graph)
    model, elided_spans = _parse_skeleton(data, external_data_file is not None)
    _only(model, _MODEL_FIELDS, "model")
    for field in ("producer_name", "producer_version", "domain"):
        tally.name(getattr(model, field), f"model {field}", header=True)
    if not 3 <= model.ir_version <= onnx.IR_VERSION:
        raise ArtifactRefused(f"model: ir_version {model.ir_version} is not a known IR version")
    opset = _check_opset(model, tally)
    graph = model.graph
    _only(graph, _GRAPH_FIELDS, "graph")
    _check_graph_counts(graph, tally)
    tally.name(graph.name, "graph name", header=True)
    for kind in ("input", "output", "value_info"):
        for i, info in enumerate(getattr(graph, kind)):
            _check_value_info(info, f"graph.{kind}[{i}]", tally)
    ops = _check_nodes(graph, opset, allowed_ops, max_constant_bytes, tally)
    data_bytes = _check_initializers(graph, weights, external_data_file, outside_graph, tally)
    if external_data_file is not None:
        for spec in weights:
            if spec.name in outside_graph:  # names and dims of structure, like the graph's
                tally.name(spec.name, f"tensor outside the graph {_show(spec.name)}")
                tally.dims(len(spec.shape), f"tensor outside the graph {_show(spec.name)}")
        outside = outside_graph_description(weights, outside_graph)
        size = _check_structure_bytes(len(data) + len(outside), tally.limits)
        return ArtifactReport((), structure_hash(data, (), outside), ops, data_bytes, size)
    try:
        spans = elided_spans or onnx_wire.initializer_spans(data)
    except ValueError as exc:  # cannot happen after the checks above; refuse, never crash
        raise ArtifactRefused(f"initializer layout: {exc}") from exc
    _check_raw_lengths(spans, {spec.name: spec for spec in weights})  # none outside the graph
    size = _check_structure_bytes(len(data) - _span_bytes(spans), tally.limits)
    return ArtifactReport(spans, structure_hash(data, spans), ops, 0, size)
