"""`sluice simulate --backend ray`: 32 virtual trainers on a 2-CPU Ray, and a trainer whose
actor dies after its push is retried with the same update id and counted once."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psutil  # type: ignore[import-untyped]  # psutil ships no type hints
import pytest

from sluice.clients.ray_backend import EXIT_AFTER_PUSH_ENV
from sluice.clients.sdk import EgressClient, TrainerClient, default_update_id
from sluice.gateway.cli import main
from sluice.gateway.core.records import RoundState
from tests.conftest import TINY, Running, start_gateway

# Ray's single-machine mode: every Ray server on 127.0.0.1 (read when ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray  # the `ray` extra: make install has it, and a missing one is a failure

SIMULATE = [sys.executable, "-m", "sluice.gateway.cli", "simulate"]
SMALL = ["--model", TINY, "--clips", "64", "--epochs", "1", "--rounds", "2"]
ROUND_LINE = re.compile(r"^round (\d) (\S+) \(\w+\) +held-out loss .* pushed [\d.]+ MB in ")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray with 2 CPUs, started by this process; the simulations connect to it
    (--ray-address) as to any cluster, so the file starts Ray once."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for attempt in (1, 2, 3):
        try:
            context = ray.init(
                num_cpus=2,
                include_dashboard=False,
                object_store_memory=100 * 2**20,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            break
        except Exception:
            # Ray gives its raylet a fixed 30 s to register: a 2-core machine busy with
            # other work can miss it (twice in a row, in a rehearsal with three workers on
            # two cores). Its processes are stopped, then it starts again;
            # the failed start's process handles go now, not as ResourceWarnings that fail
            # whichever test's setup the garbage collector happens to run in.
            ray.shutdown()
            for child in psutil.Process().children(recursive=True):  # what it left running
                with contextlib.suppress(psutil.Error):  # gone meanwhile: nothing to kill
                    if any(part in child.name() for part in ("ray", "gcs", "plasma")):
                        child.kill()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
            if attempt == 3:
                raise
    yield str(cast(Any, context).address_info["gcs_address"])  # a RayContext
    ray.shutdown()


def run_simulate(running: Running, address: str, *args: str, **env: str) -> tuple[str, str]:
    target = ["--target", running.endpoints.internal, "--insecure"]
    done = subprocess.run(
        [*SIMULATE, *target, *SMALL, "--backend", "ray", "--ray-address", address, *args],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    assert not any(w in done.stdout + done.stderr for w in ("Traceback", "(raylet)", "INFO"))
    return done.stdout, done.stderr


def updates(running: Running) -> list[tuple[int, str, str]]:
    rows = running.gateway.store._all("SELECT round, trainer, update_id FROM updates")
    return [(int(r["round"]), str(r["trainer"]), str(r["update_id"])) for r in rows]


def assert_rounds_closed_once_per_trainer(running: Running, trainers: int) -> None:
    with TrainerClient(running.endpoints.internal) as client:  # the last push closes round 2
        deadline = time.monotonic() + 30
        while client.round(TINY).round < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    rows = updates(running)
    assert len(rows) == len({(r, t) for r, t, _ in rows}) == 2 * trainers  # none twice
    assert Counter(r for r, _, _ in rows) == {1: trainers, 2: trainers}
    for round_no, trainer, update_id in rows:  # the SDK's id, whichever attempt pushed it
        assert update_id == default_update_id(trainer, TINY, round_no)
    for round_no in (1, 2):
        stored = running.gateway.store.get_round(TINY, round_no)
        assert stored is not None and stored.state == RoundState.CLOSED
        assert stored.version == round_no


def test_32_virtual_trainers_run_two_rounds_on_two_cpus(
    tmp_path: Path, template_cache: Path, ray_address: str
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=32, min_trainers=3)
    try:
        out, _ = run_simulate(running, ray_address, "--trainers", "32")
        assert_rounds_closed_once_per_trainer(running, 32)
        pushed = {(str(r), t) for r, t, _ in updates(running)}
        with EgressClient(running.endpoints.egress) as egress:
            assert [r.version for r in egress.releases(TINY)] == [2, 1]
    finally:
        running.gateway.stop()
    lines = out.splitlines()
    assert lines[0].startswith(f"32 trainers on Ray ({ray_address}; 1 CPU per trainer) x 2 ")
    reported = [m.groups() for m in map(ROUND_LINE.match, lines) if m]
    assert len(reported) == len(set(reported)) == 64  # a line per trainer per round
    assert set(reported) == pushed
    assert lines[-1].startswith("2 rounds x 32 trainers in ")


def test_a_trainer_whose_actor_dies_after_pushing_is_retried_and_counted_once(
    tmp_path: Path, template_cache: Path, ray_address: str
) -> None:
    # Round 2's base (version 1) can still be pulled after the round closed: the retry
    # trains the same update again and the gateway answers it as a replay.
    running = start_gateway(tmp_path / "gw", template_cache, quorum=4, min_trainers=3)
    try:
        hook = {EXIT_AFTER_PUSH_ENV: "shanghai-01:2"}
        out, _ = run_simulate(running, ray_address, "--trainers", "4", **hook)
        assert_rounds_closed_once_per_trainer(running, 4)
        running.gateway.audit.flush(everything=True)
        audit = running.gateway.store.audit_entries
        accepted = [e for e in audit("push.accepted") if e.actor == "shanghai-01"]
        assert [e.subject for e in accepted] == [f"{TINY}/round/1", f"{TINY}/round/2"]
        assert not audit("push.rejected")  # the retry's push was a replay, not a conflict
    finally:
        running.gateway.stop()
    (retried,) = [line for line in out.splitlines() if "lost its Ray actor" in line]
    assert retried.startswith("shanghai-01 (shanghai) lost its Ray actor (round 2: pushing ")
    assert retried.endswith(
        "attempt 2 of 3 in a new actor, rejoining round 2 with the same update id"
    )
    reported = [m.groups() for m in map(ROUND_LINE.match, out.splitlines()) if m]
    trainers = ("shanghai-01", "beijing-01", "shenzhen-01", "chengdu-01")
    assert sorted(reported) == sorted((str(r), t) for r in (1, 2) for t in trainers)


def test_ray_options_need_the_ray_backend_and_ray_itself(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["simulate", "--target", "127.0.0.1:9", "--insecure"]
    assert main([*base, "--ray-address", "auto", "--trainer-cpus", "0.5"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "sluice simulate: --ray-address, --trainer-cpus: only with --backend ray"
    ]
    assert main([*base, "--backend", "ray", "--trainer-cpus", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "sluice simulate: --trainer-cpus: expected more than 0, got 0"
    ]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra was not installed
    assert main([*base, "--backend", "ray"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "sluice simulate: --backend ray needs Ray: pip install 'sluicegate[ray]'"
    ]


def test_the_local_ray_listens_on_loopback_only(ray_address: str) -> None:
    """Ray takes the host's address as the node's by default and listens on every
    interface; started for one machine (here, and by `simulate` without --ray-address) it
    must not be reachable from the network."""
    assert ray_address.startswith("127.0.0.1:")
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in ours
    ]
    assert listening, "no Ray server found listening"
    loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    assert [c.laddr for c in listening if c.laddr.ip not in loopback] == []
