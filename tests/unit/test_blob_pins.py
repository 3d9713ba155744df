"""A blob placed for a row not committed yet (a close's version) is pinned: no removal
takes it, however the removal and the placing interleave."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from sluice.gateway.store import blobs
from sluice.gateway.store.blobs import BlobStore


def test_a_pinned_blob_is_not_removed_and_is_once_unpinned(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    sha = store.write([b"version bytes"])
    store.pin(sha)
    store.pin(sha)  # pins count
    assert not store.remove(store.path(sha))
    store.unpin(sha)
    assert not store.remove(store.path(sha))
    store.unpin(sha)
    assert store.remove(store.path(sha)) and not store.path(sha).exists()


def test_a_removal_under_way_when_a_close_places_the_same_bytes_leaves_the_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push refused at its commit removes its blob; the close pins its version of the
    same bytes and finds that very file at its address meanwhile. Whichever comes first,
    the version's address holds the bytes once the close has placed them."""
    store = BlobStore(tmp_path / "blobs")
    data = b"the next version, computed by a trainer" * 1000
    sha = store.write([data])  # the refused push's file, at the version's address
    out = store.temp_path()
    out.write_bytes(data)  # the close's output
    real_hold = blobs._hold
    placing = threading.Thread(target=lambda: store.adopt(out, pin=True))

    def hold_then_place(path: Path) -> int | None:
        held = real_hold(path)
        if path == store.path(sha) and not placing.is_alive():
            placing.start()  # the close adopts now, between the removal's check and unlink
            placing.join(0.5)
        return held

    monkeypatch.setattr(blobs, "_hold", hold_then_place)
    store.remove(store.path(sha))
    placing.join(10)
    assert not placing.is_alive()
    assert hashlib.sha256(store.path(sha).read_bytes()).hexdigest() == sha
    assert not store.remove(store.path(sha))  # pinned until its row is in


def test_a_fifo_planted_at_a_blobs_name_does_not_hold_its_removal(tmp_path: Path) -> None:
    """An insider's FIFO at a blob's address: opening it to hold its blocks would wait for
    a writer, under the blob locks every push and close take."""
    store = BlobStore(tmp_path / "blobs")
    path = store.path(hashlib.sha256(b"planted").hexdigest())
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    removing = threading.Thread(target=store.remove, args=(path,), daemon=True)
    removing.start()
    removing.join(5)
    assert not removing.is_alive() and not path.exists()
