"""A version blob is named by the sha256 of the bytes it holds, and whatever reads along
with its adoption (the publisher's tags) is fed exactly the bytes that were hashed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.gateway.export.pieces import PieceCheck, PieceTags
from sluice.gateway.store import blobs as blobs_module
from sluice.gateway.store.blobs import BlobStore, ChangedOnDisk, PieceHash
from sluice.models.schema import Schema
from tests.conftest import TINY, random_delta
from tests.unit.test_races import make_gateway, push

TRAINERS = ["shanghai-01", "beijing-01", "chengdu-01"]
STRATEGIES = [  # the fold, a server optimizer's, a robust strategy's and DP's noise after
    {},
    {"strategies": {TINY: {"name": "FedAdam"}}},
    {"strategies": {TINY: {"name": "FedMedian"}}},
    {"dp_noise_multiplier": 0.1},
]
IDS = ["FedAvg", "FedAdam", "FedMedian", "DP"]


@pytest.mark.parametrize("size", [0, 1, (8 << 20) - 1, 8 << 20, (17 << 20) + 5])
def test_adopt_hands_inspect_exactly_the_bytes_it_names_the_blob_by(
    tmp_path: Path, size: int
) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(size)
    path = store.temp_path()
    path.write_bytes(data)
    seen: list[bytes] = []
    tags = PieceTags(1 << 20)

    def inspect(piece: bytes | memoryview) -> None:
        seen.append(bytes(piece))
        tags.feed(piece)

    name = store.adopt(path, inspect=inspect)
    assert b"".join(seen) == data  # in order, each byte once
    assert name == hashlib.sha256(data).hexdigest()
    assert store.path(name).read_bytes() == data and not path.exists()
    check = PieceCheck(tags.finish())  # the tags read along are the blob's
    check.feed(store.path(name).read_bytes())
    assert check.whole()


@pytest.mark.parametrize("settings", STRATEGIES, ids=IDS)
def test_every_strategy_names_its_version_by_the_bytes_it_holds(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, settings: dict[str, Any]
) -> None:
    gw = make_gateway(tmp_path, template_cache, **settings)
    for round_no in (1, 2):
        for i, t in enumerate(TRAINERS):
            push(
                gw,
                tiny_schema,
                random_delta(tiny_schema, 10 * round_no + i),
                t,
                round_no=round_no,
                base=round_no - 1,
            )
        closed = gw.rounds.close(TINY, round_no)
        assert closed.released or "dp_noise_multiplier" in settings  # DP: over its budget
        version = closed.version
        blob = gw.blobs.path(version.weights_sha256).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == version.weights_sha256
        assert len(blob) == tiny_schema.payload_bytes
    assert not list(gw.blobs.tmp.iterdir())


@pytest.mark.parametrize("pieces", [[], [b""], [b"a"], [os.urandom(3 << 20), os.urandom(5)]])
def test_adopt_written_names_the_blob_by_the_bytes_fed(tmp_path: Path, pieces: list[bytes]) -> None:
    store = BlobStore(tmp_path / "blobs")
    path = store.temp_path()
    seen: list[bytes] = []
    hashed = PieceHash(lambda piece: seen.append(bytes(piece)))
    with path.open("wb") as f:
        for piece in pieces:
            f.write(piece)
            hashed.feed(memoryview(piece))
    data = b"".join(pieces)
    name = store.adopt_written(path, hashed)
    assert name == hashlib.sha256(data).hexdigest() and b"".join(seen) == data
    assert store.path(name).read_bytes() == data and not path.exists()


def test_adopt_written_refuses_a_file_that_is_not_the_bytes_fed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    path = store.temp_path()
    hashed = PieceHash()
    hashed.feed(b"abc")
    path.write_bytes(b"abcd")  # one byte more than was fed: not what the writer wrote
    with pytest.raises(ChangedOnDisk, match="holds 4 bytes; 3 were written"):  # retried
        store.adopt_written(path, hashed)
    assert path.exists() and not any(p for p in store.root.iterdir() if p != store.tmp)


@pytest.mark.parametrize("settings", STRATEGIES, ids=IDS)
def test_only_a_fold_whose_result_nothing_changes_after_it_skips_the_second_read(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    settings: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every strategy feeds its blocks as it writes them (RoundInput.written): the version
    is hashed, checked and tagged from those, and its file is not read again. With DP the
    noise pass, which rewrites the file after the strategy, feeds the noised blocks."""
    reads: list[str] = []
    real_adopt, real_written = BlobStore.adopt, BlobStore.adopt_written

    def adopt(self: BlobStore, *args: Any, **kwargs: Any) -> str:
        reads.append("read again")
        return real_adopt(self, *args, **kwargs)

    def adopt_written(self: BlobStore, *args: Any, **kwargs: Any) -> str:
        reads.append("from the writes")
        return real_written(self, *args, **kwargs)

    monkeypatch.setattr(BlobStore, "adopt", adopt)
    monkeypatch.setattr(BlobStore, "adopt_written", adopt_written)
    gw = make_gateway(tmp_path, template_cache, **settings)
    for i, t in enumerate(TRAINERS):
        push(gw, tiny_schema, random_delta(tiny_schema, 30 + i), t)
    version = gw.rounds.close(TINY, 1).version
    blob = gw.blobs.path(version.weights_sha256).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == version.weights_sha256
    assert reads == ["from the writes"]


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(1, 5 << 20),
    how=st.sampled_from(["flip", "truncate", "extend", "none"]),
    at=st.floats(0.0, 1.0),
)
def test_a_blob_written_here_is_verified_against_its_tags(
    tmp_path_factory: pytest.TempPathFactory, size: int, how: str, at: float
) -> None:
    """Blobs a gateway writes are tagged as they are hashed; verify() then checks them
    against those tags: the same answer as a sha256 for every change, intact or not."""
    store = BlobStore(tmp_path_factory.mktemp("b") / "blobs", tagger=lambda: PieceTags(1 << 20))
    data = os.urandom(size)
    sha = store.write([data[: size // 2], data[size // 2 :]])
    assert store.proof(sha) is not None
    raw = bytearray(data)
    i = min(int(size * at), size - 1)
    if how == "flip":
        raw[i] ^= 0x80
    elif how == "truncate":
        del raw[i:]
    elif how == "extend":
        raw += b"x"
    store.path(sha).write_bytes(bytes(raw))
    untagged = BlobStore(store.root)  # a gateway started afresh: no tags, a sha256
    assert untagged.proof(sha) is None
    assert bool(store.verify(sha, size)) == (how != "none") == bool(untagged.verify(sha, size))
    store.remove(store.path(sha))
    assert store.proof(sha) is None  # bytes pushed again are tagged again


def test_the_tags_kept_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blobs_module, "PROOFS_KEPT", 3)
    store = BlobStore(tmp_path / "blobs", tagger=lambda: PieceTags(1 << 20))
    shas = [store.write([bytes([i]) * 10]) for i in range(5)]
    assert [store.proof(sha) is not None for sha in shas] == [False, False, True, True, True]
    monkeypatch.setattr(blobs_module, "PROOF_BYTES_KEPT", 25)  # and the bytes they cover
    shas = [store.write([bytes([i]) * 10]) for i in range(10, 14)]
    assert [store.proof(sha) is not None for sha in shas] == [False, False, True, True]
    store.remove(store.path(shas[-1]))
    shas.append(store.write([b"y" * 10]))  # room again for one after a removal
    assert [store.proof(sha) is not None for sha in shas[2:]] == [True, False, True]


@pytest.mark.parametrize("at", [0.0, 0.5, 0.999])
@pytest.mark.parametrize("settings", STRATEGIES[:3], ids=IDS[:3])
def test_a_fold_output_rewritten_before_its_adoption_is_never_signed(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
    at: float,
    settings: dict[str, Any],
) -> None:
    """A version is named and tagged from the blocks its strategy wrote. An insider who
    rewrites the file between the fold's last write and its adoption gets no release:
    the weights copied into model.onnx are checked against those tags before the release
    is signed (the linked layout: tests/integration/test_release_link.py)."""
    gw = make_gateway(tmp_path, template_cache, **settings)
    strategy = type(gw.rounds.strategy_for(TINY))
    real = strategy.aggregate
    computed: list[bytes] = []

    def fold_then_insider(self: Any, inp: Any, out_path: Path, state_out: Path) -> Any:
        report = real(self, inp, out_path, state_out)
        data = bytearray(out_path.read_bytes())
        computed.append(bytes(data))
        data[min(int(len(data) * at), len(data) - 1)] ^= 0x01  # still finite
        out_path.write_bytes(bytes(data))
        return report

    monkeypatch.setattr(strategy, "aggregate", fold_then_insider)
    for i, t in enumerate(TRAINERS):
        push(gw, tiny_schema, random_delta(tiny_schema, 40 + i), t)
    closed = gw.rounds.close(TINY, 1)
    (fold,) = computed
    assert closed.version.weights_sha256 == hashlib.sha256(fold).hexdigest()
    assert not closed.released and "its file changed after the fold" in str(closed.refused)
    assert gw.store.get_release(TINY, 1) is None
    (refused,) = gw.store.audit_entries("release.refused")
    assert "not the bytes of version 1" in str(refused.detail["reason"])
    assert not (gw.config.data_dir / "registry" / TINY / "1").exists()


def test_with_dp_a_strategy_output_rewritten_before_the_noise_is_never_noised_and_signed(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DP's noise pass rewrites the aggregate after the strategy: it checks what it reads
    against the tags of what the strategy wrote, so an insider's bytes written in between
    fail the close (retried, nothing kept), and the retry folds what was pushed."""
    import sluice.gateway.core.rounds as rounds

    monkeypatch.setattr(rounds, "RETRY_SECONDS", 0.0)
    gw = make_gateway(tmp_path, template_cache, dp_noise_multiplier=0.1)
    strategy = type(gw.rounds.strategy_for(TINY))
    real = strategy.aggregate
    poked: list[int] = []

    def fold_then_insider(self: Any, inp: Any, out_path: Path, state_out: Path) -> Any:
        report = real(self, inp, out_path, state_out)
        if not poked:
            data = bytearray(out_path.read_bytes())
            data[len(data) // 2] ^= 0x01
            out_path.write_bytes(bytes(data))
            poked.append(1)
        return report

    monkeypatch.setattr(strategy, "aggregate", fold_then_insider)
    for i, t in enumerate(TRAINERS):
        push(gw, tiny_schema, random_delta(tiny_schema, 60 + i), t)
    with pytest.raises(Exception, match="not what the strategy wrote"):
        gw.rounds.close(TINY, 1)
    assert gw.store.latest_version(TINY).version == 0  # type: ignore[union-attr]
    assert list(gw.blobs.tmp.iterdir()) == []
    gw.rounds.tick()  # the retry: the strategy's output, noised, is the version
    version = gw.store.latest_version(TINY)
    assert version is not None and version.version == 1
    blob = gw.blobs.path(version.weights_sha256).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == version.weights_sha256
