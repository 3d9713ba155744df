"""ONNX template export, wire-level ranges, byte-range refresh and the self-test."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from sluice.gateway.export import refresh as refresh_module
from sluice.gateway.export.parity import PARITY_TOLERANCE, max_output_diff
from sluice.gateway.export.refresh import refresh, write_refreshed, write_release_files
from sluice.gateway.export.selftest import self_test
from sluice.gateway.export.template import (
    META_FILE,
    TEMPLATE_FILE,
    TWO_FILE_THRESHOLD,
    OnnxTemplate,
    build_template,
    load_template,
    save_template,
    structure_hash,
)
from sluice.models import onnx_wire
from sluice.models.manifest import DATA_FILE, MODEL_FILE
from sluice.models.registry import InputSpec, ModelEntry, get
from sluice.models.schema import Schema, TensorSpec
from tests.layouts import graph_layout


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
def two_file(tiny: ModelEntry) -> OnnxTemplate:
    """The tiny model in the large-model layout, forced by a threshold of 0 bytes."""
    return build_template(tiny, two_file_threshold=0)


def _random_payload(schema: Schema, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arrays = {
        spec.name: rng.standard_normal(spec.shape).astype(spec.dtype)
        if spec.is_float
        else np.zeros(spec.shape, dtype=spec.dtype)
        for spec in schema.tensors
    }
    return schema.flatten(arrays)


def _walk(message: Any) -> list[Any]:
    """message and every message under it."""
    found = [message]
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None:
            continue
        if field.is_repeated:
            for child in getattr(message, field.name):
                found.extend(_walk(child))
        elif message.HasField(field.name):
            found.extend(_walk(getattr(message, field.name)))
    return found


# --- the template -----------------------------------------------------------------------


def test_ranges_are_the_float_state_dict(template: OnnxTemplate, tiny: ModelEntry) -> None:
    state = tiny.build(tiny.init_seed).state_dict()
    floats = {name for name, tensor in state.items() if tensor.is_floating_point()}
    assert {r.name for r in template.ranges} == floats
    # The int64 BatchNorm counters are in the schema but not in the graph.
    assert all(name.endswith("num_batches_tracked") for name in set(state) - floats)
    model = onnx.load_from_string(bytes(template.data))
    for init in model.graph.initializer:
        assert init.name in state
        assert tuple(init.dims) == tuple(state[init.name].shape)
        assert init.HasField("raw_data")


def test_build_is_deterministic(template: OnnxTemplate, tiny: ModelEntry) -> None:
    again = build_template(tiny)
    assert again.data == template.data
    assert again == template


def test_no_metadata_or_doc_strings(template: OnnxTemplate) -> None:
    model = onnx.load_from_string(bytes(template.data))
    for message in _walk(model):
        names = {f.name for f in message.DESCRIPTOR.fields}
        if "metadata_props" in names:
            assert len(message.metadata_props) == 0, type(message).__name__
        if "doc_string" in names:
            assert message.doc_string == "", type(message).__name__
    assert "+" not in model.producer_version  # no "+cpu" / "+cu128" build tag
    onnx.checker.check_model(model, full_check=True)


def test_no_local_paths_in_template(template: OnnxTemplate) -> None:
    repo = Path(__file__).resolve().parents[2]
    leaks = [str(repo), sys.prefix, os.path.dirname(torch.__file__), str(Path.home())]
    for leak in [*leaks, "site-packages", ".py", "File "]:
        assert leak.encode() not in template.data, leak


def test_dynamic_batch(template: OnnxTemplate) -> None:
    model = onnx.load_from_string(bytes(template.data))
    (frames,) = model.graph.input
    assert frames.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_self_test_tiny(template: OnnxTemplate, tiny: ModelEntry) -> None:
    assert self_test(template, tiny) < 1e-4


def test_self_test_drivenet() -> None:
    entry = get("drivenet")
    assert self_test(build_template(entry), entry) < 1e-4


def test_self_test_catches_an_unrefreshed_weight(template: OnnxTemplate, tiny: ModelEntry) -> None:
    # What a weight folded under a new name would look like: its bytes never move.
    stale = dataclasses.replace(
        template, ranges=tuple(r for r in template.ranges if r.name != "backbone.1.1.running_var")
    )
    with pytest.raises(ValueError, match="self-test max abs diff"):
        self_test(stale, tiny)


# --- onnx_wire ------------------------------------------------------------------------


def test_wire_spans_match_onnx(template: OnnxTemplate) -> None:
    model = onnx.load_from_string(bytes(template.data))
    spans = onnx_wire.initializer_spans(template.data)
    assert [s.name for s in spans] == [i.name for i in model.graph.initializer]
    for span, init in zip(spans, model.graph.initializer, strict=True):
        assert template.data[span.start : span.end] == init.raw_data
        assert template.data[span.start : span.end] == numpy_helper.to_array(init).tobytes()


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no graph
        b"\x3a\x05\x2a",  # graph length past the end
        b"\x3a\x00\x3a\x00",  # two graphs
        b"\x3a\x02\x2a\x00",  # initializer without name or raw_data
        b"\x3a\x04\x2a\x02\x42\x00",  # initializer with a name only
        b"\x3a\x03\x2a\x05\x42",  # initializer runs past the end of the graph
        b"\x3a\x03\x2a\x01\x43",  # group wire type
        b"\x3a\x06\x2a\x04\x42\x01\xff\x4a",  # raw_data tag without length
        b"\x3a\x08\x2a\x06\x42\x01\xff\x4a\x01\x00",  # name is not UTF-8
        b"\xff" * 11,  # varint too long
    ],
)
def test_wire_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        onnx_wire.initializer_spans(data)


def test_wire_rejects_duplicate_names() -> None:
    init = b"\x2a\x06\x42\x01a\x4a\x01\x00"
    graph = init + init
    with pytest.raises(ValueError, match="more than once"):
        onnx_wire.initializer_spans(b"\x3a" + bytes([len(graph)]) + graph)


def test_wire_offsets_on_a_hand_built_model() -> None:
    model = onnx.ModelProto(graph=onnx.GraphProto(name="g"))
    model.graph.initializer.append(numpy_helper.from_array(np.arange(3, dtype="<f4"), "w"))
    data = model.SerializeToString()
    (span,) = onnx_wire.initializer_spans(data)
    assert span.name == "w"
    assert data[span.start : span.end] == np.arange(3, dtype="<f4").tobytes()


# --- refresh --------------------------------------------------------------------------


def test_refresh_with_own_weights_is_identity(
    template: OnnxTemplate, schema: Schema, tiny: ModelEntry
) -> None:
    payload = schema.flatten(tiny.build(tiny.init_seed).state_dict())
    assert refresh(template, schema, payload) == template.data


def test_refresh_changes_only_weight_ranges(template: OnnxTemplate, schema: Schema) -> None:
    out = refresh(template, schema, _random_payload(schema, 7))
    assert len(out) == len(template.data)
    inside = np.zeros(len(out), dtype=bool)
    for r in template.ranges:
        inside[r.start : r.end] = True
    changed = np.frombuffer(out, np.uint8) != np.frombuffer(template.data, np.uint8)
    assert changed.any()
    assert not (changed & ~inside).any()
    assert structure_hash(out, template.ranges) == template.structure_hash
    views = schema.views(_random_payload(schema, 7))
    for init in onnx.load_from_string(out).graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), views[init.name])


def test_refresh_accepts_array_and_memoryview(template: OnnxTemplate, schema: Schema) -> None:
    payload = _random_payload(schema, 3)
    want = refresh(template, schema, payload)
    assert refresh(template, schema, memoryview(payload)) == want
    assert refresh(template, schema, np.frombuffer(payload, np.uint8)) == want
    with pytest.raises(ValueError, match="uint8"):
        refresh(template, schema, np.frombuffer(payload, np.float32))


def test_refresh_rejects_wrong_size(template: OnnxTemplate, schema: Schema) -> None:
    payload = _random_payload(schema, 1)
    with pytest.raises(ValueError, match=f"expected {len(payload)} bytes, got {len(payload) - 4}"):
        refresh(template, schema, payload[:-4])


def test_refresh_rejects_other_schema(template: OnnxTemplate, schema: Schema) -> None:
    other = Schema(schema.tensors[:-1])
    with pytest.raises(ValueError, match="template was built for schema"):
        refresh(template, other, bytes(other.payload_bytes))


def test_refresh_rejects_range_size_mismatch(template: OnnxTemplate, schema: Schema) -> None:
    # A schema whose hash matches the template (forged here) but whose tensor is smaller.
    specs = [
        TensorSpec(s.name, (1,), s.dtype) if s.name == "lane_head.bias" else s
        for s in schema.tensors
    ]
    shrunk = Schema(tuple(specs))
    forged = dataclasses.replace(template, schema_hash=shrunk.hash)
    with pytest.raises(ValueError, match=r"'lane_head.bias': schema expects 4 bytes"):
        refresh(forged, shrunk, bytes(shrunk.payload_bytes))


def test_write_refreshed_streams_the_same_bytes(
    template: OnnxTemplate, schema: Schema, tmp_path: Path
) -> None:
    payload = _random_payload(schema, 5)
    (tmp_path / "update.bin").write_bytes(payload)
    out = tmp_path / "model.onnx"
    digest = write_refreshed(template, schema, tmp_path / "update.bin", out)
    assert out.read_bytes() == refresh(template, schema, payload)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "update.bin"]


def test_write_refreshed_rejects_short_file(
    template: OnnxTemplate, schema: Schema, tmp_path: Path
) -> None:
    (tmp_path / "update.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="got 0"):
        write_refreshed(template, schema, tmp_path / "update.bin", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


# --- save / load ----------------------------------------------------------------------


def test_save_load_round_trip(template: OnnxTemplate, tmp_path: Path) -> None:
    save_template(template, tmp_path / "t")
    assert load_template(tmp_path / "t") == template
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [META_FILE, TEMPLATE_FILE]


def test_load_rejects_a_changed_structure(template: OnnxTemplate, tmp_path: Path) -> None:
    save_template(template, tmp_path)
    data = bytearray(template.data)
    at = template.ranges[0].start - 1  # a byte of framing just before the first weights
    data[at] ^= 0x01
    (tmp_path / TEMPLATE_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError):
        load_template(tmp_path)


def test_load_ignores_weight_values(template: OnnxTemplate, schema: Schema, tmp_path: Path) -> None:
    save_template(template, tmp_path)
    (tmp_path / TEMPLATE_FILE).write_bytes(refresh(template, schema, _random_payload(schema, 9)))
    assert load_template(tmp_path).structure_hash == template.structure_hash


class _HiddenScale(nn.Module):
    """A float tensor in the graph that is not in the state_dict (non-persistent buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.register_buffer("scale", torch.rand(3), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.head(x)
        return y * self.scale, y


def test_build_refuses_weights_a_refresh_cannot_reach() -> None:
    entry = ModelEntry("hidden-scale", _HiddenScale, (InputSpec("x", (1, 4)),), ("y", "z"))
    with pytest.raises(ValueError, match=r"'scale' .* not a state_dict key"):
        build_template(entry)


# --- the two-file layout ----------------------------------------------------------------


def _graph_weights(t: OnnxTemplate, schema: Schema) -> list[TensorSpec]:
    names = {init.name for init in onnx.load_from_string(bytes(t.data)).graph.initializer}
    return [spec for spec in schema.tensors if spec.name in names]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_small_models_stay_single_file(template: OnnxTemplate) -> None:
    assert TWO_FILE_THRESHOLD == 3 << 29  # 1.5 GiB (DESIGN.md)
    assert template.data_file is None
    assert template.data_file_bytes == 0


def test_two_file_graph_points_at_fixed_offsets(two_file: OnnxTemplate, schema: Schema) -> None:
    assert two_file.data_file == DATA_FILE
    model = onnx.load_from_string(bytes(two_file.data))
    inits = {init.name: init for init in model.graph.initializer}
    graph = {spec.name for spec in _graph_weights(two_file, schema)}
    # The payload layout: each graph weight at its payload offset, the data file the payload.
    for spec, start, _ in schema.spans():
        if spec.name not in graph:
            continue
        init = inits.pop(spec.name)
        assert not init.HasField("raw_data")
        assert init.data_location == onnx.TensorProto.EXTERNAL
        assert [(e.key, e.value) for e in init.external_data] == [
            ("location", DATA_FILE),
            ("offset", str(start)),
            ("length", str(spec.num_bytes)),
        ]
    assert inits == {}  # every initializer is a weight in the data file
    assert two_file.data_file_bytes == two_file.payload_bytes == schema.payload_bytes
    assert [r.name for r in two_file.ranges] == [s.name for s in _graph_weights(two_file, schema)]
    skipped = {s.name for s in schema.tensors} - {r.name for r in two_file.ranges}
    assert skipped  # BatchNorm's counters: in the schema and the payload, not the graph
    assert all(name.endswith("num_batches_tracked") for name in skipped)
    # Nothing in model.onnx changes with the weights: its hash is of the bytes as they are,
    # and of the tensors the data file holds outside the graph (where, what shape and type).
    outside = json.loads(two_file.outside_graph)
    offsets = {spec.name: start for spec, start, _ in schema.spans()}
    assert outside == [
        [s.name, list(s.shape), s.dtype, offsets[s.name]]
        for s in schema.tensors
        if s.name in skipped
    ]
    digest = hashlib.sha256(two_file.data)
    digest.update(b"\0sluice outside-graph tensors\0" + two_file.outside_graph)
    assert two_file.structure_hash == digest.hexdigest()


def test_two_file_graph_is_the_single_file_graph(
    two_file: OnnxTemplate, template: OnnxTemplate
) -> None:
    one, two = (
        onnx.load_from_string(bytes(template.data)),
        onnx.load_from_string(bytes(two_file.data)),
    )
    for model in (one, two):
        del model.graph.initializer[:]
    assert one.SerializeToString(deterministic=True) == two.SerializeToString(deterministic=True)
    for message in _walk(onnx.load_from_string(bytes(two_file.data))):
        names = {f.name for f in message.DESCRIPTOR.fields}
        if "metadata_props" in names:
            assert len(message.metadata_props) == 0, type(message).__name__
        if "doc_string" in names:
            assert message.doc_string == "", type(message).__name__


def test_two_file_build_is_deterministic(two_file: OnnxTemplate, tiny: ModelEntry) -> None:
    assert build_template(tiny, two_file_threshold=0) == two_file


def test_two_file_release_holds_the_payload_weights(
    two_file: OnnxTemplate, schema: Schema, tmp_path: Path
) -> None:
    payload = _random_payload(schema, 11)
    (tmp_path / "update.bin").write_bytes(payload)
    files = write_release_files(two_file, schema, tmp_path / "update.bin", tmp_path / "release")
    release = tmp_path / "release"
    assert sorted(p.name for p in release.iterdir()) == [MODEL_FILE, DATA_FILE]  # no temp files
    assert files == [
        (name, (release / name).stat().st_size, _sha256(release / name))
        for name in (MODEL_FILE, DATA_FILE)
    ]
    assert (release / MODEL_FILE).read_bytes() == two_file.data
    spans = {spec.name: (start, end) for spec, start, end in schema.spans()}
    assert set(spans) > {s.name for s in _graph_weights(two_file, schema)}  # counters too
    assert (release / DATA_FILE).read_bytes() == payload  # the payload layout: all of it
    # onnx itself resolves the external data beside model.onnx to the payload's tensors.
    views = schema.views(payload)
    loaded = onnx.load(str(release / MODEL_FILE))
    for init in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), views[init.name])


def test_two_file_releases_share_model_onnx(
    two_file: OnnxTemplate, schema: Schema, tmp_path: Path
) -> None:
    for seed in (1, 2):
        (tmp_path / f"{seed}.bin").write_bytes(_random_payload(schema, seed))
        write_release_files(two_file, schema, tmp_path / f"{seed}.bin", tmp_path / str(seed))
    assert (tmp_path / "1" / MODEL_FILE).read_bytes() == (tmp_path / "2" / MODEL_FILE).read_bytes()
    assert (tmp_path / "1" / DATA_FILE).read_bytes() != (tmp_path / "2" / DATA_FILE).read_bytes()


def test_two_file_data_is_streamed_in_chunks(
    two_file: OnnxTemplate, schema: Schema, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "update.bin").write_bytes(_random_payload(schema, 4))
    want = write_release_files(two_file, schema, tmp_path / "update.bin", tmp_path / "whole")
    # Chunks smaller than most tensors and not a multiple of any of them.
    monkeypatch.setattr(refresh_module, "_CHUNK_BYTES", 100)
    assert (
        write_release_files(two_file, schema, tmp_path / "update.bin", tmp_path / "small") == want
    )


def _copy_file_range_unsupported(*args: object) -> int:
    raise OSError(errno.EXDEV, "Invalid cross-device link")


@pytest.mark.parametrize("copier", ["none", "unsupported"])
def test_release_files_without_copy_file_range_are_the_same_bytes(
    two_file: OnnxTemplate,
    template: OnnxTemplate,
    schema: Schema,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    copier: str,
) -> None:
    # Weights are copied in the kernel where it can (copy_file_range); elsewhere, or where
    # the filesystem refuses, through the process: the files must not differ.
    (tmp_path / "update.bin").write_bytes(_random_payload(schema, 7))
    want = [
        write_release_files(t, schema, tmp_path / "update.bin", tmp_path / f"kernel-{i}")
        for i, t in enumerate((template, two_file))
    ]
    replacement = None if copier == "none" else _copy_file_range_unsupported
    monkeypatch.setattr(refresh_module, "_copy_file_range", replacement)
    monkeypatch.setattr(refresh_module, "_CHUNK_BYTES", 100)
    for i, t in enumerate((template, two_file)):
        got = write_release_files(t, schema, tmp_path / "update.bin", tmp_path / f"process-{i}")
        assert got == want[i]
        for name, _, sha in got:
            assert _sha256(tmp_path / f"process-{i}" / name) == sha


def test_two_file_release_rejects_short_payload(
    two_file: OnnxTemplate, schema: Schema, tmp_path: Path
) -> None:
    (tmp_path / "update.bin").write_bytes(_random_payload(schema, 1)[:-4])
    with pytest.raises(ValueError, match=f"got {schema.payload_bytes - 4}"):
        write_release_files(two_file, schema, tmp_path / "update.bin", tmp_path / "release")
    assert list((tmp_path / "release").iterdir()) == []


def test_write_release_files_single_file(
    template: OnnxTemplate, schema: Schema, tmp_path: Path
) -> None:
    payload = _random_payload(schema, 6)
    (tmp_path / "update.bin").write_bytes(payload)
    files = write_release_files(template, schema, tmp_path / "update.bin", tmp_path / "release")
    out = tmp_path / "release" / MODEL_FILE
    assert files == [(MODEL_FILE, out.stat().st_size, _sha256(out))]
    assert out.read_bytes() == refresh(template, schema, payload)
    assert [p.name for p in (tmp_path / "release").iterdir()] == [MODEL_FILE]


def test_parity_runs_the_files_own_weights(
    template: OnnxTemplate, schema: Schema, tiny: ModelEntry, tmp_path: Path
) -> None:
    # max_output_diff loads a file's weights in place (external data pointing into the
    # file itself); the values onnxruntime runs must be exactly the file's bytes.
    payload = tmp_path / "payload.bin"
    payload.write_bytes(schema.flatten(tiny.build(seed=5).state_dict()))
    write_release_files(template, schema, payload, tmp_path / "release")
    path = tmp_path / "release" / MODEL_FILE
    in_place = max_output_diff(path, tiny, tiny.build(seed=5))
    assert in_place <= PARITY_TOLERANCE
    assert in_place == max_output_diff(path.read_bytes(), tiny, tiny.build(seed=5))
    r = next(r for r in template.ranges if r.name == "control_head.bias")
    data = bytearray(path.read_bytes())
    data[r.start : r.start + 4] = np.float32(100.0).tobytes()
    path.write_bytes(data)
    assert max_output_diff(path, tiny, tiny.build(seed=5)) > 50


def test_single_file_writers_refuse_a_two_file_template(
    two_file: OnnxTemplate, schema: Schema, tmp_path: Path
) -> None:
    payload = _random_payload(schema, 1)
    with pytest.raises(ValueError, match="write_release_files"):
        refresh(two_file, schema, payload)
    (tmp_path / "update.bin").write_bytes(payload)
    with pytest.raises(ValueError, match="write_release_files"):
        write_refreshed(two_file, schema, tmp_path / "update.bin", tmp_path / MODEL_FILE)


def test_two_file_self_test(two_file: OnnxTemplate, tiny: ModelEntry) -> None:
    assert self_test(two_file, tiny) < 1e-4


def test_two_file_self_test_catches_swapped_offsets(
    two_file: OnnxTemplate, tiny: ModelEntry
) -> None:
    # Two same-sized tensors whose data-file ranges are swapped: the release writer puts
    # each where the ranges say, onnxruntime reads them where model.onnx says.
    names = [r.name for r in two_file.ranges]
    a, b = names.index("backbone.0.1.running_mean"), names.index("backbone.1.1.running_mean")
    ranges = list(two_file.ranges)
    assert ranges[a].end - ranges[a].start == ranges[b].end - ranges[b].start
    ranges[a], ranges[b] = (
        dataclasses.replace(ranges[a], name=names[b]),
        dataclasses.replace(ranges[b], name=names[a]),
    )
    # In the payload layout each range must be where the payload holds its tensor.
    with pytest.raises(ValueError, match=r"self-test failed: .* not where the payload holds it"):
        self_test(dataclasses.replace(two_file, ranges=tuple(ranges)), tiny)


def test_two_file_save_load_round_trip(two_file: OnnxTemplate, tmp_path: Path) -> None:
    save_template(two_file, tmp_path / "t")
    assert load_template(tmp_path / "t") == two_file
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [META_FILE, TEMPLATE_FILE]
    assert (tmp_path / "t" / TEMPLATE_FILE).read_bytes() == two_file.data


def test_load_rejects_a_moved_external_offset(two_file: OnnxTemplate, tmp_path: Path) -> None:
    save_template(two_file, tmp_path)
    model = onnx.load_from_string(bytes(two_file.data))
    model.graph.initializer[1].external_data[1].value = "0"  # overlaps the first weight
    (tmp_path / TEMPLATE_FILE).write_bytes(model.SerializeToString(deterministic=True))
    with pytest.raises(ValueError, match="does not match the recorded ranges"):
        load_template(tmp_path)


def test_load_rejects_another_location(two_file: OnnxTemplate, tmp_path: Path) -> None:
    save_template(two_file, tmp_path)
    model = onnx.load_from_string(bytes(two_file.data))
    model.graph.initializer[0].external_data[0].value = "../elsewhere.data"
    (tmp_path / TEMPLATE_FILE).write_bytes(model.SerializeToString(deterministic=True))
    with pytest.raises(ValueError, match=r"expected 'model\.onnx\.data'"):
        load_template(tmp_path)


def test_two_file_ranges_must_lie_end_to_end(two_file: OnnxTemplate) -> None:
    old = graph_layout(two_file)  # as templates built before the payload layout
    gap = (dataclasses.replace(old.ranges[0], start=4, end=4 + old.ranges[0].end),)
    with pytest.raises(ValueError, match="expected to start at 0"):
        dataclasses.replace(old, ranges=gap + old.ranges[1:])
    with pytest.raises(ValueError, match="not a plain file name"):
        dataclasses.replace(two_file, data_file="../model.onnx.data")
    with pytest.raises(ValueError, match="need the payload layout"):
        dataclasses.replace(old, outside_graph=two_file.outside_graph)


def test_payload_layout_tiles_the_data_file(two_file: OnnxTemplate) -> None:
    """Every byte of the data file is one listed tensor's: a graph weight's range or a
    tensor outside the graph; a gap, an overlap or a short or long file is refused."""
    assert two_file.payload_bytes is not None and two_file.outside_graph
    first = two_file.ranges[0]
    moved = dataclasses.replace(first, start=first.start + 4, end=first.end + 4)
    with pytest.raises(ValueError, match=r"no listed tensor's|out of order|start at"):
        dataclasses.replace(two_file, ranges=(moved, *two_file.ranges[1:]))
    with pytest.raises(ValueError, match="no listed tensor's"):
        dataclasses.replace(two_file, outside_graph=b"")  # the counters' bytes: nobody's
    for size in (two_file.payload_bytes - 8, two_file.payload_bytes + 8):
        with pytest.raises(ValueError, match=r"the tensors end at|past"):
            dataclasses.replace(two_file, payload_bytes=size)
    entries = json.loads(two_file.outside_graph)
    entries[0][3] += 8  # a counter moved into the next tensor
    with pytest.raises(ValueError, match="no listed tensor's"):
        dataclasses.replace(two_file, outside_graph=json.dumps(entries).encode())
    for bad in (b"{", b"[1]", b'[["x", [-1], "<i8", 0]]', b'{"a": 1}'):
        with pytest.raises(ValueError):
            dataclasses.replace(two_file, outside_graph=bad)


def test_a_graph_layout_template_still_makes_releases(
    two_file: OnnxTemplate, schema: Schema, tmp_path: Path
) -> None:
    old = graph_layout(two_file)
    payload = _random_payload(schema, 12)
    (tmp_path / "update.bin").write_bytes(payload)
    write_release_files(old, schema, tmp_path / "update.bin", tmp_path / "release")
    spans = {spec.name: (start, end) for spec, start, end in schema.spans()}
    want = b"".join(payload[slice(*spans[r.name])] for r in old.ranges)
    assert (tmp_path / "release" / DATA_FILE).read_bytes() == want
    views = schema.views(payload)
    loaded = onnx.load(str(tmp_path / "release" / MODEL_FILE))
    for init in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), views[init.name])


def test_load_reads_a_template_saved_before_the_two_file_layout(
    template: OnnxTemplate, tmp_path: Path
) -> None:
    save_template(template, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["data_file"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    assert load_template(tmp_path) == template
