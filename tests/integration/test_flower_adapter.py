"""Unchanged Flower clients against a real gateway: a NumPyClient as Flower's PyTorch tutorial
writes it, clients whose parameter order is not the state_dict's, and a ClientApp train
function over ArrayRecord. Every pushed delta is checked by name against what the client's
module actually trained."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sluice.clients.flower import FlowerAdapterError, run_numpy_client, run_train_function
from sluice.clients.sdk import Identity, TrainerClient
from sluice.gateway.pki import init_pki
from sluice.models import registry
from sluice.models.declare import DeclarationError
from sluice.models.schema import Schema, tensor_to_numpy
from tests.conftest import TINY, Running, start_gateway, stored_state

with warnings.catch_warnings():
    # flwr 1.42 imports typer 0.20, which imports click.utils names that click 8.5
    # deprecates; not our code, and only at import time.
    warnings.filterwarnings("ignore", r"'click\.utils\.\w+' is deprecated", DeprecationWarning)
    from flwr.app import (
        Array,
        ArrayRecord,
        Context,
        Message,
        MetricRecord,
        MetricRecordValues,
        RecordDict,
    )
    from flwr.client import NumPyClient
    from flwr.clientapp import ClientApp
    from flwr.common import NDArrays, Scalar

BATCHES = 2  # of 8 clips: two optimizer steps, BatchNorm counters advance by 2


def load_data(seed: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    """A trainer's private clips: random frames, controls and lane offsets."""
    gen = torch.Generator().manual_seed(seed)
    (frames,) = registry.get(TINY).example_inputs(batch=8 * BATCHES, seed=seed)
    controls = torch.randn(len(frames), 2, generator=gen)
    lanes = torch.randn(len(frames), 4, generator=gen)
    return DataLoader(TensorDataset(frames, controls, lanes), batch_size=8)


def train(net: nn.Module, trainloader: DataLoader[tuple[torch.Tensor, ...]], epochs: int) -> float:
    """Train the network on the training set (the tutorial's loop, DriveNet's two heads)."""
    criterion = torch.nn.MSELoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    total = 0.0
    for _ in range(epochs):
        for frames, controls, lanes in trainloader:
            optimizer.zero_grad()
            pred_controls, pred_lanes = net(frames)
            loss = criterion(pred_controls, controls) + criterion(pred_lanes, lanes)
            torch.autograd.backward(loss)  # Tensor.backward is untyped
            optimizer.step()
            total += loss.item()
    return total / (epochs * len(trainloader))


class FlowerClient(NumPyClient):
    """Written as Flower's PyTorch tutorial writes it."""

    def __init__(self, net: nn.Module, trainloader: DataLoader[tuple[torch.Tensor, ...]]) -> None:
        self.net = net
        self.trainloader = trainloader
        self.configs: list[dict[str, Scalar]] = []  # what fit() was given, for the tests

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return [val.cpu().numpy() for _, val in self.net.state_dict().items()]

    def set_parameters(self, parameters: NDArrays) -> None:
        params_dict = zip(self.net.state_dict().keys(), parameters, strict=True)
        state_dict = OrderedDict({k: torch.tensor(v) for k, v in params_dict})
        self.net.load_state_dict(state_dict, strict=True)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.configs.append(dict(config))
        self.set_parameters(parameters)
        loss = train(self.net, self.trainloader, epochs=int(config.get("local_epochs", 1)))
        # torch's Dataset declares no __len__; the tutorial's datasets (and this one) have it
        num_examples = len(self.trainloader.dataset)  # type: ignore[arg-type]
        return self.get_parameters(config={}), num_examples, {"loss": loss}


SWAPPED = ("backbone.0.1.weight", "backbone.0.1.bias")  # both (8,) float32


def permute(names: list[str], order: str) -> list[str]:
    if order == "reversed":
        return names[::-1]
    i, j = names.index(SWAPPED[0]), names.index(SWAPPED[1])
    out = list(names)
    out[i], out[j] = out[j], out[i]
    return out


class PermutedClient(FlowerClient):
    """Its own order for both get_parameters and set_parameters (a consistent client)."""

    def __init__(
        self, net: nn.Module, trainloader: DataLoader[tuple[torch.Tensor, ...]], order: str
    ) -> None:
        super().__init__(net, trainloader)
        self.names = permute(list(net.state_dict()), order)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        state = self.net.state_dict()
        return [state[name].cpu().numpy() for name in self.names]

    def set_parameters(self, parameters: NDArrays) -> None:
        state = {k: torch.tensor(v) for k, v in zip(self.names, parameters, strict=True)}
        self.net.load_state_dict(state, strict=True)


class ListsInOrderClient(FlowerClient):
    """Lists its arrays in its own order but loads them in state_dict order (the tutorial's
    set_parameters): an inconsistent client."""

    def __init__(
        self, net: nn.Module, trainloader: DataLoader[tuple[torch.Tensor, ...]], order: str
    ) -> None:
        super().__init__(net, trainloader)
        self.names = permute(list(net.state_dict()), order)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        state = self.net.state_dict()
        return [state[name].cpu().numpy() for name in self.names]


def tiny_net(seed: int) -> nn.Module:
    return registry.get(TINY).build(seed=seed)


def pull_base(running: Running, schema: Schema, version: int = 0) -> dict[str, np.ndarray]:
    with TrainerClient(running.endpoints.internal) as client:
        data = client.pull_global(TINY, version).data
    return {k: tensor_to_numpy(t) for k, t in schema.to_state_dict(data).items()}


def stored_delta(
    running: Running, schema: Schema, trainer: str, round_no: int = 1
) -> dict[str, np.ndarray]:
    """The delta the gateway holds for the trainer's update: what it will fold."""
    (update,) = [
        u for u in running.gateway.store.round_updates(TINY, round_no) if u.trainer == trainer
    ]
    return schema.views(running.gateway.blobs.path(update.payload_sha256).read_bytes())


def assert_delta_by_name(
    got: dict[str, np.ndarray], trained: nn.Module, base: dict[str, np.ndarray]
) -> None:
    state = trained.state_dict()
    assert list(got) == list(state)
    for name, delta in got.items():
        want = tensor_to_numpy(state[name]) - base[name]
        assert delta.dtype == want.dtype, name
        np.testing.assert_array_equal(delta, want, err_msg=name)
    # Training happened: every float tensor moved (so a misplaced one could not pass), and
    # each BatchNorm counted its steps exactly.
    for name, delta in got.items():
        if name.endswith("num_batches_tracked"):
            assert int(delta) == BATCHES, name
        else:
            assert np.any(delta != 0), name


def accepted(running: Running) -> int:
    with TrainerClient(running.endpoints.internal) as client:
        return int(client.round(TINY).accepted)


def run(client: NumPyClient, running: Running, trainer: str = "shanghai-01", **kw: Any) -> None:
    run_numpy_client(
        client,
        target=running.endpoints.internal,
        model=TINY,
        trainer=trainer,
        region=trainer.split("-")[0],
        **kw,
    )


# NumPyClient


def test_tutorial_numpy_client_pushes_what_it_trained_by_name(
    gateway: Running, tiny_schema: Schema
) -> None:
    client = FlowerClient(tiny_net(seed=7), load_data(seed=1))
    (report,) = run_numpy_client(
        client,
        target=gateway.endpoints.internal,
        model=TINY,
        trainer="shanghai-01",
        region="shanghai",
        module=client.net,
        fit_config=lambda server_round: {"local_epochs": 1, "lr_decay": 0.5**server_round},
    )
    assert client.configs == [{"server_round": 1, "local_epochs": 1, "lr_decay": 0.5}]
    assert (report.round, report.base_version, report.num_examples) == (1, 0, 8 * BATCHES)
    assert report.created and report.accepted == accepted(gateway) == 1
    (update,) = gateway.gateway.store.round_updates(TINY, 1)
    assert (update.trainer, update.region, update.num_examples) == ("shanghai-01", "shanghai", 16)
    assert update.metrics == report.metrics and set(update.metrics) == {"loss"}
    base = pull_base(gateway, tiny_schema)
    assert_delta_by_name(stored_delta(gateway, tiny_schema, "shanghai-01"), client.net, base)


@pytest.mark.parametrize("order", ["reversed", "swapped"])
def test_a_client_with_its_own_order_is_mapped_by_name_with_its_module(
    gateway: Running, tiny_schema: Schema, order: str
) -> None:
    client = PermutedClient(tiny_net(seed=7), load_data(seed=2), order)
    assert client.names != list(client.net.state_dict())
    run(client, gateway, module=client.net)
    base = pull_base(gateway, tiny_schema)
    got = stored_delta(gateway, tiny_schema, "shanghai-01")
    assert_delta_by_name(got, client.net, base)
    # The swapped pair have one shape: only their values tell them apart, and they differ.
    assert not np.array_equal(got[SWAPPED[0]], got[SWAPPED[1]])


def test_names_in_the_clients_order_map_without_a_module(
    gateway: Running, tiny_schema: Schema
) -> None:
    client = PermutedClient(tiny_net(seed=7), load_data(seed=3), "swapped")
    run(client, gateway, names=client.names)
    base = pull_base(gateway, tiny_schema)
    assert_delta_by_name(stored_delta(gateway, tiny_schema, "shanghai-01"), client.net, base)


def test_another_order_without_a_module_is_refused_and_nothing_pushed(gateway: Running) -> None:
    client = ListsInOrderClient(tiny_net(seed=7), load_data(seed=4), "reversed")
    before = stored_state(gateway)
    with pytest.raises(FlowerAdapterError, match="exactly one of module="):
        run(client, gateway)  # no module, no names: the order would be a guess
    state_dict_order = list(client.net.state_dict())
    with pytest.raises(FlowerAdapterError, match=r"array 0 is \(4,\) float32, but names= puts"):
        run(client, gateway, names=state_dict_order)
    assert client.configs, "fit() ran: the refusal is of its result"
    assert stored_state(gateway) == before and accepted(gateway) == 0


def test_a_client_that_loads_in_another_order_than_it_lists_is_refused(gateway: Running) -> None:
    client = ListsInOrderClient(tiny_net(seed=7), load_data(seed=5), "swapped")
    before = stored_state(gateway)
    with pytest.raises(FlowerAdapterError, match=r"'backbone\.0\.1\.weight'\).*set_parameters"):
        run(client, gateway, module=client.net)
    assert stored_state(gateway) == before and accepted(gateway) == 0


def test_arrays_that_are_not_the_modules_are_refused(gateway: Running) -> None:
    class CopyingClient(FlowerClient):
        def fit(
            self, parameters: NDArrays, config: dict[str, Scalar]
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            arrays, n, metrics = super().fit(parameters, config)
            arrays[1] = arrays[1] + 1  # not what the module holds
            return arrays, n, metrics

    client = CopyingClient(tiny_net(seed=7), load_data(seed=6))
    before = stored_state(gateway)
    with pytest.raises(
        FlowerAdapterError, match=r"fit\(\): array 1 \(\(8,\) float32\) is not exactly any"
    ):
        run(client, gateway, module=client.net)
    assert stored_state(gateway) == before and accepted(gateway) == 0


def test_numeric_metrics_are_forwarded_and_a_non_finite_one_refused(gateway: Running) -> None:
    class MetricsClient(FlowerClient):
        extra: dict[str, Any]  # numpy scalars and bools too, as clients return them

        def fit(
            self, parameters: NDArrays, config: dict[str, Scalar]
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            arrays, n, metrics = super().fit(parameters, config)
            return arrays, n, {**metrics, **self.extra}

    client = MetricsClient(tiny_net(seed=7), load_data(seed=7))
    client.extra = {"accuracy": float("nan")}
    with pytest.raises(FlowerAdapterError, match="metric 'accuracy' = nan"):
        run(client, gateway, module=client.net)
    assert accepted(gateway) == 0
    client.extra = {"accuracy": np.float32(0.25), "steps": 2, "phase": "warm", "early": True}
    run(client, gateway, module=client.net)
    (update,) = gateway.gateway.store.round_updates(TINY, 1)
    assert set(update.metrics) == {"loss", "accuracy", "steps"}
    assert (update.metrics["accuracy"], update.metrics["steps"]) == (0.25, 2.0)


def test_rounds_follow_the_gateway(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=1, min_trainers=1)
    try:
        trained: list[dict[str, np.ndarray]] = []

        class KeepingClient(FlowerClient):
            def fit(
                self, parameters: NDArrays, config: dict[str, Scalar]
            ) -> tuple[NDArrays, int, dict[str, Scalar]]:
                out = super().fit(parameters, config)
                trained.append({k: v.clone().numpy() for k, v in self.net.state_dict().items()})
                return out

        client = KeepingClient(tiny_net(seed=7), load_data(seed=8))
        reports = run_numpy_client(
            client,
            target=running.endpoints.internal,
            model=TINY,
            trainer="shanghai-01",
            region="shanghai",
            module=client.net,
            rounds=2,
        )
        assert [(r.round, r.base_version) for r in reports] == [(1, 0), (2, 1)]
        assert [c["server_round"] for c in client.configs] == [1, 2]
        # One trainer per round: version 1 is the base plus its whole delta, and round 2
        # was trained from it.
        version_1 = pull_base(running, tiny_schema, version=1)
        for name, value in trained[0].items():
            np.testing.assert_allclose(version_1[name], value, rtol=1e-6, atol=1e-6)
        got = stored_delta(running, tiny_schema, "shanghai-01", round_no=2)
        for name, delta in got.items():
            np.testing.assert_array_equal(delta, trained[1][name] - version_1[name])
    finally:
        running.gateway.stop()


def test_the_trainers_certificate_is_its_identity(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    layout = init_pki(tmp_path / "pki", trainers=[("shanghai-01", "shanghai")])
    running = start_gateway(
        tmp_path / "gw", template_cache, insecure_loopback=False, pki_dir=layout.directory
    )
    try:
        me = Identity.from_pki(layout.directory, "shanghai-01")
        client = FlowerClient(tiny_net(seed=7), load_data(seed=9))
        with pytest.raises(grpc.RpcError) as err:
            run(client, running, trainer="beijing-01", module=client.net, identity=me)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        (report,) = run_numpy_client(
            client,
            target=running.endpoints.internal,
            model=TINY,
            trainer="shanghai-01",
            region="shanghai",
            identity=me,
            module=client.net,
        )
        assert report.accepted == 1
        assert [u.trainer for u in running.gateway.store.round_updates(TINY, 1)] == ["shanghai-01"]
    finally:
        running.gateway.stop()


def test_fedprox_mu_reaches_both_client_kinds_under_flowers_keys(
    tmp_path: Path, template_cache: Path
) -> None:
    fedprox = {TINY: {"name": "FedProx", "proximal_mu": 0.1}}
    running = start_gateway(tmp_path / "gw", template_cache, strategies=fedprox)
    try:
        client = FlowerClient(tiny_net(seed=7), load_data(seed=10))
        run(client, running, module=client.net)
        seen: list[dict[str, object]] = []
        run_train_function(
            tutorial_app([], seen),
            target=running.endpoints.internal,
            model=TINY,
            trainer="beijing-01",
            region="beijing",
            run_config={"local-epochs": 1},
            node_config={"partition-id": 0},
        )
    finally:
        running.gateway.stop()
    assert client.configs == [{"server_round": 1, "proximal_mu": 0.1}]
    assert seen == [{"server-round": 1, "proximal-mu": 0.1, "local-epochs": 1}]


# ClientApp train function over ArrayRecord


def tutorial_app(trained: list[nn.Module], seen: list[dict[str, object]]) -> ClientApp:
    """A ClientApp as `flwr new` (PyTorch) writes one; keeps its trained net and configs."""
    app = ClientApp()

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        model = tiny_net(seed=99)  # its own init: the base must overwrite every tensor
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        seen.append({**msg.content.config_records["config"], **context.run_config})
        trainloader = load_data(seed=int(context.node_config["partition-id"]))
        train_loss = train(model, trainloader, int(context.run_config["local-epochs"]))
        model_record = ArrayRecord(model.state_dict())
        metrics: dict[str, MetricRecordValues] = {
            "train_loss": train_loss,
            "num-examples": len(trainloader.dataset),  # type: ignore[arg-type]
        }
        content = RecordDict({"arrays": model_record, "metrics": MetricRecord(metrics)})
        trained.append(model)
        return Message(content=content, reply_to=msg)

    return app


def test_clientapp_train_function_over_arrayrecord(gateway: Running, tiny_schema: Schema) -> None:
    trained: list[nn.Module] = []
    seen: list[dict[str, object]] = []
    (report,) = run_train_function(
        tutorial_app(trained, seen),
        target=gateway.endpoints.internal,
        model=TINY,
        trainer="shanghai-01",
        region="shanghai",
        train_config={"lr": 0.01},
        run_config={"local-epochs": 1},
        node_config={"partition-id": 3},
    )
    assert seen == [{"lr": 0.01, "server-round": 1, "local-epochs": 1}]
    assert (report.num_examples, set(report.metrics)) == (8 * BATCHES, {"train_loss"})
    (update,) = gateway.gateway.store.round_updates(TINY, 1)
    assert update.num_examples == 16 and update.metrics == report.metrics
    base = pull_base(gateway, tiny_schema)
    assert_delta_by_name(stored_delta(gateway, tiny_schema, "shanghai-01"), trained[0], base)


def _echo(
    change: Callable[[dict[str, np.ndarray], dict[str, MetricRecordValues]], None],
) -> ClientApp:
    """A train function that returns the base it got (and 16 examples), then `change`s it."""
    app = ClientApp()

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        arrays = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
        metrics: dict[str, MetricRecordValues] = {"num-examples": 16, "loss": 0.5}
        change(arrays, metrics)
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


def _drop(a: dict[str, np.ndarray], m: dict[str, MetricRecordValues]) -> None:
    del a["lane_head.bias"]


def _add(a: dict[str, np.ndarray], m: dict[str, MetricRecordValues]) -> None:
    a["lane_head.extra"] = np.zeros(4, np.float32)


def _reshape(a: dict[str, np.ndarray], m: dict[str, MetricRecordValues]) -> None:
    a["lane_head.weight"] = a["lane_head.weight"].T.copy()


def _retype(a: dict[str, np.ndarray], m: dict[str, MetricRecordValues]) -> None:
    a["lane_head.bias"] = a["lane_head.bias"].astype(np.float64)


def _no_count(a: dict[str, np.ndarray], m: dict[str, MetricRecordValues]) -> None:
    del m["num-examples"]


def _zero_count(a: dict[str, np.ndarray], m: dict[str, MetricRecordValues]) -> None:
    m["num-examples"] = 0


def _float_count(a: dict[str, np.ndarray], m: dict[str, MetricRecordValues]) -> None:
    m["num-examples"] = 16.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop, r"missing \['lane_head\.bias'\], unknown \[\]"),
        (_add, r"missing \[\], unknown \['lane_head\.extra'\]"),
        (_reshape, r"'lane_head\.weight': expected \(4, 32\) float32, got \(32, 4\) float32"),
        (_retype, r"'lane_head\.bias': expected \(4,\) float32, got \(4,\) float64"),
        (_no_count, "has no 'num-examples'"),
        (_zero_count, "must be a positive int .* got 0"),
        (_float_count, "must be a positive int .* got 16.0"),
    ],
)
def test_a_reply_that_is_not_the_models_state_dict_is_refused(
    gateway: Running,
    change: Callable[[dict[str, np.ndarray], dict[str, MetricRecordValues]], None],
    message: str,
) -> None:
    before = stored_state(gateway)
    with pytest.raises(FlowerAdapterError, match=message):
        run_train_function(
            _echo(change),
            target=gateway.endpoints.internal,
            model=TINY,
            trainer="shanghai-01",
            region="shanghai",
        )
    assert stored_state(gateway) == before and accepted(gateway) == 0


def test_an_unchanged_reply_pushes_a_zero_delta(gateway: Running, tiny_schema: Schema) -> None:
    """The control for the refusals above: the same echo, unchanged, is accepted."""
    (report,) = run_train_function(
        _echo(lambda a, m: None),
        target=gateway.endpoints.internal,
        model=TINY,
        trainer="shanghai-01",
        region="shanghai",
    )
    assert (report.accepted, report.num_examples, report.metrics) == (1, 16, {"loss": 0.5})
    got = stored_delta(gateway, tiny_schema, "shanghai-01")
    assert all(not np.any(d) for d in got.values())


def _raises() -> nn.Module:
    raise RuntimeError("no such checkpoint: /mnt/nowhere")


def _not_a_module() -> nn.Module:
    return "a string"  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("factory", "why"),
    [(_raises, "raised RuntimeError: no such checkpoint"), (_not_a_module, "not a torch.nn")],
    ids=["raises", "no-module"],
)
def test_a_broken_declaration_is_named_before_anything_is_sent(
    factory: Callable[[], nn.Module], why: str
) -> None:
    """The trainer side checks a declared model as the gateway does: one DeclarationError
    naming the model, not the user's traceback; nothing listens at the target."""
    declared = {"broken-net": registry.ModelEntry("broken-net", factory, (), ("y",))}
    common: dict[str, Any] = {
        "target": "127.0.0.1:9",
        "model": "broken-net",
        "trainer": "t",
        "region": "r",
        "declared": declared,
    }
    with pytest.raises(DeclarationError, match=f"model 'broken-net'.*{why}"):
        client = FlowerClient(nn.Linear(1, 1), DataLoader(TensorDataset(torch.zeros(1, 1))))
        run_numpy_client(client, names=["w"], **common)
    with pytest.raises(DeclarationError, match=f"model 'broken-net'.*{why}"):
        run_train_function(lambda msg, ctx: msg, **common)
