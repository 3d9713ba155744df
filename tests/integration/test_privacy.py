"""Central DP and screening through the real gateway: noise, the ledger, the epsilon gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.models.schema import Schema
from tests.conftest import TINY, random_delta, start_gateway
from tests.integration.test_round import push, wait_for_round

TRAINERS = ["shanghai-01", "beijing-01", "chengdu-01"]


def test_dp_noises_records_epsilon_and_the_gate_refuses_past_budget(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    # z = 1, q = 1, delta = 1e-5: epsilon 4.73 after one round, 7.08 after two.
    running = start_gateway(
        tmp_path / "gw",
        template_cache,
        dp_noise_multiplier=1.0,
        dp_clipping_norm=0.05,
        dp_max_epsilon=6.0,
    )
    try:
        payloads = [random_delta(tiny_schema, seed=i) for i in range(3)]
        with TrainerClient(running.endpoints.internal) as client:
            base = client.pull_global(TINY)
            for i, name in enumerate(TRAINERS):
                push(client, tiny_schema, payloads[i], name, 10)
            wait_for_round(client, 2)
            noised = client.pull_global(TINY)
            for i, name in enumerate(TRAINERS):
                push(client, tiny_schema, payloads[i], name, 10, round_no=2, base=1)
            wait_for_round(client, 3)
        with EgressClient(running.endpoints.egress) as egress:
            (release,) = egress.releases(TINY)
            manifest = json.loads(egress.manifest(TINY, 1).manifest_json)
        assert release.version == 1
        dp = manifest["dp"]
        assert dp["noise_multiplier"] == 1.0 and dp["clipping_norm"] == 0.05
        assert dp["delta"] == 1e-5 and dp["rounds"] == 1
        assert 4.5 < dp["epsilon"] < 5.0
        (refused,) = running.gateway.store.audit_entries("release.refused")
        assert "epsilon" in str(refused.detail) and refused.subject == f"{TINY}/release/2"
        ledger = json.loads(
            (running.data_dir / "state" / TINY / "2" / "dp_ledger.json").read_text()
        )
        assert len(ledger["rounds"]) == 2
        # Noise changed the weights: the clipped mean moves a whole update by at most C = 0.05
        # (~3e-4 per coordinate here); the noise std is z * C * max weight = 0.05 / 3 each.
        name = tiny_schema.tensors[0].name
        moved = tiny_schema.views(noised.data)[name] - tiny_schema.views(base.data)[name]
        assert 0.5 * 0.05 / 3 < float(np.std(moved)) < 2 * 0.05 / 3
    finally:
        running.gateway.stop()


def test_outlier_update_is_dropped_and_audited(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=4, drop_outlier_updates=True)
    try:
        payloads = [random_delta(tiny_schema, seed=i) for i in range(4)]
        arrays = tiny_schema.views(payloads[3])
        scaled = {k: v * 100 if v.dtype.kind == "f" else v for k, v in arrays.items()}
        payloads[3] = tiny_schema.flatten(scaled)
        with TrainerClient(running.endpoints.internal) as client:
            base = client.pull_global(TINY)
            for i, name in enumerate([*TRAINERS, "harbin-01"]):
                push(client, tiny_schema, payloads[i], name, 10)
            wait_for_round(client, 2)
            merged = client.pull_global(TINY)
        (closed,) = running.gateway.store.audit_entries("round.closed")
        assert closed.detail["screening"]["dropped"] == [3]  # type: ignore[index]
        assert closed.detail["num_trainers"] == 3
        name = tiny_schema.tensors[0].name
        want = (
            tiny_schema.views(base.data)[name]
            + sum(tiny_schema.views(p)[name] for p in payloads[:3]) / 3
        )
        np.testing.assert_allclose(tiny_schema.views(merged.data)[name], want, rtol=1e-5, atol=1e-6)
    finally:
        running.gateway.stop()
