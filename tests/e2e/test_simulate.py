"""End to end: simulated trainer processes train for real and push; releases come out of egress."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sluice.clients.scenes import make_clips
from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.clients.simulate import (
    Event,
    RoundReport,
    SimulationConfig,
    Stage,
    plan_trainers,
    simulate,
)
from sluice.clients.trainer import loss_np
from tests.conftest import TINY, start_gateway


def test_trainer_processes_run_rounds_and_releases_leave_through_egress(
    tmp_path: Path, template_cache: Path
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=3, min_trainers=3)
    try:
        config = SimulationConfig(
            target=running.endpoints.internal, model=TINY, rounds=2, clips=64, holdout_clips=32
        )
        trainers = plan_trainers(3, ["shanghai", "beijing", "chengdu"])
        events: list[Event] = []
        reports = simulate(config, trainers, events.append)
        assert [e for e in events if isinstance(e, RoundReport)] == reports  # as they came
        for t in trainers:  # each trainer's progress only moves forward, to its end
            done = [e.done for e in events if isinstance(e, Stage) and e.trainer == t.trainer]
            assert done == sorted(done) and done[-1] == 2 * config.steps_per_round
        assert sorted((r.round, r.trainer) for r in reports) == sorted(
            (round_no, t.trainer) for round_no in (1, 2) for t in trainers
        )
        # Round 2 trained from the version round 1 produced.
        assert {r.base_version for r in reports if r.round == 2} == {1}
        with TrainerClient(running.endpoints.internal) as client:
            assert client.round(TINY).round == 3
        with EgressClient(running.endpoints.egress) as egress:
            releases = egress.releases(TINY)
            assert [r.version for r in releases] == [2, 1]
            dest = tmp_path / "v2.onnx"
            sha = egress.pull(TINY, dest, version=2)
            manifest = json.loads(egress.manifest(TINY, 2).manifest_json)
        assert manifest["num_trainers"] == 3 and manifest["num_regions"] == 3
        assert manifest["files"][0]["sha256"] == sha
        session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
        batch = make_clips("shanghai", 16, seed=123)
        controls, lanes = session.run(["controls", "lanes"], {"frames": batch.frames.numpy()})
        assert np.isfinite(loss_np(np.asarray(controls), np.asarray(lanes), batch))
    finally:
        running.gateway.stop()
