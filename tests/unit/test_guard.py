"""The egress guard against real smuggling attempts on a real drivenet-tiny release."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sluice.gateway.core.errors import PolicyRefused
from sluice.gateway.export.guard import (
    FILES,
    MANIFEST_FILE,
    PARSE,
    POLICY,
    TEMPLATE,
    GuardPolicy,
    GuardRefused,
    ReleaseFacts,
    Verdicts,
    check_model_bytes,
    check_policy,
    check_release_dir,
)
from sluice.gateway.export.refresh import refresh, write_release_files
from sluice.gateway.export.template import OnnxTemplate, build_template
from sluice.models import onnx_wire
from sluice.models.manifest import DATA_FILE, MODEL_FILE
from sluice.models.registry import ModelEntry, get
from sluice.models.schema import Schema

POLICY_DEFAULT = GuardPolicy()


def _frame() -> np.ndarray:
    """A 128x256x3 'video frame': a colour gradient, the payload every attack smuggles."""
    y, x = np.mgrid[0:128, 0:256]
    return np.stack([x, 2 * y, (x + y) // 2], axis=-1).astype(np.uint8)


FRAME = _frame()
FRAME_BYTES = FRAME.tobytes()  # 98304 bytes
FRAME_B64 = base64.b64encode(FRAME_BYTES).decode()  # protobuf strings must be UTF-8


# --- fixtures: one template and one genuine release per module ---------------------------


@pytest.fixture(scope="module")
def tiny() -> ModelEntry:
    return get("drivenet-tiny")


@pytest.fixture(scope="module")
def template(tiny: ModelEntry) -> OnnxTemplate:
    return build_template(tiny)


@pytest.fixture(scope="module")
def schema(tiny: ModelEntry) -> Schema:
    return tiny.schema()


@pytest.fixture(scope="module")
def release(template: OnnxTemplate, schema: Schema, tiny: ModelEntry) -> bytes:
    """model.onnx of a genuine release: the template refreshed with other real weights."""
    state = tiny.build(seed=7).state_dict()
    return refresh(template, schema, schema.flatten(state))


def _write_release(directory: Path, files: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    """A release directory holding files plus a manifest; returns the manifest's file list."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / MANIFEST_FILE).write_text('{"format":"test"}')
    return {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()}


def _ort_runs(source: bytes | Path) -> list[np.ndarray]:
    """Outputs of onnxruntime on one input frame batch: the attack file really works."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # pruned initializers and unknown fields are logged
    session = ort.InferenceSession(
        str(source) if isinstance(source, Path) else source,
        options,
        providers=["CPUExecutionProvider"],
    )
    frames = np.random.default_rng(0).random((2, 3, 64, 128), dtype=np.float32)
    return [np.asarray(out) for out in session.run(None, {"frames": frames})]


def _ort_loads(source: bytes | Path) -> bool:
    try:
        _ort_runs(source)
    except Exception:  # onnxruntime raises its own exception types
        return False
    return True


# --- helpers to build attack files ------------------------------------------------------


def _edit(data: bytes, change: Callable[[onnx.ModelProto], None]) -> bytes:
    model = onnx.ModelProto.FromString(data)
    change(model)
    return model.SerializeToString(deterministic=True)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | onnx_wire.LEN) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | onnx_wire.VARINT) + _varint(value)


def _into_graph(data: bytes, extra: bytes) -> bytes:
    """Insert raw fields at the start of the graph message, fixing its length prefix."""
    graph = next(f for f in onnx_wire.iter_fields(data) if f.number == onnx_wire.MODEL_GRAPH)
    key = _varint(onnx_wire.MODEL_GRAPH << 3 | onnx_wire.LEN)
    prefix_start = graph.start - len(_varint(graph.value)) - len(key)
    body = extra + data[graph.start : graph.end]
    return data[:prefix_start] + key + _varint(len(body)) + body + data[graph.end :]


def _chunks(text: str, n: int) -> list[str]:
    size = -(-len(text) // n)
    return [text[i * size : (i + 1) * size] for i in range(n)]


def _frame_tensor(name: str = "") -> TensorProto:
    return numpy_helper.from_array(FRAME, name)


# --- the attacks: each hides FRAME (or as much of it as fits) in a release -----------------


def extra_initializer(m: onnx.ModelProto) -> None:
    m.graph.initializer.append(_frame_tensor("frame"))


def model_metadata(m: onnx.ModelProto) -> None:
    m.metadata_props.add(key="frame", value=FRAME_B64)


def graph_metadata(m: onnx.ModelProto) -> None:
    m.graph.metadata_props.add(key="frame", value=FRAME_B64)


def node_metadata(m: onnx.ModelProto) -> None:
    m.graph.node[8].metadata_props.add(key="pkg.torch.onnx.stack_trace", value=FRAME_B64)


def model_doc_string(m: onnx.ModelProto) -> None:
    m.doc_string = FRAME_B64


def graph_doc_string(m: onnx.ModelProto) -> None:
    m.graph.doc_string = FRAME_B64


def node_doc_string(m: onnx.ModelProto) -> None:
    m.graph.node[8].doc_string = FRAME_B64


def value_info_doc_string(m: onnx.ModelProto) -> None:
    m.graph.value_info[0].doc_string = FRAME_B64


def attribute_doc_string(m: onnx.ModelProto) -> None:
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.attribute[0].doc_string = FRAME_B64


def weight_doc_string(m: onnx.ModelProto) -> None:
    m.graph.initializer[0].doc_string = FRAME_B64


def unused_constant(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Constant", [], ["smuggled"], value=_frame_tensor()))


def constant_as_output(m: onnx.ModelProto) -> None:
    # The global team would simply run the model and read the frame from an output.
    m.graph.node.append(helper.make_node("Constant", [], ["frame"], value=_frame_tensor()))
    m.graph.output.append(helper.make_tensor_value_info("frame", TensorProto.UINT8, FRAME.shape))


def constant_into_add(m: onnx.ModelProto) -> None:
    """lanes = Gemm(...) + sum(frame * 0): the outputs do not change at all."""
    head = next(n for n in m.graph.node if "lanes" in n.output)
    head.output[0] = "lanes_pre"
    flat = numpy_helper.from_array(FRAME.reshape(-1))
    m.graph.node.extend(
        [
            helper.make_node("Constant", [], ["frame_u8"], value=flat),
            helper.make_node("Cast", ["frame_u8"], ["frame_f"], to=TensorProto.FLOAT),
            helper.make_node("Constant", [], ["zero"], value_float=0.0),
            helper.make_node("Mul", ["frame_f", "zero"], ["frame_zero"]),
            helper.make_node("ReduceSum", ["frame_zero"], ["nothing"], keepdims=0),
            helper.make_node("Add", ["lanes_pre", "nothing"], ["lanes"]),
        ]
    )


def constant_value_ints(m: onnx.ModelProto) -> None:
    values = np.frombuffer(FRAME_BYTES, dtype="<i8").tolist()
    m.graph.node.append(helper.make_node("Constant", [], ["smuggled"], value_ints=values))


def node_names(m: onnx.ModelProto) -> None:
    for node, part in zip(m.graph.node, _chunks(FRAME_B64, len(m.graph.node)), strict=True):
        node.name = part


def value_names(m: onnx.ModelProto) -> None:
    """Rename every intermediate value, consistently, so the graph still runs."""
    keep = {v.name for v in m.graph.output} | {v.name for v in m.graph.input}
    inner = [o for n in m.graph.node for o in n.output if o not in keep]
    rename = dict(zip(inner, _chunks(FRAME_B64, len(inner)), strict=True))
    for node in m.graph.node:
        node.input[:] = [rename.get(v, v) for v in node.input]
        node.output[:] = [rename.get(v, v) for v in node.output]
    for info in m.graph.value_info:
        info.name = rename.get(info.name, info.name)


def dim_param(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "b" + FRAME_B64[:4000]


def external_initializer(m: onnx.ModelProto) -> None:
    t = TensorProto(name="frame", dims=FRAME.shape, data_type=TensorProto.UINT8)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "frame.bin"), ("offset", "0"), ("length", "98304")):
        t.external_data.add(key=key, value=value)
    m.graph.initializer.append(t)


def sparse_initializer(m: onnx.ModelProto) -> None:
    n = FRAME.size
    values = numpy_helper.from_array(FRAME.reshape(-1), "frame")
    indices = numpy_helper.from_array(np.arange(n, dtype=np.int64), "frame_indices")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [n]))


def if_subgraph(m: onnx.ModelProto) -> None:
    out = helper.make_tensor_value_info("branch", TensorProto.UINT8, None)
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["branch"], value=_frame_tensor())], "then", [], [out]
    )
    other = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["branch"], value=numpy_helper.from_array(FRAME[:1, :1])
            )
        ],
        "else",
        [],
        [out],
    )
    m.graph.node.extend(
        [
            helper.make_node(
                "Constant", [], ["yes"], value=numpy_helper.from_array(np.array(True))
            ),
            helper.make_node("If", ["yes"], ["frame"], then_branch=then, else_branch=other),
        ]
    )
    m.graph.output.append(helper.make_tensor_value_info("frame", TensorProto.UINT8, None))


def custom_op(m: onnx.ModelProto) -> None:
    m.opset_import.add(domain="com.smuggle", version=1)
    m.graph.node.append(
        helper.make_node("Frame", [], ["smuggled"], domain="com.smuggle", payload=_frame_tensor())
    )


def opset_import(m: onnx.ModelProto) -> None:
    m.opset_import.add(domain="com." + FRAME_B64[:2000], version=1)


def training_info(m: onnx.ModelProto) -> None:
    init = helper.make_graph([], "init", [], [], initializer=[_frame_tensor("frame")])
    m.training_info.add(initialization=init)


def local_function(m: onnx.ModelProto) -> None:
    node = helper.make_node("Constant", [], ["out"], value=_frame_tensor())
    m.functions.append(
        helper.make_function("smuggle", "Frame", [], ["out"], [node], [helper.make_opsetid("", 20)])
    )


def typed_data_beside_raw(m: onnx.ModelProto) -> None:
    # raw_data wins at load time; int32_data rides along unread.
    weight = m.graph.initializer[0]
    weight.int32_data.extend(np.frombuffer(FRAME_BYTES, dtype="<i4").tolist())


def weight_as_float_data(m: onnx.ModelProto) -> None:
    # Same values, moved from raw_data to float_data: the file layout is no longer fixed.
    weight = m.graph.initializer[0]
    values = numpy_helper.to_array(weight).reshape(-1).tolist()
    weight.ClearField("raw_data")
    weight.float_data.extend(values)


def second_attribute_value(m: onnx.ModelProto) -> None:
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    pads = next(a for a in conv.attribute if a.name == "pads")
    pads.s = FRAME_BYTES  # type INTS: runtimes read `ints` and never look at `s`


def unknown_attribute(m: onnx.ModelProto) -> None:
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.attribute.append(helper.make_attribute("note", FRAME_BYTES))


def overlong_raw_data(m: onnx.ModelProto) -> None:
    bias = next(t for t in m.graph.initializer if t.name == "lane_head.bias")
    bias.raw_data = bias.raw_data + FRAME_BYTES


def overlong_raw_data_with_dims(m: onnx.ModelProto) -> None:
    var = next(t for t in m.graph.initializer if t.name == "backbone.3.1.running_var")
    var.raw_data = var.raw_data + FRAME_BYTES
    var.dims[0] = len(var.raw_data) // 4


def one_byte_outside_weights(data: bytes) -> bytes:
    at = data.index(b"pytorch")
    return data[:at] + b"P" + data[at + 1 :]


def trailing_bytes(data: bytes) -> bytes:
    return data + FRAME_BYTES


def unknown_field(data: bytes) -> bytes:
    return data + _len_field(1000, FRAME_BYTES)


def repeated_producer_name(data: bytes) -> bytes:
    # The parser keeps the last producer_name, the template's; the first holds the frame.
    return _len_field(2, FRAME_B64.encode()) + data


def repeated_ir_version(data: bytes) -> bytes:
    words = np.frombuffer(FRAME_BYTES, dtype="<u8").tolist()
    return b"".join(_varint_field(1, w) for w in words) + data


def repeated_graph_name(data: bytes) -> bytes:
    return _into_graph(data, _len_field(2, FRAME_B64.encode()))


@dataclass(frozen=True)
class Attack:
    make: Callable[[bytes], bytes]
    parse_reason: str  # what the parse-level check must say
    loads: bool  # onnxruntime still loads and runs the file


def _proto(change: Callable[[onnx.ModelProto], None]) -> Callable[[bytes], bytes]:
    return lambda data: _edit(data, change)


NOT_ALLOWED = "is not allowed"
TOO_LONG = "more than the 256 allowed"
NOT_CANONICAL = "not the canonical encoding"

ATTACKS: dict[str, Attack] = {
    "extra initializer": Attack(_proto(extra_initializer), "'frame' is not an expected", True),
    "model metadata_props": Attack(_proto(model_metadata), "model: metadata_props", True),
    "graph metadata_props": Attack(_proto(graph_metadata), "graph: metadata_props", True),
    "node metadata_props": Attack(_proto(node_metadata), "metadata_props is not allowed", True),
    "model doc_string": Attack(_proto(model_doc_string), "model: doc_string", True),
    "graph doc_string": Attack(_proto(graph_doc_string), "graph: doc_string", True),
    "node doc_string": Attack(_proto(node_doc_string), "doc_string is not allowed", True),
    "value_info doc_string": Attack(_proto(value_info_doc_string), "doc_string", True),
    "attribute doc_string": Attack(_proto(attribute_doc_string), "doc_string", True),
    "weight doc_string": Attack(_proto(weight_doc_string), "doc_string is not allowed", True),
    "unused Constant": Attack(_proto(unused_constant), "Constant value of 98304 bytes", True),
    "Constant as output": Attack(_proto(constant_as_output), "Constant value of 98304", True),
    "Constant into Add": Attack(_proto(constant_into_add), "Constant value of 98304", True),
    "Constant value_ints": Attack(_proto(constant_value_ints), "Constant value of 98304", True),
    "node names": Attack(_proto(node_names), TOO_LONG, True),
    "value names": Attack(_proto(value_names), TOO_LONG, True),
    "dim_param": Attack(_proto(dim_param), TOO_LONG, True),
    "external data": Attack(_proto(external_initializer), "'frame' is not an expected", True),
    "sparse_initializer": Attack(_proto(sparse_initializer), "sparse_initializer", True),
    "If subgraph": Attack(_proto(if_subgraph), "op ai.onnx::If " + NOT_ALLOWED, True),
    "custom-domain op": Attack(_proto(custom_op), "opset_import", False),
    "opset import": Attack(_proto(opset_import), "opset_import", True),
    "training_info": Attack(_proto(training_info), "model: training_info", True),
    "local function": Attack(_proto(local_function), "model: functions", True),
    "typed data beside raw_data": Attack(_proto(typed_data_beside_raw), "int32_data", True),
    "weight as float_data": Attack(_proto(weight_as_float_data), "float_data", True),
    "second attribute value": Attack(_proto(second_attribute_value), "s " + NOT_ALLOWED, False),
    "unknown attribute": Attack(_proto(unknown_attribute), "Relu has no attribute", False),
    "over-long raw_data": Attack(_proto(overlong_raw_data), "raw_data holds 98320 bytes", False),
    "over-long raw_data, dims": Attack(_proto(overlong_raw_data_with_dims), "dims [24592]", False),
    "trailing bytes": Attack(trailing_bytes, "ModelProto", False),
    "unknown protobuf field": Attack(unknown_field, NOT_CANONICAL, True),
    "repeated producer_name": Attack(repeated_producer_name, NOT_CANONICAL, True),
    "repeated ir_version": Attack(repeated_ir_version, NOT_CANONICAL, True),
    "repeated graph name": Attack(repeated_graph_name, NOT_CANONICAL, True),
}


# --- genuine releases pass --------------------------------------------------------------


def test_genuine_release_passes(release: bytes, template: OnnxTemplate, schema: Schema) -> None:
    assert release != template.data  # real weights, not the template's own
    check_model_bytes(release, template, schema, POLICY_DEFAULT)
    check_model_bytes(memoryview(release), template, schema, POLICY_DEFAULT)


def test_genuine_release_dir_passes(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    expected = _write_release(tmp_path / "1", {MODEL_FILE: release})
    check_release_dir(tmp_path / "1", template, schema, POLICY_DEFAULT, expected)


# --- remembered verdicts never let other bytes through -----------------------------------


def test_a_remembered_verdict_covers_only_the_same_bytes(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    verdicts = Verdicts()
    expected = _write_release(tmp_path / "1", {MODEL_FILE: release})
    check_release_dir(tmp_path / "1", template, schema, POLICY_DEFAULT, expected, verdicts)
    sha = expected[MODEL_FILE][1]
    assert verdicts.accepted(sha, template, schema, POLICY_DEFAULT)
    # Same bytes: accepted again (now without parsing).
    check_release_dir(tmp_path / "1", template, schema, POLICY_DEFAULT, expected, verdicts)
    # The file swapped for an attack under the old manifest: its hash gives it away.
    attack = ATTACKS["Constant as output"].make(release)
    (tmp_path / "1" / MODEL_FILE).write_bytes(attack[: len(release)].ljust(len(release), b"\0"))
    with pytest.raises(GuardRefused) as caught:
        check_release_dir(tmp_path / "1", template, schema, POLICY_DEFAULT, expected, verdicts)
    assert caught.value.layers == (FILES,)
    # An insider who also rewrote the manifest's hash: new bytes, no verdict, full check.
    evil = _write_release(tmp_path / "2", {MODEL_FILE: attack})
    with pytest.raises(GuardRefused) as caught:
        check_release_dir(tmp_path / "2", template, schema, POLICY_DEFAULT, evil, verdicts)
    assert caught.value.layers == (PARSE, TEMPLATE)
    assert not verdicts.accepted(evil[MODEL_FILE][1], template, schema, POLICY_DEFAULT)


def test_a_verdict_is_per_policy(release: bytes, template: OnnxTemplate, schema: Schema) -> None:
    verdicts = Verdicts()
    sha = hashlib.sha256(release).hexdigest()
    verdicts.accept(sha, template, schema, POLICY_DEFAULT)
    stricter = GuardPolicy(max_constant_bytes=0)
    assert not verdicts.accepted(sha, template, schema, stricter)
    assert not verdicts.accepted(sha, template, get("drivenet").schema(), POLICY_DEFAULT)


def test_guard_refused_is_a_policy_refusal() -> None:
    assert issubclass(GuardRefused, PolicyRefused)
    exc = GuardRefused("why", (POLICY,))
    assert exc.reason == str(exc) == "why"


# --- every attack is refused, by both byte-level layers -----------------------------------


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused(
    name: str, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    attack = ATTACKS[name]
    data = attack.make(release)
    assert data != release
    assert _ort_loads(data) is attack.loads
    with pytest.raises(GuardRefused) as caught:
        check_model_bytes(data, template, schema, POLICY_DEFAULT)
    # Both layers refuse it on their own, and the reason names what the parser found.
    assert caught.value.layers == (PARSE, TEMPLATE), caught.value.reason
    assert attack.parse_reason in caught.value.reason


def test_the_frame_really_leaves_through_a_constant_output(release: bytes) -> None:
    outputs = _ort_runs(ATTACKS["Constant as output"].make(release))
    assert np.array_equal(outputs[-1], FRAME)


def test_constant_into_add_leaves_the_outputs_unchanged(release: bytes) -> None:
    genuine = _ort_runs(release)
    attacked = _ort_runs(ATTACKS["Constant into Add"].make(release))
    for a, b in zip(genuine, attacked, strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_byte_outside_the_weights(
    release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    data = one_byte_outside_weights(release)
    assert _ort_loads(data)
    with pytest.raises(GuardRefused) as caught:
        check_model_bytes(data, template, schema, POLICY_DEFAULT)
    # A well-formed file: the parser accepts it, the structure hash does not match.
    assert caught.value.layers == (PARSE, TEMPLATE)
    assert "differs from the template at byte" in caught.value.reason
    assert "structure hash" in caught.value.reason


def test_weight_bytes_may_change_but_not_move(
    release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    # Rewriting every weight value is a genuine release; the guard cannot see low bits.
    out = bytearray(release)
    rng = np.random.default_rng(0)
    for r in template.ranges:
        out[r.start : r.end] = rng.standard_normal((r.end - r.start) // 4).astype("<f4").tobytes()
    check_model_bytes(bytes(out), template, schema, POLICY_DEFAULT)
    with pytest.raises(GuardRefused, match="bytes where the template"):
        check_model_bytes(bytes(out[:-1]), template, schema, POLICY_DEFAULT)


def test_template_for_another_schema_is_refused(release: bytes, template: OnnxTemplate) -> None:
    other = get("drivenet").schema()
    with pytest.raises(GuardRefused, match="is for schema"):
        check_model_bytes(release, template, other, POLICY_DEFAULT)


# --- the release directory --------------------------------------------------------------


def _refused_dir(
    directory: Path, t: OnnxTemplate, s: Schema, expected: dict[str, tuple[int, str]]
) -> GuardRefused:
    with pytest.raises(GuardRefused) as caught:
        check_release_dir(directory, t, s, POLICY_DEFAULT, expected)
    return caught.value


def test_external_data_with_side_file(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    model = ATTACKS["external data"].make(release)
    directory = tmp_path / "1"
    expected = _write_release(directory, {MODEL_FILE: model, "frame.bin": FRAME_BYTES})
    # A realistic attack: loaded from its directory, onnxruntime reads the side file.
    assert _ort_loads(directory / MODEL_FILE)
    refusal = _refused_dir(directory, template, schema, expected)
    assert "frame.bin" in refusal.reason and refusal.layers == (FILES,)
    # Listed or not in the manifest, the side file is what the guard names.
    del expected["frame.bin"]
    refusal = _refused_dir(directory, template, schema, expected)
    assert "unexpected entries ['frame.bin']" in refusal.reason


def test_side_file_next_to_a_genuine_model(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    expected = _write_release(tmp_path / "1", {MODEL_FILE: release})
    (tmp_path / "1" / ".frame.png").write_bytes(FRAME_BYTES)
    assert (
        "unexpected entries ['.frame.png']"
        in _refused_dir(tmp_path / "1", template, schema, expected).reason
    )


def test_subdirectory(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    expected = _write_release(tmp_path / "1", {MODEL_FILE: release})
    (tmp_path / "1" / "extra").mkdir()
    (tmp_path / "1" / "extra" / "frame.raw").write_bytes(FRAME_BYTES)
    assert (
        "unexpected entries ['extra']"
        in _refused_dir(tmp_path / "1", template, schema, expected).reason
    )


def test_symlinked_model(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    # The link points at a genuine file: what it points to may change after the check.
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(release)
    expected = _write_release(tmp_path / "1", {})
    expected[MODEL_FILE] = (len(release), hashlib.sha256(release).hexdigest())
    (tmp_path / "1" / MODEL_FILE).symlink_to(elsewhere)
    refusal = _refused_dir(tmp_path / "1", template, schema, expected)
    assert "model.onnx: is a symlink" in refusal.reason and refusal.layers == (FILES,)


def test_symlinked_manifest_and_directory(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    expected = _write_release(tmp_path / "1", {MODEL_FILE: release})
    link = tmp_path / "2"
    link.symlink_to(tmp_path / "1", target_is_directory=True)
    assert "not a directory we can open" in _refused_dir(link, template, schema, expected).reason
    manifest = tmp_path / "1" / MANIFEST_FILE
    manifest.rename(tmp_path / "manifest.json")
    manifest.symlink_to(tmp_path / "manifest.json")
    assert (
        "manifest.json: is a symlink"
        in _refused_dir(tmp_path / "1", template, schema, expected).reason
    )


def test_file_altered_after_publication(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    expected = _write_release(tmp_path / "1", {MODEL_FILE: release})
    altered = one_byte_outside_weights(release)
    (tmp_path / "1" / MODEL_FILE).write_bytes(altered)
    refusal = _refused_dir(tmp_path / "1", template, schema, expected)
    assert "sha256" in refusal.reason and refusal.layers == (FILES,)
    # Whoever also rewrites the manifest's sha256 still meets the template check.
    expected[MODEL_FILE] = (len(altered), hashlib.sha256(altered).hexdigest())
    refusal = _refused_dir(tmp_path / "1", template, schema, expected)
    assert refusal.layers == (PARSE, TEMPLATE)


def test_wrong_size_and_missing_files(
    tmp_path: Path, release: bytes, template: OnnxTemplate, schema: Schema
) -> None:
    expected = _write_release(tmp_path / "1", {MODEL_FILE: release})
    size, sha = expected[MODEL_FILE]
    reason = _refused_dir(tmp_path / "1", template, schema, {MODEL_FILE: (size + 1, sha)}).reason
    assert f"{size} bytes, the manifest says {size + 1}" in reason
    (tmp_path / "1" / MANIFEST_FILE).unlink()
    assert (
        "missing ['manifest.json']"
        in _refused_dir(tmp_path / "1", template, schema, expected).reason
    )
    only_data = {DATA_FILE: expected[MODEL_FILE]}
    assert (
        "the manifest lists ['model.onnx.data']"
        in _refused_dir(tmp_path / "1", template, schema, only_data).reason
    )


# --- the two-file layout ----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_file_template(tiny: ModelEntry) -> OnnxTemplate:
    t = build_template(tiny, two_file_threshold=0)
    assert t.data_file == DATA_FILE
    return t


def _two_file_release(
    directory: Path, template: OnnxTemplate, schema: Schema, tiny: ModelEntry
) -> dict[str, tuple[int, str]]:
    payload = directory.with_name("payload.bin")
    payload.write_bytes(schema.flatten(tiny.build(seed=7).state_dict()))
    written = write_release_files(template, schema, payload, directory)
    (directory / MANIFEST_FILE).write_text('{"format":"test"}')
    return {name: (size, sha) for name, size, sha in written}


def _rewrite(path: Path, data: bytes, expected: dict[str, tuple[int, str]]) -> None:
    """Replace a release file and, as an insider would, its manifest entry."""
    path.write_bytes(data)
    expected[path.name] = (len(data), hashlib.sha256(data).hexdigest())


def test_two_file_release_passes_and_runs(
    tmp_path: Path,
    release: bytes,
    two_file_template: OnnxTemplate,
    schema: Schema,
    tiny: ModelEntry,
) -> None:
    expected = _two_file_release(tmp_path / "1", two_file_template, schema, tiny)
    assert sorted(expected) == [MODEL_FILE, DATA_FILE]
    check_release_dir(tmp_path / "1", two_file_template, schema, POLICY_DEFAULT, expected)
    for a, b in zip(_ort_runs(tmp_path / "1" / MODEL_FILE), _ort_runs(release), strict=True):
        np.testing.assert_array_equal(a, b)


def test_two_file_data_with_the_frame_appended(
    tmp_path: Path, two_file_template: OnnxTemplate, schema: Schema, tiny: ModelEntry
) -> None:
    expected = _two_file_release(tmp_path / "1", two_file_template, schema, tiny)
    path = tmp_path / "1" / DATA_FILE
    original = path.read_bytes()
    path.write_bytes(original + FRAME_BYTES)
    assert _ort_loads(tmp_path / "1" / MODEL_FILE)  # onnxruntime never reads the tail
    refusal = _refused_dir(tmp_path / "1", two_file_template, schema, expected)
    assert refusal.layers == (FILES,) and "model.onnx.data: 182552 bytes" in refusal.reason
    _rewrite(path, original + FRAME_BYTES, expected)
    refusal = _refused_dir(tmp_path / "1", two_file_template, schema, expected)
    assert refusal.layers == (FILES,) and "the release's tensors are 84248" in refusal.reason


def test_two_file_extra_initializer_into_the_data_file(
    tmp_path: Path, two_file_template: OnnxTemplate, schema: Schema, tiny: ModelEntry
) -> None:
    expected = _two_file_release(tmp_path / "1", two_file_template, schema, tiny)
    size = expected[DATA_FILE][0]

    def point_at_frame(m: onnx.ModelProto) -> None:
        t = TensorProto(name="frame", dims=FRAME.shape, data_type=TensorProto.UINT8)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(size)), ("length", "98304")):
            t.external_data.add(key=key, value=value)
        m.graph.initializer.append(t)

    model = _edit((tmp_path / "1" / MODEL_FILE).read_bytes(), point_at_frame)
    _rewrite(tmp_path / "1" / MODEL_FILE, model, expected)
    data = tmp_path / "1" / DATA_FILE
    data.write_bytes(data.read_bytes() + FRAME_BYTES)
    assert _ort_loads(tmp_path / "1" / MODEL_FILE)
    refusal = _refused_dir(tmp_path / "1", two_file_template, schema, expected)
    assert refusal.layers == (FILES,)  # the manifest's data size is not the graph's
    # Even with the guard's size check out of the way, the model itself is refused.
    with pytest.raises(GuardRefused) as caught:
        check_model_bytes(model, two_file_template, schema, POLICY_DEFAULT)
    assert caught.value.layers == (PARSE, TEMPLATE)
    assert "'frame' is not an expected weight" in caught.value.reason


def test_two_file_model_pointing_elsewhere(
    tmp_path: Path, two_file_template: OnnxTemplate, schema: Schema, tiny: ModelEntry
) -> None:
    expected = _two_file_release(tmp_path / "1", two_file_template, schema, tiny)
    path = tmp_path / "1" / MODEL_FILE

    def elsewhere(m: onnx.ModelProto) -> None:
        m.graph.initializer[0].external_data[0].value = "../../frame.bin"

    _rewrite(path, _edit(path.read_bytes(), elsewhere), expected)
    refusal = _refused_dir(tmp_path / "1", two_file_template, schema, expected)
    assert refusal.layers == (PARSE, TEMPLATE) and "'../../frame.bin'" in refusal.reason


def test_layout_must_match_the_template(
    tmp_path: Path,
    release: bytes,
    template: OnnxTemplate,
    two_file_template: OnnxTemplate,
    schema: Schema,
    tiny: ModelEntry,
) -> None:
    one = _write_release(tmp_path / "one", {MODEL_FILE: release})
    two = _two_file_release(tmp_path / "two", two_file_template, schema, tiny)
    refusal = _refused_dir(tmp_path / "one", two_file_template, schema, one)
    assert "makes releases of ['model.onnx', 'model.onnx.data']" in refusal.reason
    refusal = _refused_dir(tmp_path / "two", template, schema, two)
    assert "makes releases of ['model.onnx']; the manifest lists" in refusal.reason
    with pytest.raises(GuardRefused) as caught:
        check_model_bytes(release, two_file_template, schema, POLICY_DEFAULT)
    assert caught.value.layers == (PARSE, TEMPLATE)


# --- policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("facts", "policy", "reason"),
    [
        (ReleaseFacts(2, 0.0), GuardPolicy(), "2 distinct trainers; a release needs at least 3"),
        (ReleaseFacts(4, 0.0), GuardPolicy(min_trainers=5), "needs at least 5"),
        (ReleaseFacts(3, None), GuardPolicy(), "no parity result"),
        (ReleaseFacts(3, 2e-4), GuardPolicy(), "parity max abs diff 0.0002"),
        (ReleaseFacts(3, float("nan")), GuardPolicy(), "parity max abs diff nan"),
        (ReleaseFacts(3, 0.0), GuardPolicy(max_epsilon=1.0), "no DP epsilon"),
        (ReleaseFacts(3, 0.0, 2.5), GuardPolicy(max_epsilon=1.0), "DP epsilon 2.5"),
        (ReleaseFacts(3, 0.0, float("nan")), GuardPolicy(max_epsilon=1.0), "DP epsilon nan"),
    ],
)
def test_policy_refuses(facts: ReleaseFacts, policy: GuardPolicy, reason: str) -> None:
    with pytest.raises(GuardRefused) as caught:
        check_policy(facts, policy)
    assert reason in caught.value.reason and caught.value.layers == (POLICY,)


@pytest.mark.parametrize(
    ("facts", "policy"),
    [
        (ReleaseFacts(3, 0.0), GuardPolicy()),
        (ReleaseFacts(3, 1e-4), GuardPolicy()),
        (ReleaseFacts(1, 5e-5), GuardPolicy(min_trainers=1)),
        (ReleaseFacts(3, 0.0, 7.0), GuardPolicy()),  # epsilon not enforced without a max
        (ReleaseFacts(3, 0.0, 1.0), GuardPolicy(max_epsilon=1.0)),
    ],
)
def test_policy_accepts(facts: ReleaseFacts, policy: GuardPolicy) -> None:
    check_policy(facts, policy)
