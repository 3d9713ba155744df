"""Months of rounds on a real gateway: retention after each close, `sluice gc`, and a live
backup restored into a gateway that serves the same signed releases."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.gateway.cli import main
from sluice.gateway.store import backup as backups
from sluice.gateway.store.blobs import BlobStore
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta, start_gateway
from tests.integration.test_round import push, wait_for_round

TRAINERS = ("shanghai-01", "beijing-01", "shenzhen-01")


def stopped_after_one_round(tmp_path: Path, template_cache: Path, tiny_schema: Schema) -> Running:
    """A gateway that closed and released round 1, stopped: its data dir is at rest."""
    running = start_gateway(tmp_path / "gw", template_cache)
    try:
        one_round(running, tiny_schema, 1, seed=1)
    finally:
        running.gateway.stop()
    return running


def one_round(running: Running, schema: Schema, round_no: int, seed: int) -> None:
    """Three trainers push (those that have not yet); the quorum closes the round."""
    done = {u.trainer for u in running.gateway.store.round_updates(TINY, round_no)}
    with TrainerClient(running.endpoints.internal) as client:
        base = client.round(TINY).base_version
        for i, trainer in enumerate(TRAINERS):
            if trainer in done:
                continue  # a restored backup can hold part of a round
            payload = random_delta(schema, seed=seed * 10 + i)
            push(client, schema, payload, trainer, 50 + i, round_no=round_no, base=base)
        wait_for_round(client, round_no + 1)


def blob_names(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").glob("??/*")}


def settled(running: Running, expected: set[str]) -> None:
    """The blob files become `expected` (the close's retention runs just after the next
    round opens), which is exactly what the rows still need."""
    deadline = time.monotonic() + 30
    while (found := blob_names(running.data_dir)) != expected:
        assert time.monotonic() < deadline, f"left {found - expected}, missing {expected - found}"
        time.sleep(0.05)
    assert expected == running.gateway.store.referenced_blobs()


def pulled(running: Running, dest: Path) -> dict[int, dict[str, str]]:
    """Every listed release pulled and verified: version -> file name -> sha256."""
    out: dict[int, dict[str, str]] = {}
    with EgressClient(running.endpoints.egress) as egress:
        for release in egress.releases(TINY):
            where = dest / str(release.version)
            egress.pull_release(
                TINY, where, running.gateway.signer.public_key, version=release.version
            )
            out[release.version] = {
                p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in where.iterdir()
            }
    return out


def test_retention_bounds_the_disk_and_keeps_releases_and_the_open_base(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, keep_rounds=1, keep_versions=2)
    try:
        sizes = []
        for round_no in range(1, 5):
            one_round(running, tiny_schema, round_no, seed=round_no)
            store = running.gateway.store
            # The last ended round's three updates, the two newest versions: nothing else.
            kept = {u.payload_sha256 for u in store.round_updates(TINY, round_no)}
            newest = {v.weights_sha256 for v in store.versions(TINY)[:2]}
            settled(running, kept | newest)
            sizes.append(sum(p.stat().st_size for p in (running.data_dir / "blobs").glob("??/*")))
        assert sizes[-1] == sizes[1]  # flat once retention has something to remove

        # Old weights are gone, said plainly; the current ones still come.
        with TrainerClient(running.endpoints.internal) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.pull_global(TINY, version=1)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "removed by retention" in str(err.value.details())
            assert client.pull_global(TINY).version == 4
        # Every release of every round is still listed, pulled and verified.
        releases = pulled(running, tmp_path / "pulls")
        assert sorted(releases) == [1, 2, 3, 4]
        # Each removal audited, the chain intact, the report's rows kept.
        subjects = [e.subject for e in running.gateway.store.audit_entries("retention.deleted")]
        assert subjects == [
            f"{TINY}/round/1",
            f"{TINY}/version/0",
            f"{TINY}/round/2",
            f"{TINY}/version/1",
            f"{TINY}/round/3",
            f"{TINY}/version/2",
        ]
        assert running.gateway.store.verify_audit()[1] is None
        assert len(running.gateway.store.round_updates(TINY, 1)) == 3
        before = blob_names(running.data_dir)
        running.restart()  # a restart finds nothing to drop and keeps serving
        assert blob_names(running.data_dir) == before
        one_round(running, tiny_schema, 5, seed=5)
    finally:
        running.gateway.stop()


def test_gc_by_hand_dry_run_first_and_never_under_a_running_gateway(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache)
    data = ["--data-dir", str(running.data_dir)]
    try:
        for round_no in range(1, 4):
            one_round(running, tiny_schema, round_no, seed=round_no)
        capsys.readouterr()
        assert main(["gc", *data, "--keep-rounds", "1"]) == 5  # the gateway holds the dir
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another gateway" in err[0]
        assert "Traceback" not in err[0]
    finally:
        running.gateway.stop()
    before = blob_names(running.data_dir)
    assert main(["gc", *data, "--keep-rounds", "1", "--keep-versions", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove drivenet-tiny: round 1's 3 spooled updates" in out
    assert "would remove drivenet-tiny: version 2's weights" in out
    assert blob_names(running.data_dir) == before  # a dry run deletes nothing
    assert main(["gc", *data, "--keep-rounds", "1", "--keep-versions", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["what"], r["number"]) for r in doc["removed"]] == [
        ("round", 1),
        ("round", 2),
        ("version", 0),
        ("version", 1),
        ("version", 2),
    ]
    assert doc["bytes"] == sum(r["bytes"] for r in doc["removed"]) > 0
    after = blob_names(running.data_dir)
    assert after < before and len(before - after) == 6 + 3  # 6 updates, 3 versions
    # The gateway starts on what gc left, and its releases still leave intact.
    again = start_gateway(running.data_dir, template_cache)
    try:
        assert sorted(pulled(again, tmp_path / "pulls")) == [1, 2, 3]
        one_round(again, tiny_schema, 4, seed=4)
    finally:
        again.gateway.stop()


def test_a_live_backup_restores_to_a_gateway_serving_the_same_signed_releases(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, keep_rounds=2)
    dest = tmp_path / "backup"
    try:
        for round_no in (1, 2):
            one_round(running, tiny_schema, round_no, seed=round_no)
        original = pulled(running, tmp_path / "before")
        # Round 3 is pushed while the backup runs: the backup is one consistent state.
        pushing = threading.Thread(target=one_round, args=(running, tiny_schema, 3, 3))
        pushing.start()
        assert main(["backup", str(dest), "--data-dir", str(running.data_dir)]) == 0
        pushing.join()
        out = capsys.readouterr().out
        assert out.startswith(f"{dest}: ") and "restore with `sluice restore" in out
        backed_up = backups.check(dest)
        assert [v for _, v in backed_up.releases][:2] == [1, 2]
        assert running.gateway.store.last_audit_entry("backup.created", str(dest.resolve()))
        # A backup refuses to overwrite anything.
        assert main(["backup", str(dest), "--data-dir", str(running.data_dir)]) == 1
        assert "not an empty directory" in capsys.readouterr().err
    finally:
        running.gateway.stop()

    restored = tmp_path / "restored"
    assert main(["restore", str(dest), "--data-dir", str(restored)]) == 0
    assert "restored" in capsys.readouterr().out
    again = start_gateway(restored, template_cache)
    try:
        # The same releases, byte for byte, signed by the same key.
        assert again.gateway.signer.key_id == running.gateway.signer.key_id
        now = pulled(again, tmp_path / "after")
        assert {v: now[v] for v in original} == original
        assert again.gateway.store.verify_audit()[1] is None
        # And it goes on: the next round closes and releases.
        with TrainerClient(again.endpoints.internal) as client:
            next_round = client.round(TINY).round
        one_round(again, tiny_schema, next_round, seed=9)
        assert max(pulled(again, tmp_path / "next")) == next_round
    finally:
        again.gateway.stop()


def test_a_damaged_backup_is_refused_and_nothing_is_placed(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = stopped_after_one_round(tmp_path, template_cache, tiny_schema)
    dest = tmp_path / "backup"
    assert main(["backup", str(dest), "--data-dir", str(running.data_dir), "--copy"]) == 0
    assert main(["restore", str(dest), "--check-only"]) == 0
    capsys.readouterr()
    release_file = next((dest / "registry" / TINY / "1").glob("*.onnx"))
    data = bytearray(release_file.read_bytes())
    data[-1] ^= 1
    release_file.write_bytes(bytes(data))  # a copy: the data dir's own file is untouched
    target = tmp_path / "restored"
    assert main(["restore", str(dest), "--data-dir", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256 is not the release's" in err[0]
    assert not target.exists()
    assert not list(tmp_path.glob(".restored.partial-*"))


def test_a_version_committed_between_the_file_pass_and_the_snapshot_keeps_its_dp_ledger(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A close renames state/<model>/<version> into place, then commits the version: when
    both land between the backup's walk and its snapshot, the snapshot keeps a version
    whose state (here the DP ledger) the walk never saw. Restored without it, epsilon
    would count from zero and a release the budget refuses would leave."""
    dp = {"dp_noise_multiplier": 1.0, "dp_clipping_norm": 1e-4, "dp_max_epsilon": 8.0}
    running = start_gateway(tmp_path / "gw", template_cache, **dp)
    dest = tmp_path / "backup"
    snapshot = backups._snapshot

    def close_then_snapshot(source: Path, target: Path) -> None:
        one_round(running, tiny_schema, 2, seed=2)  # version 2 and its state commit now
        snapshot(source, target)

    try:
        one_round(running, tiny_schema, 1, seed=1)
        monkeypatch.setattr(backups, "_snapshot", close_then_snapshot)
        summary = backups.backup(running.data_dir, dest)
        monkeypatch.undo()
        live = running.data_dir / "state" / TINY / "2"
        files = {p.name: p.read_bytes() for p in live.iterdir()}
        assert (
            files
            and {
                p.name: p.read_bytes()
                for p in (dest / live.relative_to(running.data_dir)).iterdir()
            }
            == files
        )
        assert summary.state_dirs[f"state/{TINY}/2"] == {n: len(b) for n, b in files.items()}
        one_round(running, tiny_schema, 3, seed=3)  # the third round spends past epsilon 8
        assert running.gateway.store.get_release(TINY, 3) is None
    finally:
        running.gateway.stop()

    backups.restore(dest, tmp_path / "restored")
    again = start_gateway(tmp_path / "restored", template_cache, **dp)
    try:
        one_round(again, tiny_schema, 3, seed=3)
        closed = again.gateway.store.audit_entries("round.closed")[-1]
        assert closed.detail["dp"]["rounds"] == 3  # type: ignore[index]
        assert again.gateway.store.get_release(TINY, 3) is None  # the budget still holds
    finally:
        again.gateway.stop()

    # The restored gateway wrote nothing into the backup (no -wal linked from it).
    assert backups.check(dest).audit_entries == summary.audit_entries
    assert sorted(p.name for p in dest.glob("sluice.db*")) == ["sluice.db"]
    # A backup missing a recorded state file is refused, whatever the database says.
    next((dest / "state" / TINY / "2").iterdir()).unlink()
    with pytest.raises(backups.BackupError, match="missing or not"):
        backups.check(dest)


def test_a_backup_or_restore_inside_a_data_dir_is_refused_as_usage(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A gateway's start and `sluice gc` delete what they do not know in their data dir:
    a backup there would be eaten (and its directories would stop the start)."""
    running = stopped_after_one_round(tmp_path, template_cache, tiny_schema)
    data = running.data_dir
    capsys.readouterr()
    for dest in (data / "blobs" / "bk", data / "backups" / "bk", data, tmp_path):
        assert main(["backup", str(dest), "--data-dir", str(data)]) == 2, dest
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "outside" in err[0] and "Traceback" not in err[0]
    assert not (data / "blobs" / "bk").exists() and not (data / "backups").exists()
    assert not list(data.rglob(".*.partial-*"))

    good = tmp_path / "backup"
    assert main(["backup", str(good), "--data-dir", str(data)]) == 0
    for target in (good / "restored", data / "restored", good):
        assert main(["restore", str(good), "--data-dir", str(target)]) == 2, target
        assert "outside" in capsys.readouterr().err
    assert not (good / "restored").exists() and not (data / "restored").exists()
    assert backups.check(good).releases == [[TINY, 1]]


def test_gc_audits_the_pushes_a_crash_cut_off_before_dropping_their_files(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = stopped_after_one_round(tmp_path, template_cache, tiny_schema)
    data = running.data_dir
    blobs = BlobStore(data / "blobs")
    with blobs.temp(f"shanghai-01+{TINY}+2+cut-off.1") as tmp:
        tmp.write(b"x" * 1000)
        tmp.finish()
        kept, name = tmp.path.read_bytes(), tmp.path.name
    (blobs.tmp / name).write_bytes(kept)  # what a kill -9 mid-push leaves
    # And a directory someone put under blobs/: not the store's, so it stays.
    (data / "blobs" / "by-hand" / "blobs").mkdir(parents=True)
    (data / "blobs" / "by-hand" / "sluice.db").write_bytes(b"not ours")
    (data / "blobs" / "ab" / "copy").mkdir(parents=True)

    assert main(["gc", "--data-dir", str(data), "--keep-rounds", "1"]) == 0
    assert list(blobs.tmp.iterdir()) == []
    assert (data / "blobs" / "by-hand" / "sluice.db").read_bytes() == b"not ours"
    assert (data / "blobs" / "ab" / "copy").is_dir()
    again = start_gateway(data, template_cache)  # nothing left to audit twice
    try:
        (entry,) = again.gateway.store.audit_entries("push.interrupted")
        assert (entry.actor, entry.subject) == ("shanghai-01", f"{TINY}/round/2")
        assert entry.detail["update_id"] == "cut-off.1"
        assert "after receiving 1000 bytes" in str(entry.detail["reason"])
        assert again.gateway.store.verify_audit()[1] is None
        one_round(again, tiny_schema, 2, seed=2)
    finally:
        again.gateway.stop()
