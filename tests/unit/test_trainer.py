"""Local training: the loss and its numpy twin, the loop, FedProx, and deltas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sluice.clients.scenes import make_clips
from sluice.clients.trainer import (
    CONTROL_SCALE,
    CONTROL_WEIGHT,
    LANE_SCALE,
    TrainConfig,
    apply_delta,
    compute_delta,
    evaluate,
    loss_fn,
    loss_np,
    train_local,
)
from sluice.models import registry


def _tiny(seed: int = 0) -> nn.Module:
    return registry.get("drivenet-tiny").build(seed)


def _distance(model: nn.Module, base: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(float(((p.detach() - base[n]) ** 2).sum()) for n, p in model.named_parameters())
    )


def test_loss_weights_each_head_by_its_scale() -> None:
    batch = make_clips("shanghai", 8, seed=0, height=16, width=32)
    controls = batch.controls + torch.tensor(CONTROL_SCALE)  # one scale off in every column
    lanes = batch.lanes + LANE_SCALE
    assert float(loss_fn(batch.controls, batch.lanes, batch.controls, batch.lanes)) == 0.0
    only_controls = float(loss_fn(controls, batch.lanes, batch.controls, batch.lanes))
    only_lanes = float(loss_fn(batch.controls, lanes, batch.controls, batch.lanes))
    assert only_controls == pytest.approx(CONTROL_WEIGHT, rel=1e-5)
    assert only_lanes == pytest.approx(1 - CONTROL_WEIGHT, rel=1e-5)


def test_loss_np_matches_loss_fn() -> None:
    batch = make_clips("chengdu", 50, seed=1, height=16, width=32)
    gen = torch.Generator().manual_seed(0)
    controls = torch.randn(50, 2, generator=gen)
    lanes = torch.randn(50, 4, generator=gen)
    expected = float(loss_fn(controls, lanes, batch.controls, batch.lanes))
    assert loss_np(controls.numpy(), lanes.numpy(), batch) == pytest.approx(expected, rel=1e-6)
    # onnxruntime hands back float32; float64 predictions must give the same number.
    got64 = loss_np(controls.double().numpy(), lanes.double().numpy(), batch)
    assert got64 == pytest.approx(expected, rel=1e-6)


def test_loss_rejects_mismatched_predictions() -> None:
    batch = make_clips("chengdu", 4, seed=1, height=16, width=32)
    with pytest.raises(ValueError, match="lanes"):
        loss_np(np.zeros((4, 2), np.float32), np.zeros((4, 2), np.float32), batch)
    with pytest.raises(ValueError, match="controls"):
        loss_fn(torch.zeros(3, 2), torch.zeros(4, 4), batch.controls, batch.lanes)


def test_train_config_rejects_nonsense() -> None:
    for bad in ({"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"proximal_mu": -1.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_train_local_counts_steps_and_leaves_eval_mode() -> None:
    data = make_clips("beijing", 40, seed=0)
    model = _tiny()
    result = train_local(model, data, TrainConfig(epochs=2, batch_size=16))
    assert (result.num_examples, result.steps) == (40, 2 * 3)
    assert math.isfinite(result.train_loss) and result.train_loss > 0
    assert not model.training
    with pytest.raises(ValueError, match="at least one"):
        train_local(model, data[:0], TrainConfig())


def test_train_local_is_reproducible() -> None:
    data = make_clips("guangzhou", 48, seed=0)
    states = []
    for _ in range(2):
        model = _tiny()
        train_local(model, data, TrainConfig(batch_size=16, seed=3))
        states.append(model.state_dict())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_evaluate_restores_mode_and_keeps_weights() -> None:
    data = make_clips("harbin", 20, seed=0)
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = evaluate(model, data, batch_size=8)
    assert math.isfinite(loss)
    assert model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # BatchNorm stats included
    assert evaluate(model, data, batch_size=8) == pytest.approx(loss, rel=1e-6)


def test_delta_round_trip_is_exact_for_integers_and_ulp_close_for_floats() -> None:
    model = _tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, make_clips("shenzhen", 32, seed=0), TrainConfig(batch_size=8))
    trained = model.state_dict()
    delta = compute_delta(trained, base)
    assert list(delta) == list(base)
    assert delta["backbone.0.1.num_batches_tracked"].dtype == torch.int64
    assert int(delta["backbone.0.1.num_batches_tracked"]) == result.steps
    restored = apply_delta(base, delta)
    for name, tensor in trained.items():
        assert restored[name].dtype == tensor.dtype
        if tensor.is_floating_point():
            # One rounded subtraction: exact where trained and base are within a factor
            # of two of each other, otherwise off by at most an ulp of the larger value.
            bound = torch.finfo(torch.float32).eps * torch.maximum(tensor.abs(), base[name].abs())
            assert ((restored[name] - tensor).abs() <= bound).all(), name
        else:
            assert torch.equal(restored[name], tensor), name


def test_delta_round_trip_exact_for_small_steps_and_large_integers() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(1000, generator=gen) + 0.5
    base = {
        "w": weights,
        "count": torch.tensor(2**40 + 3),
        "idx": torch.arange(5, dtype=torch.int32),
    }
    trained = {
        "w": weights * (1 + 0.01 * torch.randn(1000, generator=gen)),
        "count": torch.tensor(2**40 + 17),
        "idx": torch.arange(5, dtype=torch.int32) - 7,
    }
    restored = apply_delta(base, compute_delta(trained, base))
    for name, tensor in trained.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor)
    assert int(compute_delta(trained, base)["count"]) == 14


def test_delta_rejects_other_layouts() -> None:
    base = {"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int64)}
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        compute_delta({"a": torch.zeros(3)}, base)
    with pytest.raises(ValueError, match="'a'"):
        compute_delta({"a": torch.zeros(4), "b": base["b"]}, base)
    with pytest.raises(ValueError, match="'b'"):
        apply_delta(base, {"a": torch.zeros(3), "b": torch.zeros(2)})


def test_proximal_term_keeps_weights_near_the_base() -> None:
    data = make_clips("chengdu", 64, seed=0)
    distances = {}
    for mu in (0.0, 10.0):
        model = _tiny()
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_local(model, data, TrainConfig(epochs=2, batch_size=16, lr=3e-3, proximal_mu=mu))
        distances[mu] = _distance(model, base)
    assert distances[10.0] < 0.8 * distances[0.0]


def test_drivenet_learns_a_region_from_pixels() -> None:
    entry = registry.get("drivenet")
    model = entry.build(entry.init_seed)
    train, held_out = make_clips("shanghai", 256, seed=11), make_clips("shanghai", 128, seed=12)
    before = evaluate(model, held_out)
    result = train_local(model, train, TrainConfig(epochs=3, batch_size=32))
    after = evaluate(model, held_out)
    assert result.steps == 3 * 8
    # An untrained model scores ~7 (lane lines sit at +-0.45, it says 0); three epochs
    # from scratch get it to ~2.5 and more epochs below 1, the score of predicting means.
    assert after < 0.5 * before, (before, after)
