"""Closes that cannot fold what they were given: corrupt spool files, non-finite results,
overflowing sums, a full disk. Each must end visibly, leave nothing behind, never wedge.

The gateway is built in-process without listeners or worker thread (tests/unit/test_races.py),
so every close runs here, in order; tests/integration/test_wedge.py drives the same paths
through a live gateway.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.gateway.core.errors import PreconditionFailed, Unavailable, storage_fault
from sluice.gateway.core.records import MAX_SAFE_INT, RoundState
from sluice.gateway.server import Gateway
from sluice.gateway.store.blobs import BlobStore, TempBlob
from sluice.gateway.store.direct import DirectFile
from sluice.gateway.store.sqlite import Store
from sluice.models.schema import Schema
from tests.conftest import TINY, random_delta
from tests.unit.test_races import make_gateway, push

TRAINERS = ["shanghai-01", "beijing-01", "chengdu-01"]


def residue(gw: Gateway, version: int) -> list[str]:
    """What a close that did not commit `version` must not leave."""
    root = gw.config.data_dir
    found = [
        p
        for p in (root / "registry" / TINY).glob("*")
        if p.name in (str(version), f".{version}.staging")
    ]
    found += [p for p in (root / "state" / TINY).glob("*") if str(version) in p.name]
    found += list((root / "blobs" / "tmp").iterdir())
    return [str(p.relative_to(root)) for p in found]


def entries(gw: Gateway, kind: str) -> list[dict[str, object]]:
    return [dict(e.detail) for e in gw.store.audit_entries(kind)]


# The blob store's own check.


def test_verify_names_what_is_wrong_with_a_blob(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = bytes(range(256)) * 5000
    sha = blobs.write([data])
    assert blobs.verify(sha, len(data)) == ""
    path = blobs.path(sha)
    raw = bytearray(data)
    raw[1000] ^= 1
    path.write_bytes(bytes(raw))
    assert "sha256 is" in blobs.verify(sha, len(data))
    path.write_bytes(data[:-4])
    assert (
        blobs.verify(sha, len(data))
        == f"its spool file is {len(data) - 4} bytes, expected {len(data)}"
    )
    path.unlink()
    assert blobs.verify(sha, len(data)) == "its spool file is missing"


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sizes=st.lists(st.integers(0, 3 * (8 << 20) // 2), max_size=5))
def test_a_committed_spool_is_exactly_its_chunks_under_its_sha256(
    tmp_path: Path, sizes: list[int]
) -> None:
    """Chunks of any size, across the 8 MiB blocks that go to the disk with O_DIRECT."""
    blobs = BlobStore(tmp_path / f"blobs{len(list(tmp_path.iterdir()))}")
    chunks = [np.random.default_rng(n).bytes(n) for n in sizes]
    with blobs.temp("a+b+1+u") as tmp:
        for chunk in chunks:
            tmp.write(chunk)
        final = blobs.commit(tmp)
    data = b"".join(chunks)
    assert final.name == hashlib.sha256(data).hexdigest() == tmp.hexdigest()
    assert final.read_bytes() == data and tmp.size == len(data)
    assert list(blobs.tmp.iterdir()) == []


def test_a_spool_whose_block_write_fails_raises_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block written behind the caller (by a worker) that fails: the caller's next write
    raises it and the temp file goes."""
    blobs = BlobStore(tmp_path / "blobs")
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, at: int) -> int:
        if at >= 8 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    chunk = bytes(4 << 20)
    with pytest.raises(OSError, match="No space"), blobs.temp("a+b+1+u") as tmp:
        for _ in range(8):
            tmp.write(chunk)
    assert list(blobs.tmp.iterdir()) == []


def test_a_temp_blob_is_removed_even_when_closing_it_fails(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")

    class FullDisk:  # a writer whose close flushes its last block onto a full disk
        def __init__(self, out: Any) -> None:
            self.out = out

        def close(self) -> None:
            self.out.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError), blobs.temp("a+b+1+u") as tmp:
        tmp._out = FullDisk(tmp._out)  # type: ignore[assignment]
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(blobs.tmp.iterdir()) == []


def test_storage_faults_are_told_from_other_errors(tmp_path: Path) -> None:
    assert storage_fault(OSError(errno.ENOSPC, "full")) == "no space left on device"
    assert storage_fault(OSError(errno.EIO, "io")) == "I/O error"
    assert storage_fault(FileNotFoundError(errno.ENOENT, "gone")) is None
    assert storage_fault(ValueError("x")) is None
    db = sqlite3.connect(tmp_path / "tiny.db")
    db.execute("CREATE TABLE t (x BLOB)")
    db.execute("PRAGMA max_page_count = 2")  # a database that is full
    with pytest.raises(sqlite3.OperationalError) as err:
        db.execute("INSERT INTO t VALUES (?)", (bytes(1 << 16),))
    assert storage_fault(err.value) == "no space left on device (database)"


# The store at the edge of its integers, and across an upgrade.


def test_integers_sqlite_cannot_hold_name_no_row(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    for big in (1 << 63, (1 << 64) - 1):
        assert store.get_round(TINY, big) is None
        assert store.get_version(TINY, big) is None
        assert store.get_release(TINY, big) is None


def test_a_database_from_before_failed_rounds_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE rounds (model TEXT NOT NULL, round INTEGER NOT NULL,"
        " base_version INTEGER NOT NULL, state TEXT NOT NULL CHECK (state IN"
        " ('open', 'aggregating', 'closed')), opened_ms INTEGER NOT NULL,"
        " deadline_ms INTEGER NOT NULL, closed_ms INTEGER, version INTEGER,"
        " PRIMARY KEY (model, round))"
    )
    db.execute("INSERT INTO rounds VALUES ('m', 1, 0, 'open', 1, 2, NULL, NULL)")
    db.commit()
    db.close()
    store = Store(path)
    with store.transaction() as tx:
        store.set_round_state(tx, "m", 1, RoundState.FAILED, failure="why")
    r = store.get_round("m", 1)
    assert r is not None and (r.state, r.failure, r.deadline_ms) == (RoundState.FAILED, "why", 2)


# Corrupt spool files: excluded, audited, folded without.


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


# Who reads the updates at a close: FedAvg's fold hashes and measures them as it folds;
# where the norms are needed first (dropping outliers, DP) or the strategy is another, the
# scan reads them before it.
READERS = pytest.mark.parametrize(
    "readers",
    [{}, {"drop_outlier_updates": True}, {"strategies": {TINY: {"name": "FedMedian"}}}],
    ids=["fold-scans", "scan-then-fold", "scan-then-median"],
)


@READERS
@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (_flip, "sha256 is|differ from those that hashed"),
        (lambda p: p.write_bytes(p.read_bytes()[:-4]), "bytes, expected"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["flipped-byte", "truncated", "deleted"],
)
def test_a_corrupt_update_is_excluded_and_the_round_closes_without_it(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    spoil: Any,
    why: str,
    readers: dict[str, Any],
) -> None:
    gw = make_gateway(tmp_path, template_cache, **readers)
    heads = [
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)[0] for i, t in enumerate(TRAINERS)
    ]
    spoil(gw.blobs.path(heads[0].payload_sha256))
    closed = gw.rounds.close(TINY, 1)
    assert (closed.version.version, closed.version.num_trainers) == (1, 2)
    (excluded,) = entries(gw, "push.excluded")
    assert excluded["update_id"] == heads[0].update_id
    assert any(w in str(excluded["reason"]) for w in why.split("|")), excluded["reason"]
    (round_closed,) = entries(gw, "round.closed")
    assert round_closed["updates"] == [h.update_id for h in heads[1:]]
    assert not gw.blobs.path(heads[0].payload_sha256).exists()
    assert residue(gw, 2) == [] and list(gw.blobs.tmp.iterdir()) == []


@READERS
@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        # A file checked against its push's tags (the fold's own read) or hashed (a scan).
        (_flip, ("sha256 is", "differ from those that hashed", "changed while its round")),
        (lambda p: p.write_bytes(p.read_bytes()[:-4]), ("changed while",)),
        (lambda p: p.unlink(), ("missing",)),
    ],
    ids=["flipped-byte", "truncated", "deleted"],
)
def test_an_update_spoiled_as_the_strategy_starts_is_excluded(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
    spoil: Any,
    why: tuple[str, ...],
    readers: dict[str, Any],
) -> None:
    """After the scan (or the size check) and before the strategy's read: what the fold
    hashes is what it folded; a scanned file written since is seen by its stamp."""
    gw = make_gateway(tmp_path, template_cache, **readers)
    heads = [
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)[0] for i, t in enumerate(TRAINERS)
    ]
    strategy = gw.rounds.strategy_for(TINY)
    real = type(strategy).aggregate
    calls: list[int] = []

    def spoiling(self: Any, inp: Any, out_path: Path, state_out: Path) -> Any:
        if not calls:
            spoil(gw.blobs.path(heads[1].payload_sha256))
        calls.append(1)
        return real(self, inp, out_path, state_out)

    monkeypatch.setattr(type(strategy), "aggregate", spoiling)
    closed = gw.rounds.close(TINY, 1)
    assert closed.version.num_trainers == 2 and len(calls) == 2
    (excluded,) = entries(gw, "push.excluded")
    assert excluded["update_id"] == heads[1].update_id
    assert any(w in str(excluded["reason"]) for w in why), excluded["reason"]
    (round_closed,) = entries(gw, "round.closed")
    assert round_closed["updates"] == [heads[0].update_id, heads[2].update_id]
    assert residue(gw, 2) == [] and list(gw.blobs.tmp.iterdir()) == []


@READERS
def test_an_update_whose_reads_fail_with_eio_is_excluded_not_retried_forever(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
    readers: dict[str, Any],
) -> None:
    """A bad sector under one spool file: that update is lost, not the round."""
    gw = make_gateway(tmp_path, template_cache, **readers)
    heads = [
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)[0] for i, t in enumerate(TRAINERS)
    ]
    bad = str(gw.blobs.path(heads[2].payload_sha256))
    real = DirectFile.read

    def failing(self: DirectFile, offset: int, length: int, buf: np.ndarray) -> np.ndarray:
        if os.readlink(f"/proc/self/fd/{self.fd}") == bad:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, offset, length, buf)

    monkeypatch.setattr(DirectFile, "read", failing)
    closed = gw.rounds.close(TINY, 1)
    assert closed.version.num_trainers == 2
    (excluded,) = entries(gw, "push.excluded")
    assert excluded["update_id"] == heads[2].update_id
    assert "cannot be read (I/O error)" in str(excluded["reason"])
    assert residue(gw, 2) == [] and list(gw.blobs.tmp.iterdir()) == []


@pytest.mark.parametrize("readers", [{}, {"drop_outlier_updates": True}], ids=["fold", "scan"])
def test_the_audited_norms_are_the_updates_norms_whoever_reads_them(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, readers: dict[str, Any]
) -> None:
    gw = make_gateway(tmp_path, template_cache, **readers)
    payloads = [random_delta(tiny_schema, i) for i in range(len(TRAINERS))]
    for payload, t in zip(payloads, TRAINERS, strict=True):
        push(gw, tiny_schema, payload, t)
    gw.rounds.close(TINY, 1)
    (round_closed,) = entries(gw, "round.closed")
    expected = []
    for payload in payloads:
        views = tiny_schema.views(payload)
        floats = [
            views[t.name].astype(np.float64).ravel() for t in tiny_schema.tensors if t.is_float
        ]
        expected.append(float(np.linalg.norm(np.concatenate(floats))))
    screening = round_closed["screening"]
    assert isinstance(screening, dict)
    np.testing.assert_allclose(screening["norms"], expected, rtol=1e-12)


def test_too_few_left_after_exclusion_reopens_the_round(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    gw = make_gateway(tmp_path, template_cache, min_updates=2)
    heads = [
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)[0]
        for i, t in enumerate(TRAINERS[:2])
    ]
    _flip(gw.blobs.path(heads[0].payload_sha256))
    with pytest.raises(PreconditionFailed, match="reopened"):
        gw.rounds.close(TINY, 1)
    r = gw.store.get_round(TINY, 1)
    assert r is not None and (r.state, r.accepted) == (RoundState.OPEN, 1)
    assert len(entries(gw, "round.reopened")) == 1 and residue(gw, 1) == []
    # The trainer whose update was spoiled pushes again: the round closes with both.
    push(gw, tiny_schema, random_delta(tiny_schema, 7), TRAINERS[0])
    assert gw.rounds.close(TINY, 1).version.num_trainers == 2


def test_a_corrupt_base_fails_the_round_and_the_next_one_opens(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    gw = make_gateway(tmp_path, template_cache)
    push(gw, tiny_schema, random_delta(tiny_schema, 1), TRAINERS[0])
    base = gw.store.get_version(TINY, 0)
    assert base is not None
    _flip(gw.blobs.path(base.weights_sha256))
    with pytest.raises(PreconditionFailed, match="base version 0 is corrupt"):
        gw.rounds.close(TINY, 1)
    failed = gw.store.get_round(TINY, 1)
    assert failed is not None and failed.state == RoundState.FAILED
    assert "base version 0 is corrupt" in failed.failure
    nxt = gw.store.latest_round(TINY)
    assert nxt is not None and (nxt.round, nxt.state, nxt.base_version) == (2, RoundState.OPEN, 0)
    assert residue(gw, 1) == []


def _damage(path: Path, how: str, at: float) -> None:
    raw = bytearray(path.read_bytes())
    i = min(int(len(raw) * at), len(raw) - 1)
    if how == "flip":
        raw[i] ^= 0x01  # the lowest bit of one byte: still finite
    elif how == "truncate":
        del raw[i:]
    else:
        raw += b"\0"
    path.write_bytes(bytes(raw))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(how=st.sampled_from(["flip", "truncate", "extend"]), at=st.floats(0.0, 1.0))
def test_a_version_damaged_after_its_close_is_refused_as_the_next_base(
    tmp_path_factory: pytest.TempPathFactory,
    template_cache: Path,
    tiny_schema: Schema,
    how: str,
    at: float,
) -> None:
    """The next close checks the version this gateway made against the piece tags its
    adoption recorded (SpoolCheck proofs), not with a second sha256: any change is found
    the same, and a gateway started afresh (no tags) hashes it instead."""
    tmp = tmp_path_factory.mktemp("base")
    gw = make_gateway(tmp, template_cache)
    checked: list[tuple[str, bool]] = []
    real_proof = BlobStore.proof

    def proof(self: BlobStore, sha: str) -> Any:
        found = real_proof(self, sha)
        checked.append((sha, found is not None))
        return found

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlobStore, "proof", proof)
        push(gw, tiny_schema, random_delta(tiny_schema, 1), TRAINERS[0])
        made = gw.rounds.close(TINY, 1).version
        push(gw, tiny_schema, random_delta(tiny_schema, 2), TRAINERS[0], round_no=2, base=1)
        _damage(gw.blobs.path(made.weights_sha256), how, at)
        with pytest.raises(PreconditionFailed, match="base version 1 is corrupt"):
            gw.rounds.close(TINY, 2)
    assert (made.weights_sha256, True) in checked  # its tags, not a sha256
    failed = gw.store.get_round(TINY, 2)
    assert failed is not None and failed.state == RoundState.FAILED
    assert residue(gw, 2) == []


def test_a_version_intact_after_its_close_passes_its_tags_and_folds_on(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    gw = make_gateway(tmp_path, template_cache)
    for round_no in (1, 2, 3):
        push(
            gw,
            tiny_schema,
            random_delta(tiny_schema, round_no),
            TRAINERS[0],
            round_no=round_no,
            base=round_no - 1,
        )
        assert gw.rounds.close(TINY, round_no).version.version == round_no


# Results that are not finite are never a version.


def _max_delta(schema: Schema) -> bytes:
    big = np.finfo(np.float32).max
    return schema.flatten(
        {t.name: np.full(t.shape, big if t.is_float else 0, dtype=t.dtype) for t in schema.tensors}
    )


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"strategies": {TINY: {"name": "FedAdam"}}},
        {"strategies": {TINY: {"name": "FedMedian"}}},
        {"strategies": {TINY: {"name": "Krum"}}},
        {"fedbuff": True},
        {"dp_noise_multiplier": 0.1, "min_trainers": 1},
    ],
    ids=["FedAvg", "FedAdam", "FedMedian", "Krum", "FedBuff", "DP"],
)
def test_every_strategy_refuses_a_non_finite_result(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, Any],
) -> None:
    gw = make_gateway(tmp_path, template_cache, **settings)
    for i, t in enumerate(TRAINERS):
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)
    strategy = gw.rounds.strategy_for(TINY)
    real = type(strategy).aggregate

    at = tiny_schema.payload_bytes - 4 - 8 * (not tiny_schema.tensors[-1].is_float)
    nan = np.float32(np.nan).tobytes()

    def poison(path: Path) -> None:
        with path.open("r+b") as f:  # one NaN in the last float tensor
            f.seek(at)
            f.write(nan)

    def poisoned(self: Any, inp: Any, out_path: Path, state_out: Path) -> Any:
        # A strategy that feeds its pieces as it writes them (FedAvg without DP noise) has
        # the NaN in what it feeds as in what it writes; any other one in the file it wrote.
        fed = 0

        def written(piece: memoryview) -> None:
            nonlocal fed
            if fed <= at < fed + piece.nbytes:
                copy = bytearray(piece)
                copy[at - fed : at - fed + 4] = nan
                piece = memoryview(copy)
            fed += piece.nbytes
            inp.written(piece)

        tee = None if inp.written is None else written
        report = real(self, dataclasses.replace(inp, written=tee), out_path, state_out)
        poison(out_path)
        return report

    monkeypatch.setattr(type(strategy), "aggregate", poisoned)
    with pytest.raises(PreconditionFailed, match="not finite"):
        gw.rounds.close(TINY, 1)
    assert gw.store.latest_version(TINY).version == 0  # type: ignore[union-attr]
    (failed,) = entries(gw, "round.failed")
    assert "aggregate of round 1 is not finite" in str(failed["reason"])
    assert residue(gw, 1) == []


def test_a_server_optimizer_that_overflows_fails_the_round(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    gw = make_gateway(
        tmp_path,
        template_cache,
        strategies={TINY: {"name": "FedAvgM", "server_learning_rate": 4.0}},
        max_update_abs_value=1e39,  # the ingest bound lifted: the fold's own net is tested
    )
    push(gw, tiny_schema, _max_delta(tiny_schema), TRAINERS[0])
    with pytest.raises(PreconditionFailed, match="is not finite"):
        gw.rounds.close(TINY, 1)
    assert gw.store.get_round(TINY, 1).state == RoundState.FAILED  # type: ignore[union-attr]
    assert residue(gw, 1) == []


def test_a_sum_of_examples_past_what_can_be_signed_fails_the_round(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """The original wedge: num_examples = 2**63 - 1 (the header refuses it now; a database
    from before may hold one)."""
    gw = make_gateway(tmp_path, template_cache)
    for i, t in enumerate(TRAINERS[:2]):
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)
    with gw.store.transaction() as db:
        db.execute("UPDATE updates SET num_examples = ?", ((1 << 63) - 1,))
    with pytest.raises(PreconditionFailed, match=f"at most {MAX_SAFE_INT}"):
        gw.rounds.close(TINY, 1)
    assert gw.store.latest_round(TINY).round == 2  # type: ignore[union-attr]
    with pytest.raises(PreconditionFailed, match="failed"):
        gw.rounds.close(TINY, 1)  # asked again: it says so, it does not fold again
    assert residue(gw, 1) == []


# A full disk: retryable, nothing left, retried until it works.


def test_a_close_on_a_full_disk_is_unavailable_leaves_nothing_and_is_retried(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sluice.gateway.core.rounds as rounds

    monkeypatch.setattr(rounds, "RETRY_SECONDS", 0.0)
    gw = make_gateway(tmp_path, template_cache, min_trainers=1)
    for i, t in enumerate(TRAINERS):
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)
    real = gw.rounds.folder._publish
    calls: list[int] = []

    def commit_fails(served: Any, r: Any, version: Any, *rest: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            gw.rounds.publisher.publish(
                served, version, gw.blobs.path(version.weights_sha256), [], None
            )  # the release directory is written, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(served, r, version, *rest)

    monkeypatch.setattr(gw.rounds.folder, "_publish", commit_fails)
    with pytest.raises(Unavailable, match="no space left on device; the gateway tries again"):
        gw.rounds.close(TINY, 1)
    assert residue(gw, 1) == []
    assert gw.store.get_round(TINY, 1).state == RoundState.AGGREGATING  # type: ignore[union-attr]
    assert gw.rounds.close_error(TINY, 1) == "no space left on device"
    (failed,) = entries(gw, "round.close_failed")
    assert failed["error"] == "no space left on device"
    gw.rounds.tick()
    assert gw.store.get_round(TINY, 1).state == RoundState.CLOSED  # type: ignore[union-attr]
    assert gw.rounds.close_error(TINY, 1) == ""


def test_a_push_on_a_full_disk_is_unavailable_audited_and_leaves_nothing(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = make_gateway(tmp_path, template_cache)

    def full(self: TempBlob, data: bytes | memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TempBlob, "write", full)
    with pytest.raises(Unavailable, match="no space left on device; push it again later"):
        push(gw, tiny_schema, random_delta(tiny_schema, 1), TRAINERS[0])
    (interrupted,) = entries(gw, "push.interrupted")
    assert interrupted["reason"] == "no space left on device"
    assert list(gw.blobs.tmp.iterdir()) == [] and gw.store.round_updates(TINY, 1) == []


def test_pushes_a_crash_cut_off_are_audited_at_start(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    gw = make_gateway(tmp_path, template_cache)
    with gw.blobs.temp("shanghai-01+drivenet-tiny+1+abc.1") as tmp:
        tmp.write(b"x" * 1000)
        tmp.finish()
        kept = tmp.path.read_bytes()
        name = tmp.path.name
    (gw.blobs.tmp / name).write_bytes(kept)  # what a kill -9 mid-push leaves
    (gw.blobs.tmp / "deadbeef.part").write_bytes(b"a fold's output")
    gw.stop()  # as a kill would leave it: nothing more runs
    gw = Gateway(gw.config)
    (entry,) = gw.store.audit_entries("push.interrupted")
    assert (entry.actor, entry.subject) == ("shanghai-01", f"{TINY}/round/1")
    assert entry.detail["update_id"] == "abc.1" and "after receiving 1000 bytes" in str(
        entry.detail["reason"]
    )
    assert list(gw.blobs.tmp.iterdir()) == []


def test_orphan_release_and_state_directories_are_removed_at_start(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    gw = make_gateway(tmp_path, template_cache)
    for i, t in enumerate(TRAINERS):
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)
    assert gw.rounds.close(TINY, 1).released
    root = gw.config.data_dir
    for orphan in (root / "registry" / TINY / "2", root / "registry" / TINY / ".3.staging",
                   root / "state" / TINY / "2", root / "state" / TINY / ".2.staging"):  # fmt: skip
        orphan.mkdir(parents=True)
        (orphan / "model.onnx").write_bytes(b"signed, never committed")
    gw.stop()  # as a kill would leave it: nothing more runs
    gw = Gateway(gw.config)
    assert sorted(p.name for p in (root / "registry" / TINY).iterdir()) == ["1"]
    assert [p.name for p in (root / "state" / TINY).iterdir() if p.name != "1"] == []
    removed = [e.subject for e in gw.store.audit_entries("release.orphan_removed")]
    assert f"{TINY}/release/2" in removed
    assert hashlib.sha256((root / "registry" / TINY / "1" / "model.onnx").read_bytes())


def test_an_audit_entry_a_full_disk_refused_is_written_once_there_is_room(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    big = {"reason": "x" * 3000, "peer": "y" * 3000, "tag": "z" * 3000}  # more than a page
    store.record_soon("push.interrupted", "t-01", f"{TINY}/round/1", big)
    assert store.audit_entries("push.interrupted") == []
    store._db.execute("PRAGMA max_page_count = 1000000")  # room again
    store.record("gateway.started", "gateway", "gateway")
    (entry,) = store.audit_entries("push.interrupted")
    assert entry.detail["deferred_from_ms"]
    assert {k: entry.detail[k] for k in big} == big
    assert store.verify_audit()[1] is None


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB ext4 file system on a loop device: one that takes O_DIRECT (a tmpfs, as
    tests/integration/test_disk_full.py uses, does not). Needs root; skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    image, disk = tmp_path / "disk.img", tmp_path / "disk"
    disk.mkdir()
    with image.open("wb") as f:
        f.truncate(24 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 file system: {made.stderr.decode().strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_spool_that_fills_a_real_disk_raises_and_leaves_nothing(small_ext4: Path) -> None:
    """Blocks written with O_DIRECT by a worker until the disk is full: the push's write (or
    its finish) raises ENOSPC, nothing stays in blobs/tmp, and a spool that fits works."""
    blobs = BlobStore(small_ext4 / "blobs")
    chunk = np.random.default_rng(1).bytes(1 << 20)
    with pytest.raises(OSError) as raised, blobs.temp("a+b+1+u") as tmp:
        assert tmp._out.direct  # the path under test: this file system takes O_DIRECT
        for _ in range(64):  # 64 MiB into a 24 MiB disk
            tmp.write(chunk)
        blobs.commit(tmp)
    assert raised.value.errno == errno.ENOSPC
    assert list(blobs.tmp.iterdir()) == []
    data = chunk * 9  # more than one 8 MiB block: one O_DIRECT write, then the tail
    sha = blobs.write([data])
    assert blobs.path(sha).read_bytes() == data
