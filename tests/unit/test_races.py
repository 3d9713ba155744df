"""Races and failures half-way that a review found: each must leave the gateway consistent.

The gateway is built in-process without listeners or worker thread, so each interleaving
is forced deterministically (a hook runs mid-upload or mid-close).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.gateway.config import Config
from sluice.gateway.core.errors import Busy, Forbidden, PreconditionFailed
from sluice.gateway.core.ingest import BodyItem, PayloadChunk, Trailer
from sluice.gateway.core.records import PushResult, RoundState, UpdateHeader
from sluice.gateway.pki import TRAINER, Principal
from sluice.gateway.server import Gateway
from sluice.models.schema import Schema
from tests.conftest import BUILT, EPHEMERAL, TINY, random_delta


def make_gateway(tmp: Path, template_cache: Path, **settings: object) -> Gateway:
    d = tmp / "gw"
    shutil.copytree(template_cache, d / "templates")
    values: dict[str, object] = {
        "data_dir": d, "models": (TINY,), "quorum": 100, "insecure_loopback": True,
        "min_trainers": 1, **EPHEMERAL,
    }  # fmt: skip
    values.update(settings)
    gw = Gateway(Config().replace(**values))
    BUILT.append(gw)  # stopped when the test ends (conftest)
    return gw


def body(payload: bytes, hook: Callable[[], None] | None = None) -> Iterator[BodyItem]:
    chunk, n = 1 << 16, 0
    for off in range(0, len(payload), chunk):
        yield PayloadChunk(off, payload[off : off + chunk])
        n += 1
        if hook is not None and n == 1:
            hook()
    yield Trailer(n)


def push(
    gw: Gateway,
    schema: Schema,
    payload: bytes,
    trainer: str,
    *,
    round_no: int = 1,
    base: int = 0,
    hook: Callable[[], None] | None = None,
    principal: Principal | None = None,
) -> tuple[UpdateHeader, PushResult]:
    h = UpdateHeader(
        uuid.uuid4().hex, trainer, trainer.split("-")[0], TINY, round_no, base, 100,
        schema.hash, hashlib.sha256(payload).hexdigest(), len(payload), {},
    )  # fmt: skip
    return h, gw.ingest.receive(h, 100, body(payload, hook), principal=principal)


def test_fedbuff_push_while_the_buffer_folds_is_retried_not_lost(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    gw = make_gateway(tmp_path, template_cache, fedbuff=True, quorum=3)
    for i, t in enumerate(["shanghai-01", "beijing-01", "chengdu-01"]):
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)
    real = gw.rounds.publisher.publish
    late: list[BaseException] = []

    def publish(*args: Any, **kwargs: Any) -> Any:  # round 1 is aggregating meanwhile
        with pytest.raises(Busy, match="push again") as err:
            push(gw, tiny_schema, random_delta(tiny_schema, 9), "harbin-01")
        late.append(err.value)
        return real(*args, **kwargs)

    gw.rounds.publisher.publish = publish  # type: ignore[method-assign]
    gw.rounds.close(TINY, 1)
    assert late and gw.store.round_updates(TINY, 1).__len__() == 3
    _, retried = push(gw, tiny_schema, random_delta(tiny_schema, 9), "harbin-01", base=1)
    assert retried.round == 2 and retried.accepted == 1


def test_a_close_that_fails_half_way_is_retried_by_the_worker(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sluice.gateway.core.rounds as rounds

    monkeypatch.setattr(rounds, "RETRY_SECONDS", 0.0)
    gw = make_gateway(tmp_path, template_cache, quorum=2)
    for i, t in enumerate(["shanghai-01", "beijing-01"]):
        push(gw, tiny_schema, random_delta(tiny_schema, i), t)
    real = gw.rounds.publisher.publish
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    gw.rounds.publisher.publish = flaky  # type: ignore[method-assign]
    gw.rounds.tick()  # logs the failure; other models would still get their turn
    assert gw.store.get_round(TINY, 1).state == RoundState.AGGREGATING  # type: ignore[union-attr]
    assert gw.rounds.close_error(TINY, 1) == "no space left on device"
    gw.rounds.tick()  # the worker's next tick finishes it
    assert gw.store.get_round(TINY, 1).state == RoundState.CLOSED  # type: ignore[union-attr]
    assert len(calls) == 2 and gw.store.latest_version(TINY).version == 1  # type: ignore[union-attr]


def test_revocation_during_an_upload_keeps_that_update_out(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    gw = make_gateway(tmp_path, template_cache)
    principal = Principal("shanghai-01", TRAINER, "shanghai", 0xABC)

    def revoke() -> None:  # the interceptor admitted the stream; the operator revokes now
        gw.rounds.revoke("abc", "shanghai-01", "stolen key")

    payload = random_delta(tiny_schema, 1)
    with pytest.raises(Forbidden, match="revoked during the upload"):
        push(gw, tiny_schema, payload, "shanghai-01", hook=revoke, principal=principal)
    assert gw.store.round_updates(TINY, 1) == []
    assert not gw.blobs.path(hashlib.sha256(payload).hexdigest()).exists()


def test_identical_payloads_racing_keep_the_committed_ones_blob(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """B renames a blob in and pauses before its row; A, with the same bytes, fails at its
    commit and must not unlink the blob B is about to reference."""
    gw = make_gateway(tmp_path, template_cache)
    payload = random_delta(tiny_schema, 5)  # both trainers send the same bytes
    b_renamed, a_finished = threading.Event(), threading.Event()
    real_commit = gw.ingest._commit
    results: dict[str, PushResult] = {}

    def paused_commit(h: UpdateHeader, peer: str, principal: Principal | None) -> PushResult:
        if h.trainer == "beijing-01":
            b_renamed.set()
            a_finished.wait(1.0)  # without the blob lock, A unlinks right here
        return real_commit(h, peer, principal)

    gw.ingest._commit = paused_commit  # type: ignore[method-assign]

    def push_b() -> None:
        results["b"] = push(gw, tiny_schema, payload, "beijing-01")[1]

    thread = threading.Thread(target=push_b)
    thread.start()
    assert b_renamed.wait(5)
    revoked_a = Principal("shanghai-01", TRAINER, "shanghai", 0xA)
    gw.store.record("test", "test", "test")
    with gw.store.transaction() as db:  # A's certificate is revoked: its commit will fail
        gw.store.insert_revoked(db, "a", "shanghai-01", "test", 0)
    try:
        with pytest.raises(Forbidden):
            push(gw, tiny_schema, payload, "shanghai-01", principal=revoked_a)
    finally:
        a_finished.set()
        thread.join(5)
    assert results["b"].created
    assert gw.blobs.path(hashlib.sha256(payload).hexdigest()).exists()
    assert not any(gw.blobs.tmp.iterdir())


def _header(schema: Schema, payload: bytes, trainer: str, sha_in: str) -> UpdateHeader:
    sha = hashlib.sha256(payload).hexdigest() if sha_in == "header" else ""
    return UpdateHeader(
        uuid.uuid4().hex, trainer, trainer.split("-")[0], TINY, 1, 0, 100,
        schema.hash, sha, len(payload), {},
    )  # fmt: skip


def _body(payload: bytes, sha_in: str) -> Iterator[BodyItem]:
    yield PayloadChunk(0, payload)
    yield Trailer(1, hashlib.sha256(payload).hexdigest() if sha_in == "trailer" else "")


@pytest.mark.parametrize("closes", [False, True], ids=["round-open", "round-closed"])
@pytest.mark.parametrize("sha_in", ["header", "trailer"])
def test_a_retry_whose_original_commits_meanwhile_is_answered_as_a_replay(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, sha_in: str, closes: bool
) -> None:
    """The retry passes its replay check before the original commits, then finds its own
    id as the trainer's update in the round, or (the original's commit made the quorum)
    the round closed: a replay (created False) either way, not ALREADY_EXISTS or
    FAILED_PRECONDITION, one row, no rejection audited, nothing left in blobs/tmp."""
    gw = make_gateway(tmp_path, template_cache, quorum=2 if closes else 100)
    if closes:
        push(gw, tiny_schema, random_delta(tiny_schema, 2), "beijing-01")
    payload = random_delta(tiny_schema, 7)
    h = _header(tiny_schema, payload, "shanghai-01", sha_in)
    real_open = gw.ingest._open_round
    originals: list[PushResult] = []

    def original_commits_first(header: UpdateHeader) -> Any:
        if not originals:
            originals.append(PushResult("", False, 0, 0))  # once: this call is the original
            originals[0] = gw.ingest.receive(h, 100, _body(payload, sha_in))
            if closes:
                gw.rounds.close(TINY, 1)
        return real_open(header)

    gw.ingest._open_round = original_commits_first  # type: ignore[method-assign, assignment]
    retried = gw.ingest.receive(h, 100, _body(payload, sha_in))
    assert originals[0].created and not retried.created
    assert (retried.update_id, retried.round) == (h.update_id, 1)
    assert h.update_id in [u.update_id for u in gw.store.round_updates(TINY, 1)]
    assert len(gw.store.round_updates(TINY, 1)) == retried.accepted == (2 if closes else 1)
    assert gw.store.audit_entries("push.rejected") == []
    assert not any(gw.blobs.tmp.iterdir())


def test_the_same_bytes_pushed_while_a_round_aggregates_leave_its_update_as_scanned(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """Two trainers may send identical bytes (an all-zero delta). A late push of bytes that
    an update of the aggregating round already has must not touch that update's blob: the
    close takes a spool file changed after its scan for a corrupt update and drops it."""
    gw = make_gateway(tmp_path, template_cache)
    zeros = bytes(tiny_schema.payload_bytes)
    push(gw, tiny_schema, zeros, "shanghai-01")
    push(gw, tiny_schema, random_delta(tiny_schema, 2), "beijing-01")
    blob = gw.blobs.path(hashlib.sha256(zeros).hexdigest())
    before = blob.stat()
    in_body, scanned, finish_late = threading.Event(), threading.Event(), threading.Event()
    late: list[BaseException] = []

    def sending() -> None:
        in_body.set()
        finish_late.wait(10)

    def push_late() -> None:
        try:
            push(gw, tiny_schema, zeros, "chengdu-01", hook=sending)
        except Exception as exc:
            late.append(exc)

    real_prepare = gw.rounds.folder.privacy.prepare

    def prepare(*args: Any, **kwargs: Any) -> Any:
        prepared = real_prepare(*args, **kwargs)  # the updates' files are scanned now
        scanned.set()
        finish_late.set()
        thread.join(10)  # the late push spools, renames and is refused: round 1 is closing
        return prepared

    gw.rounds.folder.privacy.prepare = prepare  # type: ignore[method-assign]
    thread = threading.Thread(target=push_late)
    thread.start()
    assert in_body.wait(10)  # its header passed while round 1 was open
    gw.rounds.close(TINY, 1)
    assert scanned.is_set() and len(late) == 1  # refused, not committed
    after = blob.stat()
    assert (after.st_ino, after.st_ctime_ns) == (before.st_ino, before.st_ctime_ns)
    assert gw.store.audit_entries("push.excluded") == []
    assert gw.store.get_round(TINY, 1).state == RoundState.CLOSED  # type: ignore[union-attr]
    assert len(gw.store.round_updates(TINY, 1)) == 2
    assert not any(gw.blobs.tmp.iterdir())


def test_a_push_of_the_versions_own_bytes_refused_at_its_commit_leaves_the_version_blob(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """A hostile trainer who can compute the next version (its own update folded into a
    base it pulled) streams those bytes as a push to the closing round. The close places
    the version's file, builds its release, and only then commits the version's row; the
    push, refused at its commit meanwhile, drops the blob of its bytes if no row refers to
    them. That was the version's file: every later close then found its base missing."""
    gw = make_gateway(tmp_path, template_cache)
    push(gw, tiny_schema, random_delta(tiny_schema, 1), "shanghai-01")
    in_body, built = threading.Event(), threading.Event()
    weights: list[Path] = []
    late: list[BaseException] = []

    def version_bytes() -> Iterator[BodyItem]:
        in_body.set()  # the header passed while round 1 was open
        assert built.wait(30)
        data = weights[0].read_bytes()
        yield PayloadChunk(0, data)
        yield Trailer(1, hashlib.sha256(data).hexdigest())

    def push_late() -> None:
        h = _header(tiny_schema, bytes(tiny_schema.payload_bytes), "beijing-01", "trailer")
        try:
            gw.ingest.receive(h, 100, version_bytes())
        except Exception as exc:
            late.append(exc)

    real_publish = gw.rounds.publisher.publish

    def publish(served: Any, version: Any, path: Path, *args: Any, **kwargs: Any) -> Any:
        outcome = real_publish(served, version, path, *args, **kwargs)
        weights.append(path)  # placed and released; its row is not committed yet
        built.set()
        thread.join(30)  # the late push sends those bytes and is refused at its commit
        return outcome

    gw.rounds.publisher.publish = publish  # type: ignore[method-assign,assignment]
    thread = threading.Thread(target=push_late)
    thread.start()
    assert in_body.wait(10)
    gw.rounds.close(TINY, 1)
    assert len(late) == 1 and isinstance(late[0], PreconditionFailed), late
    v1 = gw.store.latest_version(TINY)
    assert v1 is not None and v1.version == 1
    kept = gw.blobs.path(v1.weights_sha256)
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == v1.weights_sha256
    gw.rounds.publisher.publish = real_publish  # type: ignore[method-assign]
    push(gw, tiny_schema, random_delta(tiny_schema, 2), "chengdu-01", round_no=2, base=1)
    gw.rounds.close(TINY, 2)  # version 1 is its base
    assert gw.store.latest_version(TINY).version == 2  # type: ignore[union-attr]
    assert not any(gw.blobs.tmp.iterdir())


def test_a_pull_that_has_its_header_reads_to_the_end_when_retention_removes_its_version(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    """PullGlobal opens the weights before it sends the header: a close whose retention
    removes that version in the middle of the pull leaves the pull the version's bytes,
    where it used to fail with INTERNAL (the file opened after the header was gone)."""
    import grpc

    from sluice.gateway.services.trainer import TrainerServicer
    from sluice.v1 import trainer_pb2

    gw = make_gateway(tmp_path, template_cache, keep_versions=1)
    v0 = gw.store.latest_version(TINY)
    assert v0 is not None
    expected = gw.blobs.path(v0.weights_sha256).read_bytes()

    class Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise AssertionError(f"aborted: {code} {details}")

    servicer = TrainerServicer(gw.store, gw.blobs, gw.rounds, gw.ingest)
    request = trainer_pb2.PullGlobalRequest(model=TINY, version=0)
    open_files = len(os.listdir("/proc/self/fd"))
    cancelled = servicer.PullGlobal(request, Context())  # type: ignore[arg-type]
    next(cancelled)  # the header went; then the client cancels
    cancelled.close()  # type: ignore[attr-defined]  # a generator, as gRPC closes it
    assert len(os.listdir("/proc/self/fd")) == open_files  # its file closed with it
    stream = servicer.PullGlobal(
        trainer_pb2.PullGlobalRequest(model=TINY, version=0),
        Context(),  # type: ignore[arg-type]
    )
    header = next(stream)
    assert isinstance(header, trainer_pb2.PullGlobalResponse)
    assert header.header.version == 0
    push(gw, tiny_schema, random_delta(tiny_schema, 3), "shanghai-01")
    gw.rounds.close(TINY, 1)
    assert gw.store.get_version(TINY, 0).removed_ms is not None  # type: ignore[union-attr]
    assert not gw.blobs.path(v0.weights_sha256).exists()
    chunks = [trainer_pb2.PullGlobalResponse.FromString(m) for m in stream if isinstance(m, bytes)]
    assert b"".join(c.chunk.data for c in chunks) == expected
