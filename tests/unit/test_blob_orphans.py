"""What a start (or `sluice gc`) drops from blobs/: only the store's own files, never a
directory someone put there (a backup made inside the data dir, a copy by hand)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.gateway.store.blobs import BlobStore


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
