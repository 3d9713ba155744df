"""The template-free parse-level check that the gateway and the global team both run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sluice.gateway.export.template import OnnxTemplate, build_template
from sluice.models import artifact, onnx_wire
from sluice.models.artifact import (
    ArtifactRefused,
    WeightSpec,
    check_weight_specs,
    inspect_onnx,
    op_set,
    structure_hash,
    tensor_bytes,
)
from sluice.models.registry import get
from sluice.models.schema import TensorSpec

DATA_FILE = "model.onnx.data"


@pytest.fixture(scope="module")
def template() -> OnnxTemplate:
    return build_template(get("drivenet-tiny"))


@pytest.fixture(scope="module")
def weights(template: OnnxTemplate) -> list[TensorSpec]:
    """The graph's weights in schema order (the schema also has num_batches_tracked)."""
    names = {r.name for r in template.ranges}
    return [spec for spec in get("drivenet-tiny").schema().tensors if spec.name in names]


@pytest.fixture(scope="module")
def ops(template: OnnxTemplate) -> frozenset[tuple[str, str]]:
    return op_set(bytes(template.data))


def _edit(data: bytes, change: Callable[[onnx.ModelProto], None]) -> bytes:
    model = onnx.ModelProto.FromString(data)
    change(model)
    return model.SerializeToString(deterministic=True)


def _refused(
    data: bytes,
    weights: Sequence[WeightSpec],
    ops: frozenset[tuple[str, str]],
    **options: int | str | None,
) -> str:
    with pytest.raises(ArtifactRefused) as caught:
        inspect_onnx(data, weights, allowed_ops=ops, **options)  # type: ignore[arg-type]
    return str(caught.value)


# --- a genuine file ---------------------------------------------------------------------


def test_template_passes(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    report = inspect_onnx(bytes(template.data), weights, allowed_ops=ops)
    assert [(s.name, s.start, s.end) for s in report.ranges] == [
        (r.name, r.start, r.end) for r in template.ranges
    ]
    # The global team's structure hash is the template's, from the file alone.
    assert report.structure_hash == template.structure_hash
    assert report.ops == ops and ("", "Conv") in ops
    assert report.external_data_bytes == 0
    assert inspect_onnx(memoryview(bytes(template.data)), weights, allowed_ops=ops) == report


def test_structure_hash_ignores_weight_values(template: OnnxTemplate) -> None:
    changed = bytearray(bytes(template.data))
    for r in template.ranges:
        changed[r.start : r.end] = bytes(range(256)) * ((r.end - r.start) // 256) + bytes(
            (r.end - r.start) % 256
        )
    assert structure_hash(bytes(changed), template.ranges) == template.structure_hash
    changed[0] ^= 1
    assert structure_hash(bytes(changed), template.ranges) != template.structure_hash
    with pytest.raises(ValueError, match="out of order"):
        structure_hash(bytes(template.data), tuple(reversed(template.ranges)))


def test_weight_order_does_not_matter_in_one_file(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    inspect_onnx(bytes(template.data), list(reversed(weights)), allowed_ops=ops)


def test_ai_onnx_is_the_default_domain(template: OnnxTemplate, weights: list[TensorSpec]) -> None:
    spelled = frozenset(("ai.onnx", op) for _, op in op_set(bytes(template.data)))
    inspect_onnx(bytes(template.data), weights, allowed_ops=spelled)


# --- canonical encoding -----------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        # ir_version 10 as a two-byte varint: the same value, a different encoding.
        ("over-long varint", lambda d: b"\x08\x8a\x00" + d[2:]),
        ("unknown field", lambda d: d + _varint(999 << 3 | 0) + _varint(42)),
        ("repeated scalar", lambda d: d[:2] + d),
        ("fields out of order", lambda d: d[2:] + d[:2]),
        ("empty unknown field", lambda d: d + _varint(77 << 3 | 2) + b"\x00"),
    ],
)
def test_non_canonical_encodings(
    name: str,
    change: Callable[[bytes], bytes],
    template: OnnxTemplate,
    weights: list[TensorSpec],
    ops: frozenset[tuple[str, str]],
) -> None:
    data = change(bytes(template.data))
    assert onnx.ModelProto.FromString(data).ir_version == 10  # protobuf reads it happily
    assert "not the canonical encoding" in _refused(data, weights, ops)


def _padded_length(buf: bytes, start: int, end: int, path: Sequence[int]) -> bytes:
    """buf[start:end] with the length of the first field path[-1] (found under path[:-1])
    written one byte longer than needed; enclosing lengths are re-encoded to match."""
    out, todo = bytearray(), list(path)
    for f in onnx_wire.iter_fields(buf, start, end):
        if todo and f.number == todo[0] and f.wire_type == onnx_wire.LEN:
            key = onnx_wire.encode_varint(f.number << 3 | onnx_wire.LEN)
            if len(todo) == 1:
                minimal = bytearray(onnx_wire.encode_varint(f.value))
                minimal[-1] |= 0x80  # same value, one continuation byte more
                out += key + minimal + b"\x00" + buf[f.start : f.end]
            else:
                inner = _padded_length(buf, f.start, f.end, todo[1:])
                out += key + onnx_wire.encode_varint(len(inner)) + inner
            todo = []
        else:
            out += buf[f.key_start : f.end]
    return bytes(out)


@pytest.mark.parametrize(
    "path",
    [
        (onnx_wire.MODEL_GRAPH,),
        (onnx_wire.MODEL_GRAPH, onnx_wire.GRAPH_INITIALIZER),
        (onnx_wire.MODEL_GRAPH, onnx_wire.GRAPH_INITIALIZER, onnx_wire.TENSOR_RAW_DATA),
    ],
    ids=["graph", "initializer", "raw_data"],
)
def test_over_long_lengths_around_the_elided_weights(
    path: tuple[int, ...],
    template: OnnxTemplate,
    weights: list[TensorSpec],
    ops: frozenset[tuple[str, str]],
) -> None:
    # The lengths the weight-free parse rewrites must still be canonical in the file.
    data = _padded_length(bytes(template.data), 0, len(bytes(template.data)), path)
    assert len(data) == len(bytes(template.data)) + 1
    parsed = onnx.ModelProto.FromString(data)  # protobuf reads it happily
    assert parsed.SerializeToString(deterministic=True) == bytes(template.data)
    assert "not the canonical encoding" in _refused(data, weights, ops)


def test_a_flood_of_fields_is_refused_without_walking_it(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    # 300k empty unknown fields inside the graph (~1 MB): the walker stops at its budget
    # instead of visiting them all in Python (upb would have refused them in C).
    data = bytes(template.data)
    graph = next(f for f in onnx_wire.iter_fields(data) if f.number == onnx_wire.MODEL_GRAPH)
    junk = (onnx_wire.encode_varint(99 << 3 | onnx_wire.VARINT) + b"\x00") * 300_000
    body = data[graph.start : graph.end] + junk
    key = onnx_wire.encode_varint(onnx_wire.MODEL_GRAPH << 3 | onnx_wire.LEN)
    flood = data[: graph.key_start] + key + onnx_wire.encode_varint(len(body)) + body
    flood += data[graph.end :]
    reason = _refused(flood, weights, ops)
    assert f"more than {onnx_wire.MAX_FIELDS} protobuf fields" in reason


def test_weight_free_parse_sees_the_same_model(template: OnnxTemplate) -> None:
    skeleton, spans = onnx_wire.elide_raw_data(bytes(template.data))
    assert spans == onnx_wire.initializer_spans(bytes(template.data))
    assert len(skeleton) < len(bytes(template.data)) - sum(s.end - s.start for s in spans) + 1000
    full = onnx.ModelProto.FromString(bytes(template.data))
    for init in full.graph.initializer:
        init.raw_data = b""
    assert onnx.ModelProto.FromString(skeleton) == full


def test_garbage_and_truncation(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    assert "not a parseable" in _refused(bytes(template.data)[:-3], weights, ops)
    assert "not a parseable" in _refused(bytes(template.data) + b"\x00", weights, ops)


# --- expected tensors -------------------------------------------------------------------


def test_expected_weights_must_match(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    first = weights[0]
    missing = [*weights, TensorSpec("extra.weight", (2,), "<f4")]
    assert "weights missing from the graph: ['extra.weight']" in _refused(
        bytes(template.data), missing, ops
    )
    assert "is not an expected weight" in _refused(bytes(template.data), weights[1:], ops)
    shape = [TensorSpec(first.name, (8, 27), "<f4"), *weights[1:]]
    assert "dims [8, 3, 3, 3], expected [8, 27]" in _refused(bytes(template.data), shape, ops)
    dtype = [TensorSpec(first.name, first.shape, "<f2"), *weights[1:]]
    assert "data_type 1, expected 10" in _refused(bytes(template.data), dtype, ops)
    big = [TensorSpec(first.name, first.shape, ">f4"), *weights[1:]]
    assert "big-endian" in _refused(bytes(template.data), big, ops)
    assert "twice" in _refused(bytes(template.data), [*weights, first], ops)


def test_raw_data_must_be_exactly_the_tensor(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    def shorten(m: onnx.ModelProto) -> None:
        m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]

    assert "raw_data holds 860 bytes, the tensor has 864" in _refused(
        _edit(bytes(template.data), shorten), weights, ops
    )

    def no_raw_data(m: onnx.ModelProto) -> None:
        m.graph.initializer[0].ClearField("raw_data")

    assert "no raw_data" in _refused(_edit(bytes(template.data), no_raw_data), weights, ops)


def test_a_hand_built_model() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    data = model.SerializeToString(deterministic=True)
    spec = [TensorSpec("w", (2, 3), "<f4")]
    report = inspect_onnx(data, spec, allowed_ops=frozenset({("", "MatMul")}))
    (span,) = report.ranges
    assert data[span.start : span.end] == w.tobytes()
    # The same values as float_data: ONNX-valid, but no fixed byte layout to check.
    model.graph.initializer[0].ClearField("raw_data")
    model.graph.initializer[0].float_data.extend(w.reshape(-1).tolist())
    typed = model.SerializeToString(deterministic=True)
    assert "float_data is not allowed" in _refused(typed, spec, frozenset({("", "MatMul")}))


# --- nodes and attributes ---------------------------------------------------------------


def test_ops_outside_the_allowed_set(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    reason = _refused(bytes(template.data), weights, ops - {("", "Relu")})
    assert "op ai.onnx::Relu is not allowed" in reason and "'node_relu'" in reason


def test_constant_size_limit(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    # The template's Constants are one int64 (a shape) or one float32 (a zero) each.
    inspect_onnx(bytes(template.data), weights, allowed_ops=ops, max_constant_bytes=8)
    reason = _refused(bytes(template.data), weights, ops, max_constant_bytes=4)
    assert "'node_Constant_2' attribute 'value_ints': Constant value of 8 bytes" in reason


def test_string_limit(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    assert "more than the 8 allowed" in _refused(
        bytes(template.data), weights, ops, max_string_bytes=8
    )


def _with_node(node: onnx.NodeProto) -> Callable[[onnx.ModelProto], None]:
    return lambda m: m.graph.node.append(node)


def test_subgraph_attributes_even_on_an_allowed_op(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["b"], value_float=1.0)], "b", [], [out]
    )
    node = helper.make_node("If", ["c"], ["o"], then_branch=branch, else_branch=branch)
    data = _edit(bytes(template.data), _with_node(node))
    reason = _refused(data, weights, ops | {("", "If")})
    assert "attribute type GRAPH (5) is not allowed" in reason


def test_tensor_attribute_only_on_constant(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    value = numpy_helper.from_array(np.zeros(1, dtype=np.float32))
    node = helper.make_node("ConstantOfShape", ["s"], ["o"], value=value)
    data = _edit(bytes(template.data), _with_node(node))
    reason = _refused(data, weights, ops | {("", "ConstantOfShape")})
    assert "a TENSOR attribute is only allowed on Constant" in reason


def test_custom_op_without_an_opset_import(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    node = helper.make_node("Frame", [], ["o"], domain="com.smuggle")
    data = _edit(bytes(template.data), _with_node(node))
    assert "op com.smuggle::Frame is not allowed" in _refused(data, weights, ops)


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        (
            helper.make_node("Constant", [], ["o"], value_float=1.0, value_int=2),
            "a Constant needs exactly one value",
        ),
        (
            helper.make_node("Relu", ["x"], ["o"], alpha=1.0),
            "Relu has no attribute 'alpha'",
        ),
        (
            helper.make_node("Gemm", ["a", "b"], ["o"], transA="yes"),
            "Gemm.transA must have type 2, not 3",
        ),
        (
            helper.make_node("Conv", ["a", "b"], ["o"], pads=list(range(64))),
            "64 values, more than any attribute needs",
        ),
        (
            helper.make_node("Constant", [], ["o"], value_string="x" * 65),
            "Constant value of 65 bytes",
        ),
    ],
)
def test_attribute_rules(
    node: onnx.NodeProto,
    reason: str,
    template: OnnxTemplate,
    weights: list[TensorSpec],
    ops: frozenset[tuple[str, str]],
) -> None:
    assert reason in _refused(_edit(bytes(template.data), _with_node(node)), weights, ops)


def test_ir_version_and_opset(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    def old_ir(m: onnx.ModelProto) -> None:
        m.ir_version = 2

    def future_opset(m: onnx.ModelProto) -> None:
        m.opset_import[0].version = 999

    def other_domain(m: onnx.ModelProto) -> None:
        m.opset_import[0].domain = "ai.onnx.ml"

    assert "ir_version 2" in _refused(_edit(bytes(template.data), old_ir), weights, ops)
    assert "version 999" in _refused(_edit(bytes(template.data), future_opset), weights, ops)
    assert "domain 'ai.onnx.ml'" in _refused(
        _edit(bytes(template.data), other_domain), weights, ops
    )


# --- the two-file layout, built by hand -------------------------------------------------


def _externalize(data: bytes, weights: Sequence[TensorSpec]) -> tuple[bytes, bytes]:
    """(model.onnx, model.onnx.data) of the two-file layout for a single-file model."""
    model = onnx.ModelProto.FromString(data)
    by_name = {init.name: init for init in model.graph.initializer}
    spans = {s.name: s for s in onnx_wire.initializer_spans(data)}
    payload, pos = [], 0
    for spec in weights:
        init, span = by_name[spec.name], spans[spec.name]
        payload.append(data[span.start : span.end])
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        length = tensor_bytes(spec)
        for key, value in (("location", DATA_FILE), ("offset", str(pos)), ("length", str(length))):
            init.external_data.add(key=key, value=value)
        pos += length
    return model.SerializeToString(deterministic=True), b"".join(payload)


@pytest.fixture(scope="module")
def two_file(template: OnnxTemplate, weights: list[TensorSpec]) -> tuple[bytes, bytes]:
    return _externalize(bytes(template.data), weights)


def test_two_file_layout_passes_and_loads(
    tmp_path: Path,
    two_file: tuple[bytes, bytes],
    template: OnnxTemplate,
    weights: list[TensorSpec],
    ops: frozenset[tuple[str, str]],
) -> None:
    model, payload = two_file
    report = inspect_onnx(model, weights, allowed_ops=ops, external_data_file=DATA_FILE)
    assert report.external_data_bytes == len(payload) == sum(map(tensor_bytes, weights))
    assert report.ranges == () and report.structure_hash == structure_hash(model, ())
    (tmp_path / "model.onnx").write_bytes(model)
    (tmp_path / DATA_FILE).write_bytes(payload)
    frames = np.zeros((1, 3, 64, 128), dtype=np.float32)
    one = ort.InferenceSession(bytes(template.data), providers=["CPUExecutionProvider"])
    two = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for a, b in zip(
        one.run(None, {"frames": frames}), two.run(None, {"frames": frames}), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # Without external_data_file the same file is refused: weights must be inline then.
    assert "external_data is not allowed (values go in raw_data)" in _refused(model, weights, ops)
    assert "is not a plain name" in _refused(
        model, weights, ops, external_data_file="../model.onnx.data"
    )


def _entries(init: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


def _set_entry(index: int, key: str, value: str) -> Callable[[onnx.ModelProto], None]:
    def change(m: onnx.ModelProto) -> None:
        for e in m.graph.initializer[index].external_data:
            if e.key == key:
                e.value = value

    return change


def _add_checksum(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].external_data.add(key="checksum", value="0" * 40)


def _raw_data_too(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].raw_data = b"\x00" * 864


def _not_external(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].ClearField("data_location")


def _swap_first_two(m: onnx.ModelProto) -> None:
    # The first weight's bytes after the second's: no gap, but not schema order.
    second = _entries(m.graph.initializer[1])["length"]
    _set_entry(0, "offset", second)(m)
    _set_entry(1, "offset", "0")(m)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_set_entry(0, "location", "frame.bin"), "external data in 'frame.bin'"),
        (_set_entry(0, "location", "/etc/passwd"), "external data in '/etc/passwd'"),
        (_set_entry(1, "offset", "0864"), "offset '0864' is not canonical"),
        (_set_entry(1, "offset", "+864"), "offset '+864' is not canonical"),
        (_set_entry(1, "offset", "1000"), "offset 1000, expected 864"),
        (_set_entry(0, "length", "900"), "external data length 900, the tensor has 864"),
        (_add_checksum, "external_data keys ['location', 'offset', 'length', 'checksum']"),
        (_raw_data_too, "raw_data is not allowed (values go in the external data file)"),
        (_not_external, "expected data_location EXTERNAL"),
        (_swap_first_two, "offset 32, expected 0"),
    ],
)
def test_two_file_layout_refusals(
    change: Callable[[onnx.ModelProto], None],
    reason: str,
    two_file: tuple[bytes, bytes],
    weights: list[TensorSpec],
    ops: frozenset[tuple[str, str]],
) -> None:
    data = _edit(two_file[0], change)
    assert reason in _refused(data, weights, ops, external_data_file=DATA_FILE)


# --- hostile values end in a refusal, never a crash ---------------------------------------


def _constant(tensor: TensorProto) -> Callable[[onnx.ModelProto], None]:
    return _with_node(helper.make_node("Constant", [], ["c"], value=tensor))


def _set_elem_type(value: int) -> Callable[[onnx.ModelProto], None]:
    def change(m: onnx.ModelProto) -> None:
        m.graph.value_info[0].type.tensor_type.elem_type = value

    return change


def _set_dim_value(m: onnx.ModelProto) -> None:
    m.graph.value_info[0].type.tensor_type.shape.dim[0].dim_value = -5


def _set_opset_version(m: onnx.ModelProto) -> None:
    m.opset_import[0].version = -1


_F = TensorProto.FLOAT


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        # Once a bare KeyError: 99 from onnx.helper.tensor_dtype_to_np_dtype.
        (_constant(TensorProto(data_type=99, dims=[1], raw_data=b"\0")), "data_type 99 is not"),
        (_constant(TensorProto(data_type=(1 << 31) - 1, dims=[1])), "data_type 2147483647"),
        (_constant(TensorProto(data_type=TensorProto.STRING, dims=[1])), "data_type 8 is not"),
        (_constant(TensorProto(data_type=TensorProto.INT4, dims=[2], raw_data=b"\0")), "type 22"),
        # 2**32 * 2**32 floats wraps to 0 bytes in int64: an empty raw_data once matched it.
        (_constant(TensorProto(data_type=_F, dims=[1 << 32, 1 << 32])), "value of 7378697629"),
        (_constant(TensorProto(data_type=_F, dims=[-1, -4], raw_data=b"\0" * 16)), "negative dim"),
        (_constant(TensorProto(data_type=_F, dims=[1] * 9, raw_data=b"\0" * 4)), "(limit dims)"),
        (_set_elem_type(99), "elem_type 99 is not a data type"),
        (_set_elem_type(-(1 << 31)), "elem_type -2147483648 is not a data type"),
        (_set_elem_type(0), "elem_type 0 is not a data type"),
        (_set_dim_value, "negative dim_value -5"),
        (_set_opset_version, "version -1 is not a known opset"),
    ],
)
def test_hostile_values_are_refused(
    change: Callable[[onnx.ModelProto], None],
    reason: str,
    template: OnnxTemplate,
    weights: list[TensorSpec],
    ops: frozenset[tuple[str, str]],
) -> None:
    assert reason in _refused(_edit(bytes(template.data), change), weights, ops)


def test_unknown_enum_values_are_refused(
    template: OnnxTemplate, weights: list[TensorSpec], ops: frozenset[tuple[str, str]]
) -> None:
    # AttributeProto.type (field 20) is a closed enum: upb keeps 99 as an unknown field.
    node = helper.make_node("Relu", ["frames"], ["o"])
    node.attribute.add(name="alpha", type=onnx.AttributeProto.FLOAT, f=1.0)
    type_float = _varint(20 << 3) + _varint(onnx.AttributeProto.FLOAT)
    raw = node.SerializeToString()
    assert raw.count(type_float) == 1
    data = bytes(template.data)
    graph = next(f for f in onnx_wire.iter_fields(data) if f.number == onnx_wire.MODEL_GRAPH)
    body = _varint(1 << 3 | 2) + _varint(len(raw)) + raw.replace(type_float, type_float[:-1] + b"c")
    body += data[graph.start : graph.end]
    key = _varint(onnx_wire.MODEL_GRAPH << 3 | 2)
    hostile = data[: graph.key_start] + key + _varint(len(body)) + body + data[graph.end :]
    assert onnx.ModelProto.FromString(hostile).graph.node[0].attribute[0].type == 0
    assert "not the canonical encoding" in _refused(hostile, weights, ops)


def test_a_check_that_breaks_refuses_with_a_short_reason(
    template: OnnxTemplate,
    weights: list[TensorSpec],
    ops: frozenset[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> None:
        raise IndexError("frame" * 10_000)

    monkeypatch.setattr(artifact, "_check_value_info", broken)
    reason = _refused(bytes(template.data), weights, ops)
    assert reason.startswith("malformed model: IndexError: 'frameframe")
    assert len(reason) < 160 and "(50000 chars)" in reason


@pytest.mark.parametrize(
    "spec",
    [
        TensorSpec("w", (2,), "<U4"),
        TensorSpec("w", (2,), "not a dtype"),
        TensorSpec("w", (-2,), "<f4"),
        TensorSpec("w", ("2",), "<f4"),  # type: ignore[arg-type]
        TensorSpec(7, (2,), "<f4"),  # type: ignore[arg-type]
        TensorSpec("w", (2,), "<c32"),
    ],
)
def test_expected_weights_no_file_could_match(
    spec: TensorSpec, template: OnnxTemplate, ops: frozenset[tuple[str, str]]
) -> None:
    with pytest.raises(ArtifactRefused, match="expected weight"):
        check_weight_specs([spec])
    assert "expected weight" in _refused(bytes(template.data), [spec], ops)


@pytest.mark.parametrize(
    "data",
    [b"\x00", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11, bytes(range(256))],
)
def test_op_set_of_bytes_that_are_no_model(data: bytes) -> None:
    with pytest.raises(ValueError):  # ArtifactRefused; never protobuf's own DecodeError
        op_set(data)


def test_wire_helpers_raise_value_errors_only() -> None:
    with pytest.raises(ValueError, match="negative"):
        onnx_wire.encode_varint(-1)
    with pytest.raises(ValueError, match="truncated varint"):
        onnx_wire.read_varint(b"\x80", 0, 10)  # an end past the buffer: no IndexError
    long_name = TensorProto(name="n" * 1000, raw_data=b"\0")
    graph = onnx.GraphProto(initializer=[long_name, long_name])
    with pytest.raises(ValueError, match=r"appears more than once") as caught:
        onnx_wire.initializer_spans(onnx.ModelProto(graph=graph).SerializeToString())
    assert len(str(caught.value)) < 120  # the name is cut short
