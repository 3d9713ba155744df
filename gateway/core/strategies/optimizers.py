"""Server-optimizer strategies (FedAvgM, FedAdam, FedYogi, FedAdagrad), streamed block by block.

Each follows the maths of Flower 1.42's class of the same name (`flwr.server.strategy`),
hyperparameters named and defaulted as there. Writing x for the current global weights
(the round's base), delta_t = fedavg(clients) - x is the example-weighted mean of the
spooled deltas, and

    FedAvgM     p = -delta_t;  mom = server_momentum * mom + p  (if server_momentum > 0)
                x' = x - server_learning_rate * (mom or p)
    FedAdam     m = beta_1 * m + (1 - beta_1) * delta_t;  v = beta_2 * v + (1 - beta_2) * delta_t^2
                x' = x + eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)) * m / (sqrt(v) + tau)
    FedYogi     m as FedAdam;  v = v - (1 - beta_2) * delta_t^2 * sign(v - delta_t^2)
                x' = x + eta * m / (sqrt(v) + tau)           (no bias correction)
    FedAdagrad  m = delta_t (Flower fixes beta_1 = 0);  v = v + delta_t^2
                x' = x + eta * m / (sqrt(v) + tau)

with t the server round (Flower's bias correction uses t + 1, so round 1 already divides
by 1 - beta_1^2), m = v = mom = 0 before the first step (Flower's zeros_like; for FedAvgM
that makes round 1's momentum the pseudo-gradient, as Flower sets it), and eta_l kept only
for Flower's signature: it is the trainers' rate. Integer tensors take FedAvg's rule.

Precision: every block is widened to float64, stepped, and narrowed to the tensor's dtype.
(Flower, fed float32, steps FedAvgM, FedYogi and FedAdagrad in float32; FedAdam's weights
turn float64 in round 1 and its moments in round 2, as its bias-correction factor is a
numpy float64.)

State: one file per array (`momentum.bin`; `m.bin`, `v.bin`; `v.bin`) in exactly the
payload's layout, so `schema.views(file)` reads it: float tensors hold the state in their
own dtype (as Flower's zeros_like does), integer tensors hold zeros (they take FedAvg's
rule and have no optimizer state). `optimizer.json` names the strategy and schema. A round
continues from `state_in` when it holds this strategy's state, and otherwise starts afresh,
as a new Flower strategy would; RoundReport says which.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from sluice.gateway.core.aggregation import Contribution, add_integer_mean
from sluice.gateway.core.strategies.base import RoundInput, RoundReport, feed_written
from sluice.gateway.store.direct import DirectFile, WindowReader, open_regular_in
from sluice.models.schema import Schema

STATE_META = "optimizer.json"

F64 = np.ndarray  # a float64 block; all blocks of one step have the same length


class _Stepper(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def state_files(self) -> tuple[str, ...]: ...

    def step(self, server_round: int, x: F64, delta: F64, scratch: F64, state: list[F64]) -> None:
        """Update x (the weights) and state in place; delta and scratch may be overwritten."""
        ...


@dataclass(frozen=True, kw_only=True)
class FedAvgM:
    """Server momentum (Hsu et al. 2019), as Flower's FedAvgM: heavy ball, no Nesterov.

    With server_learning_rate 1 and server_momentum 0 this is FedAvg. Memory: see `optimize`.
    """

    name: str = field(default="FedAvgM", init=False)
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0

    def __post_init__(self) -> None:
        _check(self.name, "server_momentum", self.server_momentum, 0.0, math.inf)

    @property
    def state_files(self) -> tuple[str, ...]:
        return ("momentum.bin",) if self.server_momentum > 0.0 else ()

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        return optimize(self, inp, out_path, state_out)

    def step(self, server_round: int, x: F64, delta: F64, scratch: F64, state: list[F64]) -> None:
        pseudo_gradient = np.negative(delta, out=delta)  # x - fedavg(clients)
        if state:
            (momentum,) = state
            np.multiply(momentum, self.server_momentum, out=momentum)
            np.add(momentum, pseudo_gradient, out=momentum)
            pseudo_gradient = momentum
        np.multiply(pseudo_gradient, self.server_learning_rate, out=scratch)
        np.subtract(x, scratch, out=x)


@dataclass(frozen=True, kw_only=True)
class FedAdam:
    """Adam on the server (Reddi et al. 2020), as Flower's FedAdam. Memory: see `optimize`."""

    name: str = field(default="FedAdam", init=False)
    eta: float = 1e-1
    eta_l: float = 1e-1  # the trainers' learning rate; unused here, kept for Flower's signature
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9

    def __post_init__(self) -> None:
        _check_betas(self.name, self.beta_1, self.beta_2, self.tau)

    @property
    def state_files(self) -> tuple[str, ...]:
        return ("m.bin", "v.bin")

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        return optimize(self, inp, out_path, state_out)

    def step(self, server_round: int, x: F64, delta: F64, scratch: F64, state: list[F64]) -> None:
        m, v = state
        _first_moment(m, delta, scratch, self.beta_1)
        np.multiply(delta, delta, out=scratch)
        np.multiply(scratch, 1 - self.beta_2, out=scratch)
        np.multiply(v, self.beta_2, out=v)
        np.add(v, scratch, out=v)
        # Flower's expression, to the bit: exponents t + 1, not t.
        eta_norm = float(
            self.eta
            * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0))
            / (1 - np.power(self.beta_1, server_round + 1.0))
        )
        _adaptive_step(x, m, v, delta, scratch, eta_norm, self.tau)


@dataclass(frozen=True, kw_only=True)
class FedYogi:
    """Yogi on the server (Reddi et al. 2020), as Flower's FedYogi. Memory: see `optimize`."""

    name: str = field(default="FedYogi", init=False)
    eta: float = 1e-2
    eta_l: float = 0.0316  # the trainers' learning rate; unused here, kept for Flower's signature
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check_betas(self.name, self.beta_1, self.beta_2, self.tau)

    @property
    def state_files(self) -> tuple[str, ...]:
        return ("m.bin", "v.bin")

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        return optimize(self, inp, out_path, state_out)

    def step(self, server_round: int, x: F64, delta: F64, scratch: F64, state: list[F64]) -> None:
        m, v = state
        _first_moment(m, delta, scratch, self.beta_1)
        squared = np.multiply(delta, delta, out=scratch)
        sign = np.sign(np.subtract(v, squared, out=delta), out=delta)  # delta is spent
        np.multiply(squared, 1.0 - self.beta_2, out=squared)
        np.multiply(squared, sign, out=squared)
        np.subtract(v, squared, out=v)
        _adaptive_step(x, m, v, delta, scratch, self.eta, self.tau)


@dataclass(frozen=True, kw_only=True)
class FedAdagrad:
    """Adagrad on the server (Reddi et al. 2020), as Flower's FedAdagrad. Memory: `optimize`.

    Flower fixes beta_1 = 0, so m_t is delta_t and only v is state.
    """

    name: str = field(default="FedAdagrad", init=False)
    eta: float = 1e-1
    eta_l: float = 1e-1  # the trainers' learning rate; unused here, kept for Flower's signature
    tau: float = 1e-9

    def __post_init__(self) -> None:
        _check(self.name, "tau", self.tau, 0.0, math.inf)

    @property
    def state_files(self) -> tuple[str, ...]:
        return ("v.bin",)

    def aggregate(self, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
        return optimize(self, inp, out_path, state_out)

    def step(self, server_round: int, x: F64, delta: F64, scratch: F64, state: list[F64]) -> None:
        (v,) = state
        np.multiply(delta, delta, out=scratch)
        np.add(v, scratch, out=v)
        _adaptive_step(x, delta, v, delta, scratch, self.eta, self.tau)


def _first_moment(m: F64, delta: F64, scratch: F64, beta_1: float) -> None:
    """m = beta_1 * m + (1 - beta_1) * delta, in Flower's order of operations."""
    np.multiply(m, beta_1, out=m)
    np.multiply(delta, 1 - beta_1, out=scratch)
    np.add(m, scratch, out=m)


def _adaptive_step(x: F64, m: F64, v: F64, out: F64, scratch: F64, rate: float, tau: float) -> None:
    """x += rate * m / (sqrt(v) + tau); out and scratch are overwritten (out may be m)."""
    np.multiply(m, rate, out=out)
    np.sqrt(v, out=scratch)
    np.add(scratch, tau, out=scratch)
    np.divide(out, scratch, out=out)
    np.add(x, out, out=x)


def _check(strategy: str, name: str, value: float, low: float, high: float) -> None:
    if not (low <= value < high):
        raise ValueError(f"{strategy}: {name} must be in [{low}, {high}), got {value}")


def _check_betas(strategy: str, beta_1: float, beta_2: float, tau: float) -> None:
    _check(strategy, "beta_1", beta_1, 0.0, 1.0)
    _check(strategy, "beta_2", beta_2, 0.0, 1.0)
    _check(strategy, "tau", tau, 0.0, math.inf)


def optimize(strategy: _Stepper, inp: RoundInput, out_path: Path, state_out: Path) -> RoundReport:
    """Run one server-optimizer round over the spooled deltas, block by block.

    Blocks hold block_bytes // 8 elements of one tensor. Memory: three float64 blocks (mean
    delta, weights, scratch) plus one per state array (FedAvgM 3-4, FedAdagrad 4, FedAdam and
    FedYogi 5 blocks of block_bytes), and one read buffer of up to a block, whatever the
    number of contributions or the size of the model. Files are read and written in place
    (pread, sequential writes); nothing of model size is ever held.
    """
    contributions = inp.contributions
    schema = inp.schema
    if not contributions:
        raise ValueError(f"{strategy.name} needs at least one contribution")
    total = sum(c.num_examples for c in contributions)
    if total <= 0 or any(c.num_examples <= 0 for c in contributions):
        raise ValueError("every contribution needs num_examples > 0")
    continued = _continues(strategy, inp.state_in, schema)

    count_max = max(inp.block_bytes // 8, 1)
    widest = max((spec.np_dtype.itemsize for spec in schema.tensors), default=1)
    delta_raw, x_raw, scratch_raw = (np.empty(count_max) for _ in range(3))
    state_raw = [np.empty(count_max) for _ in strategy.state_files]
    read_raw = np.empty(count_max * widest, dtype=np.uint8)

    state_out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        base_fd = open_regular_in(stack, inp.base_path)
        # Cold updates read with O_DIRECT through one window (as robust.py).
        updates = [stack.enter_context(DirectFile(c.path)) for c in contributions]
        reader = WindowReader(read_raw.nbytes)
        state_fds = (
            [open_regular_in(stack, inp.state_in / n) for n in strategy.state_files]
            if continued and inp.state_in is not None
            else []
        )
        out = stack.enter_context(out_path.open("wb"))
        state_sinks = [
            stack.enter_context((state_out / n).open("wb")) for n in strategy.state_files
        ]

        for spec, start, end in schema.spans():
            dtype = spec.np_dtype
            for first in range(start, end, count_max * dtype.itemsize):
                count = min(count_max, (end - first) // dtype.itemsize)
                buf = read_raw[: count * dtype.itemsize].view(dtype)
                delta, scratch = delta_raw[:count], scratch_raw[:count]
                if not spec.is_float:
                    _integer_block(
                        buf, first, base_fd, updates, reader, contributions, delta, scratch
                    )
                    out.write(buf.data)
                    feed_written(inp.written, buf.data)
                    zeros = scratch.view(np.uint8)[: buf.nbytes]
                    zeros.fill(0)
                    for sink in state_sinks:
                        sink.write(zeros.data)
                    continue
                delta.fill(0)
                for update, c in zip(updates, contributions, strict=True):
                    reader.read_into(update, buf, first)
                    factor = c.scale * c.num_examples / total
                    np.multiply(buf, factor, out=scratch, dtype=np.float64)
                    np.add(delta, scratch, out=delta)
                x = x_raw[:count]
                _read(base_fd, buf, first)
                np.copyto(x, buf)
                state = [raw[:count] for raw in state_raw]
                for i, s in enumerate(state):
                    if state_fds:
                        _read(state_fds[i], buf, first)
                        np.copyto(s, buf)
                    else:
                        s.fill(0)
                strategy.step(inp.server_round, x, delta, scratch, state)
                _write_narrowed(out, buf, x)
                feed_written(inp.written, buf.data)
                for sink, s in zip(state_sinks, state, strict=True):
                    _write_narrowed(sink, buf, s)

    meta = {"strategy": strategy.name, "schema_hash": schema.hash, "server_round": inp.server_round}
    (state_out / STATE_META).write_text(json.dumps(meta, sort_keys=True) + "\n")
    return RoundReport(
        {
            "num_updates": len(contributions),
            "server_round": inp.server_round,
            "optimizer_state": "continued" if continued else "fresh",
        }
    )


def _continues(strategy: _Stepper, state_in: Path | None, schema: Schema) -> bool:
    """Whether state_in holds this strategy's state for this schema (else: start afresh)."""
    if state_in is None or not (state_in / STATE_META).is_file():
        return False
    meta = json.loads((state_in / STATE_META).read_text())
    if meta.get("strategy") != strategy.name:
        return False  # another strategy's state, e.g. after a configuration change
    if meta.get("schema_hash") != schema.hash:
        raise ValueError(
            f"{strategy.name} state in {state_in}: schema {meta.get('schema_hash')}, "
            f"expected {schema.hash}"
        )
    for name in strategy.state_files:
        path = state_in / name
        size = path.stat().st_size if path.is_file() else None
        if size != schema.payload_bytes:
            got = "missing" if size is None else f"{size} bytes"
            raise ValueError(
                f"{strategy.name} state {path}: expected {schema.payload_bytes} bytes, got {got}"
            )
    return True


def _integer_block(
    buf: np.ndarray,
    first: int,
    base_fd: int,
    updates: Sequence[DirectFile],
    reader: WindowReader,
    contributions: Sequence[Contribution],
    acc: F64,
    scratch: F64,
) -> None:
    """FedAvg's integer rule into buf: base + rint(sum(n_i * d_i) / sum(n_i)), as fold_fedavg."""
    total = sum(c.num_examples for c in contributions)
    acc.fill(0)
    for update, c in zip(updates, contributions, strict=True):
        reader.read_into(update, buf, first)
        np.multiply(buf, float(c.num_examples), out=scratch)
        np.add(acc, scratch, out=acc)
    np.divide(acc, total, out=acc)
    np.rint(acc, out=acc)
    _read(base_fd, buf, first)
    add_integer_mean(buf, acc, delta=scratch.view(np.uint8)[: buf.nbytes].view(buf.dtype))


def _write_narrowed(sink: BinaryIO, buf: np.ndarray, block: F64) -> None:
    np.copyto(buf, block, casting="same_kind")
    sink.write(buf.data)


def _read(fd: int, buf: np.ndarray, offset: int) -> None:
    view = buf.view(np.uint8).data
    got = os.preadv(fd, [view], offset)
    if got != len(view):
        raise ValueError(f"short read at offset {offset}: {got} of {len(view)} bytes")
