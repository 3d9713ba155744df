"""Nothing one update does wedges or poisons a model, through a live gateway: integers past
what can be stored are refused at the header, a corrupt spool file is excluded, a
non-finite result is never a version, and a failed round is visible while pushes go on."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sluice.clients.sdk import AdminClient, EgressClient, RetryPolicy, TrainerClient
from sluice.models.schema import Schema
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.conftest import TINY, Running, random_delta, start_gateway, stored_state, update_header
from tests.integration.test_round import push, wait_for_round

Code = grpc.StatusCode
TIMEOUT_S = 10.0
TRAINERS = ["shanghai-01", "beijing-01", "chengdu-01"]
BIG = [1 << 63, (1 << 64) - 1]  # uint64 on the wire, past SQLite's signed 64-bit


@pytest.fixture
def stub(gateway: Running) -> Iterator[trainer_pb2_grpc.TrainerServiceStub]:
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        yield trainer_pb2_grpc.TrainerServiceStub(ch)


def header_then_wait(
    header: trainer_pb2.UpdateHeader, release: threading.Event
) -> Iterator[trainer_pb2.PushUpdateRequest]:
    """The header, then no payload until released: an answer before it came at the header."""
    yield trainer_pb2.PushUpdateRequest(header=header)
    release.wait(TIMEOUT_S)


def residue(running: Running) -> list[str]:
    """Release and state directories no committed row names, staging and temp files: what
    no close, failed or not, may leave behind."""
    root, store = running.data_dir, running.gateway.store
    released = {str(v) for m, v in store.released_versions() if m == TINY}
    versions = {str(r["version"]) for r in store._all("SELECT version FROM versions")}
    found = [p for p in (root / "registry" / TINY).glob("*") if p.name not in released]
    found += [p for p in (root / "state" / TINY).glob("*") if p.name not in versions]
    found += list((root / "blobs" / "tmp").iterdir())
    return [str(p.relative_to(root)) for p in found]


# Integers at the edge.


@pytest.mark.parametrize(
    ("fields", "code", "text"),
    [
        *(({"round_no": n}, Code.INVALID_ARGUMENT, "round") for n in BIG),
        *(({"base_version": n}, Code.INVALID_ARGUMENT, "base_version") for n in BIG),
        *(({"num_examples": n}, Code.INVALID_ARGUMENT, "num_examples") for n in BIG),
        ({"num_examples": (1 << 63) - 1}, Code.INVALID_ARGUMENT, "at most 2147483647"),
        ({"num_examples": 1 << 31}, Code.INVALID_ARGUMENT, "at most 2147483647"),
        *(({"payload_bytes": n}, Code.INVALID_ARGUMENT, "payload_bytes") for n in BIG),
        ({"metrics": {"loss": float("nan")}}, Code.INVALID_ARGUMENT, "must be finite"),
        ({"metrics": {"loss": float("-inf")}}, Code.INVALID_ARGUMENT, "must be finite"),
        ({"metrics": {"x" * 65: 1.0}}, Code.INVALID_ARGUMENT, "metric name"),
        ({"metrics": {"a\nb": 1.0}}, Code.INVALID_ARGUMENT, "printable"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else None,
)
def test_header_fields_out_of_range_are_refused_at_the_header(
    gateway: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,
    tiny_schema: Schema,
    fields: dict[str, object],
    code: grpc.StatusCode,
    text: str,
) -> None:
    before = stored_state(gateway)
    payload = random_delta(tiny_schema, seed=1)
    header = update_header(tiny_schema, payload, **fields)  # type: ignore[arg-type]
    release = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.PushUpdate(header_then_wait(header, release), timeout=TIMEOUT_S / 2)
    finally:
        release.set()
    assert err.value.code() == code, err.value.details()
    assert text in (err.value.details() or "")
    assert stored_state(gateway) == before


def test_versions_past_int64_are_not_found_on_every_listener(
    gateway: Running, tiny_schema: Schema
) -> None:
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        trainer = trainer_pb2_grpc.TrainerServiceStub(ch)
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        for big in BIG:
            pull = trainer_pb2.PullGlobalRequest(model=TINY, version=big)
            with pytest.raises(grpc.RpcError) as err:
                list(trainer.PullGlobal(pull, timeout=TIMEOUT_S))
            assert err.value.code() == Code.NOT_FOUND, err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                admin.CloseRound(
                    admin_pb2.CloseRoundRequest(model=TINY, round=big), timeout=TIMEOUT_S
                )
            assert err.value.code() == Code.NOT_FOUND, err.value.details()
    with grpc.insecure_channel(gateway.endpoints.egress) as ch:
        egress = egress_pb2_grpc.EgressServiceStub(ch)
        for big in BIG:
            with pytest.raises(grpc.RpcError) as err:
                egress.GetManifest(
                    egress_pb2.GetManifestRequest(model=TINY, version=big), timeout=TIMEOUT_S
                )
            assert err.value.code() == Code.NOT_FOUND, err.value.details()
            req = egress_pb2.PullReleaseRequest(model=TINY, version=big)
            with pytest.raises(grpc.RpcError) as err:
                list(egress.PullRelease(req, timeout=TIMEOUT_S))
            assert err.value.code() == Code.NOT_FOUND, err.value.details()


# Spool files changed after the push was acknowledged.


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _nan(schema: Schema) -> Callable[[Path], None]:
    def spoil(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        schema.views(memoryview(raw))[schema.tensors[0].name].reshape(-1)[3] = np.nan
        path.write_bytes(bytes(raw))

    return spoil


@pytest.mark.parametrize("how", ["flipped-byte", "truncated-by-4", "nan-written"])
def test_an_update_spoiled_after_its_ack_is_excluded_not_folded(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, how: str
) -> None:
    spoil = {
        "flipped-byte": _flip,
        "truncated-by-4": lambda p: p.write_bytes(p.read_bytes()[:-4]),
        "nan-written": _nan(tiny_schema),
    }[how]
    running = start_gateway(tmp_path / "gw", template_cache, min_trainers=2)
    try:
        payloads = [random_delta(tiny_schema, seed=i) for i in range(3)]
        with TrainerClient(running.endpoints.internal) as client:
            base = client.pull_global(TINY)
            acks = []
            for i, name in enumerate(TRAINERS):
                if i == 2:  # the third push closes the round: spoil the first before it
                    spoil(running.gateway.blobs.path(
                        running.gateway.store.round_updates(TINY, 1)[0].payload_sha256
                    ))  # fmt: skip
                acks.append(client.push_update(
                    model=TINY, round_no=1, base_version=0, schema_hash=tiny_schema.hash,
                    trainer=name, region=name.split("-")[0], num_examples=10 * (i + 1),
                    payload=payloads[i],
                ))  # fmt: skip
            wait_for_round(client, 2)
            merged = client.pull_global(TINY)
            # Pushes go on: round 2 takes updates.
            push(client, tiny_schema, payloads[0], TRAINERS[0], 5, round_no=2, base=1)
        store = running.gateway.store
        (excluded,) = store.audit_entries("push.excluded")
        assert excluded.detail["update_id"] == acks[0].update_id
        (closed,) = store.audit_entries("round.closed")
        assert closed.detail["updates"] == [a.update_id for a in acks[1:]]
        # The version is the others' FedAvg, and finite.
        views, base_views = tiny_schema.views(merged.data), tiny_schema.views(base.data)
        for spec in tiny_schema.tensors:
            if spec.is_float:
                want = (
                    base_views[spec.name]
                    + (
                        tiny_schema.views(payloads[1])[spec.name] * 20
                        + tiny_schema.views(payloads[2])[spec.name] * 30
                    )
                    / 50
                )
                np.testing.assert_allclose(views[spec.name], want, rtol=1e-5, atol=1e-6)
        with EgressClient(running.endpoints.egress) as egress:
            manifest = json.loads(egress.manifest(TINY).manifest_json)
        assert (manifest["num_trainers"], manifest["num_updates"]) == (2, 2)
        assert residue(running) == []
    finally:
        running.gateway.stop()


# A non-finite result: the round fails, the base stays, pushes go on.


def _max_delta(schema: Schema) -> bytes:
    big = np.finfo(np.float32).max
    return schema.flatten(
        {t.name: np.full(t.shape, big if t.is_float else 0, dtype=t.dtype) for t in schema.tensors}
    )


def test_float32_max_deltas_never_make_an_inf_version(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """One trainer of three sends float32-max deltas with a large num_examples. FedAvg is a
    convex combination, so round 1's version is huge but finite; round 2 would overflow to
    inf and fails instead: version 1 stays the base, round 3 opens on it and closes."""
    # k = 4: no release is attempted for three trainers, so no parity run on huge weights.
    # The ingest bound on values is lifted: this tests the fold's own safety net.
    running = start_gateway(
        tmp_path / "gw", template_cache, min_trainers=4, max_update_abs_value=1e39
    )
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for round_no in (1, 2):
                base = round_no - 1
                push(
                    client,
                    tiny_schema,
                    _max_delta(tiny_schema),
                    "shenzhen-01",
                    1_000_000,
                    round_no,
                    base,
                )
                for i, name in enumerate(TRAINERS[:2]):
                    push(
                        client,
                        tiny_schema,
                        random_delta(tiny_schema, 10 * round_no + i),
                        name,
                        100,
                        round_no,
                        base,
                    )
                wait_for_round(client, round_no + 1)
            info = client.round(TINY)
            assert (info.round, info.base_version) == (3, 1)
            pulled = client.pull_global(TINY)
            assert pulled.version == 1
            assert all(np.isfinite(a).all() for a in tiny_schema.views(pulled.data).values())
            with AdminClient(running.endpoints.internal) as admin:
                (status,) = admin.status().models
                assert (status.failed_round, status.open_round, status.latest_version) == (2, 3, 1)
                assert "aggregate of round 2 is not finite" in status.failed_reason
                with pytest.raises(grpc.RpcError) as err:
                    admin.close_round(TINY, 2)
                assert err.value.code() == Code.FAILED_PRECONDITION
                assert "round 2 of 'drivenet-tiny' failed" in (err.value.details() or "")
            # Pushes go on: round 3 trains from version 1 and closes into version 2.
            for i, name in enumerate(TRAINERS):
                push(client, tiny_schema, random_delta(tiny_schema, 40 + i), name, 10, 3, 1)
            wait_for_round(client, 4)
            assert client.pull_global(TINY).version == 2
        (failed,) = running.gateway.store.audit_entries("round.failed")
        assert failed.subject == f"{TINY}/round/2" and len(failed.detail["updates"]) == 3  # type: ignore[arg-type]
        assert residue(running) == []
    finally:
        running.gateway.stop()


def test_a_failed_round_survives_a_restart_and_does_not_wedge(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """The original wedge: a close that can never succeed, left aggregating across a
    restart (as an older gateway left it): the restart fails it once, and pushes go on."""
    running = start_gateway(tmp_path / "gw", template_cache, quorum=10)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for i, name in enumerate(TRAINERS[:2]):
                push(client, tiny_schema, random_delta(tiny_schema, i), name, 10)
        with running.gateway.store.transaction() as db:  # what the old gateway stored
            db.execute("UPDATE updates SET num_examples = ?", ((1 << 63) - 1,))
            db.execute("UPDATE rounds SET state = 'aggregating' WHERE round = 1")
        running.restart()
        with TrainerClient(running.endpoints.internal) as client:
            info = client.round(TINY)
            assert (info.round, info.base_version, info.accepted) == (2, 0, 0)
            push(client, tiny_schema, random_delta(tiny_schema, 5), TRAINERS[0], 10, 2, 0)
        assert running.gateway.store.get_round(TINY, 1).state == "failed"  # type: ignore[union-attr]
        assert len(running.gateway.store.audit_entries("round.failed")) == 1
        assert residue(running) == []
    finally:
        running.gateway.stop()


def test_a_close_failing_for_an_unknown_reason_ends_the_round_after_a_few_tries(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close failing for a reason that may go away is retried with backoff, and shown in
    status; it ends the round after CLOSE_ATTEMPTS tries when the reason is unknown."""
    import sluice.gateway.core.rounds as rounds

    monkeypatch.setattr(rounds, "RETRY_SECONDS", 0.05)
    running = start_gateway(tmp_path / "gw", template_cache, min_trainers=1)
    real = running.gateway.rounds.publisher.publish
    calls: list[float] = []

    def broken(*args: object, **kwargs: object) -> object:
        calls.append(time.monotonic())
        raise RuntimeError("a bug in publish")

    running.gateway.rounds.publisher.publish = broken  # type: ignore[method-assign,assignment]
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for i, name in enumerate(TRAINERS):
                push(client, tiny_schema, random_delta(tiny_schema, i), name, 10)
            wait_for_round(client, 2, timeout_s=30)
            assert len(calls) == rounds.CLOSE_ATTEMPTS
            running.gateway.rounds.publisher.publish = real  # type: ignore[method-assign]
            for i, name in enumerate(TRAINERS):
                push(client, tiny_schema, random_delta(tiny_schema, 9 + i), name, 10, 2, 0)
            wait_for_round(client, 3)
        with AdminClient(running.endpoints.internal) as admin:
            (status,) = admin.status().models
        assert status.failed_round == 1 and "a bug in publish" in status.failed_reason
        assert [
            e.detail["attempt"] for e in running.gateway.store.audit_entries("round.close_failed")
        ] == [1]
        assert residue(running) == []
    finally:
        running.gateway.stop()


def test_push_to_a_round_that_failed_says_so(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=10)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            payload = random_delta(tiny_schema, 1)
            push(client, tiny_schema, payload, TRAINERS[0], 10)
            running.gateway.rounds._fail(running.gateway.store.get_round(TINY, 1), "for the test")  # type: ignore[arg-type]
            with pytest.raises(grpc.RpcError) as err:  # the same push again: its round failed
                push(client, tiny_schema, payload, TRAINERS[0], 10)
            assert err.value.code() == Code.FAILED_PRECONDITION
            assert "which failed (for the test); push it to the open round" in (
                err.value.details() or ""
            )
            push(client, tiny_schema, payload, TRAINERS[0], 10, round_no=2)
    finally:
        running.gateway.stop()


def test_one_trainer_cannot_fail_every_round_with_huge_values(
    gateway: Running, tiny_schema: Schema
) -> None:
    """At the default bound a float32-max delta is refused at ingest (nothing stored), so the
    other trainers' round closes: one hostile trainer cannot stop progress."""
    before = stored_state(gateway)
    with TrainerClient(gateway.endpoints.internal, retry=RetryPolicy(attempts=1)) as client:
        for payload in (_max_delta(tiny_schema), _max_delta(tiny_schema)[:-4] + b"\xff" * 4):
            with pytest.raises(grpc.RpcError) as err:
                push(client, tiny_schema, payload, "shenzhen-01", 1_000_000, 1, 0)
            assert err.value.code() == Code.INVALID_ARGUMENT
            assert "magnitude at most" in (err.value.details() or "")
        assert stored_state(gateway) == before
        for i, name in enumerate(TRAINERS):
            push(client, tiny_schema, random_delta(tiny_schema, 60 + i), name, 10, 1, 0)
        wait_for_round(client, 2)
        assert client.pull_global(TINY).version == 1


def test_a_close_that_kills_the_process_on_every_restart_ends_in_a_failed_round(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """Each restart resumes an interrupted close (audited); a round whose close the process
    died in RESUME_LIMIT times fails visibly instead of crash-looping the gateway."""
    from sluice.gateway.core.records import RoundState
    from sluice.gateway.core.rounds import RESUME_LIMIT, RESUMED

    running = start_gateway(tmp_path / "gw", template_cache, quorum=10)
    with TrainerClient(running.endpoints.internal) as client:
        for i, name in enumerate(TRAINERS):
            push(client, tiny_schema, random_delta(tiny_schema, 70 + i), name, 10, 1, 0)
    running.gateway.stop()
    # What RESUME_LIMIT restarts that each died mid-close leave: the round aggregating, and
    # one resume entry per restart.
    store = type(running.gateway.store)(running.data_dir / "sluice.db")
    with store.transaction() as db:
        store.set_round_state(db, TINY, 1, RoundState.AGGREGATING)
    for n in range(RESUME_LIMIT):
        store.record(RESUMED, "gateway", f"{TINY}/round/1", {"restart": n + 1})
    store.close()
    running.gateway = type(running.gateway)(running.config)
    running.endpoints = running.gateway.start()
    try:
        with AdminClient(running.endpoints.internal) as admin:
            (status,) = admin.status().models
        assert (status.failed_round, status.open_round) == (1, 2)
        assert "restarts" in status.failed_reason
        assert residue(running) == []
    finally:
        running.gateway.stop()
