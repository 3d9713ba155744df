"""The scan a close runs before its strategy (core/scan.py over store/direct.py): whatever
the schema, the read window and the file, it hashes every byte and takes the norm of every
float; a file that is not what was acknowledged is named, never folded."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.gateway.core import scan as scan_module
from sluice.gateway.core.aggregation import Contribution, FoldScan, fold_fedavg
from sluice.gateway.core.scan import changed_since, scan_updates
from sluice.gateway.export.pieces import PieceTags
from sluice.gateway.store.direct import (
    DirectFile,
    WindowReader,
    aligned_buffer,
    window_bytes,
)
from sluice.models.appender import ALIGN
from sluice.models.schema import Schema, TensorSpec
from tests.unit.test_appender import direct_works

DTYPES = ["<f4", "<f2", "<f8", "bfloat16", "<i8", "<i4"]
SCHEMAS = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.integers(0, 700)), min_size=1, max_size=5
).map(
    lambda specs: Schema(
        tuple(TensorSpec(f"t{i}", (n,), dtype) for i, (dtype, n) in enumerate(specs))
    )
)
BLOCKS = st.sampled_from([8, 24, 100, ALIGN, 5000, 1 << 20])
SPOILS = st.sampled_from(["none", "flip", "truncate", "extend", "delete"])


def payload(schema: Schema, seed: int) -> tuple[bytes, float]:
    """A random payload and the float64 norm of its floats, as numpy takes it."""
    rng = np.random.default_rng(seed)
    arrays, floats = {}, []
    for spec in schema.tensors:
        if spec.is_float:
            values = (rng.standard_normal(spec.shape) * 3).astype(spec.np_dtype)
            floats.append(values.astype(np.float64).ravel())
        else:
            values = rng.integers(-1000, 1000, spec.shape).astype(spec.np_dtype)
        arrays[spec.name] = values
    norm = float(np.linalg.norm(np.concatenate(floats))) if floats else 0.0
    return schema.flatten(arrays), norm


def evict(path: Path) -> bool:
    """Out of the page cache: what a spool written with O_DIRECT is when its round closes
    (a file still in the cache is read from it, not with O_DIRECT). DONTNEED passes over
    pages still in another CPU's LRU batch, so it is repeated until a read that may not
    wait finds nothing; False if the pages stayed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if os.fstat(fd).st_size == 0:
            return True
        for _ in range(50):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            try:
                os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
            except BlockingIOError:
                return True
            time.sleep(0.02)
        return False
    finally:
        os.close(fd)


def one_update(tmp_path: Path, count: int) -> tuple[Schema, Path, bytes]:
    """A one-tensor schema of `count` float32s and a spooled update of it."""
    schema = Schema((TensorSpec("a", (count,), "<f4"),))
    data, _ = payload(schema, 1)
    path = tmp_path / "u.bin"
    path.write_bytes(data)
    return schema, path, data


def spoil(path: Path, how: str, where: int) -> str:
    """Spoil the file; the phrase its problem must hold ("" for none)."""
    data = path.read_bytes()
    if how == "flip" and data:
        raw = bytearray(data)
        raw[where % len(raw)] ^= 0x01
        path.write_bytes(bytes(raw))
        return "sha256 is"
    if how == "truncate" and data:
        path.write_bytes(data[: where % len(data)])
        return "bytes, expected"
    if how == "extend":
        path.write_bytes(data + b"\0" * (1 + where % 9000))
        return "bytes, expected"
    if how == "delete":
        path.unlink()
        return "is missing"
    return ""


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    schema=SCHEMAS,
    block=BLOCKS,
    workers=st.integers(1, 3),
    count=st.integers(1, 3),
    how=SPOILS,
    where=st.integers(0, 1 << 20),
    cold=st.booleans(),
)
def test_every_byte_is_hashed_and_every_float_squared(
    tmp_path: Path,
    schema: Schema,
    block: int,
    workers: int,
    count: int,
    how: str,
    where: int,
    cold: bool,
) -> None:
    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    run.mkdir()
    paths, shas, norms = [], [], []
    for i in range(count):
        data, norm = payload(schema, i)
        path = run / f"u{i}.bin"
        path.write_bytes(data)
        paths.append(path)
        shas.append(hashlib.sha256(data).hexdigest())
        norms.append(norm)
    phrase = spoil(paths[-1], how, where)
    for path in paths if cold else []:
        if path.exists():
            evict(path)

    scans = scan_updates(schema, paths, shas, block, workers)

    for i, s in enumerate(scans):
        if i == count - 1 and phrase:
            assert phrase in s.problem and math.isnan(s.norm)
        else:
            assert s.problem == ""
            assert s.norm == pytest.approx(norms[i], rel=1e-12, abs=1e-300)
            assert s.stamp is not None


def test_the_same_file_gives_the_same_norm_whatever_the_window(tmp_path: Path) -> None:
    schema = Schema((TensorSpec("a", (3001,), "<f4"), TensorSpec("b", (513,), "<f2")))
    data, _ = payload(schema, 3)
    path = tmp_path / "u.bin"
    path.write_bytes(data)
    again = {
        scan_updates(schema, [path], None, block)[0].norm for block in (1 << 20, 1 << 20, 1 << 20)
    }
    assert len(again) == 1


def test_without_expectations_a_bad_file_is_an_error(tmp_path: Path) -> None:
    schema = Schema((TensorSpec("a", (100,), "<f4"),))
    with pytest.raises(FileNotFoundError):
        scan_updates(schema, [tmp_path / "absent.bin"])
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 396)
    with pytest.raises(ValueError, match="396 bytes, the payload is 400"):
        scan_updates(schema, [short])


def test_an_unreadable_file_is_its_problem_and_other_errors_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema, path, data = one_update(tmp_path, 5000)
    sha = hashlib.sha256(data).hexdigest()
    code = errno.EIO

    def failing(self: DirectFile, offset: int, length: int, buf: np.ndarray) -> np.ndarray:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(DirectFile, "read", failing)
    (s,) = scan_updates(schema, [path], [sha], 4096)
    assert s.problem == "its spool file cannot be read (I/O error)"
    code = errno.ENOMEM  # not the file's fault: the close is retried
    with pytest.raises(OSError, match=os.strerror(errno.ENOMEM)):
        scan_updates(schema, [path], [sha], 4096)


def test_a_file_that_shrinks_while_it_is_scanned_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema, path, data = one_update(tmp_path, 5000)
    real = DirectFile.read

    def shrinking(self: DirectFile, offset: int, length: int, buf: np.ndarray) -> Any:
        os.truncate(path, 10_000)
        return real(self, offset, length, buf)

    monkeypatch.setattr(DirectFile, "read", shrinking)
    (s,) = scan_updates(schema, [path], [hashlib.sha256(data).hexdigest()], 4096)
    assert s.problem == "its spool file became shorter than 20000 bytes"


def test_no_read_is_in_flight_once_a_scan_has_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next window is read ahead into the scan's other buffer: a scan that stops early
    waits for that read before its buffers go to the next file."""
    schema, path, _ = one_update(tmp_path, 50_000)
    reads: list[str] = []
    real = DirectFile.read

    def tracked(self: DirectFile, offset: int, length: int, buf: np.ndarray) -> Any:
        reads.append("start")
        try:
            if len(reads) > 1:
                time.sleep(0.3)  # the read ahead is still running when the scan fails
            return real(self, offset, length, buf)
        finally:
            reads.append("end")

    def failing_squares(*args: Any) -> float:
        raise ArithmeticError("boom")

    real_scan = scan_module._scan
    at_exit: list[tuple[int, int]] = []

    def scan_then_count(*args: Any) -> Any:
        try:
            return real_scan(*args)
        finally:  # what is in flight when the scan's buffers go back for the next file
            at_exit.append((reads.count("start"), reads.count("end")))

    monkeypatch.setattr(DirectFile, "read", tracked)
    monkeypatch.setattr(scan_module, "_squares", failing_squares)
    monkeypatch.setattr(scan_module, "_scan", scan_then_count)
    with pytest.raises(ArithmeticError):
        scan_updates(schema, [path], None, 4096)
    assert at_exit == [(2, 2)]  # the first read and the one ahead, both finished


def test_a_file_written_after_its_scan_is_seen_as_changed(tmp_path: Path) -> None:
    schema = Schema((TensorSpec("a", (100,), "<f4"),))
    data, _ = payload(schema, 1)
    paths = [tmp_path / f"u{i}.bin" for i in range(3)]
    for p in paths:
        p.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    scans = scan_updates(schema, paths, [sha] * 3)
    scanned = {f"sha{i}": (p, s.stamp) for i, (p, s) in enumerate(zip(paths, scans, strict=True))}
    assert changed_since(scanned) == {}  # type: ignore[arg-type]
    with paths[0].open("r+b") as f:  # the same bytes written again: still a write
        f.write(data[:4])
    paths[1].unlink()
    assert changed_since(scanned) == {  # type: ignore[arg-type]
        "sha0": "its spool file changed while its round was aggregated",
        "sha1": "its spool file is missing",
    }


# --- the O_DIRECT reader ---------------------------------------------------------------


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(0, 5 * ALIGN),
    offset=st.integers(0, 6 * ALIGN),
    length=st.integers(0, 3 * ALIGN),
    use_direct=st.booleans(),
    cold=st.booleans(),
)
def test_a_read_gives_exactly_the_bytes_at_any_offset(
    tmp_path: Path, size: int, offset: int, length: int, use_direct: bool, cold: bool
) -> None:
    """From the disk with O_DIRECT (cold), from the page cache (hot), or buffered."""
    data = np.random.default_rng(size).bytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    if cold:
        evict(path)
    buf = aligned_buffer(window_bytes(length))
    assert buf.ctypes.data % ALIGN == 0
    with DirectFile(path, use_direct=use_direct) as f:
        assert f.size == size
        assert f.direct == (use_direct and direct_works(tmp_path))
        got = f.read(offset, length, buf)
        assert got.tobytes() == data[offset : offset + length]


def test_a_hot_file_is_read_from_the_page_cache_and_a_cold_one_from_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_works(tmp_path):
        pytest.skip("this file system takes no O_DIRECT")
    data = np.random.default_rng(1).bytes(64 * ALIGN)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    real_preadv = os.preadv
    served: list[str] = []

    def counting(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        try:
            got = real_preadv(fd, buffers, offset, flags)
        except BlockingIOError:
            served.append("missed")
            raise
        wanted = sum(len(memoryview(b)) for b in buffers)
        served.append("disk" if not flags else "cache" if got == wanted else "partly cached")
        return got

    monkeypatch.setattr(os, "preadv", counting)
    buf = aligned_buffer(window_bytes(8 * ALIGN))
    with DirectFile(path) as f:
        assert f.read(100, 8 * ALIGN, buf).tobytes() == data[100 : 100 + 8 * ALIGN]
        assert served == ["cache"]
        if not evict(path):
            pytest.skip("the kernel kept the file's pages in the page cache")
        served.clear()
        assert f.read(100, 8 * ALIGN, buf).tobytes() == data[100 : 100 + 8 * ALIGN]
        assert served in (["missed", "disk"], ["partly cached", "disk"])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    offset=st.integers(0, 3 * ALIGN),
    count=st.integers(0, 900),
    dtype=st.sampled_from(["<f4", "<f8", "<i8", "<f2", "|u1"]),
)
def test_a_window_reader_fills_any_array_with_the_bytes_at_any_offset(
    tmp_path: Path, offset: int, count: int, dtype: str
) -> None:
    """The robust and server-optimizer strategies read cold updates this way."""
    data = np.random.default_rng(offset).bytes(4 * ALIGN + 8 * 900)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    dest = np.empty((2, count), dtype=dtype)[1]  # a row: contiguous, anywhere in memory
    with DirectFile(path) as f:
        WindowReader(8 * 900).read_into(f, dest, offset)
        assert dest.tobytes() == data[offset : offset + dest.nbytes]
        with pytest.raises(ValueError, match="short read"):
            WindowReader(8 * 900).read_into(f, np.empty(10, "<f8"), len(data) - 79)
        with pytest.raises(ValueError, match="window"):
            WindowReader(16).read_into(f, np.empty(3, "<f8"), 0)


@pytest.mark.parametrize("refused_at", ["open", "read"])
def test_a_file_system_that_refuses_o_direct_is_read_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused_at: str
) -> None:
    """tmpfs before Linux 6.6 refused O_DIRECT at open; some file systems at the read."""
    data = np.random.default_rng(5).bytes(3 * ALIGN + 77)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    real_open, real_preadv = os.open, os.preadv
    direct_fds: set[int] = set()

    def fake_open(name: Any, flags: int, *args: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            if refused_at == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(name, flags, *args)
            direct_fds.add(fd)
            return fd
        return real_open(name, flags, *args)

    def fake_preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        if flags:  # nothing from the page cache: the O_DIRECT path is the one under test
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "preadv", fake_preadv)
    with DirectFile(path) as f:
        got = f.read(ALIGN - 3, 2 * ALIGN + 50, aligned_buffer(window_bytes(2 * ALIGN + 50)))
        assert got.tobytes() == data[ALIGN - 3 : 3 * ALIGN + 47]
        assert not f.direct  # and it stays off for the file's next reads
        assert f.read(0, 10, aligned_buffer(window_bytes(10))).tobytes() == data[:10]


# --- the fold's own scan (FedAvg: one read of each update per close) --------------------


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    schema=SCHEMAS,
    block=st.sampled_from([40, 1000, ALIGN, 10_000, 1 << 20]),
    workers=st.integers(1, 4),
    count=st.integers(1, 4),
)
def test_the_fold_hashes_and_measures_what_it_folds(
    tmp_path: Path, schema: Schema, block: int, workers: int, count: int
) -> None:
    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    run.mkdir()
    base = run / "base.bin"
    base.write_bytes(payload(schema, 99)[0])
    contributions, datas = [], []
    for i in range(count):
        data, _ = payload(schema, i)
        (run / f"u{i}.bin").write_bytes(data)
        contributions.append(Contribution(run / f"u{i}.bin", i + 1))
        datas.append(data)

    plain = b"".join(bytes(b) for b in fold_fedavg(schema, base, contributions, block, workers))
    scan = FoldScan(count)
    scanned = b"".join(
        bytes(b) for b in fold_fedavg(schema, base, contributions, block, workers, scan=scan)
    )

    assert scanned == plain
    by_scan = scan_updates(schema, [c.path for c in contributions], None, block)
    for i, data in enumerate(datas):
        assert scan.sha256(i) == hashlib.sha256(data).hexdigest()
        assert scan.norm(i) == pytest.approx(by_scan[i].norm, rel=1e-12, abs=1e-300)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    schema=SCHEMAS,
    block=st.sampled_from([40, 1000, ALIGN, 10_000, 1 << 20]),
    piece=st.sampled_from([1, 7, 4096, 1 << 20]),
    workers=st.integers(1, 4),
    damaged=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.floats(0.0, 1.0))),
)
def test_the_fold_checks_what_it_folds_against_the_pushes_tags(
    tmp_path: Path,
    schema: Schema,
    block: int,
    piece: int,
    workers: int,
    damaged: tuple[int, float] | None,
) -> None:
    """Where a push's piece tags are held (BlobStore.proof), the fold checks each update's
    bytes against them instead of hashing it: an update changed anywhere after its tags
    were recorded is named, the others pass, and the norms are the same."""
    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    run.mkdir()
    base = run / "base.bin"
    base.write_bytes(payload(schema, 99)[0])
    contributions, proofs, norms = [], [], []
    for i in range(3):
        data, norm = payload(schema, i)
        tags = PieceTags(piece)
        tags.feed(data)
        proofs.append(tags.proof()())
        raw = bytearray(data)
        if damaged is not None and damaged[0] == i and raw:  # sizes: the close's stat
            raw[min(int(len(raw) * damaged[1]), len(raw) - 1)] ^= 0x01
        (run / f"u{i}.bin").write_bytes(bytes(raw))
        contributions.append(Contribution(run / f"u{i}.bin", i + 1))
        norms.append(norm)
    scan = FoldScan(3, proofs)
    for _ in fold_fedavg(schema, base, contributions, block, workers, scan=scan):
        pass
    for i in range(3):
        bad = damaged is not None and damaged[0] == i and schema.payload_bytes > 0
        assert bool(scan.problem(i, "not consulted where a proof is")) == bad
        if not bad:
            assert scan.norm(i) == pytest.approx(norms[i], rel=1e-9, abs=1e-300)
    with pytest.raises(ValueError, match="3 contributions, 2 proofs"):
        FoldScan(3, proofs[:2])


def test_a_fold_that_fails_or_stops_early_leaves_no_thread_waiting(tmp_path: Path) -> None:
    """Blocks wait for the block before them to be hashed: a block that fails, or a caller
    that stops reading, must not leave the others waiting for a turn that never comes."""
    schema = Schema((TensorSpec("a", (40_000,), "<f4"),))
    base = tmp_path / "base.bin"
    base.write_bytes(payload(schema, 9)[0])
    good = tmp_path / "good.bin"
    good.write_bytes(payload(schema, 1)[0])
    short = tmp_path / "short.bin"
    short.write_bytes(payload(schema, 2)[0][:100_000])  # blocks past 100 KB fail
    contributions = [Contribution(good, 1), Contribution(short, 1)]
    for _ in range(30):  # the first error in block order is the one raised, every time
        with pytest.raises(ValueError, match="short read"):
            for _ in fold_fedavg(schema, base, contributions, 4096, 4, scan=FoldScan(2)):
                pass
    blocks = fold_fedavg(schema, base, contributions[:1], 4096, 4, scan=FoldScan(1))
    next(blocks)
    blocks.close()  # returns: every worker finished or was cancelled
    assert not [t for t in threading.enumerate() if t.name.startswith("fold")]


def test_a_failed_write_stops_the_fold_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedAvg's output write fails (a full disk): the fold's workers end and its files
    close before the error leaves aggregate, not when its traceback is let go."""
    from sluice.gateway.core.strategies import base as strategies
    from sluice.gateway.store.writeback import WriteBehind

    schema, path, _ = one_update(tmp_path, 200_000)
    base = tmp_path / "base.bin"
    base.write_bytes(path.read_bytes())

    def full(self: Any, nbytes: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WriteBehind, "wrote", full)
    inp = strategies.RoundInput(schema, base, [Contribution(path, 1)], 1, block_bytes=4096)
    with pytest.raises(OSError, match="No space left") as raised:
        strategies.FedAvg().aggregate(inp, tmp_path / "out.bin", tmp_path)
    assert raised.value.__traceback__ is not None  # still held, and yet:
    assert not [t for t in threading.enumerate() if t.name.startswith("fold")]


@settings(max_examples=25, deadline=None)
@given(
    schema=SCHEMAS,
    block=st.sampled_from([40, 1000, ALIGN, 1 << 20]),
    damaged=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.floats(0.0, 1.0))),
)
def test_the_scan_checks_each_update_against_its_push_s_tags(
    tmp_path_factory: pytest.TempPathFactory,
    schema: Schema,
    block: int,
    damaged: tuple[int, float] | None,
) -> None:
    """Where the norms come first (DP, dropping outliers, another strategy), the scan reads
    each update once and checks it against its push's tags where they are held: the same
    verdicts and norms as a sha256, a changed byte anywhere named."""
    run = tmp_path_factory.mktemp("scan")
    paths, shas, proofs = [], [], []
    for i in range(3):
        data, _ = payload(schema, i)
        tags = PieceTags(4096)
        tags.feed(data)
        proofs.append(tags.proof()())
        raw = bytearray(data)
        if damaged is not None and damaged[0] == i and raw:
            raw[min(int(len(raw) * damaged[1]), len(raw) - 1)] ^= 0x01
        (run / f"u{i}.bin").write_bytes(bytes(raw))
        paths.append(run / f"u{i}.bin")
        shas.append(hashlib.sha256(data).hexdigest())
    tagged = scan_updates(schema, paths, shas, block, proofs=proofs)
    hashed = scan_updates(schema, paths, shas, block)
    for i in range(3):
        bad = damaged is not None and damaged[0] == i and schema.payload_bytes > 0
        assert bool(tagged[i].problem) == bad == bool(hashed[i].problem)
        if not bad:
            assert tagged[i].norm == hashed[i].norm
    with pytest.raises(ValueError, match="3 files, 2 proofs"):
        scan_updates(schema, paths, shas, block, proofs=proofs[:2])
