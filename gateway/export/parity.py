"""onnxruntime vs torch on the same weights: the check every template and release passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.registry import ModelEntry

PARITY_TOLERANCE = 1e-4
PARITY_BATCH = 4  # > 1 so the dynamic batch dimension is exercised


def max_output_diff(
    onnx_model: bytes | Path, entry: ModelEntry, module: torch.nn.Module, seed: int = 0
) -> float:
    """Max abs difference over all outputs of onnxruntime and torch on example inputs."""
    import onnxruntime as ort  # loaded lazily: only exports need the runtime

    frames = entry.example_input(batch=PARITY_BATCH, seed=seed)
    with torch.no_grad():
        out = module.eval()(frames)
    want = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    # Torch first, then drop this reference: a module the caller no longer holds (publish
    # passes a temporary) is freed before onnxruntime loads its own copy of the weights.
    del module, out
    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    options = ort.SessionOptions()
    # Prepacking copies every big weight once more: 4.3 instead of 2.2 GiB for a 2 GiB model.
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    got = session.run(list(entry.output_names), {entry.input_names[0]: frames.numpy()})
    del session
    if len(got) != len(want):
        raise ValueError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
    worst = 0.0
    for name, g, w in zip(entry.output_names, got, want, strict=True):
        if g.shape != tuple(w.shape):
            raise ValueError(f"output {name!r}: onnxruntime {g.shape}, torch {tuple(w.shape)}")
        diff = float(np.max(np.abs(g - w.numpy())))
        if not np.isfinite(diff):
            raise ValueError(f"output {name!r}: non-finite difference")
        worst = max(worst, diff)
    return worst
