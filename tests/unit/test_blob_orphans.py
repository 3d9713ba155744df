"""What a start (or `sluice gc`) drops from blobs/: only the store's own files, never a
directory someone put there (a backup made inside the data dir, a copy by hand)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import pytest

from sluice.gateway.core.catalog import Catalog
from sluice.gateway.core.ingest import Ingest
from sluice.gateway.store.blobs import BlobStore
from sluice.gateway.store.sqlite import Store


def test_drop_orphans_removes_files_and_leaves_directories_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    kept = blobs.write([b"kept"])
    orphan = blobs.write([b"orphan"])
    (blobs.tmp / "abc.part").write_bytes(b"cut off")
    (blobs.tmp / "a-dir").mkdir()
    (blobs.root / kept[:2] / "a-dir").mkdir()
    (blobs.root / "bk" / "blobs").mkdir(parents=True)  # a backup made in here
    (blobs.root / "bk" / "sluice.db").write_bytes(b"a backup's database")

    assert blobs.drop_orphans({kept}) == [orphan]
    assert blobs.exists(kept) and not blobs.exists(orphan)
    assert sorted(p.name for p in blobs.tmp.iterdir()) == ["a-dir"]
    assert (blobs.root / kept[:2] / "a-dir").is_dir()
    assert (blobs.root / "bk" / "sluice.db").read_bytes() == b"a backup's database"
    warned = " ".join(r.getMessage() for r in caplog.records)
    for left in ("tmp/a-dir", f"{kept[:2]}/a-dir", "blobs/bk"):
        assert left in warned


def test_a_cut_off_push_s_temp_file_stays_until_its_audit_entry_is_written(
    tmp_path: Path,
) -> None:
    """On a full disk the push.interrupted entry waits in memory (record_soon); a gc that
    exits then would lose it with the temp file, its only evidence: the file stays, and
    the next clean-up with room audits it and drops it."""
    store = Store(tmp_path / "s.db")
    blobs = BlobStore(tmp_path / "blobs")
    ingest = Ingest(store, blobs, Catalog(()))
    orphan = blobs.write([b"no row names this"])
    with blobs.temp("shanghai-01+drivenet-tiny+2+cut-off") as tmp:
        tmp.write(b"x" * 5000)
        kept = tmp.path.with_suffix(".kept")
        os.link(tmp.path, kept)  # a crash leaves the tagged temp file behind
    kept.rename(tmp.path)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 4}")
    with contextlib.suppress(sqlite3.OperationalError):  # the audit log, until the disk is full
        while True:
            store.record("test.filler", "test", "test", {"pad": "p" * 100})

    assert ingest.drop_crash_leftovers() == [orphan]
    assert store.holds_deferred() and tmp.path.exists()
    assert store.audit_entries("push.interrupted") == []

    store = Store(tmp_path / "s.db")  # the next gc (or start), with room again
    ingest = Ingest(store, blobs, Catalog(()))
    assert ingest.drop_crash_leftovers() == [] and not tmp.path.exists()
    (entry,) = store.audit_entries("push.interrupted")
    assert entry.actor == "shanghai-01" and "5000 bytes" in str(entry.detail["reason"])
