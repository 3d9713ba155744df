"""Local training on one region's clips: the loss, the training loop and the update as a delta."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sluice.clients.scenes import SceneBatch

# Every label is divided by its typical spread across regions so that steering (hundredths
# of a radian), acceleration (m/s^2) and lane x (tenths of the frame width) weigh alike;
# a model that predicts each region's mean scores about 1, a perfect one 0.
CONTROL_SCALE = (0.05, 1.5)  # steering (rad), acceleration (m/s^2)
LANE_SCALE = 0.1  # image x, normalised to [-1, 1]
CONTROL_WEIGHT = 0.5  # share of the controls head; the lanes head gets the rest


def _check_shapes(controls: tuple[int, ...], lanes: tuple[int, ...], n: int) -> None:
    if controls != (n, len(CONTROL_SCALE)) or lanes != (n, 4):
        raise ValueError(
            f"predictions: expected controls ({n}, 2) and lanes ({n}, 4), "
            f"got {controls} and {lanes}"
        )


def loss_fn(
    controls_pred: torch.Tensor,
    lanes_pred: torch.Tensor,
    batch_controls: torch.Tensor,
    batch_lanes: torch.Tensor,
) -> torch.Tensor:
    """Scaled MSE of both heads, CONTROL_WEIGHT * controls + (1 - CONTROL_WEIGHT) * lanes.

    controls term: mean over examples and both columns of ((pred - target) / CONTROL_SCALE)^2;
    lanes term: mean over examples and all four columns of ((pred - target) / LANE_SCALE)^2.
    """
    _check_shapes(tuple(controls_pred.shape), tuple(lanes_pred.shape), len(batch_controls))
    scale = controls_pred.new_tensor(CONTROL_SCALE)
    controls = (((controls_pred - batch_controls) / scale) ** 2).mean()
    lanes = (((lanes_pred - batch_lanes) / LANE_SCALE) ** 2).mean()
    return CONTROL_WEIGHT * controls + (1 - CONTROL_WEIGHT) * lanes


def loss_np(controls_pred: np.ndarray, lanes_pred: np.ndarray, batch: SceneBatch) -> float:
    """loss_fn on numpy outputs (e.g. from onnxruntime), accumulated in float64."""
    _check_shapes(controls_pred.shape, lanes_pred.shape, len(batch))
    scale = np.asarray(CONTROL_SCALE, dtype=np.float64)
    target_controls = batch.controls.numpy().astype(np.float64)
    target_lanes = batch.lanes.numpy().astype(np.float64)
    controls = np.mean(((controls_pred.astype(np.float64) - target_controls) / scale) ** 2)
    lanes = np.mean(((lanes_pred.astype(np.float64) - target_lanes) / LANE_SCALE) ** 2)
    return float(CONTROL_WEIGHT * controls + (1 - CONTROL_WEIGHT) * lanes)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1  # passes over the local clips per round
    batch_size: int = 32
    lr: float = 3e-4  # Adam; above ~5e-4 the first steps on the wide trunk overshoot
    proximal_mu: float = 0.0  # FedProx: adds mu/2 * ||w - w_base||^2 to the loss; 0 disables
    seed: int = 0  # order in which clips are visited

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size: expected >= 1, got {self.epochs} and {self.batch_size}"
            )
        if self.lr <= 0 or self.proximal_mu < 0:
            raise ValueError(
                f"lr > 0 and proximal_mu >= 0 expected, got {self.lr} and {self.proximal_mu}"
            )


@dataclass(frozen=True)
class TrainResult:
    num_examples: int  # clips trained on: the update's FedAvg weight
    train_loss: float  # mean loss_fn over the last epoch (without the proximal term)
    steps: int  # optimiser steps over all epochs


def _proximal(params: Iterable[nn.Parameter], anchors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.stack([((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)]).sum()


def train_local(
    model: nn.Module,
    data: SceneBatch,
    config: TrainConfig,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train model in place on data; it is left in eval mode. on_step(done, total) is
    called after every optimiser step (for progress)."""
    n = len(data)
    if n == 0:
        raise ValueError("data: expected at least one clip, got 0")
    total_steps = config.epochs * math.ceil(n / config.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    # The round's base weights, which FedProx keeps the local model close to.
    anchors = [p.detach().clone() for p in params] if config.proximal_mu > 0 else []
    optimizer = torch.optim.Adam(params, lr=config.lr)
    order_gen = torch.Generator().manual_seed(config.seed)
    steps, epoch_loss = 0, 0.0
    model.train()
    try:
        for _ in range(config.epochs):
            loss_sum = 0.0
            for idx in torch.split(torch.randperm(n, generator=order_gen), config.batch_size):
                batch = data[idx]
                controls, lanes = model(batch.frames)
                loss = loss_fn(controls, lanes, batch.controls, batch.lanes)
                objective = loss
                if anchors:
                    objective = loss + config.proximal_mu / 2 * _proximal(params, anchors)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(objective)  # Tensor.backward is untyped
                optimizer.step()
                loss_sum += loss.item() * len(idx)
                steps += 1
                if on_step is not None:
                    on_step(steps, total_steps)
            epoch_loss = loss_sum / n
    finally:
        model.eval()
    return TrainResult(num_examples=n, train_loss=epoch_loss, steps=steps)


def evaluate(model: nn.Module, data: SceneBatch, batch_size: int = 256) -> float:
    """Mean loss_fn over data in eval mode; the model's mode is restored afterwards."""
    if len(data) == 0:
        raise ValueError("data: expected at least one clip, got 0")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                batch = data[start : start + batch_size]
                controls, lanes = model(batch.frames)
                total += loss_fn(controls, lanes, batch.controls, batch.lanes).item() * len(batch)
    finally:
        model.train(was_training)
    return total / len(data)


def _check_same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys():
        missing, extra = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
        raise ValueError(f"tensors differ: missing {missing}, extra {extra}")
    for name, tensor in a.items():
        other = b[name]
        if tensor.shape != other.shape or tensor.dtype != other.dtype:
            raise ValueError(
                f"tensor {name!r}: expected {tuple(other.shape)} {other.dtype}, "
                f"got {tuple(tensor.shape)} {tensor.dtype}"
            )


def compute_delta(
    trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """trained - base for every tensor, in base's order.

    Integer tensors (BatchNorm's num_batches_tracked) subtract exactly. A float delta is one
    rounded subtraction: apply_delta restores trained exactly wherever the two values are
    within a factor of 2 of each other (Sterbenz), else to within an ulp or two.
    """
    _check_same_layout(trained, base)
    return {name: trained[name].detach() - b.detach() for name, b in base.items()}


def apply_delta(
    base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """base + delta for every tensor, in base's order; the inverse of compute_delta."""
    _check_same_layout(delta, base)
    return {name: b.detach() + delta[name].detach() for name, b in base.items()}
