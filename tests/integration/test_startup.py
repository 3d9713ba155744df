"""Starting the gateway: one gateway per data dir, one CA per data dir, keys never silently
remade, and a start on a full disk that serves what is stored."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.clients.sdk import RetryPolicy, TrainerClient
from sluice.gateway.config import Config
from sluice.gateway.pki import init_pki
from sluice.gateway.server import (
    CA_FILE,
    ENDPOINTS_FILE,
    LOCK_FILE,
    RESERVE_FILE,
    Gateway,
    StartupError,
)
from tests.conftest import TINY, Running, start_gateway

NO_RETRY = RetryPolicy(attempts=1)


def serves(running: Running) -> bool:
    with TrainerClient(running.endpoints.internal, retry=NO_RETRY, timeout_s=10) as client:
        return client.round(TINY).round >= 1 and len(client.pull_global(TINY).data) > 0


# 15. One gateway per data dir.


def test_a_second_gateway_on_a_data_dir_fails_at_once_naming_the_holder(
    tmp_path: Path, template_cache: Path
) -> None:
    first = start_gateway(tmp_path / "gw", template_cache)
    try:
        with pytest.raises(StartupError, match=rf"in use by another gateway \(pid {os.getpid()}\)"):
            Gateway(first.config)
        assert (first.data_dir / ENDPOINTS_FILE).exists()  # the first one's, untouched
        assert serves(first)
    finally:
        first.gateway.stop()
    second = start_gateway(tmp_path / "gw", template_cache)  # the lock went with the first
    try:
        assert serves(second)
    finally:
        second.gateway.stop()


def test_sluice_serve_on_a_held_data_dir_exits_with_the_reason(
    tmp_path: Path, template_cache: Path
) -> None:
    first = start_gateway(tmp_path / "gw", template_cache)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "sluice.gateway.cli", "serve", "--data-dir", str(first.data_dir),
             "--models", TINY, "--insecure-loopback"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert f"in use by another gateway (pid {os.getpid()})" in run.stderr
        assert "Traceback" not in run.stderr
        assert (first.data_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert serves(first)
    finally:
        first.gateway.stop()


# 15. One CA per data dir, unless told.


def test_another_ca_is_refused_unless_accepted(tmp_path: Path, template_cache: Path) -> None:
    first = init_pki(tmp_path / "pki-a", trainers=[("shanghai-01", "shanghai")])
    other = init_pki(tmp_path / "pki-b", trainers=[("shanghai-01", "shanghai")])
    data = tmp_path / "gw"
    mtls = {"insecure_loopback": False}
    start_gateway(data, template_cache, pki_dir=first.directory, **mtls).gateway.stop()
    recorded = (data / CA_FILE).read_text()
    start_gateway(data, template_cache, pki_dir=first.directory, **mtls).gateway.stop()  # same CA
    with pytest.raises(StartupError, match="not the one this data dir was first served with"):
        start_gateway(data, template_cache, pki_dir=other.directory, **mtls)
    assert (data / CA_FILE).read_text() == recorded
    running = start_gateway(
        data, template_cache, pki_dir=other.directory, accept_new_ca=True, **mtls
    )
    try:
        (changed,) = running.gateway.store.audit_entries("gateway.ca_changed")
        assert changed.detail["previous"] == recorded.strip()
        assert (data / CA_FILE).read_text() != recorded
    finally:
        running.gateway.stop()


# 16. The release-signing key is never silently remade.


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("empty", "is empty: a first start was interrupted"),
        ("corrupt", "restore it from a backup"),
        ("missing", "is missing but release-signing.pub is there"),
    ],
)
def test_an_unusable_signing_key_stops_the_start_and_says_what_to_do(
    tmp_path: Path, template_cache: Path, damage: str, message: str
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache)
    running.gateway.stop()
    key = running.data_dir / "keys" / "release-signing.key"
    if damage == "empty":
        key.write_bytes(b"")
    elif damage == "corrupt":
        key.write_bytes(key.read_bytes()[:40])
    else:
        key.unlink()
    before = sorted(p.name for p in key.parent.iterdir())
    with pytest.raises(StartupError, match=message):
        Gateway(running.config)
    assert sorted(p.name for p in key.parent.iterdir()) == before  # nothing made or replaced
    if damage == "empty":  # the message's advice works: remove it, start again
        key.unlink()
        (key.parent / "release-signing.pub").unlink(missing_ok=True)
        again = start_gateway(running.data_dir, template_cache)
        again.gateway.stop()
        assert key.stat().st_size > 0


# 10 (start-up). A full disk: serve what is stored, warn about what cannot be written.


def test_a_start_that_cannot_write_serves_anyway(
    tmp_path: Path, template_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_gateway(tmp_path / "gw", template_cache).gateway.stop()
    real = Path.write_text
    full = OSError(errno.ENOSPC, "No space left on device")

    def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.parent == tmp_path / "gw":
            raise full
        return real(self, *args, **kwargs)

    def record(*args: Any, **kwargs: Any) -> Any:
        raise full

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr("sluice.gateway.store.sqlite.Store.record", record)
    running = start_gateway(tmp_path / "gw", template_cache)
    try:
        assert not (running.data_dir / ENDPOINTS_FILE).exists()
        assert not list(running.data_dir.glob("*.tmp"))
        assert serves(running)
    finally:
        running.gateway.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs (root only: skipped where it cannot be mounted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> None:
    with (directory / "filler").open("wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def test_a_start_on_a_really_full_disk_serves_what_is_stored(
    small_disk: Path, template_cache: Path
) -> None:
    data = small_disk / "gw"
    start_gateway(data, template_cache).gateway.stop()
    assert (data / RESERVE_FILE).exists()
    fill(small_disk)
    running = start_gateway(data, template_cache)
    try:
        assert serves(running)
        with grpc.insecure_channel(running.endpoints.egress) as ch:
            stub: Any = health_pb2_grpc.HealthStub(ch)
            got = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert got.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.gateway.stop()
    (small_disk / "filler").unlink()
    start_gateway(data, template_cache).gateway.stop()  # room again: the reserve is held again
    assert (data / RESERVE_FILE).exists()


def test_config_defaults_leave_room_for_a_third_principal() -> None:
    c = Config()
    assert c.workers - c.reserved_workers >= 3 * c.max_streams_per_principal
    assert c.max_streams_per_principal < c.workers / 3


def test_a_second_stop_does_nothing(tmp_path: Path, template_cache: Path) -> None:
    """stop() twice (a signal handler and a finally, say): the second returns at once and
    the data dir is left to the next start, served as before."""
    running = start_gateway(tmp_path / "gw", template_cache)
    running.gateway.stop()
    running.gateway.stop()
    running.restart()
    try:
        with grpc.insecure_channel(running.endpoints.internal) as ch:
            stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.gateway.stop()


def test_a_stop_whose_step_fails_still_ends_everything_and_says_why(
    tmp_path: Path, template_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One step of stop() raising (the rounds worker here) does not leave the listeners
    serving or the data dir locked: every later step runs, then the error is raised."""
    running = start_gateway(tmp_path / "gw", template_cache)

    def broken() -> None:
        raise RuntimeError("the rounds worker would not stop")

    monkeypatch.setattr(running.gateway.rounds, "stop", broken)
    with pytest.raises(RuntimeError, match="would not stop"):
        running.gateway.stop()
    with grpc.insecure_channel(running.endpoints.internal) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    monkeypatch.undo()
    running.gateway.rounds.stop()  # the worker the broken step left
    running.restart()  # the data dir lock was given back
    running.gateway.stop()
