"""Settings: TOML, then SLUICE_* environment, then flags; strategies per model from tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.gateway.config import load_config
from sluice.gateway.core.strategies import build_strategy
from sluice.gateway.core.strategies.optimizers import FedAdam


def test_toml_env_and_overrides_layer_in_order(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(
        """
[gateway]
models = ["drivenet", "drivenet-tiny"]
quorum = 5
dp_noise_multiplier = 1.1

[gateway.strategies.drivenet]
name = "FedAdam"
eta = 0.01
"""
    )
    config = load_config(path, {"min_trainers": 4}, environ={"SLUICE_QUORUM": "7"})
    assert config.models == ("drivenet", "drivenet-tiny")
    assert (config.quorum, config.min_trainers, config.dp_noise_multiplier) == (7, 4, 1.1)
    strategy = build_strategy(config.strategies["drivenet"])
    assert isinstance(strategy, FedAdam) and strategy.eta == 0.01


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text("[gateway]\nquorom = 3\n")
    with pytest.raises(ValueError, match="unknown setting 'quorom'"):
        load_config(path, environ={})
    with pytest.raises(ValueError, match="at least 1"):
        load_config(None, {"quorum": 0}, environ={})
