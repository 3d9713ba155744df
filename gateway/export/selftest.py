"""Self-test of a template: random weights through the template in onnxruntime vs torch."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sluice.gateway.export.parity import max_output_diff
from sluice.gateway.export.refresh import refresh, write_atomic, write_release_files
from sluice.gateway.export.template import OnnxTemplate
from sluice.models.entry import ModelEntry
from sluice.models.manifest import MODEL_FILE
from sluice.models.schema import Schema, printable, tensor_to_numpy

if TYPE_CHECKING:  # imported where a template is tested: a start on built ones does not
    import torch

SELF_TEST_TOLERANCE = 1e-4  # max abs diff onnxruntime vs torch, fp32, random weights
_BLOCK_BYTES = 16 << 20  # bounds each temporary for a 2 GiB weight


def _randomize(state: Mapping[str, torch.Tensor], seed: int) -> None:
    """Perturb every float tensor in place, BatchNorm statistics included."""
    # Factory init leaves BatchNorm at 1/0/0/1 in every seed; a template that had frozen
    # those values would pass a test that did not move them.
    import torch

    gen = torch.Generator().manual_seed(seed)
    block = _BLOCK_BYTES // 4  # elements; bounds the temporaries for a 2 GiB weight
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        parts = [tensor]
        if tensor.is_contiguous() and tensor.numel() > block:
            flat = tensor.view(-1)
            parts = [flat[at : at + block] for at in range(0, flat.numel(), block)]
        for part in parts:
            scale = torch.randn(part.shape, generator=gen, dtype=tensor.dtype)
            shift = torch.randn(part.shape, generator=gen, dtype=tensor.dtype)
            part.mul_(1 + 0.2 * scale).add_(0.05 * shift)
        if name.endswith("running_var"):
            tensor.clamp_(min=0.1)  # a variance must stay positive


def _payload_chunks(state: Mapping[str, torch.Tensor], schema: Schema) -> Iterator[memoryview]:
    """The flat payload of state, tensor by tensor, without copying a tensor whole."""
    for spec in schema.tensors:
        raw = tensor_to_numpy(state[spec.name].contiguous()).reshape(-1).view(np.uint8)
        for at in range(0, raw.size, _BLOCK_BYTES):
            yield raw[at : at + _BLOCK_BYTES].data


def _two_file_diff(
    t: OnnxTemplate, schema: Schema, state: Mapping[str, torch.Tensor], entry: ModelEntry,
    module: torch.nn.Module, seed: int,
) -> float:  # fmt: skip
    # onnxruntime reads the data file from beside model.onnx, so both go to a real directory.
    with tempfile.TemporaryDirectory(prefix="sluice-self-test-") as tmp:
        payload = Path(tmp) / "payload.bin"
        write_atomic(payload, _payload_chunks(state, schema))
        write_release_files(t, schema, payload, Path(tmp) / "release")
        payload.unlink()  # a 2 GiB model would otherwise hold twice its size on disk
        return max_output_diff(Path(tmp) / "release" / MODEL_FILE, entry, module, seed=seed)


def self_test(t: OnnxTemplate, entry: ModelEntry, seed: int = 1234) -> float:
    """Max abs difference of onnxruntime on the refreshed template vs torch, random weights.

    Raises ValueError above SELF_TEST_TOLERANCE (or on NaN), or if the template does not
    belong to the entry. A two-file template is written to a temporary directory (its
    size on disk, twice while being written); memory: the module plus onnxruntime's copy.
    """
    import torch

    module = entry.build(seed)
    state = module.state_dict()
    with torch.no_grad():
        _randomize(state, seed)
    schema = Schema.of(state)
    data = refresh(t, schema, schema.flatten(state)) if t.data_file is None else None
    try:
        if data is not None:
            diff = max_output_diff(data, entry, module, seed=seed)
        else:
            diff = _two_file_diff(t, schema, state, entry, module, seed)
    except ValueError as exc:
        raise ValueError(
            f"model {t.model!r}: self-test failed: {printable(str(exc), 600)}"
        ) from exc
    tolerance = max(SELF_TEST_TOLERANCE, entry.parity_tolerance)
    if not diff <= tolerance:
        raise ValueError(
            f"model {t.model!r}: self-test max abs diff {diff:.3g} exceeds {tolerance:g}"
        )
    return diff
