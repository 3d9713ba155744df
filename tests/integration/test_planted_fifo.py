"""An insider with write access to the data dir plants a FIFO where the gateway reads a
file. Opening it would wait for a writer, holding the reader (a pull's thread, a close
with the close lock) for good. Every such reader refuses it at once, and the gateway goes
on serving."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from sluice.clients.sdk import EgressClient, RetryPolicy, TrainerClient
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta
from tests.integration.test_egress_insider import release_dir
from tests.integration.test_round import _publish_one
from tests.unit.test_races import make_gateway, push

ONCE = RetryPolicy(attempts=1)


def plant(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def ends_within(seconds: float, work: Callable[[], object]) -> list[BaseException]:
    """Run work on a daemon thread; assert it ended in time; what it raised, if anything."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "a reader waited on the planted FIFO"
    return raised


def test_a_fifo_at_the_version_a_trainer_pulls_is_refused_at_once(gateway: Running) -> None:
    v0 = gateway.gateway.store.latest_version(TINY)
    assert v0 is not None
    plant(gateway.gateway.blobs.path(v0.weights_sha256))

    def pull() -> None:
        with TrainerClient(gateway.endpoints.internal, retry=ONCE, timeout_s=20) as client:
            client.pull_global(TINY)

    started = time.monotonic()
    raised = ends_within(30, pull)
    assert len(raised) == 1 and isinstance(raised[0], grpc.RpcError), raised
    assert raised[0].code() == grpc.StatusCode.DATA_LOSS, raised  # answered, not waited out
    assert "not a regular file" in (raised[0].details() or "")
    assert time.monotonic() - started < 15


def test_a_fifo_at_a_release_file_is_withheld_at_once(
    gateway: Running, tiny_schema: Schema, tmp_path: Path
) -> None:
    _publish_one(gateway, tiny_schema)
    plant(release_dir(gateway) / "model.onnx")

    def pull() -> None:
        with EgressClient(gateway.endpoints.egress, retry=ONCE, timeout_s=20) as egress:
            egress.pull(TINY, tmp_path / "model.onnx")

    raised = ends_within(30, pull)
    assert len(raised) == 1 and isinstance(raised[0], grpc.RpcError), raised
    assert raised[0].code() == grpc.StatusCode.DATA_LOSS, raised  # withheld, at once
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("where", ["base", "update"])
def test_a_fifo_where_a_close_reads_does_not_hold_the_close_lock(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, where: str
) -> None:
    gw = make_gateway(tmp_path, template_cache)
    payload = random_delta(tiny_schema, 1)
    push(gw, tiny_schema, payload, "shanghai-01")
    push(gw, tiny_schema, random_delta(tiny_schema, 2), "beijing-01")
    base = gw.store.latest_version(TINY)
    assert base is not None
    sha = base.weights_sha256 if where == "base" else hashlib.sha256(payload).hexdigest()
    plant(gw.blobs.path(sha))
    ends_within(60, lambda: gw.rounds.close(TINY, 1))  # refused or failed: not waiting
    assert gw.rounds.close_lock.acquire(timeout=5)
    gw.rounds.close_lock.release()


def test_a_fifo_swapped_in_for_the_version_as_its_release_is_built_fails_that_try_only(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """Between the version's placing and its release: the release is not built from it,
    the close fails at once, and the next try places the version again over the FIFO."""
    gw = make_gateway(tmp_path, template_cache)
    push(gw, tiny_schema, random_delta(tiny_schema, 1), "shanghai-01")
    real = gw.rounds.publisher.publish
    tries: list[Path] = []

    def swapped(served: Any, version: Any, path: Path, *args: Any, **kwargs: Any) -> Any:
        if not tries:
            plant(path)
        tries.append(path)
        return real(served, version, path, *args, **kwargs)

    gw.rounds.publisher.publish = swapped  # type: ignore[method-assign,assignment]
    raised = ends_within(60, lambda: gw.rounds.close(TINY, 1))
    assert raised, "a release was built from a FIFO"
    gw.rounds.close(TINY, 1)  # the next try
    v1 = gw.store.latest_version(TINY)
    assert v1 is not None and v1.version == 1 and len(tries) == 2
    kept = gw.blobs.path(v1.weights_sha256)
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == v1.weights_sha256
