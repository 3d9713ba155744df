"""The tensor wire format shared by gateway and clients: schema, hash, flat little-endian bytes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is handled: a reader who only pulls,
    import torch  # verifies and exports weights never loads it (the client install)

# Dtypes a schema may hold (torch's name -> numpy's); everything travels little-endian.
_TORCH_TO_NUMPY: dict[str, str] = {
    "float32": "<f4",
    "float16": "<f2",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
}
FLOAT_DTYPES = frozenset({"<f4", "<f2", "<f8"})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype string, little-endian ("<f4")

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_bytes(self) -> int:
        return self.num_elements * np.dtype(self.dtype).itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Schema:
    """Ordered (name, shape, dtype) of a state_dict; an update is its tensors end to end."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> Schema:
        specs = []
        for name, tensor in state_dict.items():
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in _TORCH_TO_NUMPY:
                raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} is not supported")
            specs.append(TensorSpec(name, tuple(tensor.shape), _TORCH_TO_NUMPY[dtype]))
        return cls(tuple(specs))

    @cached_property
    def hash(self) -> str:
        """Hex sha256 of the canonical JSON of the tensor list."""
        doc = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]
        canon = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(canon).hexdigest()

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Byte offset of each tensor in the flat payload."""
        out, pos = [], 0
        for t in self.tensors:
            out.append(pos)
            pos += t.num_bytes
        return tuple(out)

    @cached_property
    def payload_bytes(self) -> int:
        return sum(t.num_bytes for t in self.tensors)

    @property
    def num_parameters(self) -> int:
        return sum(t.num_elements for t in self.tensors)

    def spans(self) -> Iterator[tuple[TensorSpec, int, int]]:
        """(spec, start, end) byte range of every tensor in the payload."""
        for spec, start in zip(self.tensors, self.offsets, strict=True):
            yield spec, start, start + spec.num_bytes

    def views(self, buffer: np.ndarray | memoryview | bytes) -> dict[str, np.ndarray]:
        """Zero-copy numpy views of each tensor in a flat payload buffer."""
        raw = np.frombuffer(buffer, dtype=np.uint8)
        if raw.size != self.payload_bytes:
            raise ValueError(f"payload: expected {self.payload_bytes} bytes, got {raw.size}")
        return {
            spec.name: raw[start:end].view(spec.dtype).reshape(spec.shape)
            for spec, start, end in self.spans()
        }

    def flatten(self, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> bytes:
        """Concatenate tensors in schema order, checking every name, shape and dtype."""
        return b"".join(self.tensor_bytes(arrays))

    def tensor_bytes(self, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> Iterator[bytes]:
        """The payload tensor by tensor, so callers can stream without one big copy."""
        if set(arrays) != {t.name for t in self.tensors}:
            missing = sorted({t.name for t in self.tensors} - set(arrays))
            extra = sorted(set(arrays) - {t.name for t in self.tensors})
            raise ValueError(f"tensors differ from schema: missing {missing}, extra {extra}")
        for spec in self.tensors:
            value = arrays[spec.name]
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else value
            if tuple(arr.shape) != spec.shape:
                raise ValueError(
                    f"tensor {spec.name!r}: expected shape {spec.shape}, got {tuple(arr.shape)}"
                )
            if np.dtype(arr.dtype) != np.dtype(spec.dtype):
                raise ValueError(f"tensor {spec.name!r}: expected {spec.dtype}, got {arr.dtype}")
            yield np.ascontiguousarray(arr, dtype=spec.dtype).tobytes()

    def to_state_dict(self, buffer: np.ndarray | memoryview | bytes) -> dict[str, torch.Tensor]:
        """Copy a flat payload into torch tensors (owned, writable)."""
        import torch

        return {name: torch.from_numpy(arr.copy()) for name, arr in self.views(buffer).items()}
