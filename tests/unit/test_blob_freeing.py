"""Removed blobs are freed by a worker, each waiting file holding a descriptor: at most
FREE_PENDING wait, and past that the remover frees the file itself, so a gc dropping
thousands of blobs behind a slow disk cannot run the gateway out of descriptors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sluice.gateway.store import blobs
from sluice.gateway.store.blobs import FREE_PENDING, BlobStore


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_removals_behind_a_stuck_freer_hold_at_most_free_pending_descriptors(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path / "blobs")
    paths = [
        store.path(store.write([bytes([i % 256]) * 64, str(i).encode()]))
        for i in range(FREE_PENDING + 64)
    ]
    stuck, running = threading.Event(), threading.Event()

    def hold_the_worker() -> None:
        running.set()
        stuck.wait(30)

    blobs._FREEING.submit(hold_the_worker)  # the disk is slow: nothing is freed meanwhile
    assert running.wait(5)
    before = open_fds()
    try:
        assert all(store.remove(path) for path in paths)
        assert not any(path.exists() for path in paths)
        assert open_fds() - before <= FREE_PENDING
    finally:
        stuck.set()
    done = threading.Event()
    blobs._FREEING.submit(done.set)  # after every free queued before it
    assert done.wait(10)
    assert open_fds() <= before
