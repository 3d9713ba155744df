"""FedProx on the server is Flower's FedProx: FedAvg of the clients, mu only for trainers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from sluice.gateway.core.aggregation import Contribution
from sluice.gateway.core.strategies import build_strategy
from sluice.gateway.core.strategies.base import FedProx, RoundInput
from tests.unit.test_aggregation import FLOATS_ONLY, fit_res, random_arrays, write

with warnings.catch_warnings():
    # flwr 1.42 imports typer, which imports names click 8.5 deprecates (import time only).
    warnings.filterwarnings("ignore", r"'click\.utils\.\w+' is deprecated", DeprecationWarning)
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedProx as FlowerFedProx


@pytest.mark.parametrize("n", [1, 3, 6])
def test_fedprox_matches_flowers_fedprox(tmp_path: Path, n: int) -> None:
    schema = FLOATS_ONLY
    rng = np.random.default_rng(n)
    base = random_arrays(schema, rng, delta=False)
    deltas = [random_arrays(schema, rng, delta=True) for _ in range(n)]
    examples = [int(k) for k in rng.integers(1, 500, size=n)]
    contributions = [
        Contribution(write(tmp_path / f"u{i}.bin", schema, d), k)
        for i, (d, k) in enumerate(zip(deltas, examples, strict=True))
    ]
    strategy = build_strategy({"name": "FedProx", "proximal_mu": 0.1})
    assert isinstance(strategy, FedProx) and strategy.proximal_mu == 0.1
    out = tmp_path / "out.bin"
    inp = RoundInput(schema, write(tmp_path / "base.bin", schema, base), contributions, 1)
    strategy.aggregate(inp, out, tmp_path)

    names = [t.name for t in schema.tensors]
    flower = FlowerFedProx(
        proximal_mu=0.1, initial_parameters=ndarrays_to_parameters([base[k] for k in names])
    )
    # FedAvg's aggregate_fit never looks at the ClientProxy.
    results = [
        (cast(ClientProxy, None), fit_res([base[k] + d[k] for k in names], k_i))
        for d, k_i in zip(deltas, examples, strict=True)
    ]
    parameters, _ = flower.aggregate_fit(1, results, [])
    assert parameters is not None
    want = dict(zip(names, parameters_to_ndarrays(parameters), strict=True))
    got = schema.views(out.read_bytes())
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_unknown_strategy_and_bad_parameters_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'FedSGD'; known: Bulyan"):
        build_strategy({"name": "FedSGD"})
    with pytest.raises(ValueError, match="bad parameters"):
        build_strategy({"name": "FedAdam", "learning_rate": 1.0})
