"""A backup directory is input like any other: whatever backup.json holds, `check` (and so
`restore`) says what is wrong in one BackupError, never another exception."""

from __future__ import annotations

import json
import shutil
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
    # sluice.db and the key; the blob no row names (a crash's leftover) is left out.
    assert summary.audit_entries == 1 and summary.files == 2
    assert not list(made.glob("blobs/??/*"))
    restore(made, tmp_path / "restored")
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
    ["not json", "[]", '{"format": 2}', "null"],
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
