"""A model's declared initial weights: a safetensors file, checked against its schema."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sluice.models.schema import Schema, numpy_to_tensor, printable, tensor_to_numpy

if TYPE_CHECKING:
    import torch


def load_initial_weights(path: Path, schema: Schema) -> dict[str, torch.Tensor]:
    """Every schema tensor from path, by name, with its shape and dtype; finite floats.

    A tied tensor's other names may be absent or present (with the same values). Raises
    ValueError naming the first difference; never unpickles anything.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # numpy's loader has no bfloat16

    where = printable(path.name)  # the model and its init_weights are named by the caller
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        reason = printable(str(exc), 200)
        raise ValueError(f"{where}: not a readable safetensors file: {reason}") from exc
    arrays = {name: tensor_to_numpy(t) for name, t in tensors.items()}
    state: dict[str, torch.Tensor] = {}
    known = {spec.name for spec in schema.tensors} | set(schema.alias_of)
    extra = sorted(set(arrays) - known)
    if extra:
        raise ValueError(f"{where}: tensors not in the model: {[printable(n) for n in extra[:5]]}")
    for spec in schema.tensors:
        if spec.name not in arrays:
            raise ValueError(f"{where}: tensor {spec.name!r} is missing")
        arr = arrays[spec.name]
        if tuple(arr.shape) != spec.shape or arr.dtype != spec.np_dtype:
            raise ValueError(
                f"{where}: tensor {spec.name!r} is {tuple(arr.shape)} "
                f"{arr.dtype}, the model has {spec.shape} {spec.dtype}"
            )
        if spec.is_float and not np.isfinite(arr.astype(np.float32)).all():
            raise ValueError(f"{where}: tensor {spec.name!r} is not finite")
        state[spec.name] = numpy_to_tensor(np.array(arr, order="C"))  # a 0-d one stays 0-d
    for alias, name in schema.aliases:
        if alias in arrays and not np.array_equal(arrays[alias], arrays[name]):
            raise ValueError(f"{where}: {alias!r} is tied to {name!r} but holds other values")
        state[alias] = state[name]
    return state
