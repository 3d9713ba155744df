"""A backup directory is input like any other: whatever backup.json holds, `check` (and so
`restore`) says what is wrong in one BackupError, never another exception."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.gateway.store.backup import MANIFEST, BackupError, Summary, backup, check, restore
from sluice.gateway.store.blobs import BlobStore
from sluice.gateway.store.sqlite import Store


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data dir (a database with an audit entry, a blob, a key) and its backup."""
    root = tmp_path_factory.mktemp("data")
    store = Store(root / "sluice.db")
    store.record("gateway.started", "gateway", "gateway", {})
    BlobStore(root / "blobs").write([b"weights"])
    (root / "keys").mkdir(mode=0o700)
    (root / "keys" / "release-signing.key").write_bytes(b"key")
    store.close()
    dest = root.parent / "backup"
    backup(root, dest)
    return dest


def test_a_backup_checks_and_restores_with_its_modes(made: Path, tmp_path: Path) -> None:
    summary = check(made)
    # sluice.db and the key; the blob no row names (a crash's leftover) is left out, and
    # not counted as linked either (the database is a snapshot, neither).
    assert summary.audit_entries == 1 and summary.files == 2
    assert (summary.linked, summary.copied) == (1, 0)
    assert not list(made.glob("blobs/??/*"))
    restore(made, tmp_path / "restored")
    # check() read the backup; no -wal or -shm of its database went along to be written.
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["keys", "sluice.db"]
    assert (tmp_path / "restored" / "keys").stat().st_mode & 0o777 == 0o700
    db = Store(tmp_path / "restored" / "sluice.db")
    try:
        assert db.verify_audit() == (1, None)
    finally:
        db.close()
    with pytest.raises(BackupError, match="not an empty directory"):
        restore(made, tmp_path / "restored")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from([*Summary.__dataclass_fields__, "format"]), value=json_values)
def test_any_backup_json_value_is_checked_or_refused_in_words(
    made: Path, tmp_path_factory: pytest.TempPathFactory, field: str, value: object
) -> None:
    copy = tmp_path_factory.mktemp("copy") / "b"
    shutil.copytree(made, copy)
    doc = json.loads((copy / MANIFEST).read_text())
    doc[field] = value
    (copy / MANIFEST).write_text(json.dumps(doc))
    try:
        check(copy)
    except BackupError as exc:
        assert str(exc) and len(str(exc)) < 1000
    shutil.rmtree(copy.parent)


@pytest.mark.parametrize(
    "damage",
    ["not json", "[]", '{"format": 99}', "null"],
)
def test_a_backup_json_that_is_no_backup_is_refused(
    made: Path, tmp_path: Path, damage: str
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(made, copy)
    (copy / MANIFEST).write_text(damage)
    with pytest.raises(BackupError, match="backup"):
        check(copy)


def test_an_audit_log_edited_in_the_backup_is_refused(made: Path, tmp_path: Path) -> None:
    import sqlite3

    copy = tmp_path / "b"
    shutil.copytree(made, copy)
    db = sqlite3.connect(copy / "sluice.db")
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET actor = 'someone else'")
    db.commit()
    db.close()
    with pytest.raises(BackupError, match="audit chain is broken"):
        check(copy)


def test_a_backup_that_does_not_record_the_state_directories_is_refused(
    made: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version's state (its DP ledger) missing would go unseen: format 2 records each
    kept version's state files. Format 1 recorded none: it is checked for all else, and
    said so (refusing it would leave nothing to restore from)."""
    import sqlite3

    copy = tmp_path / "b"
    shutil.copytree(made, copy)
    db = sqlite3.connect(copy / "sluice.db")
    db.execute(
        "INSERT INTO versions VALUES ('m', 3, 3, ?, 3, 1, 150, 0, NULL)", ("a" * 64,)
    )  # a version the database keeps, made after the backup was taken
    db.commit()
    db.close()
    blob = copy / "blobs" / "aa" / ("a" * 64)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"w")
    doc = json.loads((copy / MANIFEST).read_text())
    with pytest.raises(BackupError, match="records nothing of state/m/3"):
        check(copy)
    doc["state_dirs"] = {"state/m/3": {"dp_ledger.json": 24}}
    (copy / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(BackupError, match=r"dp_ledger\.json is missing or not 24 bytes"):
        check(copy)
    (copy / "state" / "m" / "3").mkdir(parents=True)
    (copy / "state" / "m" / "3" / "dp_ledger.json").write_bytes(b"x" * 24)
    assert check(copy).state_dirs == {"state/m/3": {"dp_ledger.json": 24}}
    doc["state_dirs"] = {"state/m/3": {"../../../sluice.db": 24}}
    (copy / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(BackupError, match="not a file name"):
        check(copy)
    doc["format"] = 1  # recorded no state directories: checked for all else, with a warning
    del doc["state_dirs"]
    (copy / MANIFEST).write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        assert check(copy).state_dirs == {}
    assert "format 1 records no state directories" in caplog.text
    (copy / "blobs" / "aa" / ("a" * 64)).unlink()
    with pytest.raises(BackupError, match="is missing"):
        check(copy)


def test_a_later_backup_removes_what_a_killed_one_left_and_nothing_else(
    made: Path, tmp_path: Path
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now
    killed = tmp_path / f".old.partial-{gone.pid}"
    (killed / "blobs" / "aa").mkdir(parents=True)
    (killed / "blobs" / "aa" / "x").write_bytes(b"a link to a deleted blob's space")
    (killed / "sluice.db").write_bytes(b"")
    running = tmp_path / f".other.partial-{os.getppid()}"  # its process is alive
    running.mkdir()
    not_ours = tmp_path / f".mine.partial-{gone.pid}"  # holds what no backup writes
    (not_ours / "notes").mkdir(parents=True)
    backup(Path(check(made).source), tmp_path / "new")
    assert not killed.exists() and running.is_dir() and (not_ours / "notes").is_dir()
    assert check(tmp_path / "new").audit_entries == 1


def test_backup_json_is_on_the_disk_before_the_backup_is_named(
    made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    backup(Path(check(made).source), tmp_path / "new")
    partial = str(tmp_path / f".new.partial-{os.getpid()}")
    assert f"{partial}/{MANIFEST}" in synced and partial in synced
    assert synced.index(f"{partial}/{MANIFEST}") < synced.index(partial)
