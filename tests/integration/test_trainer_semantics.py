"""A trainer counts once per round, its retries are safe across restarts, and what a crash
or a restart interrupted is finished, told or cleaned: through a live gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sluice.clients.sdk import (
    AdminClient,
    RetryPolicy,
    TrainerClient,
    default_update_id,
    push_messages,
)
from sluice.gateway.server import Gateway
from sluice.models.schema import Schema
from sluice.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import TINY, Running, random_delta, start_gateway, update_header
from tests.integration.test_round import push, wait_for_round
from tests.integration.test_wedge import header_then_wait

Code = grpc.StatusCode
TIMEOUT_S = 10.0


# One trainer is not a quorum.


def test_a_second_update_of_a_trainer_in_a_round_is_refused_at_the_header(
    gateway: Running, tiny_schema: Schema
) -> None:
    """quorum = 3: one trainer's four pushes count once and close nothing."""
    with TrainerClient(gateway.endpoints.internal) as client:
        first = client.push_update(
            model=TINY, round_no=1, base_version=0, schema_hash=tiny_schema.hash,
            trainer="shanghai-01", region="shanghai", num_examples=10,
            payload=random_delta(tiny_schema, 1),
        )  # fmt: skip
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        stub = trainer_pb2_grpc.TrainerServiceStub(ch)
        for seed in (2, 3, 4):
            payload = random_delta(tiny_schema, seed)
            release = threading.Event()
            header = update_header(tiny_schema, payload)
            try:
                with pytest.raises(grpc.RpcError) as err:
                    stub.PushUpdate(header_then_wait(header, release), timeout=TIMEOUT_S / 2)
            finally:
                release.set()
            assert err.value.code() == Code.ALREADY_EXISTS
            assert f"already has update {first.update_id!r} in round 1" in (
                err.value.details() or ""
            )
        info = stub.GetRound(trainer_pb2.GetRoundRequest(model=TINY), timeout=TIMEOUT_S)
    assert (info.round, info.accepted) == (1, 1)
    gateway.gateway.audit.flush(everything=True)  # repeats are coalesced, with a count
    rejected = gateway.gateway.store.audit_entries("push.rejected")
    assert sum(int(str(e.detail.get("count", 1))) for e in rejected) == 3
    assert all("one update per round" in str(e.detail) for e in rejected)
    assert len(gateway.gateway.store.round_updates(TINY, 1)) == 1


def test_quorum_and_num_trainers_count_trainers_not_updates(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """A database from before the rule may hold two updates of one trainer in a round:
    they count once toward the quorum and only the first is folded."""
    running = start_gateway(tmp_path / "gw", template_cache, quorum=2, min_trainers=1)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            push(client, tiny_schema, random_delta(tiny_schema, 1), "shanghai-01", 10)
            with running.gateway.store.transaction() as db:  # a second row, as old gateways took
                db.execute(
                    "INSERT INTO updates (update_id, model, round, trainer, region, base_version,"
                    " num_examples, metrics_json, payload_sha256, payload_bytes, received_ms)"
                    " SELECT 'again', model, round, trainer, region, base_version, num_examples,"
                    " metrics_json, payload_sha256, payload_bytes, received_ms FROM updates"
                )
            assert client.round(TINY).accepted == 1
            time.sleep(1.0)  # the worker ticks: one trainer is not a quorum of 2
            assert client.round(TINY).round == 1
            push(client, tiny_schema, random_delta(tiny_schema, 2), "beijing-01", 10)
            wait_for_round(client, 2)
        version = running.gateway.store.get_version(TINY, 1)
        assert version is not None and version.num_trainers == 2
        (closed,) = running.gateway.store.audit_entries("round.closed")
        assert "again" not in closed.detail["updates"]  # type: ignore[operator]
    finally:
        running.gateway.stop()


# Application-level retries are safe: the SDK's update id is the same for every attempt.


def test_a_push_repeated_after_a_restart_counts_once(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache)
    payload = random_delta(tiny_schema, 1)
    fields = dict(
        model=TINY, round_no=1, base_version=0, schema_hash=tiny_schema.hash,
        trainer="shanghai-01", region="shanghai", num_examples=10,
    )  # fmt: skip
    try:
        # The SDK gives up while the gateway restarts (no retries here: as if the ack was lost
        # and the budget ran out); the trainer calls push_update again afterwards.
        with TrainerClient(running.endpoints.internal, retry=RetryPolicy(attempts=1)) as client:
            first = client.push_update(payload=payload, **fields)  # type: ignore[arg-type]
        running.restart()
        with TrainerClient(running.endpoints.internal) as client:
            again = client.push_update(payload=payload, **fields)  # type: ignore[arg-type]
            assert first.update_id == again.update_id == default_update_id("shanghai-01", TINY, 1)
            assert (first.created, again.created, again.accepted) == (True, False, 1)
            with pytest.raises(grpc.RpcError) as err:  # retrained meanwhile: still one update
                client.push_update(payload=random_delta(tiny_schema, 2), **fields)  # type: ignore[arg-type]
            assert err.value.code() == Code.ALREADY_EXISTS
            assert client.round(TINY).accepted == 1
    finally:
        running.gateway.stop()


def test_the_sdk_retries_through_a_restart_and_counts_once(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """The trainer's first push was committed but it never saw the ack; it pushes again
    while the gateway is down, and the SDK keeps trying until the gateway is back."""
    running = start_gateway(tmp_path / "gw", template_cache)
    fields = dict(
        model=TINY, round_no=1, base_version=0, schema_hash=tiny_schema.hash,
        trainer="beijing-01", region="beijing", num_examples=10,
        payload=random_delta(tiny_schema, 3),
    )  # fmt: skip
    patient = RetryPolicy(attempts=20, first_backoff_s=0.1, max_backoff_s=0.5)
    results: list[trainer_pb2.PushUpdateResponse | BaseException] = []

    def trainer() -> None:
        with TrainerClient(running.endpoints.internal, retry=patient) as client:
            try:
                results.append(client.push_update(**fields))  # type: ignore[arg-type]
            except grpc.RpcError as exc:
                results.append(exc)

    with TrainerClient(running.endpoints.internal) as client:
        first = client.push_update(**fields)  # type: ignore[arg-type]
    running.gateway.stop()
    thread = threading.Thread(target=trainer)
    thread.start()
    time.sleep(0.5)  # the SDK meets a closed port and backs off
    running.config = running.config.replace(internal_address=running.endpoints.internal)
    running.gateway = Gateway(running.config)  # back on the same port
    running.endpoints = running.gateway.start()
    thread.join(30)
    try:
        (again,) = results
        assert isinstance(again, trainer_pb2.PushUpdateResponse), again
        assert (again.update_id, again.created, again.accepted) == (first.update_id, False, 1)
        assert len(running.gateway.store.round_updates(TINY, 1)) == 1
    finally:
        running.gateway.stop()


# What a restart interrupted: finished, told, cleaned.


def test_close_round_retried_after_a_restart_says_what_the_close_produced(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=10, min_trainers=2)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for i, name in enumerate(["shanghai-01", "beijing-01"]):
                push(client, tiny_schema, random_delta(tiny_schema, i), name, 10)
        # The operator's CloseRound was in flight when the gateway was killed.
        with running.gateway.store.transaction() as db:
            db.execute("UPDATE rounds SET state = 'aggregating' WHERE round = 1")
        running.restart()  # finishes the close
        with AdminClient(running.endpoints.internal) as admin:
            again = admin.close_round(TINY, 1)
            assert (again.version, again.released, again.already_closed) == (1, True, True)
            (status,) = admin.status().models
            assert (status.open_round, status.round_state, status.latest_release) == (2, "open", 1)
    finally:
        running.gateway.stop()


def test_close_round_repeated_tells_why_nothing_was_released(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=10, min_trainers=3)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            push(client, tiny_schema, random_delta(tiny_schema, 1), "shanghai-01", 10)
        with AdminClient(running.endpoints.internal) as admin:
            first = admin.close_round(TINY, 1)
            again = admin.close_round(TINY, 1)
        assert (first.version, first.released, first.already_closed) == (1, False, False)
        assert (again.version, again.released, again.already_closed) == (1, False, True)
        assert again.release_refused == first.release_refused != ""
    finally:
        running.gateway.stop()


def test_a_push_cut_off_by_kill_9_is_audited_at_the_next_start(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    data_dir = tmp_path / "gw"
    shutil.copytree(template_cache, data_dir / "templates")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.gateway.cli", "serve", "--data-dir", str(data_dir),
         "--models", TINY, "--insecure-loopback"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    release = threading.Event()
    try:
        endpoints = data_dir / "endpoints.json"
        deadline = time.monotonic() + 60
        while not endpoints.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        target = json.loads(endpoints.read_text())["internal"]
        payload = random_delta(tiny_schema, 1)
        header = update_header(tiny_schema, payload, update_id="cut-off.1")
        messages = list(push_messages(header, payload, chunk_bytes=16 << 10))

        def stalled() -> Iterator[trainer_pb2.PushUpdateRequest]:
            yield from messages[:3]
            release.wait(TIMEOUT_S)

        with grpc.insecure_channel(target) as ch:
            future = trainer_pb2_grpc.TrainerServiceStub(ch).PushUpdate.future(
                stalled(), timeout=TIMEOUT_S
            )
            tmp = data_dir / "blobs" / "tmp"
            deadline = time.monotonic() + TIMEOUT_S
            while not list(tmp.glob("*~*.part")):
                assert time.monotonic() < deadline, "the push never started spooling"
                time.sleep(0.02)
            proc.kill()  # SIGKILL: no handler runs, no audit entry is written
            proc.wait(10)
            release.set()
            with pytest.raises(grpc.RpcError):
                future.result()
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    running = start_gateway(data_dir, template_cache)
    try:
        (entry,) = running.gateway.store.audit_entries("push.interrupted")
        assert (entry.actor, entry.subject) == ("shanghai-01", f"{TINY}/round/1")
        assert entry.detail["update_id"] == "cut-off.1"
        assert "the gateway stopped after receiving" in str(entry.detail["reason"])
        assert list((data_dir / "blobs" / "tmp").iterdir()) == []
    finally:
        running.gateway.stop()
