"""The tensor wire format shared by gateway and clients: schema, hash, flat little-endian bytes."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is handled: a reader who only pulls,
    import torch  # verifies and exports weights never loads it (the client install)

# Dtypes a schema may hold (torch's name -> the schema's); everything travels little-endian.
# numpy has no bfloat16: the schema names it "bfloat16" and numpy sees ml_dtypes' type
# (which onnx itself uses), so views, the fold and the checks treat it like any float.
_TORCH_TO_NUMPY: dict[str, str] = {
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "bfloat16",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
}
FLOAT_DTYPES = frozenset({"<f4", "<f2", "<f8", "bfloat16"})
HALF_DTYPES = frozenset({"<f2", "bfloat16"})  # folded in float32, rounded once
_NUMPY_DTYPES = frozenset(_TORCH_TO_NUMPY.values())


def printable(text: str, limit: int = 64) -> str:
    """A name from a file or the user's code, for a one-line message: control characters
    escaped, cut to limit (as gateway.core.errors.bounded, which models may not import)."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


@functools.lru_cache(maxsize=64)  # bounded: dtype strings can come from a manifest
def numpy_dtype(dtype: str) -> np.dtype[Any]:
    """numpy's dtype for a schema dtype string ("<f4", "bfloat16", ...)."""
    if dtype == "bfloat16":
        import ml_dtypes  # onnx's own dependency: present wherever a schema is used

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    return np.dtype(dtype)


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 (which numpy lacks) as ml_dtypes' bfloat16."""
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return t.numpy()


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy that also takes ml_dtypes' bfloat16 (sharing memory, no copy)."""
    import torch

    if array.dtype == numpy_dtype("bfloat16"):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype string, little-endian ("<f4")

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return numpy_dtype(self.dtype)

    @property
    def num_bytes(self) -> int:
        return self.num_elements * self.np_dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def is_half(self) -> bool:
        """float16 or bfloat16: accumulated in float32 and rounded once."""
        return self.dtype in HALF_DTYPES


def _as_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """A tensor's numpy view; arrays (and numpy scalars, e.g. a 0-d counter) as arrays."""
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value)
    return tensor_to_numpy(value)


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two state_dict entries one tensor: the same memory seen the same way.

    On the meta device (a schema built without weights) there is no memory: entries are
    the same tensor only when they are the same object (state_dict(keep_vars=True)).
    Empty tensors share no values; they are never aliases.
    """
    if tensor.numel() == 0:
        return None
    if tensor.device.type == "meta":
        return ("object", id(tensor))
    return (
        tensor.device.type,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


@dataclass(frozen=True)
class Schema:
    """Ordered (name, shape, dtype) of a state_dict; an update is its tensors end to end.

    A tied parameter (one tensor under two state_dict names, e.g. an embedding reused as
    the output projection) travels once, under its first name; `aliases` maps every other
    name to that one. to_state_dict gives back every name; flatten accepts them.
    """

    tensors: tuple[TensorSpec, ...]
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, the tensor's first name), in order

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> Schema:
        specs: list[TensorSpec] = []
        aliases: list[tuple[str, str]] = []
        first: dict[tuple[Any, ...], str] = {}
        import torch

        for name, tensor in state_dict.items():
            if not isinstance(name, str):
                raise ValueError(f"state_dict key {printable(repr(name))}: expected a string")
            if not isinstance(tensor, torch.Tensor):  # e.g. a module's get_extra_state()
                raise ValueError(
                    f"state_dict {printable(name)!r}: a {type(tensor).__name__}, not a tensor "
                    "(extra state does not travel; keep it out of state_dict)"
                )
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in _TORCH_TO_NUMPY:
                raise ValueError(
                    f"state_dict {printable(name)!r}: dtype {tensor.dtype} is not supported; "
                    f"expected one of {', '.join(_TORCH_TO_NUMPY)}"
                )
            key = _storage_key(tensor)
            if key is not None and key in first:
                aliases.append((name, first[key]))
                continue
            if key is not None:
                first[key] = name
            specs.append(TensorSpec(name, tuple(tensor.shape), _TORCH_TO_NUMPY[dtype]))
        return cls(tuple(specs), tuple(aliases))

    @cached_property
    def hash(self) -> str:
        """Hex sha256 of the canonical JSON of the tensor list (and of the aliases, if any:
        a schema without them hashes as it always did)."""
        canon = json.dumps(self.to_doc(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(canon).hexdigest()

    def to_doc(self) -> object:
        """The JSON document the hash is taken of: the tensor list, or with aliases an
        object holding both. from_doc reads it back."""
        tensors = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]
        if not self.aliases:
            return tensors
        return {"tensors": tensors, "aliases": [list(pair) for pair in self.aliases]}

    @classmethod
    def from_doc(cls, doc: object) -> Schema:
        """A schema from to_doc's document (e.g. one cached on disk); ValueError for
        anything else: unknown dtypes, negative or non-integer dims, repeated names, an
        alias of no tensor."""
        tensors, aliases = doc, []
        if isinstance(doc, dict):
            if set(doc) != {"tensors", "aliases"}:
                raise ValueError("schema: expected the keys tensors and aliases")
            tensors, aliases = doc["tensors"], doc["aliases"]
        if not isinstance(tensors, list) or not isinstance(aliases, list):
            raise ValueError("schema: expected a list of tensors")
        specs: list[TensorSpec] = []
        for t in tensors:
            if not isinstance(t, dict) or set(t) != {"name", "shape", "dtype"}:
                raise ValueError("schema: a tensor is {name, shape, dtype}")
            name, shape, dtype = t["name"], t["shape"], t["dtype"]
            if not isinstance(name, str) or dtype not in _NUMPY_DTYPES:
                raise ValueError(f"schema: tensor {str(name)[:64]!r}: bad name or dtype")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise ValueError(f"schema: tensor {name[:64]!r}: bad shape")
            specs.append(TensorSpec(name, tuple(shape), dtype))
        names = {s.name for s in specs}
        pairs: list[tuple[str, str]] = []
        for pair in aliases:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(p, str) for p in pair)
                or pair[1] not in names
                or pair[0] in names
            ):
                raise ValueError("schema: an alias is [name, a tensor's name]")
            pairs.append((pair[0], pair[1]))
        if len(names) != len(specs) or len({a for a, _ in pairs}) != len(pairs):
            raise ValueError("schema: repeated tensor names")
        return cls(tuple(specs), tuple(pairs))

    @cached_property
    def alias_of(self) -> dict[str, str]:
        return dict(self.aliases)

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
        """Zero-copy numpy views of each tensor in a flat payload buffer (aliases not
        repeated: one entry per tensor on the wire)."""
        raw = np.frombuffer(buffer, dtype=np.uint8)
        if raw.size != self.payload_bytes:
            raise ValueError(f"payload: expected {self.payload_bytes} bytes, got {raw.size}")
        return {
            spec.name: raw[start:end].view(spec.np_dtype).reshape(spec.shape)
            for spec, start, end in self.spans()
        }

    def flatten(self, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> bytes:
        """Concatenate tensors in schema order, checking every name, shape and dtype."""
        return b"".join(self.tensor_bytes(arrays))

    def tensor_bytes(self, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> Iterator[bytes]:
        """The payload tensor by tensor, so callers can stream without one big copy.

        arrays holds every tensor's name; a tied tensor's other names may be present too
        (a whole state_dict) and are not sent again.
        """
        names = {t.name for t in self.tensors}
        given = set(arrays) - set(self.alias_of)
        if given != names:
            missing = sorted(names - given)
            extra = sorted(given - names)
            raise ValueError(f"tensors differ from schema: missing {missing}, extra {extra}")
        for alias, name in self.aliases:  # present or not, never a second value
            if alias in arrays and not np.array_equal(
                _as_numpy(arrays[alias]), _as_numpy(arrays[name])
            ):
                raise ValueError(f"tensors {name!r} and {alias!r} are tied but differ")
        for spec in self.tensors:
            arr = _as_numpy(arrays[spec.name])
            if tuple(arr.shape) != spec.shape:
                raise ValueError(
                    f"tensor {spec.name!r}: expected shape {spec.shape}, got {tuple(arr.shape)}"
                )
            if np.dtype(arr.dtype) != spec.np_dtype:
                raise ValueError(f"tensor {spec.name!r}: expected {spec.dtype}, got {arr.dtype}")
            yield np.ascontiguousarray(arr, dtype=spec.np_dtype).tobytes()

    def to_state_dict(self, buffer: np.ndarray | memoryview | bytes) -> dict[str, torch.Tensor]:
        """Copy a flat payload into torch tensors (owned, writable); a tied tensor's other
        names map to the same tensor, so load_state_dict(strict=True) accepts the result."""
        state = {name: numpy_to_tensor(arr.copy()) for name, arr in self.views(buffer).items()}
        for alias, name in self.aliases:
            state[alias] = state[name]
        return state
