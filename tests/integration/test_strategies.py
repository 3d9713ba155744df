"""Strategies through the real gateway: FedAdam's state survives a restart byte for byte."""

from __future__ import annotations

from pathlib import Path

from sluice.clients.sdk import TrainerClient
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta, start_gateway
from tests.integration.test_round import push, wait_for_round

FEDADAM = {TINY: {"name": "FedAdam", "eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}}


def play_round(running: Running, schema: Schema, round_no: int) -> None:
    with TrainerClient(running.endpoints.internal) as client:
        for i, name in enumerate(["shanghai-01", "beijing-01", "chengdu-01"]):
            payload = random_delta(schema, seed=100 * round_no + i)
            push(client, schema, payload, name, 10 + i, round_no=round_no, base=round_no - 1)
        wait_for_round(client, round_no + 1)


def state_files(running: Running, version: int) -> dict[str, bytes]:
    directory = running.data_dir / "state" / TINY / str(version)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_fedadam_restart_mid_run_gives_the_same_bytes(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    results = []
    for restart in (False, True):
        running = start_gateway(tmp_path / f"gw-{restart}", template_cache, strategies=FEDADAM)
        try:
            for round_no in (1, 2, 3):
                play_round(running, tiny_schema, round_no)
                if restart and round_no == 2:
                    running.restart()
            with TrainerClient(running.endpoints.internal) as client:
                info = client.round(TINY)
                assert info.strategy == "FedAdam"
                weights = client.pull_global(TINY)
            results.append((weights.version, weights.sha256, state_files(running, 3)))
        finally:
            running.gateway.stop()
    (v_a, sha_a, state_a), (v_b, sha_b, state_b) = results
    assert v_a == v_b == 3
    assert sha_a == sha_b
    assert set(state_a) >= {"m.bin", "v.bin"} and state_a == state_b
