"""Aggregation strategies over spooled delta updates, each bounded in memory (see base.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sluice.gateway.core.strategies.base import FedAvg, FedProx, Strategy
from sluice.gateway.core.strategies.optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi
from sluice.gateway.core.strategies.robust import Bulyan, FedMedian, FedTrimmedAvg, Krum

# Flower's names. Each factory takes the strategy's hyperparameters as keywords.
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "FedAvg": FedAvg,
    "FedProx": FedProx,
    "FedAvgM": FedAvgM,
    "FedAdam": FedAdam,
    "FedYogi": FedYogi,
    "FedAdagrad": FedAdagrad,
    "FedTrimmedAvg": FedTrimmedAvg,
    "FedMedian": FedMedian,
    "Krum": Krum,  # num_clients_to_keep > 0: MultiKrum
    "MultiKrum": Krum,
    "Bulyan": Bulyan,
}


def build_strategy(spec: Mapping[str, Any]) -> Strategy:
    """A strategy from its configuration: {"name": "FedAdam", "eta": 0.01, ...}."""
    params = dict(spec)
    name = params.pop("name", "FedAvg")
    factory = STRATEGIES.get(name)
    if factory is None:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown strategy {name!r}; known: {known}")
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"strategy {name!r}: bad parameters {sorted(params)}: {exc}") from exc
