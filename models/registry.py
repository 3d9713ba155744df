"""The models the gateway serves: name -> how to build it, its example input and I/O names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sluice.models.drivenet import DriveNet, DriveNetConfig
from sluice.models.schema import Schema


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[[], nn.Module]  # fresh, untrained module
    input_shape: tuple[int, ...]  # one example input, batch first
    input_names: tuple[str, ...] = ("frames",)
    output_names: tuple[str, ...] = ("controls", "lanes")
    init_seed: int = 0  # version 0 of the global weights comes from this seed
    description: str = field(default="", compare=False)

    def build(self, seed: int | None = None) -> nn.Module:
        """A module in eval mode; with a seed, its initial weights are reproducible."""
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self.factory()
        else:
            module = self.factory()
        return module.eval()

    def schema(self) -> Schema:
        with torch.device("meta"):  # names, shapes and dtypes only: no weights allocated
            return Schema.of(self.factory().state_dict())

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.rand((batch, *self.input_shape[1:]), generator=gen)


def _drivenet_entry(name: str, config: DriveNetConfig, description: str) -> ModelEntry:
    return ModelEntry(
        name=name,
        factory=lambda: DriveNet(config),
        input_shape=(1, 3, config.frame_height, config.frame_width),
        description=description,
    )


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        _drivenet_entry("drivenet", DriveNetConfig(), "camera frame -> controls and lanes, 2.5M"),
        # Wide sibling for throughput benchmarks: a 32768-wide trunk, 100.9M params (403 MB).
        _drivenet_entry("drivenet-xl", DriveNetConfig(hidden=32768), "benchmark-sized DriveNet"),
        # Benchmark sizes (bench/): a DriveNet's trunk holds ~3079 parameters per unit of
        # hidden width, so these give ~5M, ~32M (128 MB), ~250M (1 GB) and ~600M (2.4 GB).
        _drivenet_entry("drivenet-5m", DriveNetConfig(hidden=1600), "DriveNet, ~5M params"),
        _drivenet_entry("drivenet-128mb", DriveNetConfig(hidden=10368), "DriveNet, 128 MB"),
        _drivenet_entry("drivenet-1gb", DriveNetConfig(hidden=81200), "DriveNet, 1 GB"),
        _drivenet_entry("drivenet-600m", DriveNetConfig(hidden=194850), "DriveNet, ~600M"),
        # Over 2 GiB of weights, for the two-file release layout (tests/slow, bench/): a
        # 183000-wide trunk, 563.6M params, 2.25 GB (2.10 GiB) of float32. Not in `make test`.
        _drivenet_entry(
            "drivenet-2g", DriveNetConfig(hidden=183000), "DriveNet over 2 GiB (two-file layout)"
        ),
        # Tiny sibling for fast tests: same graph, a fraction of the weights.
        _drivenet_entry(
            "drivenet-tiny",
            DriveNetConfig(channels=(8, 8, 16, 16), hidden=32),
            "test-sized DriveNet",
        ),
    )
}


def get(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"unknown model {name!r}; registered: {known}") from None
