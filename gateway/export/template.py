"""A model's ONNX template: exported once, weights at recorded byte ranges, self-tested."""

from __future__ import annotations

import gc
import json
import mmap
import os
import re
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

if TYPE_CHECKING:  # at run time imported where a template is built: ~55 MB of RSS otherwise
    import torch  # and ~2 s of a start on built templates
    from onnxscript import ir

from sluice.gateway.export.refresh import write_atomic
from sluice.models import onnx_wire

# The global team recomputes it offline from models/ alone; re-exported for callers here.
from sluice.models.artifact import outside_graph_description, tensor_bytes
from sluice.models.artifact import structure_hash as structure_hash
from sluice.models.entry import ModelEntry
from sluice.models.manifest import DATA_FILE
from sluice.models.schema import Schema, TensorSpec, printable, tensor_to_numpy

TEMPLATE_FILE = "template.onnx"
META_FILE = "template.json"
# Graph weights above this many bytes get the two-file layout: a single ONNX file over
# 2 GiB is written without error and then fails to load (DESIGN.md, "ONNX export").
TWO_FILE_THRESHOLD = 3 << 29  # 1.5 GiB

# Fields that only describe how the file was made. The exporter puts stack traces with
# absolute source paths into metadata_props; they leak and break the structure hash.
_STRIPPED_FIELDS = frozenset({"metadata_props", "doc_string"})
# Terminal colours in the exporter's messages: noise in a log line or a refusal.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TORCH_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_SHARED_AXIS_WARNING = r"# The axis name: \w+ will not be used, since it shares"
_EXTERNAL_KEYS = ("location", "offset", "length")  # exactly these, in this order
_BLOCK_BYTES = 16 << 20  # bounds each temporary when a whole tensor is too big to copy


def _entries(t: OnnxTemplate) -> list[list[Any]]:
    entries = json.loads(t.outside_graph) if t.outside_graph else []
    if not isinstance(entries, list):
        raise ValueError("not a list")
    return entries


def _entry_bytes(entry: list[Any]) -> int:
    """Bytes of one [name, shape, dtype, offset] entry of an outside-graph description."""
    name, shape, dtype, _ = entry
    return tensor_bytes(TensorSpec(str(name), tuple(int(d) for d in shape), str(dtype)))


@dataclass(frozen=True)
class WeightRange:
    """Bytes [start, end) hold state_dict tensor `name` (raw little-endian).

    Of the template file in the single-file layout, of the data file in the two-file one.
    """

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class OnnxTemplate:
    """A serialized ONNX model whose weights can be replaced by copying bytes into ranges.

    Single-file layout (data_file None): `data` is the whole ONNX file carrying the
    init_seed weights in raw_data, `ranges` lie in it in file order, and structure_hash
    is its sha256 with every range zeroed.

    Two-file layout (data_file set; graph weights over TWO_FILE_THRESHOLD): `data` is
    model.onnx, whose weight initializers hold no values but point into data_file with
    exactly the keys location, offset, length. structure_hash is the plain sha256 of
    `data`, which holds no weights to zero. Every release's model.onnx is `data` byte for
    byte. The data file is laid out one of two ways:

    - payload layout (payload_bytes set; every template built since): the data file is the
      payload itself, every schema tensor end to end in schema order (models/schema.py),
      payload_bytes long; `ranges` are the graph's tensors at their payload offsets, and
      a tensor the graph does not read (BatchNorm's num_batches_tracked) keeps its place
      between them. A release's data file can then be the version blob itself.
    - graph layout (payload_bytes None; templates built before): `ranges` end to end in
      schema order from 0, only the graph's tensors.
    """

    model: str  # registry name
    schema_hash: str  # Schema.hash of the state_dict the ranges were taken from
    # The ONNX file (single-file) or model.onnx (two-file). A loaded template maps its file
    # read-only: refresh and guard read only the bytes between the weight ranges, so the
    # template's own (initial) weights never become resident memory of the gateway.
    data: bytes | memoryview
    ranges: tuple[WeightRange, ...]  # in file order, non-overlapping
    structure_hash: str  # sha256 of data with every range in it zeroed
    data_file: str | None = None  # the two-file layout's weights file, beside model.onnx
    payload_bytes: int | None = None  # two-file payload layout: the data file's size
    # The payload layout's tensors outside the graph (artifact.outside_graph_description):
    # part of structure_hash; with the ranges they tile the data file end to end.
    outside_graph: bytes = b""

    def __post_init__(self) -> None:
        if self.data_file is None:
            pos = 0
            for r in self.ranges:
                if not pos <= r.start <= r.end <= len(self.data):
                    raise ValueError(
                        f"weight range {r.name!r} [{r.start}, {r.end}) is out of order"
                    )
                pos = r.end
            return
        if self.data_file in ("", ".", "..") or "/" in self.data_file or "\\" in self.data_file:
            raise ValueError(f"data file {self.data_file!r} is not a plain file name")
        pos, gaps = 0, self.payload_bytes is not None
        for r in self.ranges:
            if not (pos <= r.start if gaps else r.start == pos) or r.end < r.start:
                raise ValueError(
                    f"weight range {r.name!r} [{r.start}, {r.end}) of {self.data_file}: "
                    f"expected to start at {'or after ' if gaps else ''}{pos} "
                    f"(weights {'in payload order' if gaps else 'end to end'})"
                )
            pos = r.end
        if self.payload_bytes is not None:
            self._check_tiling()
        elif self.outside_graph:
            raise ValueError("tensors outside the graph need the payload layout")

    def _check_tiling(self) -> None:
        """The ranges and the tensors outside the graph cover the data file exactly."""
        try:
            outside = [(int(e[3]), int(e[3]) + _entry_bytes(e)) for e in _entries(self)]
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise ValueError(f"tensors outside the graph: malformed description: {exc}") from exc
        pos = 0
        for start, end in sorted([(r.start, r.end) for r in self.ranges] + outside):
            if start != pos:
                raise ValueError(
                    f"{self.data_file}: bytes [{pos}, {start}) are no listed tensor's "
                    "(weights and tensors outside the graph end to end)"
                )
            pos = end
        if pos != self.payload_bytes:
            raise ValueError(
                f"{self.data_file}: the tensors end at {pos}, the payload at {self.payload_bytes}"
            )

    @property
    def data_file_bytes(self) -> int:
        """Size of the two-file layout's data file; 0 for a single-file template."""
        if self.payload_bytes is not None:
            return self.payload_bytes
        return self.ranges[-1].end if self.data_file is not None and self.ranges else 0


def _dynamic_shapes(entry: ModelEntry) -> tuple[dict[int, Any], ...]:
    """torch.export's dynamic_shapes for the declared inputs: axis 0 is one shared batch."""
    import torch

    batch = torch.export.Dim("batch")
    return tuple(
        {
            axis: batch if axis == 0 else torch.export.Dim(f"{spec.name}_{axis}")
            for axis in spec.dynamic
        }
        for spec in entry.inputs
    )


def _export(module: torch.nn.Module, entry: ModelEntry, schema: Schema) -> torch.onnx.ONNXProgram:
    # optimize=False: the optimizer folds BatchNorm into Conv and keeps the old names on
    # changed tensors, so a name-keyed refresh would run and be wrong (DESIGN.md).
    import torch

    with warnings.catch_warnings():
        # torch 2.13's own run_decompositions deep-copies a pytree LeafSpec and trips
        # torch's deprecation of it; where warnings are errors (our tests) that aborts
        # the export with a ConversionError. Only this message is silenced.
        warnings.filterwarnings("ignore", message=_TORCH_LEAFSPEC_WARNING, category=FutureWarning)
        # Inputs sharing the batch axis: the exporter notes it names that axis once.
        warnings.filterwarnings("ignore", message=_SHARED_AXIS_WARNING, category=UserWarning)
        try:
            program = torch.onnx.export(
                module,
                # Batch 2: torch.export specializes an axis whose example size is 1, and
                # a graph fixed to batch 1 fails every other batch (onnxruntime refuses).
                entry.example_inputs(batch=2),
                dynamo=True,
                optimize=False,
                external_data=False,
                input_names=list(entry.input_names),
                output_names=list(entry.output_names),
                dynamic_shapes=_dynamic_shapes(entry),
                verbose=False,
            )
        except Exception as exc:  # the exporter's own errors run to pages: the first lines
            first = " ".join(_ANSI.sub("", str(exc)).strip().splitlines()[:3])
            raise ValueError(
                f"model {printable(entry.name)!r}: torch.onnx.export failed: "
                f"{type(exc).__name__}: {printable(first, 600)}"
            ) from exc
    if program is None:  # only when dynamo=False; keeps the type checker honest
        raise RuntimeError("torch.onnx.export returned no program")
    _name_tied_weights(program, schema)
    return program


def _name_tied_weights(program: torch.onnx.ONNXProgram, schema: Schema) -> None:
    """A tied parameter is one initializer, which the exporter names after any of its
    state_dict names (the last module that uses it, in torch 2.13); the schema carries
    it under its first. Rename it so a name-keyed refresh reaches it."""
    initializers = program.model.graph.initializers
    for name in list(initializers):
        canonical = schema.alias_of.get(name)
        if canonical is None:
            continue
        if canonical in initializers:
            raise ValueError(
                f"tensor {canonical!r} and its alias {name!r} are two initializers: the "
                "exporter untied them, and a refresh would update only one"
            )
        initializers[name].name = canonical


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


def _normalize(proto: onnx.ModelProto, external: Collection[str] = ()) -> None:
    """Strip, and give every initializer raw_data, except the `external` placeholders."""
    _strip(proto)
    # "2.13.0+cpu" vs "+cu128" would make CPU and GPU hosts build different templates.
    proto.producer_version = proto.producer_version.split("+", 1)[0]
    for init in proto.graph.initializer:
        if init.name in external:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            raise ValueError(f"initializer {init.name!r}: external data in an in-memory export")
        if not init.HasField("raw_data"):
            # Typed fields (float_data, int64_data, ...) have no fixed byte layout to patch.
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))


def _numpy_dtype(data_type: int) -> np.dtype[Any]:
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    return dtype.newbyteorder("<") if dtype.byteorder in "=<>" and dtype.kind != "V" else dtype


def _check_initializers(proto: onnx.ModelProto, schema: Schema) -> set[str]:
    """Names of initializers that are state_dict tensors; raise on anything a refresh would miss."""
    specs = {spec.name: spec for spec in schema.tensors}
    weights = set()
    for init in proto.graph.initializer:
        dtype = _numpy_dtype(init.data_type)
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
        if dims != spec.shape or dtype != spec.np_dtype:
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
        want = tensor_to_numpy(state[r.name].contiguous()).reshape(-1).view(np.uint8)
        if not np.array_equal(view[r.start : r.end], want):
            raise ValueError(
                f"tensor {r.name!r}: template bytes differ from the state_dict "
                "(the exporter changed its values or layout)"
            )


def _row_blocks(array: np.ndarray) -> Iterator[slice]:
    """Slices of the first axis of about _BLOCK_BYTES each; array has at least one axis."""
    rows = max(1, _BLOCK_BYTES // max(1, array[:1].nbytes))
    for at in range(0, array.shape[0], rows):
        yield slice(at, at + rows)


def _check_values(exported: Mapping[str, ir.TensorProtocol], state: Mapping[str, Any]) -> None:
    """_check_bytes for tensors never serialized: compare the exporter's arrays block by block."""
    for name, tensor in exported.items():
        got = np.atleast_1d(tensor.numpy())  # a view of the exporter's tensor, not a copy
        want = np.atleast_1d(tensor_to_numpy(state[name]))
        # Per row block: tobytes() of a whole 2 GiB weight would copy it once more.
        if got.shape != want.shape or not all(
            got[rows].tobytes() == want[rows].tobytes() for rows in _row_blocks(want)
        ):
            raise ValueError(
                f"tensor {name!r}: exported bytes differ from the state_dict "
                "(the exporter changed its values or layout)"
            )


def _graph_weight_bytes(program: torch.onnx.ONNXProgram, schema: Schema) -> int:
    specs = {spec.name: spec for spec in schema.tensors}
    names = program.model.graph.initializers
    return sum(spec.num_bytes for name, spec in specs.items() if name in names)


def _single_file(
    program: torch.onnx.ONNXProgram, entry: ModelEntry, schema: Schema, state: Mapping[str, Any]
) -> OnnxTemplate:
    proto = program.model_proto
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


def _two_file(
    program: torch.onnx.ONNXProgram, entry: ModelEntry, schema: Schema, state: Mapping[str, Any]
) -> OnnxTemplate:
    # Never one ModelProto with the weights in it (over 2 GiB it cannot be serialized):
    # each state_dict-named initializer's value is swapped for an external placeholder,
    # then the small graph is serialized and its external_data rewritten to the layout.
    from onnxscript import ir

    specs = {spec.name for spec in schema.tensors}
    exported: dict[str, ir.TensorProtocol] = {}
    for name, value in program.model.graph.initializers.items():
        tensor = value.const_value
        if name not in specs or tensor is None:
            continue
        exported[name] = tensor
        value.const_value = ir.ExternalTensor(
            DATA_FILE,
            0,
            tensor.nbytes,
            tensor.dtype,
            shape=ir.Shape(tensor.shape.numpy()),
            name=name,
        )
    proto = ir.serde.serialize_model(program.model)
    _normalize(proto, external=exported)
    weights = _check_initializers(proto, schema)
    _check_values(exported, state)
    by_name = {init.name: init for init in proto.graph.initializer}
    ranges = []
    # The payload layout: each graph weight where the payload holds it, so that the data
    # file can be the payload (a version blob) itself.
    for spec, start, end in schema.spans():
        if spec.name not in weights:
            continue  # e.g. BatchNorm's num_batches_tracked: in the payload, not the graph
        init = by_name[spec.name]
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        entries = (DATA_FILE, str(start), str(spec.num_bytes))
        for key, text in zip(_EXTERNAL_KEYS, entries, strict=True):
            init.external_data.add(key=key, value=text)
        ranges.append(WeightRange(spec.name, start, end))
    data = proto.SerializeToString(deterministic=True)
    outside = outside_graph_description(schema.tensors, set(specs) - set(weights))
    t = OnnxTemplate(
        entry.name,
        schema.hash,
        data,
        tuple(ranges),
        structure_hash(data, (), outside),
        DATA_FILE,
        schema.payload_bytes,
        outside,
    )
    _check_external(t, "template")
    return t


def build_template(entry: ModelEntry, two_file_threshold: int = TWO_FILE_THRESHOLD) -> OnnxTemplate:
    """Export entry's model once and record where each state_dict tensor's bytes lie.

    Graph weights of more than two_file_threshold bytes get the two-file layout (see
    OnnxTemplate); 0 forces it on any model. Weights are the entry's init_seed weights
    (single-file only; a two-file template holds none). Deterministic: the same entry,
    torch and onnx versions give identical bytes. Run self_test() before trusting a new
    template. Memory: the module plus one serialized template; for the two-file layout
    the module plus the graph, never a second copy of the weights.
    """
    import torch

    module = entry.build(entry.init_seed)
    state = module.state_dict()
    schema = Schema.of(state)
    with torch.no_grad():
        program = _export(module, entry, schema)
    if _graph_weight_bytes(program, schema) > two_file_threshold:
        t = _two_file(program, entry, schema, state)
    else:
        t = _single_file(program, entry, schema, state)
    # The exported program keeps the module's weights alive in reference cycles (2 GiB
    # for drivenet-2g) until the cyclic collector happens to run; free them now.
    del program, module, state
    gc.collect()
    return t


def _external_spans(data: bytes | memoryview, data_file: str) -> dict[str, tuple[int, int]]:
    """name -> [start, end) in data_file of every initializer with external data."""
    spans = {}
    for init in onnx.load_from_string(bytes(data)).graph.initializer:  # model.onnx: small
        if init.data_location != onnx.TensorProto.EXTERNAL and not init.external_data:
            continue
        where = f"initializer {init.name!r}"
        entries = [(e.key, e.value) for e in init.external_data]
        if [key for key, _ in entries] != list(_EXTERNAL_KEYS) or init.HasField("raw_data"):
            raise ValueError(f"{where}: external data {entries}, expected keys {_EXTERNAL_KEYS}")
        location, offset, length = (value for _, value in entries)
        if location != data_file or not (offset.isdigit() and length.isdigit()):
            raise ValueError(f"{where}: external data {entries}, expected {data_file!r}")
        spans[init.name] = (int(offset), int(offset) + int(length))
    return spans


def _check_external(t: OnnxTemplate, where: str) -> None:
    """The two-file template's model.onnx points exactly at its ranges, and at nothing else."""
    if t.data_file is None:
        raise ValueError(f"{where}: not a two-file template")
    spans = _external_spans(t.data, t.data_file)
    want = {r.name: (r.start, r.end) for r in t.ranges}
    if spans != want:
        wrong = sorted(
            name for name in spans.keys() | want.keys() if spans.get(name) != want.get(name)
        )
        raise ValueError(f"{where}: external data of {wrong} does not match the recorded ranges")


def save_template(t: OnnxTemplate, directory: Path) -> None:
    """Write template.onnx and template.json into directory, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": t.model,
        "schema_hash": t.schema_hash,
        "structure_hash": t.structure_hash,
        "data_file": t.data_file,
        **({} if t.payload_bytes is None else {"payload_bytes": t.payload_bytes}),
        **({"outside_graph": t.outside_graph.decode()} if t.outside_graph else {}),
        "ranges": [{"name": r.name, "start": r.start, "end": r.end} for r in t.ranges],
    }
    # The ONNX file first: a crash in between leaves a json that fails load's hash check.
    write_atomic(directory / TEMPLATE_FILE, [t.data])
    write_atomic(directory / META_FILE, [json.dumps(meta, indent=1).encode() + b"\n"])


def _map_read_only(path: Path) -> memoryview:
    """The file's bytes, mapped: pages are read on demand and can be dropped by the kernel.

    The templates directory is the gateway's own state, like its database: whoever can
    rewrite it could change the template before a restart anyway.
    """
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def load_template(directory: Path) -> OnnxTemplate:
    """Read a saved template; its ranges and structure hash are checked against the bytes."""
    data = _map_read_only(directory / TEMPLATE_FILE)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        ranges = tuple(WeightRange(r["name"], r["start"], r["end"]) for r in meta["ranges"])
        t = OnnxTemplate(
            meta["model"],
            meta["schema_hash"],
            data,
            ranges,
            meta["structure_hash"],
            meta.get("data_file"),  # absent from templates saved before the two-file layout
            meta.get("payload_bytes"),  # absent: the graph layout (templates saved before)
            meta.get("outside_graph", "").encode(),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory / META_FILE}: malformed template metadata: {exc}") from exc
    if t.data_file is None:
        spans = {s.name: (s.start, s.end) for s in onnx_wire.initializer_spans(data)}
        for r in ranges:
            if spans.get(r.name) != (r.start, r.end):
                raise ValueError(f"{directory}: range of {r.name!r} does not match the ONNX file")
    else:
        _check_external(t, str(directory))
    actual = structure_hash(data, ranges if t.data_file is None else (), t.outside_graph)
    if actual != t.structure_hash:
        raise ValueError(
            f"{directory}: structure hash {actual[:16]} does not match the recorded "
            f"{t.structure_hash[:16]}"
        )
    return t
