"""A full federated round over real loopback gRPC: pushes, FedAvg, release, egress pulls."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.models import registry
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta, start_gateway


def push(
    client: TrainerClient,
    schema: Schema,
    payload: bytes,
    trainer: str,
    n: int,
    round_no: int = 1,
    base: int = 0,
) -> None:
    client.push_update(
        model=TINY,
        round_no=round_no,
        base_version=base,
        schema_hash=schema.hash,
        trainer=trainer,
        region=trainer.split("-")[0],
        num_examples=n,
        payload=payload,
    )


def wait_for_round(client: TrainerClient, round_no: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.round(TINY).round < round_no:
        assert time.monotonic() < deadline, f"round {round_no} never opened"
        time.sleep(0.05)


def test_full_round_fedavg_and_onnx_parity(gateway: Running, tiny_schema: Schema) -> None:
    trainers = [("shanghai-01", 120), ("beijing-01", 40), ("shenzhen-01", 240)]
    payloads = [random_delta(tiny_schema, seed=i) for i in range(len(trainers))]
    with TrainerClient(gateway.endpoints.internal) as client:
        base = client.pull_global(TINY)
        assert base.version == 0

        def one(i: int) -> None:
            with TrainerClient(gateway.endpoints.internal) as own:
                push(own, tiny_schema, payloads[i], trainers[i][0], trainers[i][1])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(trainers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for_round(client, 2)
        merged = client.pull_global(TINY)
    assert merged.version == 1

    # Independent numpy computation of base + weighted mean of the deltas.
    total = sum(n for _, n in trainers)
    base_views = tiny_schema.views(base.data)
    got = tiny_schema.views(merged.data)
    for spec in tiny_schema.tensors:
        deltas = [tiny_schema.views(p)[spec.name].astype(np.float64) for p in payloads]
        mean = sum(d * n for d, (_, n) in zip(deltas, trainers, strict=True)) / total
        if spec.is_float:
            want = base_views[spec.name] + mean
            np.testing.assert_allclose(got[spec.name], want, rtol=1e-5, atol=1e-6)
        else:
            want = base_views[spec.name] + np.rint(mean).astype(spec.dtype)
            np.testing.assert_array_equal(got[spec.name], want)

    # The release, pulled through egress, runs in onnxruntime like torch with those weights.
    with EgressClient(gateway.endpoints.egress) as egress:
        (release,) = egress.releases(TINY)
        assert (release.version, release.num_trainers) == (1, 3)
        dest = gateway.data_dir / "pulled.onnx"
        sha = egress.pull(TINY, dest)
        manifest = json.loads(egress.manifest(TINY).manifest_json)
    assert sha == manifest["files"][0]["sha256"] == hashlib.sha256(dest.read_bytes()).hexdigest()
    entry = registry.get(TINY)
    module = entry.build()
    module.load_state_dict(tiny_schema.to_state_dict(merged.data))
    (frames,) = entry.example_inputs(batch=8, seed=5)
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"frames": frames.numpy()})
    with torch.no_grad():
        torch_out = module(frames)
    for o, t in zip(onnx_out, torch_out, strict=True):
        assert np.max(np.abs(o - t.numpy())) < 1e-4


def _publish_one(running: Running, schema: Schema) -> None:
    with TrainerClient(running.endpoints.internal) as client:
        for i, name in enumerate(["shanghai-01", "beijing-01", "chengdu-01"]):
            push(client, schema, random_delta(schema, seed=10 + i), name, 10)
        wait_for_round(client, 2)
    with EgressClient(running.endpoints.egress) as egress:
        deadline = time.monotonic() + 30
        while not egress.releases(TINY):
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_pull_resumes_from_offset(gateway: Running, tiny_schema: Schema) -> None:
    _publish_one(gateway, tiny_schema)
    with EgressClient(gateway.endpoints.egress) as egress:
        whole = gateway.data_dir / "whole.onnx"
        sha = egress.pull(TINY, whole)
        data = whole.read_bytes()
        offset = len(data) // 3
        msgs = list(egress.pull_stream(TINY, offset=offset))
    header = msgs[0].header
    assert header.total_bytes == len(data) and header.sha256 == sha
    rest = b"".join(m.chunk.data for m in msgs[1:])
    assert msgs[1].chunk.offset == offset
    assert data[:offset] + rest == data
    assert hashlib.sha256(data[:offset] + rest).hexdigest() == sha


def test_pull_refuses_a_release_file_changed_on_disk(gateway: Running, tiny_schema: Schema) -> None:
    _publish_one(gateway, tiny_schema)
    path = gateway.data_dir / "registry" / TINY / "1" / "model.onnx"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    dest = gateway.data_dir / "out" / "model.onnx"
    with EgressClient(gateway.endpoints.egress) as egress, pytest.raises(grpc.RpcError) as err:
        egress.pull(TINY, dest)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_restart_between_two_pushes_loses_neither(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=2, min_trainers=2)
    try:
        payloads = [random_delta(tiny_schema, seed=s) for s in (1, 2)]
        with TrainerClient(running.endpoints.internal) as client:
            base = client.pull_global(TINY)
            push(client, tiny_schema, payloads[0], "shanghai-01", 30)
        running.restart()
        with TrainerClient(running.endpoints.internal) as client:
            assert client.round(TINY).accepted == 1
            push(client, tiny_schema, payloads[1], "beijing-01", 10)
            wait_for_round(client, 2)
            merged = client.pull_global(TINY)
        name = tiny_schema.tensors[0].name
        want = (
            tiny_schema.views(base.data)[name]
            + (
                tiny_schema.views(payloads[0])[name] * 30
                + tiny_schema.views(payloads[1])[name] * 10
            )
            / 40
        )
        np.testing.assert_allclose(tiny_schema.views(merged.data)[name], want, rtol=1e-5, atol=1e-6)
    finally:
        running.gateway.stop()


def test_fewer_than_k_trainers_produce_a_version_but_no_release(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=2, min_trainers=3)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            push(client, tiny_schema, random_delta(tiny_schema, 1), "shanghai-01", 5)
            push(client, tiny_schema, random_delta(tiny_schema, 2), "beijing-01", 5)
            wait_for_round(client, 2)
            assert client.pull_global(TINY).version == 1
        with EgressClient(running.endpoints.egress) as egress:
            assert egress.releases(TINY) == []
            with pytest.raises(grpc.RpcError) as err:
                egress.pull(TINY, tmp_path / "x.onnx")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (running.data_dir / "registry" / TINY / "1").exists()
        (refused,) = running.gateway.store.audit_entries("release.refused")  # and why
        assert refused.subject == f"{TINY}/release/1"
        assert "aggregates 2 distinct trainers" in str(refused.detail)
    finally:
        running.gateway.stop()


def test_cli_pull_and_status(
    gateway: Running, tiny_schema: Schema, capsys: pytest.CaptureFixture[str]
) -> None:
    from sluice.gateway.cli import main

    _publish_one(gateway, tiny_schema)
    out = gateway.data_dir / "global-team"
    key = gateway.data_dir / "keys" / "release-signing.pub"
    pull = ["pull", "--egress", gateway.endpoints.egress, "--model", TINY]
    assert main([*pull, "--public-key", str(key), "--out", str(out), "--insecure"]) == 0
    with EgressClient(gateway.endpoints.egress) as egress:
        manifest = json.loads(egress.manifest(TINY).manifest_json)
    model = (out / "model.onnx").read_bytes()
    assert hashlib.sha256(model).hexdigest() == manifest["files"][0]["sha256"]
    assert main(["status", "--target", gateway.endpoints.internal, "--insecure"]) == 0
    assert "round 2 open on version 1" in capsys.readouterr().out


def test_pull_from_past_the_end_is_invalid(gateway: Running, tiny_schema: Schema) -> None:
    _publish_one(gateway, tiny_schema)
    with EgressClient(gateway.endpoints.egress) as egress:
        (release,) = egress.releases(TINY)
        with pytest.raises(grpc.RpcError) as err:
            list(egress.pull_stream(TINY, offset=release.files[0].size + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "past the end" in (err.value.details() or "")


def test_deadline_closes_a_round_only_with_the_minimum(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(
        tmp_path / "gw", template_cache, quorum=10, min_updates=2, round_seconds=0.5, min_trainers=2
    )
    try:
        with TrainerClient(running.endpoints.internal) as client:
            push(client, tiny_schema, random_delta(tiny_schema, 1), "shanghai-01", 5)
            time.sleep(1.5)  # three deadlines pass with one update: the round stays open
            info = client.round(TINY)
            assert (info.round, info.accepted) == (1, 1)
            push(client, tiny_schema, random_delta(tiny_schema, 2), "beijing-01", 5)
            wait_for_round(client, 2, timeout_s=10)
            assert client.pull_global(TINY).version == 1
    finally:
        running.gateway.stop()
