"""onnxruntime vs torch on the same weights: the check every template and release passes."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from sluice.gateway.store.direct import open_regular
from sluice.models import onnx_wire
from sluice.models.entry import ModelEntry
from sluice.models.schema import tensor_to_numpy

if TYPE_CHECKING:  # imported where a release runs the module: a start does not need it
    import torch

PARITY_TOLERANCE = 1e-4
PARITY_BATCH = 4  # > 1 so the dynamic batch dimension is exercised


def max_output_diff(
    onnx_model: bytes | Path, entry: ModelEntry, module: torch.nn.Module, seed: int = 0
) -> float:
    """Max abs difference over all outputs of onnxruntime and torch on example inputs."""
    import onnxruntime as ort  # loaded lazily: only exports need the runtime
    import torch

    inputs = entry.example_inputs(batch=PARITY_BATCH, seed=seed)
    with torch.no_grad():
        out = module.eval()(*inputs)
    want = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    # Torch first, then drop this reference: a module the caller no longer holds (publish
    # passes a temporary) is freed before onnxruntime loads its own copy of the weights.
    del module, out
    options = ort.SessionOptions()
    # Prepacking copies every big weight once more: 4.3 instead of 2.2 GiB for a 2 GiB model.
    options.add_session_config_entry("session.disable_prepacking", "1")
    source: str | bytes = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    if isinstance(onnx_model, Path) and (view := _weights_in_place(onnx_model)) is not None:
        source = view
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(onnx_model.parent)
        )
    feeds = {name: tensor_to_numpy(x) for name, x in zip(entry.input_names, inputs, strict=True)}
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        got = session.run(list(entry.output_names), feeds)
    except Exception as exc:  # onnxruntime's own types: a graph it has no kernel for, ...
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        raise ValueError(
            f"onnxruntime cannot run the graph: {type(exc).__name__}: {first}"
        ) from exc
    del session
    if len(got) != len(want):
        raise ValueError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
    worst = 0.0
    for name, g, w in zip(entry.output_names, got, want, strict=True):
        if g.shape != tuple(w.shape):
            raise ValueError(f"output {name!r}: onnxruntime {g.shape}, torch {tuple(w.shape)}")
        # In float64: a float16 or bfloat16 output (ml_dtypes on the numpy side) compares
        # exactly, and an empty output has no maximum to take.
        diff = float(
            np.max(
                np.abs(g.astype(np.float64) - tensor_to_numpy(w).astype(np.float64)), initial=0.0
            )
        )
        if not np.isfinite(diff):
            raise ValueError(f"output {name!r}: non-finite difference")
        worst = max(worst, diff)
    return worst


def _weights_in_place(path: Path) -> bytes | None:
    """The single-file model at path as onnxruntime should load it: its own graph (parsed
    with raw_data elided) whose initializers read their values from path itself, at their
    raw_data byte ranges, as external data. onnxruntime then holds the weights once, not
    twice (the parsed file and its tensors: 2x the model at load, bench/: gateway memory),
    and the values it runs are still exactly the bytes of the file. None where the file
    has no such layout (a two-file release already keeps its weights external)."""
    with os.fdopen(open_regular(path), "rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file: nothing to map, onnxruntime says what is wrong
            return None
    with mapped:
        try:
            skeleton, spans = onnx_wire.elide_raw_data(memoryview(mapped))
        except ValueError:
            return None
    model = onnx.ModelProto.FromString(skeleton)
    at = {span.name: span for span in spans}
    for init in model.graph.initializer:
        span = at[init.name]
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", path.name), ("offset", span.start),
                           ("length", span.end - span.start)):  # fmt: skip
            entry = init.external_data.add()
            entry.key, entry.value = key, str(value)
    return model.SerializeToString()
