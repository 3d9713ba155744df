"""A served model: how to build it, its example inputs, outputs and initial weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.models.artifact import StructureLimits
from sluice.models.schema import Schema

if TYPE_CHECKING:  # torch is imported where a module is built: clients that only pull don't
    import torch
    from torch import nn

# Input dtypes a declaration may name (torch's names); example values are drawn per dtype.
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")
DEFAULT_PARITY_TOLERANCE = 1e-4  # max abs diff onnxruntime vs torch, float32 graphs


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, an example shape (batch first), dtype and which axes vary."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: tuple[int, ...] = (0,)  # axes exported as symbolic; 0 is the batch
    low: float = 0.0  # example values: uniform in [low, high), integers in [low, high)
    high: float = 1.0

    def example(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        import torch

        shape = (batch, *self.shape[1:]) if 0 in self.dynamic else self.shape
        dtype = getattr(torch, self.dtype)
        if self.dtype == "bool":
            return torch.randint(0, 2, shape, generator=generator).to(torch.bool)
        if not dtype.is_floating_point:
            low, high = int(self.low), int(self.high)
            return torch.randint(low, high, shape, generator=generator, dtype=dtype)
        values = torch.rand(shape, generator=generator, dtype=torch.float32)
        return (self.low + (self.high - self.low) * values).to(dtype)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[[], nn.Module]  # fresh, untrained module
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]
    init_seed: int = 0  # version 0 of the global weights comes from this seed...
    init_weights: Path | None = None  # ...or from this safetensors file
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE  # onnxruntime vs torch, this graph
    limits: StructureLimits = field(default_factory=StructureLimits)  # beyond the weights
    factory_path: str = ""  # "package.module:callable" it was declared with
    kwargs: Mapping[str, Any] = field(default_factory=dict, compare=False)
    description: str = field(default="", compare=False)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    def build(self, seed: int | None = None) -> nn.Module:
        """A module in eval mode; with a seed, its initial weights are reproducible."""
        import torch

        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self.factory()
        else:
            module = self.factory()
        return module.eval()

    def schema(self) -> Schema:
        import torch

        with torch.device("meta"):  # names, shapes and dtypes only: no weights allocated
            # keep_vars: on meta only the objects themselves tell a tied parameter apart.
            return Schema.of(self.factory().state_dict(keep_vars=True))

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        import torch

        gen = torch.Generator().manual_seed(seed)
        return tuple(spec.example(batch, gen) for spec in self.inputs)

    def initial_state(self) -> dict[str, torch.Tensor]:
        """Version 0's weights: init_weights if declared (checked against the schema),
        else the factory's under init_seed."""
        if self.init_weights is None:
            return self.build(self.init_seed).state_dict()
        from sluice.models.initial import load_initial_weights

        try:
            return load_initial_weights(self.init_weights, self.schema())
        except ValueError as exc:  # checked at start (check_entry); the file may have changed
            raise ValueError(f"model {self.name!r}: init_weights: {exc}") from exc
