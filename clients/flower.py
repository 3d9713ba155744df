"""Run an unchanged Flower client against Sluice: a NumPyClient or a ClientApp train function.

Each round: wait for the round, pull the base, give it to the client in the form it
expects, name what it returns by state_dict name (never by list position alone), push
`trained - base` as this trainer, with the client's numeric metrics. Nothing is pushed
when the result cannot be named without guessing: that is a `FlowerAdapterError`.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sluice.clients.sdk import Identity, TrainerClient
from sluice.models import registry
from sluice.models.declare import check_entry
from sluice.models.entry import ModelEntry
from sluice.models.schema import Schema, tensor_to_numpy

with warnings.catch_warnings():
    # flwr 1.42 imports typer, which imports click.utils names that click 8.5 deprecates;
    # not our code, and only at import time.
    warnings.filterwarnings("ignore", r"'click\.utils\.\w+' is deprecated", DeprecationWarning)
    from flwr.app import (
        DEFAULT_TTL,
        Array,
        ArrayRecord,
        ConfigRecord,
        ConfigRecordValues,
        Context,
        Message,
        MessageType,
        Metadata,
        RecordDict,
        UserConfig,
    )
    from flwr.client import NumPyClient
    from flwr.common import Scalar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sluice.v1 import trainer_pb2

NUM_EXAMPLES = "num-examples"  # Flower's weighting key in a train reply's MetricRecord
POLL_SECONDS = 0.2  # how often the open round is asked for while waiting for the next

TrainFunction = Callable[[Message, Context], Message]  # a ClientApp, or its train function
FitConfig = Mapping[str, Scalar] | Callable[[int], Mapping[str, Scalar]]
TrainConfig = Mapping[str, ConfigRecordValues] | Callable[[int], Mapping[str, ConfigRecordValues]]
_Key = tuple[np.dtype[Any], tuple[int, ...], bytes]  # an array's exact value


def _declared_schema(model: str, declared: Mapping[str, ModelEntry] | None) -> Schema:
    """The model's schema; a declaration whose factory raises, returns no module or holds
    state the wire cannot carry is a DeclarationError naming the model (models.declare),
    before anything is sent."""
    return check_entry(registry.get(model, declared), run=False)


class FlowerAdapterError(ValueError):
    """A Flower client's result that cannot become a Sluice update; nothing was pushed."""


@dataclass(frozen=True)
class FlowerRound:
    """One round a Flower client took part in, as the gateway acknowledged it."""

    round: int
    base_version: int  # the version the client trained from
    num_examples: int  # the update's FedAvg weight
    metrics: Mapping[str, float]  # what was forwarded to the gateway
    update_id: str
    created: bool  # False: the gateway already had this very update (a retry)
    accepted: int  # distinct trainers in the round, this one included


@dataclass(frozen=True)
class _Trained:
    arrays: Mapping[str, np.ndarray]  # every state_dict name -> its value after training
    num_examples: int
    metrics: Mapping[str, float]


_Step = Callable[["trainer_pb2.RoundInfo", Mapping[str, np.ndarray]], _Trained]


def run_numpy_client(
    client: NumPyClient,
    *,
    target: str,
    model: str,
    trainer: str,
    region: str,
    identity: Identity | None = None,
    module: nn.Module | None = None,
    names: Sequence[str] | None = None,
    rounds: int = 1,
    fit_config: FitConfig | None = None,
    round_timeout_s: float = 600.0,
    declared: Mapping[str, ModelEntry] | None = None,
) -> list[FlowerRound]:
    """Run a Flower `NumPyClient` for `rounds` rounds of `model` on the gateway at `target`.

    `fit(parameters, config)` gets the base in the order the client's `get_parameters`
    uses and config `{"server_round": round, **fit_config(round)}` (plus `"proximal_mu"`
    under FedProx, as Flower's FedProx sends it). Its `(arrays, num_examples, metrics)`
    are pushed as `trained - base` with the int and float metrics.

    Naming the arrays needs one of:

    - `module`, the torch module the client trains (e.g. `client.net`): the order of
      `get_parameters` is learned once by loading distinct values into the module, and
      after `fit` every returned array must equal exactly (shape, dtype, bytes) one of the
      module's tensors, which names it. A module that does not hold the base when `fit`
      first runs it (the client's `set_parameters` uses another order than its
      `get_parameters`) is refused.
    - `names`, the state_dict name of each array in the client's order: shapes and dtypes
      are checked, but two tensors of one shape in another order cannot be told apart.

    Identity: `identity` is the trainer's certificate (None: a plaintext loopback gateway);
    `trainer` and `region` must be the ones it was issued for. `declared`: the models of
    the gateway's sluice.toml (models.registry.load_declarations), for a model that is not
    built in.
    """
    if not isinstance(client, NumPyClient):
        raise FlowerAdapterError(
            f"client: expected a flwr.client.NumPyClient, got {type(client).__name__} "
            "(for a Client made by to_client(), pass its .numpy_client)"
        )
    if (module is None) == (names is None):
        raise FlowerAdapterError(
            "pass exactly one of module= (the torch module the client trains, e.g. "
            "client.net: arrays are named by value) or names= (the state_dict name of each "
            "array get_parameters returns, in its order)"
        )
    if module is not None:
        schema = Schema.of(module.state_dict())
        order = _learn_order(client, module)
    else:
        schema = _declared_schema(model, declared)
        order = list(names or ())

    def step(info: trainer_pb2.RoundInfo, base: Mapping[str, np.ndarray]) -> _Trained:
        _check_names(order, base)
        config: dict[str, Scalar] = {"server_round": int(info.round)}
        config.update(_config(fit_config, int(info.round)))
        if info.strategy == "FedProx":
            config["proximal_mu"] = float(info.proximal_mu)
        parameters = [base[name].copy() for name in order]  # the client may write into them
        with _holds_base(module, base) if module is not None else nullcontext():
            result: object = client.fit(parameters, config)
        if not (isinstance(result, tuple) and len(result) == 3):
            raise FlowerAdapterError(
                "fit() must return (parameters, num_examples, metrics), "
                f"got {type(result).__name__}"
            )
        arrays, num_examples, metrics = result
        if not isinstance(arrays, list | tuple):
            raise FlowerAdapterError(f"fit(): parameters must be a list, got {type(arrays)}")
        if module is not None:
            names_now = _names_by_value(arrays, module.state_dict(), "fit()")
            named = dict(zip(names_now, arrays, strict=True))
        else:
            named = _by_position(arrays, order, base)
        return _Trained(named, _num_examples(num_examples, "fit()"), _metrics(metrics, "fit()"))

    return _run(step, schema, target, model, trainer, region, identity, rounds, round_timeout_s)


def run_train_function(
    train_fn: TrainFunction,
    *,
    target: str,
    model: str,
    trainer: str,
    region: str,
    identity: Identity | None = None,
    rounds: int = 1,
    train_config: TrainConfig | None = None,
    run_config: UserConfig | None = None,
    node_config: UserConfig | None = None,
    round_timeout_s: float = 600.0,
    declared: Mapping[str, ModelEntry] | None = None,
) -> list[FlowerRound]:
    """Run a Flower ClientApp (or its `@app.train()` function) for `rounds` rounds.

    The message holds `"arrays"`, an ArrayRecord of the base keyed by state_dict name, and
    `"config"`, `{**train_config(round), "server-round": round}` (plus `"proximal-mu"`
    under FedProx), as Flower's strategies send them. The reply must hold one ArrayRecord
    with exactly the state_dict's names, shapes and dtypes, and one MetricRecord with
    `"num-examples"` (a positive int, the update's weight); its other int and float metrics
    are forwarded. One Context, built from `run_config` and `node_config`, serves every
    round, so `context.state` persists as it does on a Flower SuperNode. `declared`: as
    for run_numpy_client.
    """
    schema = _declared_schema(model, declared)
    context = Context(
        run_id=0,
        node_id=0,
        node_config=dict(node_config or {}),
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )

    def step(info: trainer_pb2.RoundInfo, base: Mapping[str, np.ndarray]) -> _Trained:
        config: dict[str, ConfigRecordValues] = dict(_config(train_config, int(info.round)))
        config["server-round"] = int(info.round)
        if info.strategy == "FedProx":
            config["proximal-mu"] = float(info.proximal_mu)
        arrays = ArrayRecord({name: Array(value.copy()) for name, value in base.items()})
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
        metadata = Metadata(
            run_id=0,
            message_id="",
            src_node_id=0,
            dst_node_id=context.node_id,
            reply_to_message_id="",
            group_id=str(info.round),
            created_at=time.time(),
            ttl=DEFAULT_TTL,
            message_type=MessageType.TRAIN,
        )
        # Flower's public constructors need a SuperLink's run identity (TaskIdentity); its
        # runtime builds a received message from metadata like this, so do we.
        message = Message(content=content, metadata=metadata)  # type: ignore[call-overload]
        return _from_reply(train_fn(message, context), base)

    return _run(step, schema, target, model, trainer, region, identity, rounds, round_timeout_s)


def _run(
    step: _Step,
    schema: Schema,
    target: str,
    model: str,
    trainer: str,
    region: str,
    identity: Identity | None,
    rounds: int,
    round_timeout_s: float,
) -> list[FlowerRound]:
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    reports: list[FlowerRound] = []
    with TrainerClient(target, identity=identity) as client:
        last = 0
        for _ in range(rounds):
            info = _next_round(client, model, last, round_timeout_s)
            if info.schema_hash != schema.hash:
                raise FlowerAdapterError(
                    f"the gateway's {model!r} has schema {info.schema_hash[:12]}..., this "
                    f"client's is {schema.hash[:12]}...: it trains another architecture"
                )
            pulled = client.pull_global(model, info.base_version, size=schema.payload_bytes)
            state = schema.to_state_dict(pulled.data)  # every name, tied ones included
            base = {name: tensor_to_numpy(tensor) for name, tensor in state.items()}
            trained = step(info, base)
            payload = _delta_payload(schema, trained.arrays, base)
            response = client.push_update(
                model=model,
                round_no=info.round,
                base_version=info.base_version,
                schema_hash=schema.hash,
                trainer=trainer,
                region=region,
                num_examples=trained.num_examples,
                payload=payload,
                metrics=trained.metrics,
            )  # the id is derived from (trainer, model, round): a retry never counts twice
            reports.append(
                FlowerRound(
                    round=info.round,
                    base_version=info.base_version,
                    num_examples=trained.num_examples,
                    metrics=dict(trained.metrics),
                    update_id=response.update_id,
                    created=response.created,
                    accepted=response.accepted,
                )
            )
            last = info.round
    return reports


def _next_round(
    client: TrainerClient, model: str, after: int, timeout_s: float
) -> trainer_pb2.RoundInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.round(model)
        if info.round > after:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {after} of {model!r} did not close in {timeout_s:g}s")
        time.sleep(POLL_SECONDS)


def _config(config: Any, round_no: int) -> dict[str, Any]:
    """A fit/train config given as a mapping or as Flower's `on_fit_config_fn(round)`."""
    if config is None:
        return {}
    return dict(config(round_no) if callable(config) else config)


# Naming arrays


def _key(array: np.ndarray) -> _Key:
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return array.dtype, tuple(array.shape), hashlib.blake2b(raw.data).digest()


def _ndarray(value: object, index: int, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise FlowerAdapterError(
            f"{what}: array {index} is a {type(value).__name__}, expected a numpy.ndarray"
        )
    return value


def _names_by_value(
    arrays: Sequence[object], state: Mapping[str, torch.Tensor], what: str
) -> list[str]:
    """The state_dict name of each array: the module tensor it equals exactly.

    Tensors with the same bytes (tied parameters) are interchangeable: whichever gets
    which array, every name ends up with the same value.
    """
    if len(arrays) != len(state):
        raise FlowerAdapterError(
            f"{what} returned {len(arrays)} arrays, the module's state_dict has {len(state)} "
            "tensors: the client must return every state_dict tensor (buffers included)"
        )
    free: dict[_Key, list[str]] = {}
    for name, tensor in state.items():
        free.setdefault(_key(tensor_to_numpy(tensor)), []).append(name)
    out = []
    for i, value in enumerate(arrays):
        array = _ndarray(value, i, what)
        candidates = free.get(_key(array))
        if not candidates:
            raise FlowerAdapterError(
                f"{what}: array {i} ({tuple(array.shape)} {array.dtype}) is not exactly any "
                f"{'remaining ' if candidates is not None else ''}tensor of the module: the "
                "client must return the module's own state_dict values; is module= the "
                "network the client trains?"
            )
        out.append(candidates.pop(0))
    return out


def _learn_order(client: NumPyClient, module: nn.Module) -> list[str]:
    """The state_dict name of each array `get_parameters` returns, in its order.

    The module briefly holds a distinct value in every tensor, so that a fresh model's
    equal tensors (BatchNorm's ones and zeros) cannot be confused; it is restored after.
    """
    saved = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    try:
        module.load_state_dict(_distinct_values(saved))
        listed = client.get_parameters(config={})
        return _names_by_value(listed, module.state_dict(), "get_parameters()")
    finally:
        module.load_state_dict(saved)


def _distinct_values(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A value for every tensor, no two of which have the same bytes (empty ones aside)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    seen: set[_Key] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for _ in range(100):  # a one-element half tensor has few values: draw again
            if tensor.is_floating_point():
                value = torch.randn(tensor.shape, generator=gen).to(tensor.dtype)
            else:
                value = torch.randint(-(2**30), 2**30, tensor.shape, generator=gen)
                value = value.to(tensor.dtype)
            key = _key(tensor_to_numpy(value))
            if tensor.numel() == 0 or key not in seen:
                break
        else:
            raise FlowerAdapterError(f"tensor {name!r}: found no value unlike the others")
        seen.add(key)
        out[name] = value.to(tensor.device)
    return out


@contextmanager
def _holds_base(module: nn.Module, base: Mapping[str, np.ndarray]) -> Iterator[None]:
    """Check, when fit() first runs the module, that it holds exactly the base it was given."""
    wrong: list[str] = []

    def check(mod: nn.Module, args: object) -> None:
        handle.remove()
        state = mod.state_dict()
        wrong.extend(n for n, t in state.items() if _key(tensor_to_numpy(t)) != _key(base[n]))
        if wrong:
            raise FlowerAdapterError(_not_base(wrong))

    handle = module.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()
    if wrong:  # raised in fit(), which may have swallowed it
        raise FlowerAdapterError(_not_base(wrong))


def _not_base(wrong: Sequence[str]) -> str:
    return (
        f"when fit() first ran the module, {len(wrong)} of its tensors did not hold the base "
        f"passed to fit() (first: {wrong[0]!r}): the client's set_parameters takes the list "
        "in another order than its get_parameters returns it; make both use one order"
    )


def _by_position(
    arrays: Sequence[object], order: Sequence[str], base: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    if len(arrays) != len(order):
        raise FlowerAdapterError(f"fit() returned {len(arrays)} arrays, names= has {len(order)}")
    named: dict[str, np.ndarray] = {}
    for i, (name, value) in enumerate(zip(order, arrays, strict=True)):
        array = _ndarray(value, i, "fit()")
        want = base[name]
        if array.shape != want.shape or array.dtype != want.dtype:
            raise FlowerAdapterError(
                f"fit(): array {i} is {tuple(array.shape)} {array.dtype}, but names= puts "
                f"{name!r} there, which is {tuple(want.shape)} {want.dtype}: the client "
                "returns its arrays in another order than names= says"
            )
        named[name] = array
    return named


def _check_names(order: Sequence[str], base: Mapping[str, np.ndarray]) -> None:
    if len(set(order)) != len(order) or set(order) != set(base):
        missing = sorted(set(base) - set(order))
        extra = sorted(set(order) - set(base))
        repeated = sorted({n for n in order if order.count(n) > 1})
        raise FlowerAdapterError(
            f"names differ from the model's state_dict: missing {missing}, "
            f"unknown {extra}, repeated {repeated}"
        )


# The update


def _from_reply(reply: object, base: Mapping[str, np.ndarray]) -> _Trained:
    if not isinstance(reply, Message):
        raise FlowerAdapterError(
            f"the train function returned {type(reply).__name__}, not a Message"
        )
    if reply.has_error():
        raise FlowerAdapterError(f"the train function replied with an error: {reply.error.reason}")
    records = reply.content.array_records
    metric_records = reply.content.metric_records
    if len(records) != 1 or len(metric_records) != 1:
        raise FlowerAdapterError(
            "the reply must hold one ArrayRecord and one MetricRecord, as Flower's strategies "
            f"expect; it holds {len(records)} and {len(metric_records)}"
        )
    (record,) = records.values()
    (metrics,) = metric_records.values()
    if set(record) != set(base):
        missing, extra = sorted(set(base) - set(record)), sorted(set(record) - set(base))
        raise FlowerAdapterError(
            f"the reply's ArrayRecord differs from the model's state_dict: missing {missing}, "
            f"unknown {extra}"
        )
    named: dict[str, np.ndarray] = {}
    for name, item in record.items():
        try:
            array = item.numpy()
        except (TypeError, ValueError) as exc:
            raise FlowerAdapterError(f"array {name!r}: not a numpy array ({exc})") from exc
        want = base[name]
        if array.shape != want.shape or array.dtype != want.dtype:
            raise FlowerAdapterError(
                f"array {name!r}: expected {tuple(want.shape)} {want.dtype}, "
                f"got {tuple(array.shape)} {array.dtype}"
            )
        named[name] = array
    if NUM_EXAMPLES not in metrics:
        raise FlowerAdapterError(
            f"the reply's MetricRecord has no {NUM_EXAMPLES!r}: Sluice weighs every update "
            "by it, as Flower's FedAvg does"
        )
    rest = {k: v for k, v in metrics.items() if k != NUM_EXAMPLES}
    return _Trained(
        named,
        _num_examples(metrics[NUM_EXAMPLES], f"the reply's {NUM_EXAMPLES!r}"),
        _metrics(rest, "the reply"),
    )


def _num_examples(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise FlowerAdapterError(
            f"{what}: num_examples must be a positive int (the update's weight), got {value!r}"
        )
    return int(value)


def _metrics(metrics: object, what: str) -> dict[str, float]:
    """The int and float metrics (others, str, bytes, bool or lists, stay local)."""
    if not isinstance(metrics, Mapping):
        raise FlowerAdapterError(f"{what}: metrics must be a dict, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool | np.bool_) or not isinstance(
            value, int | float | np.integer | np.floating
        ):
            continue
        number = float(value)
        if not isinstance(name, str) or not math.isfinite(number):
            raise FlowerAdapterError(
                f"{what}: metric {name!r} = {number}: the gateway takes finite metrics "
                "with string names only"
            )
        out[name] = number
    return out


def _delta_payload(
    schema: Schema, trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
) -> bytes:
    """`trained - base` for every name, flat in schema order; integers subtract exactly."""
    for alias, name in schema.aliases:
        if _key(trained[alias]) != _key(trained[name]):
            raise FlowerAdapterError(
                f"tensors {name!r} and {alias!r} are tied in the model but differ in the "
                "client's result: the client's network does not tie them"
            )
    delta = {name: np.subtract(trained[name], b) for name, b in base.items()}  # same dtypes
    return schema.flatten(delta)
