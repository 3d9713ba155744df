"""Models unlike DriveNet, declared in tests/zoo/zoo.toml the way a user declares theirs,
end to end: real training steps, push, fold (FedAvg and a robust strategy), release,
guard, `sluice verify`'s checks, onnxruntime parity and the weights back in PyTorch.

What each architecture broke before it worked is in the closing note of issue 13; the
fixes are general (models/declare.py, models/schema.py aliases and dtypes, template.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.clients.trainer import compute_delta
from sluice.clients.verify import verify_release
from sluice.clients.weights import export_safetensors, load_release
from sluice.gateway import cli
from sluice.gateway.config import Config
from sluice.gateway.server import Gateway
from sluice.models.artifact import StructureLimits
from sluice.models.entry import ModelEntry
from sluice.models.manifest import MODEL_FILE, ManifestRefused, load_public_key
from sluice.models.registry import load_declarations
from sluice.models.schema import Schema, tensor_to_numpy
from tests.conftest import Running, offline, start_gateway

ZOO_FILE = Path(__file__).parents[1] / "zoo" / "zoo.toml"
ZOO = load_declarations(ZOO_FILE)
TRAINERS = (("shanghai-01", 30), ("beijing-01", 50), ("chengdu-01", 20))


@pytest.fixture(scope="module")
def zoo_templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every zoo model's template, built and self-tested once; gateways copy them."""
    root = tmp_path_factory.mktemp("zoo-templates")
    Gateway(offline(Config(data_dir=root, models=tuple(ZOO), declared_models=ZOO))).stop()
    return root / "templates"


def train_steps(module: torch.nn.Module, entry: ModelEntry, seed: int, steps: int = 3) -> None:
    """Real SGD on random inputs (loss: mean square of every output), in train mode, so
    BatchNorm's statistics and counter move too; an integer step counter counts."""
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for step in range(steps):
        inputs = entry.example_inputs(batch=4, seed=seed * 100 + step)
        outputs = module(*inputs)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        loss = sum(o.float().pow(2).mean() for o in outputs)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
    for name, buffer in module.named_buffers():
        if name == "seen":
            buffer += steps
    module.eval()


def fedavg(
    schema: Schema, base: bytes, deltas: list[bytes], weights: list[int]
) -> dict[str, np.ndarray]:
    """FedAvg computed here, independently: floats summed in float32 or wider (half
    precision widened) and rounded once; integers base + round-half-even(mean)."""
    total = sum(weights)
    base_views = schema.views(base)
    views = [schema.views(d) for d in deltas]
    out = {}
    for spec in schema.tensors:
        b = base_views[spec.name]
        if spec.is_float:
            wide: Any = np.float64 if spec.dtype == "<f8" else np.float32
            acc = sum(
                v[spec.name].astype(wide) * (n / total) for v, n in zip(views, weights, strict=True)
            )
            out[spec.name] = (b.astype(wide) + acc).astype(spec.np_dtype)
        else:
            mean = sum(
                v[spec.name].astype(np.float64) * n for v, n in zip(views, weights, strict=True)
            )
            out[spec.name] = b + np.rint(mean / total).astype(spec.np_dtype)
    return out


def outputs_of(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(*inputs)
    return [
        tensor_to_numpy(t).astype(np.float64)
        for t in ((out,) if isinstance(out, torch.Tensor) else out)
    ]


def run_round(running: Running, entry: ModelEntry) -> tuple[bytes, list[bytes], bytes]:
    """Three trainers train from the base and push; returns base, deltas and the merge."""
    schema = entry.schema()
    deltas = []
    with TrainerClient(running.endpoints.internal) as client:
        info = client.round(entry.name)
        assert info.schema_hash == schema.hash  # both sides built the same declaration
        base = client.pull_global(entry.name).data
        for i, (trainer, n) in enumerate(TRAINERS):
            module = entry.build()
            module.load_state_dict(schema.to_state_dict(base))
            start = schema.to_state_dict(base)
            train_steps(module, entry, seed=i)
            payload = schema.flatten(compute_delta(module.state_dict(), start))
            deltas.append(payload)
            client.push_update(
                model=entry.name, round_no=1, base_version=0, schema_hash=schema.hash,
                trainer=trainer, region=trainer.split("-")[0], num_examples=n, payload=payload,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while client.round(entry.name).round < 2:
            assert time.monotonic() < deadline, "the round never closed"
            time.sleep(0.05)
        merged = client.pull_global(entry.name).data
    return base, deltas, merged


@pytest.mark.parametrize("strategy", ["FedAvg", "FedMedian"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_declared_model_end_to_end(
    name: str,
    strategy: str,
    tmp_path: Path,
    zoo_templates: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    entry = ZOO[name]
    schema = entry.schema()
    running = start_gateway(
        tmp_path / "gw", zoo_templates, models=(name,), declared_models=ZOO,
        strategies={name: {"name": strategy}},
    )  # fmt: skip
    try:
        base, deltas, merged = run_round(running, entry)
        got = schema.views(merged)
        assert any(
            not np.array_equal(got[s.name], schema.views(base)[s.name]) for s in schema.tensors
        )
        if strategy == "FedAvg":
            want = fedavg(schema, base, deltas, [n for _, n in TRAINERS])
            for spec in schema.tensors:
                if spec.is_half:  # float32 sums in another order: one ulp of rounding
                    np.testing.assert_array_max_ulp(
                        got[spec.name].astype(np.float32), want[spec.name].astype(np.float32), 1
                    )
                elif spec.is_float:
                    np.testing.assert_allclose(
                        got[spec.name], want[spec.name], rtol=1e-6, atol=1e-7
                    )
                else:
                    np.testing.assert_array_equal(got[spec.name], want[spec.name])

        key = load_public_key(running.data_dir / "keys" / "release-signing.pub")
        release = tmp_path / "release"
        with EgressClient(running.endpoints.egress) as egress:
            deadline = time.monotonic() + 60
            while not egress.releases(name):
                assert time.monotonic() < deadline, "no release"
                time.sleep(0.05)
            doc = egress.pull_release(name, release, key)  # sluice verify's checks, then kept
        assert doc["model"] == name and doc["schema_hash"] == schema.hash
        released = {w["name"] for w in doc["weights"]}
        assert not released & set(schema.alias_of)  # a tied weight is released once
        assert doc["parity_max_abs_diff"] <= entry.parity_tolerance

        # onnxruntime on the released file vs torch on the merged weights, fresh inputs
        module = entry.build()
        module.load_state_dict(schema.to_state_dict(merged))
        inputs = entry.example_inputs(batch=3, seed=77)
        session = ort.InferenceSession(
            str(release / MODEL_FILE), providers=["CPUExecutionProvider"]
        )
        feeds = {n: tensor_to_numpy(x) for n, x in zip(entry.input_names, inputs, strict=True)}
        onnx_out = session.run(list(entry.output_names), feeds)
        torch_out = outputs_of(module, inputs)
        for o, t in zip(onnx_out, torch_out, strict=True):
            np.testing.assert_allclose(o.astype(np.float64), t, atol=entry.parity_tolerance, rtol=0)

        # the global team's check uses the same totals as the gateway's guard: given tighter
        # ones than this graph needs, the very same release is refused
        files = {MODEL_FILE: release / MODEL_FILE}
        manifest, signature = (
            (release / "manifest.json").read_bytes(),
            (release / "manifest.sig").read_bytes(),
        )
        tight = StructureLimits(structure_bytes=64)
        with pytest.raises(ManifestRefused, match="limit structure_bytes"):
            verify_release(manifest, signature, key, files, limits=tight)
        verify_release(manifest, signature, key, files, limits=entry.limits)
        verify = ["verify", str(release / MODEL_FILE), str(release / "manifest.json")]
        verify += ["--public-key", str(running.data_dir / "keys" / "release-signing.pub")]
        assert cli.main([*verify, "--limit", "structure_bytes=64"]) == 1
        assert "limit structure_bytes" in capsys.readouterr().err
        assert cli.main(verify) == 0

        # the weights back in PyTorch: a fresh module from the verified release
        fresh = entry.factory()
        load_release(fresh, release, key)
        for a, b in zip(outputs_of(fresh, inputs), torch_out, strict=True):
            np.testing.assert_array_equal(a, b)
        # and as safetensors (float16/bfloat16 kept as they are), loadable by torch
        export_safetensors(release, key, tmp_path / "weights.safetensors")
        exported = load_file(str(tmp_path / "weights.safetensors"))
        assert set(exported) == released
        for name, tensor in exported.items():
            assert torch.equal(tensor, fresh.state_dict()[name]), name
    finally:
        running.gateway.stop()


def test_tied_weight_travels_once_and_stays_tied(tmp_path: Path) -> None:
    entry = ZOO["tied-tokens"]
    module = entry.build(seed=1)
    schema = Schema.of(module.state_dict())
    assert schema.aliases == (("out.weight", "embed.weight"),)
    assert schema.hash == entry.schema().hash  # real tensors and the meta build agree
    unique = sum(p.numel() * p.element_size() for p in module.parameters())  # deduplicated
    assert schema.payload_bytes == unique
    state = schema.to_state_dict(schema.flatten(module.state_dict()))
    assert state["out.weight"] is state["embed.weight"]
    fresh = entry.factory()
    fresh.load_state_dict(state)
    embed, out = fresh.get_parameter("embed.weight"), fresh.get_parameter("out.weight")
    assert out is embed  # loading does not untie the module
    assert torch.equal(embed, module.get_parameter("embed.weight"))


def test_half_precision_schema_keeps_its_dtypes() -> None:
    schema = ZOO["half-precision"].schema()
    dtypes = {s.name: s.dtype for s in schema.tensors}
    assert dtypes == {
        "order": "<i8", "seen": "<i4", "a.weight": "<f2", "a.bias": "<f2",
        "b.weight": "bfloat16", "b.bias": "bfloat16",
    }  # fmt: skip
    assert schema.payload_bytes == 4 * 8 + 4 + (16 * 8 + 16) * 2 + (4 * 16 + 4) * 2


@pytest.mark.parametrize(
    ("tensor", "value", "says"),
    [
        ("b.weight", float("nan"), "finite values"),  # bfloat16
        ("a.bias", float("inf"), "finite values"),  # float16
        ("b.bias", 3e7, "magnitude at most"),  # bfloat16 holds it; the bound does not
    ],
)
def test_half_precision_pushes_are_checked_like_float32(
    tensor: str, value: float, says: str, tmp_path: Path, zoo_templates: Path
) -> None:
    entry = ZOO["half-precision"]
    schema = entry.schema()
    running = start_gateway(
        tmp_path / "gw", zoo_templates, models=(entry.name,), declared_models=ZOO
    )
    try:
        arrays = {s.name: np.zeros(s.shape, s.np_dtype) for s in schema.tensors}
        arrays[tensor].reshape(-1)[3] = value
        with TrainerClient(running.endpoints.internal) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.push_update(
                    model=entry.name, round_no=1, base_version=0, schema_hash=schema.hash,
                    trainer="shanghai-01", region="shanghai", num_examples=10,
                    payload=schema.flatten(arrays),
                )  # fmt: skip
            assert client.round(entry.name).accepted == 0
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in (err.value.details() or "") and tensor in (err.value.details() or "")
    finally:
        running.gateway.stop()


def test_a_models_declared_limits_bind_its_releases(tmp_path: Path, zoo_templates: Path) -> None:
    """The guard applies the declaration's StructureLimits: a graph over them is never
    released (the round closes, the release is refused and audited)."""
    tight = dataclasses.replace(ZOO["multitask"], limits=StructureLimits(structure_bytes=2048))
    running = start_gateway(
        tmp_path / "gw", zoo_templates, models=("multitask",), declared_models={"multitask": tight}
    )
    try:
        run_round(running, tight)
        deadline = time.monotonic() + 30
        while not (refused := running.gateway.store.audit_entries("release.refused")):
            assert time.monotonic() < deadline, "no release decision"
            time.sleep(0.05)
        assert "structure_bytes" in json.dumps(refused[0].detail)
        with EgressClient(running.endpoints.egress) as egress:
            assert not egress.releases("multitask")
    finally:
        running.gateway.stop()


def test_a_declared_init_weights_file_is_version_0(tmp_path: Path, zoo_templates: Path) -> None:
    """init_weights gives version 0's weights (it was checked, then ignored: version 0 was
    the factory's init_seed weights whatever the file held)."""
    from safetensors.torch import save_file

    entry = ZOO["multitask"]
    state = {k: v.clone() for k, v in entry.build(entry.init_seed).state_dict().items()}
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.fill_(0.25)
    save_file(state, str(tmp_path / "v0.safetensors"))
    declared = dataclasses.replace(entry, init_weights=tmp_path / "v0.safetensors")
    running = start_gateway(
        tmp_path / "gw", zoo_templates, models=(entry.name,), declared_models={entry.name: declared}
    )
    try:
        with TrainerClient(running.endpoints.internal) as client:
            pulled = client.pull_global(entry.name, 0)
        assert pulled.version == 0
        assert pulled.data == b"".join(entry.schema().tensor_bytes(state))
        factory = entry.build(entry.init_seed).state_dict()
        assert pulled.data != b"".join(entry.schema().tensor_bytes(factory))
    finally:
        running.gateway.stop()
