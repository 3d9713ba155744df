"""A full disk, for real: the gateway's data directory on a small tmpfs filled to 0 bytes.
Pushes and closes answer UNAVAILABLE (the SDK retries it), leave nothing behind, and work
again once there is room. Needs root to mount the tmpfs; skipped otherwise (the same paths
are covered by monkeypatched unit tests in tests/unit/test_spool_integrity.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.clients.sdk import AdminClient, RetryPolicy, TrainerClient
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta, start_gateway, stored_state
from tests.integration.test_wedge import residue

Code = grpc.StatusCode
NO_RETRY = RetryPolicy(attempts=1)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def on_small_disk(small_disk: Path, template_cache: Path) -> Iterator[Running]:
    running = start_gateway(small_disk / "gw", template_cache, quorum=10, min_trainers=1)
    try:
        yield running
    finally:
        running.gateway.stop()


@contextlib.contextmanager
def full(disk: Path) -> Iterator[None]:
    """The disk at 0 bytes free inside; room again after."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(bytes(size))
    try:
        yield
    finally:
        filler.unlink()


def push(running: Running, schema: Schema, trainer: str, seed: int, **kw: object) -> None:
    with TrainerClient(running.endpoints.internal, **kw) as client:  # type: ignore[arg-type]
        client.push_update(
            model=TINY, round_no=1, base_version=0, schema_hash=schema.hash, trainer=trainer,
            region=trainer.split("-")[0], num_examples=10, payload=random_delta(schema, seed),
        )  # fmt: skip


def serving(running: Running) -> bool:
    with grpc.insecure_channel(running.endpoints.internal) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_a_push_on_a_full_disk_is_unavailable_then_works(
    on_small_disk: Running, small_disk: Path, tiny_schema: Schema
) -> None:
    before = stored_state(on_small_disk)
    with full(small_disk):
        with pytest.raises(grpc.RpcError) as err:
            push(on_small_disk, tiny_schema, "shanghai-01", 1, retry=NO_RETRY)
        assert err.value.code() == Code.UNAVAILABLE  # the SDK retries it
        assert "no space left on device" in (err.value.details() or "")
        assert stored_state(on_small_disk) == before and residue(on_small_disk) == []
        assert serving(on_small_disk)
    push(on_small_disk, tiny_schema, "shanghai-01", 1)
    assert on_small_disk.gateway.store.get_round(TINY, 1).accepted == 1  # type: ignore[union-attr]
    # Audited once there was room again (the disk refused the entry at the time).
    (entry,) = on_small_disk.gateway.store.audit_entries("push.interrupted")
    assert entry.detail["reason"] == "no space left on device" and entry.detail["deferred_from_ms"]


def test_a_close_on_a_full_disk_is_unavailable_leaves_nothing_then_works(
    on_small_disk: Running, small_disk: Path, tiny_schema: Schema
) -> None:
    for i, trainer in enumerate(["shanghai-01", "beijing-01"]):
        push(on_small_disk, tiny_schema, trainer, i)
    with AdminClient(on_small_disk.endpoints.internal) as admin:
        with full(small_disk):
            with pytest.raises(grpc.RpcError) as err:
                admin.close_round(TINY, 1)
            assert err.value.code() == Code.UNAVAILABLE
            assert "could not be closed: no space left on device" in (err.value.details() or "")
            assert residue(on_small_disk) == []
            (status,) = admin.status().models
            assert status.close_error.startswith("no space left on device")
            assert serving(on_small_disk)
        closed = admin.close_round(TINY, 1)  # the operator's retry, or the worker's
        assert (closed.version, closed.released) == (1, True)
        (status,) = admin.status().models
        assert (status.open_round, status.close_error) == (2, "")
    assert residue(on_small_disk) == []
