"""Siblings of issue 11, found by attacking the internal side as an outside tester would:
an audit flood through subjects a trainer chooses, a rejected push audited under the name
its header claims, integer tensors that wrap into a version, and a data-dir lock that a
deleted or linked lock file defeated."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from sluice.clients.sdk import AdminClient, Identity, RetryPolicy, TrainerClient, channel
from sluice.gateway.core.aggregation import add_integer_mean
from sluice.gateway.core.errors import InvalidInput, TooLarge
from sluice.gateway.pki import PkiLayout, init_pki
from sluice.gateway.server import LOCK_FILE, Gateway, StartupError
from sluice.gateway.services.auth import push_header_bytes
from sluice.gateway.store.audit import OTHER_SUBJECTS, Coalescer
from sluice.models.schema import Schema
from sluice.v1 import tensors_pb2, trainer_pb2, trainer_pb2_grpc
from tests.conftest import TINY, Running, random_delta, start_gateway, stored_state, update_header
from tests.integration.test_round import push, wait_for_round
from tests.integration.test_wedge import residue

Code = grpc.StatusCode
Request = trainer_pb2.PushUpdateRequest
TRAINERS = (("shanghai-01", "shanghai"), ("beijing-01", "beijing"), ("chengdu-01", "chengdu"))


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(
        tmp_path_factory.mktemp("redteam-pki") / "pki",
        trainers=TRAINERS,
        readers=("global-team",),
        operators=("ops",),
    )


@pytest.fixture(scope="module")
def mtls(
    tmp_path_factory: pytest.TempPathFactory, template_cache: Path, layout: PkiLayout
) -> Iterator[Running]:
    running = start_gateway(
        tmp_path_factory.mktemp("redteam") / "gw",
        template_cache,
        insecure_loopback=False,
        pki_dir=layout.directory,
    )
    yield running
    running.gateway.stop()


def _requests(header: trainer_pb2.UpdateHeader, payload: bytes) -> Iterator[Request]:
    yield Request(header=header)
    yield Request(chunk=tensors_pb2.Chunk(offset=0, data=payload))
    yield Request(trailer=trainer_pb2.UpdateTrailer(num_chunks=1))


def _rejected_rows(running: Running, since: int) -> list[Any]:
    return [e for e in running.gateway.store.audit_entries("push.rejected") if e.seq > since]


def _last_seq(running: Running) -> int:
    entries = running.gateway.store.audit_entries()
    return entries[-1].seq if entries else 0


# The audit log: a flood of refusals with subjects the trainer chooses is still coalesced.


def test_rejected_pushes_naming_distinct_models_and_rounds_are_coalesced(
    mtls: Running, layout: PkiLayout, tiny_schema: Schema
) -> None:
    """Before: the coalescing key held the header's model and round, so 120 refusals
    naming 120 models or rounds wrote 120 fsynced rows. Now an actor's keys past its share
    are counted under one key: a handful of rows, and the counts still add up."""
    payload = random_delta(tiny_schema, seed=1)
    mtls.gateway.audit.flush(everything=True)
    since = _last_seq(mtls)
    refusals = 0
    with channel(mtls.endpoints.internal, Identity.from_pki(layout.directory, "shanghai-01")) as ch:
        stub = trainer_pb2_grpc.TrainerServiceStub(ch)
        for i in range(120):
            fields: dict[str, object] = {"model": f"model-{i}"} if i % 2 else {"round_no": 1000 + i}
            header = update_header(tiny_schema, payload, **fields)  # type: ignore[arg-type]
            with pytest.raises(grpc.RpcError) as err:
                stub.PushUpdate(_requests(header, payload), timeout=10)
            assert err.value.code() in (Code.NOT_FOUND, Code.FAILED_PRECONDITION)
            refusals += 1
    rows = _rejected_rows(mtls, since)
    assert len(rows) <= 34, f"{len(rows)} audit rows for {refusals} refusals"
    mtls.gateway.audit.flush(everything=True)
    rows = _rejected_rows(mtls, since)
    assert sum(int(str(r.detail.get("count", 1))) for r in rows) == refusals
    assert {r.actor for r in rows} == {"shanghai-01"}
    assert any(r.subject == OTHER_SUBJECTS for r in rows)


def test_a_rejected_push_is_audited_under_its_senders_name_not_the_headers(
    mtls: Running, layout: PkiLayout, tiny_schema: Schema
) -> None:
    """Before: the actor of push.rejected was the header's trainer, so shanghai-01 could
    write refusals in beijing-01's name (and pick a fresh coalescing key with every name)."""
    payload = random_delta(tiny_schema, seed=2)
    since = _last_seq(mtls)
    with channel(mtls.endpoints.internal, Identity.from_pki(layout.directory, "shanghai-01")) as ch:
        stub = trainer_pb2_grpc.TrainerServiceStub(ch)
        header = update_header(tiny_schema, payload, trainer="beijing-01", region="beijing")
        with pytest.raises(grpc.RpcError) as err:
            stub.PushUpdate(_requests(header, payload), timeout=10)
        assert err.value.code() == Code.PERMISSION_DENIED
    mtls.gateway.audit.flush(everything=True)
    (row,) = [r for r in _rejected_rows(mtls, since) if r.detail["update_id"] == header.update_id]
    assert row.actor == "shanghai-01"
    assert row.detail["header_trainer"] == "beijing-01"


def test_the_coalescer_bounds_rows_per_actor_and_counts_after_stop() -> None:
    rows: list[tuple[str, str, str, Mapping[str, object]]] = []
    audit = Coalescer(lambda *row: rows.append(row), 10.0, max_keys_per_actor=4)
    for i in range(1000):
        audit.record("push.rejected", "mallory", f"m/round/{i}", {"i": i}, group=str(i))
    audit.record("push.rejected", "alice", "m/round/1", {})  # another actor: its own row
    assert len([r for r in rows if r[1] == "mallory"]) == 5
    assert [r[1] for r in rows].count("alice") == 1
    audit.stop()
    audit.record("push.rejected", "mallory", "m/round/1", {})  # after stop: written, not lost
    mallory = [r for r in rows if r[1] == "mallory"]
    assert sum(int(str(r[3].get("count", 1))) for r in mallory) == 1001
    assert mallory[4][2] == OTHER_SUBJECTS and mallory[4][3]["subject"] == "m/round/4"


# Integer tensors: a wrapped counter is never a version.


def _int_max_delta(schema: Schema, value: int) -> bytes:
    arrays = {
        t.name: np.full(t.shape, value if not t.is_float else 0, dtype=t.dtype)
        for t in schema.tensors
    }
    return schema.flatten(arrays)


@pytest.mark.parametrize(
    "strategy",
    [
        None,
        {"name": "FedAdam", "eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
        {"name": "FedMedian"},
    ],
    ids=["FedAvg", "FedAdam", "FedMedian"],
)
def test_an_integer_delta_that_would_wrap_fails_the_round_and_the_base_stays(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, strategy: dict[str, Any] | None
) -> None:
    """Before: int64-max deltas for BatchNorm's num_batches_tracked made version 1 hold
    -2**63 (a float64 2**63 cast to int64); a second round wrapped any counter. Integer
    tensors are finite, so the non-finite check let it through."""
    settings: dict[str, object] = {"quorum": 3, "min_trainers": 4}
    if strategy is not None:
        settings["strategies"] = {TINY: strategy}
    running = start_gateway(tmp_path / "gw", template_cache, **settings)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for i, (name, _) in enumerate(TRAINERS):
                # Every trainer sends it, so even a median or a trimmed mean keeps it.
                payload = _int_max_delta(tiny_schema, (1 << 63) - 1 - i)
                push(client, tiny_schema, payload, name, 10)
            wait_for_round(client, 2)
            info = client.round(TINY)
            assert (info.round, info.base_version) == (2, 0)
            with AdminClient(running.endpoints.internal) as admin:
                (status,) = admin.status().models
                assert (status.failed_round, status.latest_version) == (1, 0)
                assert "range of int64" in status.failed_reason
            for i, (name, _) in enumerate(TRAINERS):
                push(client, tiny_schema, random_delta(tiny_schema, 50 + i), name, 10, 2, 0)
            wait_for_round(client, 3)
            pulled = client.pull_global(TINY)
            assert pulled.version == 1
            for spec in tiny_schema.tensors:
                if not spec.is_float:
                    values = tiny_schema.views(pulled.data)[spec.name]
                    assert (np.asarray(values) >= 0).all() and (np.asarray(values) < 100).all()
        assert running.gateway.store.get_round(TINY, 1).state == "failed"  # type: ignore[union-attr]
        assert residue(running) == []
    finally:
        running.gateway.stop()


def test_two_rounds_of_large_integer_deltas_do_not_wrap(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """Each round alone fits int64; their sum would not: the second round fails."""
    running = start_gateway(tmp_path / "gw", template_cache, quorum=3, min_trainers=4)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for round_no in (1, 2):
                for i, (name, _) in enumerate(TRAINERS):
                    payload = _int_max_delta(tiny_schema, 5 << 60)
                    push(client, tiny_schema, payload, name, 10 + i, round_no, round_no - 1)
                wait_for_round(client, round_no + 1)
            assert client.round(TINY).base_version == 1
            pulled = client.pull_global(TINY)
            for spec in tiny_schema.tensors:
                if not spec.is_float:
                    assert (np.asarray(tiny_schema.views(pulled.data)[spec.name]) == 5 << 60).all()
        assert running.gateway.store.get_round(TINY, 2).state == "failed"  # type: ignore[union-attr]
    finally:
        running.gateway.stop()


# The data-dir lock.


def test_a_deleted_lock_file_does_not_let_a_second_gateway_in(
    tmp_path: Path, template_cache: Path
) -> None:
    """Before: the lock was only a flock on sluice.lock; an operator removing the
    'stale' pid file under a live gateway let a second one start on the same data dir."""
    first = start_gateway(tmp_path / "gw", template_cache)
    try:
        (first.data_dir / LOCK_FILE).unlink()
        with pytest.raises(StartupError, match="in use by another gateway"):
            Gateway(first.config)
        with TrainerClient(first.endpoints.internal, retry=RetryPolicy(attempts=1)) as client:
            assert client.round(TINY).round == 1
    finally:
        first.gateway.stop()
    second = start_gateway(tmp_path / "gw", template_cache)  # released with the first
    second.gateway.stop()


def test_a_lock_file_that_is_a_link_is_refused_not_written_through(
    tmp_path: Path, template_cache: Path
) -> None:
    """Before: a symlinked sluice.lock was opened, truncated and overwritten with the pid:
    whoever could write the data dir could have the gateway truncate any file it can."""
    victim = tmp_path / "precious"
    victim.write_text("keep me\n")
    (tmp_path / "gw").mkdir()
    (tmp_path / "gw" / LOCK_FILE).symlink_to(victim)
    with pytest.raises(StartupError, match="must be a regular file"):
        start_gateway(tmp_path / "gw", template_cache)
    assert victim.read_text() == "keep me\n"
    (tmp_path / "gw" / LOCK_FILE).unlink()
    start_gateway(tmp_path / "gw", template_cache).gateway.stop()  # the lock was given back


def test_nothing_is_left_by_the_refused_pushes(mtls: Running, tiny_schema: Schema) -> None:
    """The module's refusals stored nothing: no update rows, no spool or temp files."""
    blobs, rows = stored_state(mtls)
    assert rows == 0
    assert not list((mtls.data_dir / "blobs" / "tmp").iterdir())
    assert len(blobs) == 1  # version 0's weights only


# A header too large to be worth parsing is refused from its length alone.


def test_a_huge_metrics_map_is_refused_before_it_is_parsed(
    gateway: Running, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a 3.9 MB header of 200,000 metrics was parsed (about 1 s of CPU holding the
    GIL, per message, 4 at once per principal) before its size was checked."""
    from sluice.gateway import listeners
    from sluice.gateway.services import auth

    parsed: list[int] = []
    real = listeners.parse_request

    def spy(data: bytes, decode: Any, *rest: Any) -> Any:
        def counting(raw: bytes) -> Any:
            parsed.append(len(raw))
            return decode(raw)

        return real(data, counting if decode is not None else None, *rest)

    monkeypatch.setattr(auth, "parse_request", spy)
    payload = random_delta(tiny_schema, seed=3)
    metrics = {f"m{i}": float(i) for i in range(200_000)}
    header = update_header(tiny_schema, payload, metrics=metrics)
    before = stored_state(gateway)
    started = time.monotonic()
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        stub = trainer_pb2_grpc.TrainerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.PushUpdate(_requests(header, payload), timeout=10)
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    assert "update header is" in (err.value.details() or "")
    assert time.monotonic() - started < 5
    assert not [n for n in parsed if n > 1 << 20], "the huge header was parsed"
    assert stored_state(gateway) == before


def test_the_push_precheck_reads_tags_only() -> None:
    payload = b"x" * 100
    header = trainer_pb2.UpdateHeader(update_id="u", metrics={"a": 1.0})
    for message in (
        Request(header=header),
        Request(chunk=tensors_pb2.Chunk(offset=7, data=payload)),
        Request(trailer=trainer_pb2.UpdateTrailer(num_chunks=3)),
        Request(),
    ):
        push_header_bytes(message.SerializeToString(), 16 << 10)  # nothing to refuse
    big = Request(header=trainer_pb2.UpdateHeader(update_id="u" * (20 << 10)))
    with pytest.raises(TooLarge):
        push_header_bytes(big.SerializeToString(), 16 << 10)
    # Header fields repeated (protobuf merges them): their lengths add up.
    piece = Request(header=trainer_pb2.UpdateHeader(update_id="u" * 5000)).SerializeToString()
    with pytest.raises(TooLarge):
        push_header_bytes(piece * 4, 16 << 10)
    # A million tiny fields would take seconds to scan: more than a few are refused.
    with pytest.raises(InvalidInput, match="more than"):
        push_header_bytes(b"\x18\x01" * 1_000_000, 16 << 10)
    with pytest.raises(InvalidInput, match="truncated"):
        push_header_bytes(b"\x0a\xff", 16 << 10)


@pytest.mark.parametrize(
    ("dtype", "base", "mean", "expected"),
    [
        ("<i8", 5, -3.0, 2),
        ("<i8", (1 << 62), float(1 << 62), None),  # 2**63: wraps
        ("<i8", 0, float(1 << 63), None),  # the cast alone would give -2**63
        ("<i8", -(1 << 62), -float(1 << 62), -(1 << 63)),  # exactly the minimum
        ("<i4", (1 << 31) - 2, 1.0, (1 << 31) - 1),
        ("<i4", (1 << 31) - 2, 2.0, None),
        ("|i1", 100, 27.0, 127),
        ("|i1", 100, 28.0, None),
        ("|u1", 250, 5.0, 255),
        ("|u1", 250, 6.0, None),
        ("|u1", 0, -1.0, None),
    ],
)
def test_integer_means_never_wrap(dtype: str, base: int, mean: float, expected: int | None) -> None:
    out = np.full(3, base, dtype=dtype)
    means = np.full(3, mean)
    if expected is None:
        with pytest.raises(OverflowError):
            add_integer_mean(out, means)
    else:
        add_integer_mean(out, means)
        assert out.tolist() == [expected] * 3
