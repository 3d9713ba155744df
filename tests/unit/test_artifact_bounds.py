"""Bounded totals: the format check alone has a stated capacity, and a pinned structure holds."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sluice.clients import verify
from sluice.clients.verify import verify_release
from sluice.gateway.export.guard import (
    data_file_weights,
    graph_weights,
    outside_graph,
    weight_specs,
)
from sluice.gateway.export.refresh import refresh, write_release_files
from sluice.gateway.export.template import OnnxTemplate, build_template
from sluice.models import artifact
from sluice.models.artifact import (
    ArtifactRefused,
    StructureLimits,
    capacity_bytes,
    inspect_onnx,
    op_set,
)
from sluice.models.manifest import (
    DATA_FILE,
    MANIFEST_FORMAT,
    MODEL_FILE,
    ManifestRefused,
    canonical_json,
)
from sluice.models.manifest import _check_weights as manifest_check_weights
from sluice.models.manifest import outside_graph as manifest_outside
from sluice.models.registry import InputSpec, ModelEntry, get
from sluice.models.schema import Schema, TensorSpec
from tests.manifests import filler_fields
from tests.unit.test_guard import FRAME, FRAME_B64, FRAME_BYTES, _chunks, _edit

DEFAULTS = StructureLimits()
Ops = frozenset[tuple[str, str]]


# --- a genuine release, and a way to sign one as whoever holds the key --------------------


@dataclass(frozen=True)
class Genuine:
    template: OnnxTemplate
    schema: Schema
    release: bytes  # model.onnx of a release: the template with other real weights
    weights: list[TensorSpec]
    ops: Ops

    def __repr__(self) -> str:  # short, for hypothesis and pytest reports
        return f"Genuine({self.template.model!r} release)"


def genuine_release(name: str = "drivenet-tiny") -> Genuine:
    entry = get(name)
    template, schema = build_template(entry), entry.schema()
    release = refresh(template, schema, schema.flatten(entry.build(seed=7).state_dict()))
    return Genuine(
        template, schema, release, graph_weights(template, schema), op_set(template.data)
    )


@pytest.fixture(scope="module")
def genuine() -> Genuine:
    return genuine_release()


def signed_release(
    directory: Path,
    key: Ed25519PrivateKey,
    model: bytes,
    g: Genuine,
    structure: str | None = None,
    **changes: Any,
) -> tuple[bytes, bytes, dict[str, Path]]:
    """(manifest.json, signature, files) of a release of `model`, signed with key: what the
    gateway publishes, or what a leaked key can publish. structure: the hash the manifest
    names (the template's unless given); changes replace manifest fields (None removes)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MODEL_FILE
    path.write_bytes(model)
    doc: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "model": g.template.model,
        "version": 1,
        "structure_hash": structure or g.template.structure_hash,
        "weights": [{"name": w.name, "shape": list(w.shape), "dtype": w.dtype} for w in g.weights],
        "ops": sorted([d, o] for d, o in g.ops),
        "files": [
            {"name": MODEL_FILE, "size": len(model), "sha256": hashlib.sha256(model).hexdigest()}
        ],
        **filler_fields(key.public_key()),
    }
    for field, value in changes.items():
        if value is None:
            del doc[field]
        else:
            doc[field] = value
    manifest = canonical_json(doc)
    return manifest, key.sign(manifest), {MODEL_FILE: path}


def _refused(data: bytes, g: Genuine, limits: StructureLimits = DEFAULTS) -> str:
    with pytest.raises(ArtifactRefused) as caught:
        inspect_onnx(data, g.weights, allowed_ops=g.ops, limits=limits)
    return str(caught.value)


def _alone(limit: str) -> StructureLimits:
    """The default for `limit`, every other StructureLimits field lifted out of the way."""
    lifted = {f.name: 1 << 40 for f in fields(StructureLimits) if f.name != limit}
    return StructureLimits(**lifted)


# --- the frame, smuggled through the structure ---------------------------------------------

WORDS = np.frombuffer(FRAME_BYTES, dtype="<u8") & np.uint64((1 << 63) - 1)  # 12,288 dims' worth
NAMES = _chunks(FRAME_B64, 512)  # 512 names of 256 characters: the frame in base64


def _value(name: str, dims: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def constants_of_64_bytes(m: onnx.ModelProto) -> None:
    for i in range(len(FRAME_BYTES) // 64):
        chunk = np.frombuffer(FRAME_BYTES[64 * i : 64 * (i + 1)], dtype=np.uint8)
        value = numpy_helper.from_array(chunk)
        m.graph.node.append(helper.make_node("Constant", [], [f"frame_{i}"], value=value))


def zero_size_constant_dims(m: onnx.ModelProto) -> None:
    value = TensorProto(data_type=TensorProto.UINT8, dims=[0, *WORDS[1:].tolist()])
    m.graph.node.append(helper.make_node("Constant", [], ["frame"], value=value))


def dim_values_in_one_value(m: onnx.ModelProto) -> None:
    m.graph.value_info.append(_value("frame", WORDS.tolist()))


def dim_values_eight_per_value(m: onnx.ModelProto) -> None:
    for i in range(0, len(WORDS), 8):
        m.graph.value_info.append(_value(f"d{i}", WORDS[i : i + 8].tolist()))


def value_info_names(m: onnx.ModelProto) -> None:
    m.graph.value_info.extend(_value(name, [1]) for name in NAMES)


def graph_input_names(m: onnx.ModelProto) -> None:
    m.graph.input.extend(_value(name, [1]) for name in NAMES)


def graph_output_names(m: onnx.ModelProto) -> None:
    m.graph.output.extend(_value(name, [1]) for name in NAMES)


def node_names(m: onnx.ModelProto) -> None:
    for i, name in enumerate(NAMES):
        m.graph.node.append(helper.make_node("Relu", ["frames"], [f"r{i}"], name=name))


def relu_inputs(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Relu", NAMES, ["frame"]))


def concat_inputs(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Concat", NAMES, ["frame"], axis=0))


@dataclass(frozen=True)
class Encoding:
    change: Callable[[onnx.ModelProto], None]
    closed_by: tuple[str, ...]  # reasons that each close the encoding on their own


def limit(name: str) -> str:
    return f"(limit {name})"


STRUCTURE = limit("structure_bytes")


FRAME_ENCODINGS: dict[str, Encoding] = {
    "1536 Constants of 64 bytes": Encoding(
        constants_of_64_bytes, (STRUCTURE, limit("constant_bytes"), limit("nodes"))
    ),
    "one zero-size Constant with 12,288 dims": Encoding(
        zero_size_constant_dims, (STRUCTURE, limit("dims"), limit("total_dims"))
    ),
    "12,288 dim_values in one value_info": Encoding(
        dim_values_in_one_value, (STRUCTURE, limit("dims"), limit("total_dims"))
    ),
    "12,288 dim_values, 8 per value_info": Encoding(
        dim_values_eight_per_value, (STRUCTURE, limit("value_infos"), limit("total_dims"))
    ),
    "512 value_info names of 256 chars": Encoding(
        value_info_names, (STRUCTURE, limit("name_bytes"))
    ),
    "512 graph inputs of 256 chars": Encoding(
        graph_input_names, (STRUCTURE, limit("graph_inputs"), limit("name_bytes"))
    ),
    "512 graph outputs of 256 chars": Encoding(
        graph_output_names, (STRUCTURE, limit("graph_outputs"), limit("name_bytes"))
    ),
    "512 node names of 256 chars": Encoding(node_names, (STRUCTURE, limit("name_bytes"))),
    # Its schema refuses it before a name is read: no limit need be in force at all.
    "one Relu with 512 inputs": Encoding(
        relu_inputs, ("512 inputs, Relu takes at most 1 (its schema)",)
    ),
    "one Concat with 512 inputs": Encoding(
        concat_inputs, (STRUCTURE, limit("node_arity"), limit("name_bytes"))
    ),
}


def test_capacity_is_less_than_a_frame() -> None:
    assert capacity_bytes(DEFAULTS) == DEFAULTS.structure_bytes + 1 == 65_537
    assert capacity_bytes(DEFAULTS) < FRAME.nbytes == 98_304
    assert capacity_bytes(StructureLimits(structure_bytes=10)) == 11


@pytest.mark.parametrize("name", list(FRAME_ENCODINGS))
def test_a_frame_in_the_structure_is_refused(name: str, genuine: Genuine) -> None:
    encoding = FRAME_ENCODINGS[name]
    data = _edit(genuine.release, encoding.change)
    # The frame really is in the file, outside the weights.
    assert len(data) - len(genuine.release) >= len(FRAME_BYTES) * 3 // 4
    assert "(limit " in _refused(data, genuine) or "(its schema)" in _refused(data, genuine)
    # The structure bound closes it alone, and so does each channel's own bound.
    for reason in encoding.closed_by:
        bound = reason.removeprefix("(limit ").removesuffix(")")
        only = _alone(bound) if reason.startswith("(limit ") else _alone("")
        assert reason in _refused(data, genuine, only)


# --- small channels -----------------------------------------------------------------------


def _conv(i: int, **attributes: Any) -> onnx.NodeProto:
    return helper.make_node("Conv", ["frames", "backbone.0.0.weight"], [f"c{i}"], **attributes)


def string_attributes(m: onnx.ModelProto) -> None:
    # auto_pad is a STRING that runtimes compare with 4 words; 250 bytes each carry a payload.
    m.graph.node.extend(_conv(i, auto_pad=FRAME_B64[250 * i : 250 * (i + 1)]) for i in range(40))


def integer_list_attributes(m: onnx.ModelProto) -> None:
    words = np.frombuffer(FRAME_BYTES, dtype="<i8")
    m.graph.node.extend(_conv(i, pads=words[32 * i : 32 * (i + 1)].tolist()) for i in range(40))


def _header(field: str, value: str) -> Callable[[onnx.ModelProto], None]:
    def change(m: onnx.ModelProto) -> None:
        target = m.graph if field == "name" else m
        setattr(target, field, value)

    return change


def _default_domain_in_nodes(m: onnx.ModelProto) -> None:
    m.graph.node[0].domain = "ai.onnx"


def _default_domain_in_opset(m: onnx.ModelProto) -> None:
    m.opset_import[0].domain = "ai.onnx"


def _long_constant_tensor_name(m: onnx.ModelProto) -> None:
    value = numpy_helper.from_array(np.zeros(1, dtype=np.float32), FRAME_B64[:1000])
    m.graph.node.append(helper.make_node("Constant", [], ["c"], value=value))


def _constants_in_all(m: onnx.ModelProto) -> None:
    # 64 Constants of 64 bytes each: every one within the per-value limit, 4096 + 64 in all.
    for i in range(65):
        value = numpy_helper.from_array(np.full(16, i, dtype=np.float32))
        m.graph.node.append(helper.make_node("Constant", [], [f"k{i}"], value=value))


SMALL_CHANNELS: dict[str, tuple[Callable[[onnx.ModelProto], None], str]] = {
    "string attributes": (string_attributes, limit("attribute_bytes")),
    "integer-list attributes": (integer_list_attributes, limit("attribute_bytes")),
    "one long string attribute": (
        lambda m: m.graph.node.append(_conv(0, auto_pad=FRAME_B64[:300])),
        "length 300, more than the 256 allowed",
    ),
    "Constants, each small": (_constants_in_all, limit("constant_bytes")),
    "producer_name": (_header("producer_name", FRAME_B64[:100]), limit("header_bytes")),
    "producer_version": (_header("producer_version", FRAME_B64[:65]), limit("header_bytes")),
    "model domain": (_header("domain", FRAME_B64[:100]), limit("header_bytes")),
    "graph name": (_header("name", FRAME_B64[:100]), limit("header_bytes")),
    "'ai.onnx' in a node": (_default_domain_in_nodes, "spelled '' here, not 'ai.onnx'"),
    "'ai.onnx' in opset_import": (_default_domain_in_opset, "spelled '' here, not 'ai.onnx'"),
    "Constant tensor name": (_long_constant_tensor_name, "length 1000, more than the 256"),
}


@pytest.mark.parametrize("name", list(SMALL_CHANNELS))
def test_small_channels_are_bounded(name: str, genuine: Genuine) -> None:
    change, reason = SMALL_CHANNELS[name]
    assert reason in _refused(_edit(genuine.release, change), genuine)


MARK = "zqxjzq"  # a name set by proto edit, then made invalid UTF-8 of the same length
NOT_UTF8 = b"zq\xff\xfezq"


def _mark(where: str) -> Callable[[onnx.ModelProto], None]:
    def change(m: onnx.ModelProto) -> None:
        g, conv = m.graph, next(n for n in m.graph.node if n.op_type == "Conv")
        if where == "node name":
            g.node[0].name = MARK
        elif where == "op_type":
            g.node[0].op_type = MARK
        elif where == "value name":
            g.node[0].output[0] = MARK
        elif where == "value_info name":
            g.value_info[0].name = MARK
        elif where == "dim_param":
            g.input[0].type.tensor_type.shape.dim[0].dim_param = MARK
        elif where == "graph name":
            g.name = MARK
        elif where == "producer_name":
            m.producer_name = MARK
        elif where == "opset domain":
            m.opset_import[0].domain = MARK
        elif where == "attribute name":
            conv.attribute[0].name = MARK
        elif where == "string attribute":
            next(a for a in conv.attribute if a.name == "auto_pad").s = MARK.encode()
        elif where == "initializer name":
            g.initializer[0].name = MARK
        elif where == "Constant tensor name":
            value = numpy_helper.from_array(np.zeros(1, dtype=np.float32), MARK)
            g.node.append(helper.make_node("Constant", [], ["c"], value=value))

    return change


@pytest.mark.parametrize(
    "where",
    [
        "node name",
        "op_type",
        "value name",
        "value_info name",
        "dim_param",
        "graph name",
        "producer_name",
        "opset domain",
        "attribute name",
        "string attribute",
        "initializer name",
        "Constant tensor name",
    ],
)
def test_names_and_strings_must_be_utf8(where: str, genuine: Genuine) -> None:
    marked = _edit(genuine.release, _mark(where))
    assert marked.count(MARK.encode()) == 1
    data = marked.replace(MARK.encode(), NOT_UTF8)
    assert onnx.ModelProto.FromString(data)  # upb parses it: a proto2 string of any bytes
    assert "is not valid UTF-8" in _refused(data, genuine)


# --- real models fit with room to spare ------------------------------------------------------

# Totals a real model may use at most half of: headroom, not a tight fit.
HALVED = StructureLimits(
    **{
        f.name: getattr(DEFAULTS, f.name) // 2
        for f in fields(StructureLimits)
        if f.name not in ("dims", "node_arity", "graph_inputs", "graph_outputs", "header_bytes")
    }
)


class _Block(nn.Module):
    """A pre-norm transformer encoder block: attention, LayerNorm, GELU."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class _Encoder(nn.Module):
    def __init__(self, layers: int = 2, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, 3)
        scores: torch.Tensor = self.head(self.ln(self.blocks(tokens)))
        return scores


TRANSFORMER = ModelEntry("encoder-tiny", _Encoder, (InputSpec("tokens", (1, 16, 32)),), ("scores",))


@pytest.mark.parametrize("name", ["drivenet-tiny", "drivenet", "encoder-tiny"])
def test_real_models_pass_with_half_the_limits(name: str, genuine: Genuine) -> None:
    entry = TRANSFORMER if name == "encoder-tiny" else get(name)
    template = genuine.template if name == "drivenet-tiny" else build_template(entry)
    weights, ops = graph_weights(template, entry.schema()), op_set(template.data)
    if name == "encoder-tiny":
        assert {("", "LayerNormalization"), ("", "Gelu"), ("", "Softmax")} <= ops
    report = inspect_onnx(template.data, weights, allowed_ops=ops, limits=HALVED)
    assert report.structure_hash == template.structure_hash
    assert report.structure_bytes <= capacity_bytes(HALVED) < capacity_bytes(DEFAULTS)
    if name != "encoder-tiny":  # ~6.5 KB at any width: the DriveNet graph does not grow
        assert report.structure_bytes < DEFAULTS.structure_bytes // 8


@pytest.fixture(scope="module")
def two_file() -> OnnxTemplate:
    t = build_template(get("drivenet-tiny"), two_file_threshold=0)
    assert t.data_file == DATA_FILE
    return t


def test_two_file_layout_passes_and_is_bounded(two_file: OnnxTemplate, genuine: Genuine) -> None:
    two, schema = two_file, genuine.schema
    assert two.data_file is not None and two.outside_graph  # drivenet-tiny: BatchNorm counters
    weights, outside = data_file_weights(two, schema), outside_graph(two, schema)
    report = inspect_onnx(
        two.data,
        weights,
        allowed_ops=genuine.ops,
        external_data_file=two.data_file,
        outside_graph=outside,
    )
    # The tensors outside the graph are structure: counted, and in the structure hash.
    assert report.structure_bytes == len(two.data) + len(two.outside_graph)
    assert report.structure_bytes < DEFAULTS.structure_bytes // 4
    assert report.structure_hash == two.structure_hash
    assert report.external_data_bytes == schema.payload_bytes
    small = StructureLimits(structure_bytes=report.structure_bytes - 1)
    with pytest.raises(ArtifactRefused, match=r"\(limit structure_bytes\)"):
        inspect_onnx(
            two.data,
            weights,
            allowed_ops=genuine.ops,
            external_data_file=two.data_file,
            limits=small,
            outside_graph=outside,
        )


def _outside_release(
    directory: Path, key: Ed25519PrivateKey, two: OnnxTemplate, g: Genuine, weights: list[Any]
) -> tuple[bytes, bytes, dict[str, Path]]:
    """A two-file release signed with key whose manifest lists `weights` (entries with
    "in_graph": false included) and whose data file is as long as they say."""
    specs = [TensorSpec(w["name"], tuple(w["shape"]), w["dtype"]) for w in weights]
    size = sum(artifact.tensor_bytes(spec) for spec in specs)
    data = np.random.default_rng(3).integers(0, 3, size, dtype=np.uint8).tobytes()
    (directory).mkdir(parents=True, exist_ok=True)
    (directory / DATA_FILE).write_bytes(data)
    listed = [
        {"name": MODEL_FILE, "size": len(two.data), "sha256": hashlib.sha256(two.data).hexdigest()},
        {"name": DATA_FILE, "size": size, "sha256": hashlib.sha256(data).hexdigest()},
    ]
    outside = manifest_outside({"weights": weights}["weights"])
    description = artifact.outside_graph_description(specs, outside)
    structure = artifact.structure_hash(two.data, (), description)
    manifest, signature, files = signed_release(
        directory, key, bytes(two.data), g, structure, files=listed, weights=weights
    )
    files[DATA_FILE] = directory / DATA_FILE
    return manifest, signature, files


def test_tensors_outside_the_graph_are_pinned_with_the_structure(
    tmp_path: Path, two_file: OnnxTemplate, genuine: Genuine
) -> None:
    """A leaked key adds a tensor outside the graph (a frame in the data file, or one of
    size 0 whose name carries the data), moves a counter, or lists a graph weight as
    outside: a pinned structure refuses each; the genuine listing passes."""
    two, key = two_file, Ed25519PrivateKey.generate()
    genuine_weights = weight_specs(two, genuine.schema)
    assert [w["name"] for w in genuine_weights if w.get("in_graph") is False]
    pin = two.structure_hash
    signed = _outside_release(tmp_path / "genuine", key, two, genuine, genuine_weights)
    assert verify_release(*signed[:2], key.public_key(), signed[2], structure_hash=pin)

    frame = {"name": "frame", "shape": list(FRAME.shape), "dtype": "|u1", "in_graph": False}
    named = {"name": FRAME_B64[:200], "shape": [0], "dtype": "<f4", "in_graph": False}
    counters = [i for i, w in enumerate(genuine_weights) if w.get("in_graph") is False]
    moved = list(genuine_weights)
    moved[counters[0]], moved[counters[0] - 1] = moved[counters[0] - 1], moved[counters[0]]
    for label, weights in (
        ("frame", [*genuine_weights, frame]),
        ("name", [named, *genuine_weights]),
    ):
        signed = _outside_release(tmp_path / label, key, two, genuine, weights)
        assert verify_release(*signed[:2], key.public_key(), signed[2])  # unpinned: the key's
        with pytest.raises(ManifestRefused, match="not the pinned"):
            verify_release(*signed[:2], key.public_key(), signed[2], structure_hash=pin)

    # A counter listed elsewhere in the data file: the graph's offsets no longer fit it.
    signed = _outside_release(tmp_path / "moved", key, two, genuine, moved)
    with pytest.raises(ManifestRefused, match="external data offset"):
        verify_release(*signed[:2], key.public_key(), signed[2])

    # A weight the graph reads, listed as outside it: the graph holds an unlisted initializer.
    graph_name = next(w["name"] for w in genuine_weights if "in_graph" not in w)
    hidden = [w | {"in_graph": False} if w["name"] == graph_name else w for w in genuine_weights]
    signed = _outside_release(tmp_path / "hidden", key, two, genuine, hidden)
    with pytest.raises(ManifestRefused, match="is not an expected weight"):
        verify_release(*signed[:2], key.public_key(), signed[2])


def _mutated_listing(weights: list[dict[str, Any]], data: st.DataObject) -> list[dict[str, Any]]:
    """The genuine listing with one change a leaked key could sign."""
    out = [dict(w) for w in weights]
    i = data.draw(st.integers(0, len(out) - 1), label="index")
    kind = data.draw(st.sampled_from(["toggle", "drop", "insert", "retype", "reshape"]))
    outside = [j for j, w in enumerate(out) if w.get("in_graph") is False]
    if kind == "toggle":
        if out[i].get("in_graph") is False:
            del out[i]["in_graph"]
        else:
            out[i]["in_graph"] = False
    elif kind == "drop":
        del out[i]
    elif kind == "insert":
        name = data.draw(st.text(min_size=1, max_size=40), label="name")
        if name in {w["name"] for w in out}:
            name += "\u2603"
        shape = data.draw(st.lists(st.integers(0, 64), max_size=3), label="shape")
        dtype = data.draw(st.sampled_from(["<i8", "<i4", "<f4", "|u1"]), label="dtype")
        out.insert(i, {"name": name, "shape": shape, "dtype": dtype, "in_graph": False})
    elif kind == "retype":
        j = outside[i % len(outside)]
        out[j]["dtype"] = data.draw(st.sampled_from(["<i4", "<f8", "|u1"]), label="dtype")
    else:
        j = outside[i % len(outside)]
        out[j]["shape"] = data.draw(
            st.lists(st.integers(0, 8), max_size=3).filter(lambda s: s != out[j]["shape"])
        )
    return out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_other_listing_of_the_data_file_is_refused_under_a_pin(
    two_file: OnnxTemplate, genuine: Genuine, data: st.DataObject
) -> None:
    """Whatever one change a leaked key makes to which tensors the data file holds (a
    tensor in or out of the graph, dropped, added anywhere, retyped, reshaped), a receiver
    that pinned the structure hash refuses the release."""
    key = Ed25519PrivateKey.generate()
    weights = _mutated_listing(weight_specs(two_file, genuine.schema), data)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            signed = _outside_release(Path(tmp), key, two_file, genuine, weights)
        except ValueError:
            return  # not even describable (a dtype or shape no tensor has)
        with pytest.raises(ManifestRefused):
            verify_release(
                *signed[:2], key.public_key(), signed[2], structure_hash=two_file.structure_hash
            )


def test_outside_graph_names_count_as_structure(two_file: OnnxTemplate, genuine: Genuine) -> None:
    """Zero-byte tensors outside the graph carry data in their names only: those names
    count against name_bytes and structure_bytes, so a frame cannot fit."""
    two, schema = two_file, genuine.schema
    weights = data_file_weights(two, schema)
    chunks = [FRAME_B64[i : i + 240] for i in range(0, len(FRAME_B64), 240)]
    extra = [TensorSpec(f"{i:04d}{c}", (0,), "<f4") for i, c in enumerate(chunks)]
    with pytest.raises(ArtifactRefused, match=r"limit (name_bytes|structure_bytes)"):
        inspect_onnx(
            two.data,
            [*weights, *extra],
            allowed_ops=genuine.ops,
            external_data_file=two.data_file,
            outside_graph=outside_graph(two, schema) | {e.name for e in extra},
        )


def test_outside_graph_needs_a_data_file_and_listed_names(
    two_file: OnnxTemplate, genuine: Genuine
) -> None:
    weights = data_file_weights(two_file, genuine.schema)
    with pytest.raises(ArtifactRefused, match="single-file model has no data file"):
        inspect_onnx(genuine.release, genuine.weights, allowed_ops=genuine.ops, outside_graph={"x"})
    with pytest.raises(ArtifactRefused, match="not among the weights"):
        inspect_onnx(
            two_file.data,
            weights,
            allowed_ops=genuine.ops,
            external_data_file=DATA_FILE,
            outside_graph=outside_graph(two_file, genuine.schema) | {"ghost"},
        )


@pytest.mark.parametrize("value", [True, "false", 0, None, [], {}])
def test_a_manifest_marks_in_graph_only_as_false(value: object) -> None:
    doc = {"weights": [{"name": "a", "shape": [1], "dtype": "<i8", "in_graph": value}]}
    with pytest.raises(ManifestRefused, match="in_graph"):
        manifest_check_weights(doc, "weights")


# --- the receiver: a pinned structure, and blame where it belongs ---------------------------


def _rename_a_node(m: onnx.ModelProto) -> None:
    m.graph.node[0].name = "renamed"


def test_a_pinned_structure_refuses_a_changed_graph_under_a_leaked_key(
    tmp_path: Path, genuine: Genuine
) -> None:
    leaked = Ed25519PrivateKey.generate()
    public = leaked.public_key()
    pin = genuine.template.structure_hash
    manifest, signature, files = signed_release(tmp_path / "1", leaked, genuine.release, genuine)
    assert verify_release(manifest, signature, public, files, structure_hash=pin)
    # A well-formed file with another graph, and a manifest that names its structure.
    changed = _edit(genuine.release, _rename_a_node)
    report = inspect_onnx(changed, genuine.weights, allowed_ops=genuine.ops)
    assert report.structure_hash != pin
    signed = signed_release(tmp_path / "2", leaked, changed, genuine, report.structure_hash)
    assert verify_release(*signed[:2], public, signed[2])  # without a pin: the key decides
    with pytest.raises(ManifestRefused, match="not the pinned"):
        verify_release(*signed[:2], public, signed[2], structure_hash=pin)
    # A manifest that names the pinned structure over the changed file: refused as before.
    signed = signed_release(tmp_path / "3", leaked, changed, genuine, pin)
    with pytest.raises(ManifestRefused, match="is not the pinned"):
        verify_release(*signed[:2], public, signed[2], structure_hash=pin)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"weights": [{"name": "w", "shape": [2], "dtype": "<U4"}]}, "fixed-width ONNX type"),
        ({"weights": [{"name": "w", "shape": "2x2", "dtype": "<f4"}]}, "not a list"),
        ({"weights": [{"name": "w", "shape": [-1], "dtype": "<f4"}]}, "non-negative"),
        ({"weights": [{"name": "w", "shape": [1], "dtype": "nope"}]}, "is not a dtype"),
        ({"ops": [["", 7]]}, "not a string"),
        ({"ops": "Relu"}, "not a list"),
        ({"structure_hash": None}, "'structure_hash'"),
        ({"weights": None}, "'weights'"),
    ],
)
def test_a_malformed_description_is_blamed_on_the_manifest(
    tmp_path: Path, genuine: Genuine, changes: dict[str, Any], reason: str
) -> None:
    key = Ed25519PrivateKey.generate()
    signed = signed_release(tmp_path, key, genuine.release, genuine, **changes)
    with pytest.raises(ManifestRefused) as caught:
        verify_release(*signed[:2], key.public_key(), signed[2])
    assert str(caught.value).startswith("manifest")  # blamed on the manifest, not the file
    assert reason in str(caught.value)


def _constant_of_type_99(m: onnx.ModelProto) -> None:
    value = TensorProto(data_type=99, dims=[1], raw_data=b"\0")
    m.graph.node.append(helper.make_node("Constant", [], ["c"], value=value))


def test_a_file_problem_is_blamed_on_the_file(
    tmp_path: Path, genuine: Genuine, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = Ed25519PrivateKey.generate()
    # Once a bare KeyError: 99 from onnx, reported as a manifest without a description.
    data = _edit(genuine.release, _constant_of_type_99)
    signed = signed_release(tmp_path / "1", key, data, genuine)
    with pytest.raises(
        ManifestRefused, match=r"^model\.onnx: .*tensor data_type 99 is not allowed"
    ):
        verify_release(*signed[:2], key.public_key(), signed[2])

    # Whatever a check did not expect is the file's problem too, with a bounded reason.
    def surprise(*args: object) -> None:
        raise KeyError("x" * 10_000)

    monkeypatch.setattr(artifact, "_check_nodes", surprise)
    signed = signed_release(tmp_path / "2", key, genuine.release, genuine)
    with pytest.raises(ManifestRefused) as caught:
        verify_release(*signed[:2], key.public_key(), signed[2])
    assert str(caught.value).startswith("model.onnx: malformed model: KeyError: ")
    assert len(str(caught.value)) < 200


def test_anything_else_is_still_a_refusal(
    tmp_path: Path, genuine: Genuine, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = Ed25519PrivateKey.generate()
    signed = signed_release(tmp_path, key, genuine.release, genuine)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(verify, "inspect_onnx", broken)
    with pytest.raises(ManifestRefused, match="release not verified: RuntimeError: disk on fire"):
        verify_release(*signed[:2], key.public_key(), signed[2])


def test_a_file_of_the_wrong_size_is_not_read(tmp_path: Path, genuine: Genuine) -> None:
    key = Ed25519PrivateKey.generate()
    manifest, signature, files = signed_release(tmp_path, key, genuine.release, genuine)
    files[MODEL_FILE].write_bytes(genuine.release + bytes(len(FRAME_BYTES)))
    with pytest.raises(ManifestRefused, match=f"{len(genuine.release) + 98304} bytes; the"):
        verify_release(manifest, signature, key.public_key(), files)


def test_a_side_file_is_refused_under_any_signature(tmp_path: Path, genuine: Genuine) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "frame.bin").write_bytes(FRAME_BYTES)
    side = {"name": "frame.bin", "size": len(FRAME_BYTES)}
    side["sha256"] = hashlib.sha256(FRAME_BYTES).hexdigest()
    manifest, _, files = signed_release(tmp_path, key, genuine.release, genuine)
    doc = json.loads(manifest)
    doc["files"].append(side)
    manifest = canonical_json(doc)
    files["frame.bin"] = tmp_path / "frame.bin"
    with pytest.raises(ManifestRefused, match="a release holds only"):
        verify_release(manifest, key.sign(manifest), key.public_key(), files)


def test_a_two_file_release_is_read_once_and_streamed(
    tmp_path: Path, two_file: OnnxTemplate, genuine: Genuine
) -> None:
    entry, two = get("drivenet-tiny"), two_file
    payload = tmp_path / "payload.bin"
    payload.write_bytes(genuine.schema.flatten(entry.build(seed=7).state_dict()))
    written = write_release_files(two, genuine.schema, payload, tmp_path / "1")
    key = Ed25519PrivateKey.generate()
    listed = [{"name": name, "size": size, "sha256": sha} for name, size, sha in written]
    model = (tmp_path / "1" / MODEL_FILE).read_bytes()
    weights = weight_specs(two, genuine.schema)
    manifest, _, files = signed_release(
        tmp_path / "1", key, model, genuine, two.structure_hash, files=listed, weights=weights
    )
    files[DATA_FILE] = tmp_path / "1" / DATA_FILE
    pin = two.structure_hash
    assert verify_release(manifest, key.sign(manifest), key.public_key(), files, structure_hash=pin)
    data = files[DATA_FILE].read_bytes()
    files[DATA_FILE].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a weight: same size
    with pytest.raises(ManifestRefused, match=r"model\.onnx\.data: sha256"):
        verify_release(manifest, key.sign(manifest), key.public_key(), files)
