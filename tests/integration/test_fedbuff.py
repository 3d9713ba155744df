"""FedBuff over real gRPC: a version every K updates, stale updates weighted, too stale refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.clients.sdk import TrainerClient
from sluice.gateway.core.fedbuff import FedBuffPolicy
from sluice.models.schema import Schema
from tests.conftest import TINY, random_delta, start_gateway
from tests.integration.test_round import push, wait_for_round


def test_buffered_versions_weigh_stale_updates_and_refuse_too_stale(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(
        tmp_path / "gw", template_cache, quorum=3, min_trainers=1, fedbuff=True, max_staleness=1
    )
    policy = FedBuffPolicy(max_staleness=1)
    deltas = [random_delta(tiny_schema, seed=i) for i in range(6)]
    try:
        with TrainerClient(running.endpoints.internal) as client:
            v0 = client.pull_global(TINY)
            for i, name in enumerate(["shanghai-01", "beijing-01", "chengdu-01"]):
                push(client, tiny_schema, deltas[i], name, 10 * (i + 1))
            wait_for_round(client, 2)  # K = 3 updates: version 1
            v1 = client.pull_global(TINY)
            assert v1.version == 1
            # A trainer still on version 0 (staleness 1) and two on version 1.
            push(client, tiny_schema, deltas[3], "harbin-01", 40, round_no=1, base=0)
            info = client.round(TINY)
            assert (info.round, info.accepted) == (2, 1)  # joined the open buffer
            push(client, tiny_schema, deltas[4], "shenzhen-01", 20, round_no=2, base=1)
            push(client, tiny_schema, deltas[5], "wuhan-01", 30, round_no=2, base=1)
            wait_for_round(client, 3)
            v2 = client.pull_global(TINY)
            # Now on version 2: an update from version 0 is 2 behind, past max_staleness 1.
            with pytest.raises(grpc.RpcError) as err:
                push(client, tiny_schema, deltas[0], "xian-01", 5, round_no=1, base=0)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "at most 1 are accepted" in (err.value.details() or "")
        name = tiny_schema.tensors[0].name
        views = [tiny_schema.views(d)[name].astype(np.float64) for d in deltas]
        n = [40, 20, 30]
        s = [policy.weight(1), 1.0, 1.0]
        want = tiny_schema.views(v1.data)[name] + sum(
            s[i] * n[i] * views[3 + i] for i in range(3)
        ) / sum(n)
        np.testing.assert_allclose(tiny_schema.views(v2.data)[name], want, rtol=1e-5, atol=1e-6)
        assert policy.weight(1) == pytest.approx(2**-0.5)
        assert tiny_schema.views(v0.data)[name].shape == want.shape
    finally:
        running.gateway.stop()


def test_staleness_weight_is_documented_function() -> None:
    policy = FedBuffPolicy(max_staleness=4, exponent=0.5)
    assert [round(policy.weight(t), 4) for t in range(4)] == [1.0, 0.7071, 0.5774, 0.5]
    with pytest.raises(ValueError, match="future"):
        policy.weight(-1)
