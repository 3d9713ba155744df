"""A model's ONNX template: exported once, weights at recorded byte ranges, self-tested."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from gateway.export.parity import max_output_diff
from gateway.export.refresh import refresh, write_atomic
from models import onnx_wire
from models.registry import ModelEntry
from models.schema import Schema

TEMPLATE_FILE = "template.onnx"
META_FILE = "template.json"
SELF_TEST_TOLERANCE = 1e-4  # max abs diff onnxruntime vs torch, fp32, random weights

# Fields that only describe how the file was made. The exporter puts stack traces with
# absolute source paths into metadata_props; they leak and break the structure hash.
_STRIPPED_FIELDS = frozenset({"metadata_props", "doc_string"})
_ZEROS = bytes(1 << 20)
_TORCH_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@dataclass(frozen=True)
class WeightRange:
    """Bytes [start, end) of the template hold state_dict tensor `name` (raw little-endian)."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class OnnxTemplate:
    """A serialized ONNX model whose weights can be replaced by copying bytes into ranges."""

    model: str  # registry name
    schema_hash: str  # Schema.hash of the state_dict the ranges were taken from
    data: bytes  # the ONNX file, carrying the model's init_seed weights
    ranges: tuple[WeightRange, ...]  # in file order, non-overlapping
    structure_hash: str  # sha256 of data with every range zeroed

    def __post_init__(self) -> None:
        pos = 0
        for r in self.ranges:
            if not pos <= r.start <= r.end <= len(self.data):
                raise ValueError(f"weight range {r.name!r} [{r.start}, {r.end}) is out of order")
            pos = r.end


def structure_hash(data: bytes | memoryview, ranges: tuple[WeightRange, ...]) -> str:
    """Hex sha256 of data with every weight range zeroed: the same for any weight values."""
    digest = hashlib.sha256()
    view = memoryview(data)
    pos = 0
    for r in ranges:
        digest.update(view[pos : r.start])
        for at in range(r.start, r.end, len(_ZEROS)):
            digest.update(_ZEROS[: min(len(_ZEROS), r.end - at)])
        pos = r.end
    digest.update(view[pos:])
    return digest.hexdigest()


def _export(module: torch.nn.Module, entry: ModelEntry) -> onnx.ModelProto:
    # optimize=False: the optimizer folds BatchNorm into Conv and keeps the old names on
    # changed tensors, so a name-keyed refresh would run and be wrong (DESIGN.md).
    with warnings.catch_warnings():
        # torch 2.13's own run_decompositions deep-copies a pytree LeafSpec and trips
        # torch's deprecation of it; where warnings are errors (our tests) that aborts
        # the export with a ConversionError. Only this message is silenced.
        warnings.filterwarnings("ignore", message=_TORCH_LEAFSPEC_WARNING, category=FutureWarning)
        program = torch.onnx.export(
            module,
            (entry.example_input(),),
            dynamo=True,
            optimize=False,
            external_data=False,
            input_names=list(entry.input_names),
            output_names=list(entry.output_names),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    if program is None:  # only when dynamo=False; keeps the type checker honest
        raise RuntimeError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    return proto


def _strip(message: Any) -> None:
    """Clear metadata_props and doc_string in message and every message under it."""
    # Walk descriptors rather than ListFields(): that would copy every raw_data blob.
    for field in message.DESCRIPTOR.fields:
        if field.name in _STRIPPED_FIELDS:
            message.ClearField(field.name)
        elif field.message_type is None:
            continue
        elif field.is_repeated:
            for child in getattr(message, field.name):
                _strip(child)
        elif message.HasField(field.name):
            _strip(getattr(message, field.name))


def _normalize(proto: onnx.ModelProto) -> None:
    _strip(proto)
    # "2.13.0+cpu" vs "+cu128" would make CPU and GPU hosts build different templates.
    proto.producer_version = proto.producer_version.split("+", 1)[0]
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            raise ValueError(f"initializer {init.name!r}: external data in an in-memory export")
        if not init.HasField("raw_data"):
            # Typed fields (float_data, int64_data, ...) have no fixed byte layout to patch.
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))


def _check_initializers(proto: onnx.ModelProto, schema: Schema) -> set[str]:
    """Names of initializers that are state_dict tensors; raise on anything a refresh would miss."""
    specs = {spec.name: spec for spec in schema.tensors}
    weights = set()
    for init in proto.graph.initializer:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).newbyteorder("<")
        dims = tuple(init.dims)
        spec = specs.get(init.name)
        if spec is None:
            # A float tensor the exporter made (a folded or transposed weight under a new
            # name) would keep init_seed values forever; only scalars are plainly constants.
            if dtype.kind == "f" and int(np.prod(dims, dtype=np.int64)) > 1:
                raise ValueError(
                    f"initializer {init.name!r} {dims} is a float tensor but not a state_dict "
                    "key; a weight refresh could not reach it"
                )
            continue
        if dims != spec.shape or dtype != np.dtype(spec.dtype):
            raise ValueError(
                f"tensor {init.name!r}: state_dict has {spec.shape} {spec.dtype}, "
                f"the exporter wrote {dims} {dtype.str}"
            )
        weights.add(init.name)
    return weights


def _check_bytes(data: bytes, ranges: tuple[WeightRange, ...], state: Mapping[str, Any]) -> None:
    """Each range must hold the state_dict tensor's exact bytes, not merely its shape."""
    # A square weight transposed by the exporter has the right shape and wrong layout.
    view = np.frombuffer(data, dtype=np.uint8)
    for r in ranges:
        want = state[r.name].detach().cpu().contiguous().numpy().reshape(-1).view(np.uint8)
        if not np.array_equal(view[r.start : r.end], want):
            raise ValueError(
                f"tensor {r.name!r}: template bytes differ from the state_dict "
                "(the exporter changed its values or layout)"
            )


def build_template(entry: ModelEntry) -> OnnxTemplate:
    """Export entry's model once and record where each state_dict tensor's bytes lie.

    Weights are the entry's init_seed weights. Deterministic: the same entry, torch and
    onnx versions give identical bytes. Run self_test() before trusting a new template.
    """
    module = entry.build(entry.init_seed)
    state = module.state_dict()
    schema = Schema.of(state)
    with torch.no_grad():
        proto = _export(module, entry)
    _normalize(proto)
    weights = _check_initializers(proto, schema)
    data = proto.SerializeToString(deterministic=True)
    ranges = tuple(
        WeightRange(s.name, s.start, s.end)
        for s in onnx_wire.initializer_spans(data)
        if s.name in weights
    )
    _check_bytes(data, ranges, state)
    return OnnxTemplate(entry.name, schema.hash, data, ranges, structure_hash(data, ranges))


def save_template(t: OnnxTemplate, directory: Path) -> None:
    """Write template.onnx and template.json into directory, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": t.model,
        "schema_hash": t.schema_hash,
        "structure_hash": t.structure_hash,
        "ranges": [{"name": r.name, "start": r.start, "end": r.end} for r in t.ranges],
    }
    # The ONNX file first: a crash in between leaves a json that fails load's hash check.
    write_atomic(directory / TEMPLATE_FILE, [t.data])
    write_atomic(directory / META_FILE, [json.dumps(meta, indent=1).encode() + b"\n"])


def load_template(directory: Path) -> OnnxTemplate:
    """Read a saved template; its ranges and structure hash are checked against the bytes."""
    data = (directory / TEMPLATE_FILE).read_bytes()
    try:
        meta = json.loads((directory / META_FILE).read_text())
        ranges = tuple(WeightRange(r["name"], r["start"], r["end"]) for r in meta["ranges"])
        t = OnnxTemplate(meta["model"], meta["schema_hash"], data, ranges, meta["structure_hash"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory / META_FILE}: malformed template metadata: {exc}") from exc
    spans = {s.name: (s.start, s.end) for s in onnx_wire.initializer_spans(data)}
    for r in ranges:
        if spans.get(r.name) != (r.start, r.end):
            raise ValueError(f"{directory}: range of {r.name!r} does not match the ONNX file")
    actual = structure_hash(data, ranges)
    if actual != t.structure_hash:
        raise ValueError(
            f"{directory}: structure hash {actual[:16]} does not match the recorded "
            f"{t.structure_hash[:16]}"
        )
    return t


def _randomize(state: Mapping[str, torch.Tensor], seed: int) -> None:
    """Perturb every float tensor in place, BatchNorm statistics included."""
    # Factory init leaves BatchNorm at 1/0/0/1 in every seed; a template that had frozen
    # those values would pass a test that did not move them.
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        scale = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
        shift = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
        tensor.mul_(1 + 0.2 * scale).add_(0.05 * shift)
        if name.endswith("running_var"):
            tensor.clamp_(min=0.1)  # a variance must stay positive


def self_test(t: OnnxTemplate, entry: ModelEntry, seed: int = 1234) -> float:
    """Max abs difference of onnxruntime on the refreshed template vs torch, random weights.

    Raises ValueError above SELF_TEST_TOLERANCE (or on NaN), or if the template does not
    belong to the entry.
    """
    module = entry.build(seed)
    state = module.state_dict()
    with torch.no_grad():
        _randomize(state, seed)
    schema = Schema.of(state)
    data = refresh(t, schema, schema.flatten(state))
    try:
        diff = max_output_diff(data, entry, module, seed=seed)
    except ValueError as exc:
        raise ValueError(f"model {t.model!r}: self-test failed: {exc}") from exc
    if not diff <= SELF_TEST_TOLERANCE:
        raise ValueError(
            f"model {t.model!r}: self-test max abs diff {diff:.3g} exceeds {SELF_TEST_TOLERANCE}"
        )
    return diff
