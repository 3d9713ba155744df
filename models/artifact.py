"""The parse-level artifact check: an ONNX file holds the expected weights and nothing else."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import defs, helper

from models import onnx_wire

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
_MAX_SINGLE_FILE_BYTES = (2 << 30) - 1  # protobuf cannot parse a message this large
_ZEROS = bytes(1 << 20)

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


class WeightSpec(Protocol):
    """A tensor the file must hold (models.schema.TensorSpec is one)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...  # numpy dtype string, little-endian ("<f4")


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


def structure_hash(data: bytes | memoryview, ranges: Iterable[_Range]) -> str:
    """Hex sha256 of data with every weight range zeroed: the same for any weight values.

    ranges are in file order and do not overlap (a template's, or inspect_onnx's).
    """
    digest = hashlib.sha256()
    view = memoryview(data)
    pos = 0
    for r in ranges:
        if not pos <= r.start <= r.end <= len(view):
            raise ValueError(f"range [{r.start}, {r.end}) is out of order or past the end")
        digest.update(view[pos : r.start])
        for at in range(r.start, r.end, len(_ZEROS)):
            digest.update(_ZEROS[: min(len(_ZEROS), r.end - at)])
        pos = r.end
    digest.update(view[pos:])
    return digest.hexdigest()


def tensor_bytes(spec: WeightSpec) -> int:
    """Bytes of the tensor's raw little-endian values."""
    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def _onnx_type(spec: WeightSpec) -> int:
    dtype = np.dtype(spec.dtype)
    if dtype.byteorder == ">":
        raise ArtifactRefused(f"tensor {spec.name!r}: big-endian {spec.dtype} has no ONNX layout")
    return int(helper.np_dtype_to_tensor_dtype(dtype))


def _from_buffer(data: bytes | memoryview) -> onnx.ModelProto:
    model = onnx.ModelProto()
    # upb parses any buffer; bytes(data) would copy a file of up to 2 GiB once more.
    model.ParseFromString(data)  # type: ignore[arg-type]
    return model


def _parse(data: bytes | memoryview, elided: bool = False) -> onnx.ModelProto:
    try:
        model = _from_buffer(data)
    except Exception as exc:  # upb raises its own DecodeError type; any failure is a refusal
        raise ArtifactRefused(f"not a parseable ONNX ModelProto: {exc}") from exc
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


def _parse_skeleton(
    data: bytes | memoryview, external: bool
) -> tuple[onnx.ModelProto, tuple[onnx_wire.InitializerSpan, ...] | None]:
    """The parsed model and, for the single-file layout, its initializers' raw_data spans.

    A single file is parsed with every initializer's raw_data elided (onnx_wire): the same
    checks on the same message, without two more copies of the weights. Where it cannot be
    elided (no or repeated raw_data, malformed wire format), the whole file is parsed, so
    the refusal names what the parser finds.
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


def _short(value: str | bytes, limit: int, where: str) -> None:
    # Names and strings in a graph are identifiers; a long one is a payload.
    if len(value) > limit:
        raise ArtifactRefused(f"{where}: length {len(value)}, more than the {limit} allowed")


def _show(text: str) -> str:
    """A file-controlled string for a message: quoted, and cut short if it is long."""
    return repr(text) if len(text) <= 64 else f"{text[:64]!r}... ({len(text)} chars)"


def _domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


def op_set(data: bytes | memoryview) -> frozenset[tuple[str, str]]:
    """The (domain, op_type) pairs of a model's graph; a template's is the allowed set.

    Parsed without the initializers' raw_data where the layout allows: the weights are
    never read (a mapped template's stay on disk)."""
    try:
        skeleton, _ = onnx_wire.elide_raw_data(data)
    except ValueError:
        skeleton = bytes(data) if isinstance(data, memoryview) else data
    model = _from_buffer(skeleton)
    return frozenset((_domain(n.domain), n.op_type) for n in model.graph.node)


def _check_opset(model: onnx.ModelProto) -> int:
    if len(model.opset_import) != 1:
        found = ", ".join(f"{_show(o.domain)} v{o.version}" for o in model.opset_import)
        raise ArtifactRefused(f"opset_import: expected only the default domain, found {found}")
    opset = model.opset_import[0]
    _only(opset, _OPSET_FIELDS, "opset_import[0]")
    if opset.domain not in DEFAULT_DOMAINS:
        raise ArtifactRefused(f"opset_import: domain {_show(opset.domain)} is not allowed")
    if not 1 <= opset.version <= defs.onnx_opset_version():
        raise ArtifactRefused(f"opset_import: version {opset.version} is not a known opset")
    return int(opset.version)


def _check_value_info(info: onnx.ValueInfoProto, where: str, max_string_bytes: int) -> None:
    _only(info, _VALUE_INFO_FIELDS, where)
    _short(info.name, max_string_bytes, f"{where} name")
    if not info.HasField("type"):
        return
    _only(info.type, _TYPE_FIELDS, f"{where} type")
    tensor_type = info.type.tensor_type
    _only(tensor_type, _TENSOR_TYPE_FIELDS, f"{where} type")
    for i, dim in enumerate(tensor_type.shape.dim):
        _only(dim, _DIM_FIELDS, f"{where} dim {i}")
        _short(dim.dim_param, max_string_bytes, f"{where} dim {i} dim_param")


def _constant_bytes(attr: onnx.AttributeProto, where: str) -> int:
    """Bytes of a Constant node's value; its tensor must be a plain raw_data tensor."""
    if attr.type == _A.TENSOR:
        t = attr.t
        _only(t, _CONSTANT_TENSOR_FIELDS, f"{where} tensor")
        if t.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
            raise ArtifactRefused(f"{where}: tensor data_type {t.data_type} is not allowed")
        if any(d < 0 for d in t.dims):
            raise ArtifactRefused(f"{where}: negative dims {list(t.dims)}")
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        size = int(np.prod(list(t.dims), dtype=np.int64)) * itemsize
        if len(t.raw_data) != size:
            raise ArtifactRefused(
                f"{where}: raw_data holds {len(t.raw_data)} bytes, dims {list(t.dims)} need {size}"
            )
        return size
    if attr.type == _A.STRING:
        return len(attr.s)
    if attr.type == _A.STRINGS:
        return sum(len(s) for s in attr.strings)
    scalar = {_A.FLOAT: 4, _A.INT: 8}.get(attr.type, 0)
    return scalar + 4 * len(attr.floats) + 8 * len(attr.ints)


def _check_attribute(
    node: onnx.NodeProto,
    attr: onnx.AttributeProto,
    where: str,
    schema: defs.OpSchema | None,
    max_constant_bytes: int,
    max_string_bytes: int,
) -> None:
    value_field = _ATTRIBUTE_VALUE_FIELD.get(attr.type)
    if value_field is None:
        kind = _A.AttributeType.Name(attr.type) if attr.type in _A.AttributeType.values() else "?"
        raise ArtifactRefused(f"{where}: attribute type {kind} ({attr.type}) is not allowed")
    # A second value field (an INT attribute that also carries `s`) is ignored by
    # runtimes and would be a hiding place; only the one matching `type` may be set.
    _only(attr, frozenset({"name", "type", value_field}), where)
    _short(attr.name, max_string_bytes, f"{where} name")
    if schema is not None:
        known = schema.attributes.get(attr.name)
        if known is None:
            raise ArtifactRefused(f"{where}: {node.op_type} has no attribute {attr.name!r}")
        want = _SCHEMA_ATTRIBUTE_TYPES.get(known.type)
        if want != attr.type:
            raise ArtifactRefused(
                f"{where}: {node.op_type}.{attr.name} must have type {want}, not {attr.type}"
            )
    if node.op_type == "Constant" and _domain(node.domain) == "":
        size = _constant_bytes(attr, where)
        if size > max_constant_bytes:
            raise ArtifactRefused(
                f"{where}: Constant value of {size} bytes, more than the {max_constant_bytes} "
                "allowed"
            )
        return
    if attr.type == _A.TENSOR:
        raise ArtifactRefused(f"{where}: a TENSOR attribute is only allowed on Constant")
    # Ordinary attributes (pads, strides, auto_pad) are tiny; a long one is a payload.
    _short(
        attr.s if attr.type == _A.STRING else b"".join(attr.strings),
        max_string_bytes,
        where,
    )
    if 8 * len(attr.ints) + 4 * len(attr.floats) > max_string_bytes:
        count = len(attr.ints) + len(attr.floats)
        raise ArtifactRefused(f"{where}: {count} values, more than any attribute needs")


def _op_schema(node: onnx.NodeProto, opset: int, where: str) -> defs.OpSchema | None:
    """The default-domain op's schema, to check attribute names and types against."""
    if _domain(node.domain) != "":
        return None  # a custom op the template itself uses; nothing to check it against
    try:
        return defs.get_schema(node.op_type, opset, "")
    except defs.SchemaError as exc:
        raise ArtifactRefused(f"{where}: {node.op_type} is not an op of opset {opset}") from exc


def _check_nodes(
    graph: onnx.GraphProto,
    opset: int,
    allowed_ops: frozenset[tuple[str, str]],
    max_constant_bytes: int,
    max_string_bytes: int,
) -> frozenset[tuple[str, str]]:
    allowed = frozenset((_domain(d), op) for d, op in allowed_ops)
    ops = set()
    for i, node in enumerate(graph.node):
        where = f"graph.node[{i}] {_show(node.name)}"
        _only(node, _NODE_FIELDS, where)
        for value in (node.name, node.op_type, node.domain, *node.input, *node.output):
            _short(value, max_string_bytes, f"{where} name, op or value name")
        op = (_domain(node.domain), node.op_type)
        if op not in allowed:
            raise ArtifactRefused(f"{where}: op {op[0] or 'ai.onnx'}::{op[1]} is not allowed")
        ops.add(op)
        schema = _op_schema(node, opset, where)
        names = [attr.name for attr in node.attribute]
        if len(set(names)) != len(names):
            raise ArtifactRefused(f"{where}: an attribute given twice in {names}")
        if node.op_type == "Constant" and op[0] == "" and len(names) != 1:
            raise ArtifactRefused(f"{where}: a Constant needs exactly one value, has {names}")
        for attr in node.attribute:
            _check_attribute(
                node,
                attr,
                f"{where} attribute {_show(attr.name)}",
                schema,
                max_constant_bytes,
                max_string_bytes,
            )
    return frozenset(ops)


def _check_weight(init: onnx.TensorProto, spec: WeightSpec, external: bool) -> None:
    where = f"initializer {init.name!r}"
    allowed = _EXTERNAL_WEIGHT_FIELDS if external else _WEIGHT_FIELDS
    for name in _present(init):
        if name not in allowed:
            where_value = "the external data file" if external else "raw_data"
            raise ArtifactRefused(f"{where}: {name} is not allowed (values go in {where_value})")
    dims = tuple(init.dims)
    if dims != tuple(spec.shape):
        raise ArtifactRefused(f"{where}: dims {list(dims)}, expected {list(spec.shape)}")
    if init.data_type != _onnx_type(spec):
        raise ArtifactRefused(
            f"{where}: data_type {init.data_type}, expected {_onnx_type(spec)} ({spec.dtype})"
        )
    if external and init.data_location != onnx.TensorProto.EXTERNAL:
        raise ArtifactRefused(f"{where}: expected data_location EXTERNAL")
    if not external and "raw_data" not in _present(init):
        raise ArtifactRefused(f"{where}: no raw_data")


def _external_offset(init: onnx.TensorProto, data_file: str, length: int) -> int:
    where = f"initializer {init.name!r}"
    entries = {e.key: e.value for e in init.external_data}
    if sorted(entries) != sorted(_EXTERNAL_KEYS) or len(init.external_data) != 3:
        keys = [e.key for e in init.external_data]
        raise ArtifactRefused(f"{where}: external_data keys {keys}, expected {_EXTERNAL_KEYS}")
    for e in init.external_data:
        _only(e, frozenset({"key", "value"}), f"{where} external_data")
    if entries["location"] != data_file:
        raise ArtifactRefused(
            f"{where}: external data in {_show(entries['location'])}, expected {data_file!r}"
        )
    numbers = {}
    for key in ("offset", "length"):
        text = entries[key]
        # Only the canonical decimal spelling: " 12", "+12" and "012" parse the same.
        if not text.isascii() or not text.isdigit() or str(int(text)) != text:
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
    max_string_bytes: int,
) -> int:
    """Refuse anything but exactly `weights`; return the external data file's size."""
    specs: dict[str, WeightSpec] = {}
    for spec in weights:
        if spec.name in specs:
            raise ArtifactRefused(f"expected weights name {spec.name!r} twice")
        specs[spec.name] = spec
    seen: dict[str, onnx.TensorProto] = {}
    for init in graph.initializer:
        _short(init.name, max_string_bytes, "initializer name")
        if init.name not in specs:
            raise ArtifactRefused(f"initializer {_show(init.name)} is not an expected weight")
        if init.name in seen:
            raise ArtifactRefused(f"initializer {init.name!r} appears more than once")
        _check_weight(init, specs[init.name], external_data_file is not None)
        seen[init.name] = init
    missing = [name for name in specs if name not in seen]
    if missing:
        raise ArtifactRefused(f"weights missing from the graph: {missing}")
    if external_data_file is None:
        return 0
    # The data file holds the weights end to end in the expected (schema) order.
    pos = 0
    for spec in weights:
        length = tensor_bytes(spec)
        offset = _external_offset(seen[spec.name], external_data_file, length)
        if offset != pos:
            raise ArtifactRefused(
                f"initializer {spec.name!r}: external data offset {offset}, expected {pos} "
                "(weights end to end in schema order)"
            )
        pos += length
    return pos


def _check_raw_lengths(
    spans: Sequence[onnx_wire.InitializerSpan], weights: Mapping[str, WeightSpec]
) -> None:
    for span in spans:
        want = tensor_bytes(weights[span.name])
        if span.end - span.start != want:
            raise ArtifactRefused(
                f"initializer {span.name!r}: raw_data holds {span.end - span.start} bytes, "
                f"the tensor has {want}"
            )


def inspect_onnx(
    data: bytes | memoryview,
    weights: Sequence[WeightSpec],
    *,
    allowed_ops: frozenset[tuple[str, str]],
    max_constant_bytes: int = 64,
    max_string_bytes: int = 256,
    external_data_file: str | None = None,
) -> ArtifactReport:
    """Accept a serialized ONNX model only if it holds `weights` and nothing else.

    Needs no template, so the global team can run it offline on a pulled file. The file
    must be its own canonical protobuf encoding; its initializers exactly `weights` by
    name, dims and dtype with values in raw_data only (or, with external_data_file, all
    in that file end to end in `weights` order); no doc strings, metadata, sparse
    initializers, local functions, training info, subgraphs, other opset domains or ops
    outside allowed_ops; Constant values of at most max_constant_bytes and every name or
    string of at most max_string_bytes. Raises ArtifactRefused naming the first problem.
    Memory: a single file's structure without its weights (parsed with raw_data elided); a
    file that cannot be elided, two copies of data (the parse and its re-encoding).
    """
    if external_data_file is not None and (
        external_data_file in ("", ".", "..") or any(c in external_data_file for c in "/\\\0")
    ):
        raise ArtifactRefused(f"external data file {external_data_file!r} is not a plain name")
    model, elided_spans = _parse_skeleton(data, external_data_file is not None)
    _only(model, _MODEL_FIELDS, "model")
    for value in (model.producer_name, model.producer_version, model.domain):
        _short(value, max_string_bytes, "model producer or domain")
    if not 3 <= model.ir_version <= onnx.IR_VERSION:
        raise ArtifactRefused(f"model: ir_version {model.ir_version} is not a known IR version")
    opset = _check_opset(model)
    graph = model.graph
    _only(graph, _GRAPH_FIELDS, "graph")
    _short(graph.name, max_string_bytes, "graph name")
    for kind in ("input", "output", "value_info"):
        for i, info in enumerate(getattr(graph, kind)):
            _check_value_info(info, f"graph.{kind}[{i}]", max_string_bytes)
    ops = _check_nodes(graph, opset, allowed_ops, max_constant_bytes, max_string_bytes)
    data_bytes = _check_initializers(graph, weights, external_data_file, max_string_bytes)
    if external_data_file is not None:
        return ArtifactReport((), structure_hash(data, ()), ops, data_bytes)
    try:
        spans = elided_spans or onnx_wire.initializer_spans(data)
    except ValueError as exc:  # cannot happen after the checks above; refuse, never crash
        raise ArtifactRefused(f"initializer layout: {exc}") from exc
    _check_raw_lengths(spans, {spec.name: spec for spec in weights})
    return ArtifactReport(spans, structure_hash(data, spans), ops, 0)
