"""Streaming FedAvg: fold spooled delta updates block by block, never N updates in memory."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import math
import os
import queue
import threading
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Ships no type information.
from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

from sluice.gateway.core.lazy import LazyModule, lazy_function
from sluice.gateway.store.blobs import NOT_AS_HASHED, Proof
from sluice.gateway.store.direct import DirectFile, aligned_buffer, open_regular_in, window_bytes
from sluice.models.schema import Schema, TensorSpec

# scipy's BLAS, imported at the first fold: a gateway's start does not pay its ~0.2 s.
blas: Any = LazyModule("scipy.linalg.blas")

# 1 MiB blocks stay in the CPU caches between the read and the axpy, and keep the fold's
# memory at 4 MiB whatever the model (bench/: as fast as 8 MiB blocks at 25M-100M params).
DEFAULT_BLOCK_BYTES = 1 << 20
# Threads folding blocks at once: the fold is bound by memory copies and arithmetic, which
# run outside the GIL; more than the cores the gateway has only adds hand-offs.
FOLD_WORKERS = max(1, min(4, os.cpu_count() or 1))
# y += a * x in one pass (BLAS axpy) for native float32/float64: numpy needs a multiply
# and an add, two passes over the block (bench/README.md: ~3x the arithmetic throughput).
_AXPY = {
    np.dtype(np.float32): lazy_function("scipy.linalg.blas", "saxpy"),
    np.dtype(np.float64): lazy_function("scipy.linalg.blas", "daxpy"),
}


@functools.cache
def _blas() -> ThreadpoolController:
    """The loaded BLAS libraries. The fold runs them on one thread: on a block of 1 MiB,
    OpenBLAS's thread hand-off costs more than it gains (bench: 0.21 s vs 0.30 s for 16 x
    100 MB), and the gateway's other threads want the other cores anyway. scipy's BLAS
    (the axpy's, imported lazily) is loaded first: a controller sees only the libraries
    loaded when it is made, and an unlimited OpenBLAS under FOLD_WORKERS threads made the
    fold 3x slower."""
    importlib.import_module("scipy.linalg.blas")
    return ThreadpoolController().select(user_api="blas")


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread while any fold (or norm pass, core/dp.py) runs: beside the spool
    checks' hashing threads, a second BLAS thread spins for a core it does not get (a
    404 MB norm pass took 0.6-0.7 s and 1.2-1.4 s of CPU that way, 0.08 s alone). The
    limit is process-wide, so overlapping users share it: the first sets it, the last one
    out restores the original (a plain nested limit() would restore the other's 1 as the
    'original')."""
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas().limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


@dataclass(frozen=True)
class Contribution:
    path: Path  # flat payload file: the delta (trained - base) of every tensor
    num_examples: int
    scale: float = 1.0  # multiplies the float tensors of the delta as read (DP clipping)


def _read(fd: int, buf: np.ndarray, offset: int) -> None:
    view = buf.view(np.uint8).data
    got = os.preadv(fd, [view], offset)
    if got != len(view):
        raise ValueError(f"short read at offset {offset}: {got} of {len(view)} bytes")


def add_integer_mean(
    out: np.ndarray,
    mean: np.ndarray,
    what: str = "an integer tensor",
    delta: np.ndarray | None = None,
) -> None:
    """out += mean in out's integer dtype, where mean is the rounded mean delta in float64
    (read only); `delta`, out's dtype and size, is scratch.

    numpy wraps integer overflow silently, and casting a float past the dtype's range gives
    garbage (2**63 becomes -2**63): either would put a wrapped counter into the version.
    Raises OverflowError instead (a close that fails the same way every time: the round
    fails, audited, and its base stays). Unless a value is near the limits, it allocates
    nothing the size of the block.
    """
    info = np.iinfo(out.dtype)
    lo, hi = float(info.min), float(info.max) + 1.0  # hi excluded; both exact in float64
    if not mean.size:
        return
    if not (mean.min() >= lo and mean.max() < hi):  # NaN fails both
        raise OverflowError(f"{what}: the mean update leaves the range of {out.dtype}")
    if delta is None:
        delta = np.empty_like(out)
    np.copyto(delta, mean, casting="unsafe")  # exact: in range, and already an integer
    if (
        int(out.max()) + int(mean.max()) <= info.max
        and int(out.min()) + int(mean.min()) >= info.min
    ):
        np.add(out, delta, out=out)  # cannot overflow anywhere: the common case
        return
    # Near the limits somewhere: element by element, exactly (rare: its copy is fine).
    before = out.copy()
    np.add(out, delta, out=out)  # wraps where it overflows
    # Signed: the sum's sign differs from both operands'; unsigned: it came out smaller.
    wrapped = ((before ^ out) & (delta ^ out)) < 0 if info.min < 0 else out < before
    if wrapped.any():
        raise OverflowError(f"{what}: base + mean update leaves the range of {out.dtype}")


class FoldScan:
    """The spool check and the norms, taken from the fold's own reads of the delta files
    (so each file is read once per close: core/scan.py reads them separately where the norms
    are needed before the fold, for DP clipping or dropping outliers).

    Each contribution's sha256 over its blocks in file order (a block waits for the one
    before it in that file to be hashed: the fold's workers hash in turn), and the sum of
    its float squares in float64 per block, added in block order (the same file gives the
    same norm). fold_fedavg fills it; read it once the fold has finished.
    """

    def __init__(self, count: int, proofs: Sequence[Proof | None] = ()) -> None:
        """`proofs`: per contribution, a check of its bytes recorded as they hashed to its
        name (BlobStore.proof: the push's piece tags), fed instead of a sha256; None (or
        none given) where there is none."""
        self._proofs = list(proofs) or [None] * count
        if len(self._proofs) != count:
            raise ValueError(f"{count} contributions, {len(self._proofs)} proofs")
        self._digests = [hashlib.sha256() for _ in range(count)]
        self._squares: list[dict[int, float]] = [{} for _ in range(count)]
        self._next = [0] * count  # the block each file's hash waits for
        self._turn = threading.Condition()
        self._failed_at: int | None = None  # the first block that failed, if any

    def feed(self, i: int, index: int, raw: np.ndarray, spec: TensorSpec, wide: np.ndarray) -> None:
        """Block `index` of contribution i, as read (before the fold changes anything)."""
        with self._turn:
            while self._next[i] != index and not self._after_failure(index):
                self._turn.wait()
            if self._after_failure(index):
                raise RuntimeError(f"block {self._failed_at} of the fold failed")
        try:
            proof = self._proofs[i]  # its turn: no other thread touches this one's checks
            if proof is None:
                self._digests[i].update(raw.data)
            else:
                proof.feed(raw.data)
            if spec.is_float:
                self._squares[i][index] = squares(raw.view(spec.np_dtype), wide)
        finally:
            with self._turn:
                self._next[i] = index + 1
                self._turn.notify_all()

    def _after_failure(self, index: int) -> bool:
        return self._failed_at is not None and index > self._failed_at

    def failed(self, index: int) -> None:
        """Block `index` failed: the blocks after it raise rather than wait for a turn that
        may never come (the blocks before it finish: their turns come from earlier ones)."""
        with self._turn:
            if self._failed_at is None or index < self._failed_at:
                self._failed_at = index
            self._turn.notify_all()

    def sha256(self, i: int) -> str:
        """The sha256 of contribution i as read (those checked against a proof: of nothing)."""
        return self._digests[i].hexdigest()

    def problem(self, i: int, sha256: str) -> str:
        """What is wrong with contribution i, acknowledged under sha256; "" if nothing."""
        proof = self._proofs[i]
        if proof is not None:
            return "" if proof.whole() else NOT_AS_HASHED
        got = self.sha256(i)
        return "" if got == sha256 else f"its spool file's sha256 is {got}, not its name"

    def norm(self, i: int) -> float:
        total = 0.0
        for _, value in sorted(self._squares[i].items()):
            total += value
        return math.sqrt(total)


_EINSUM_SQUARES = (np.dtype(np.float32), np.dtype(np.float64))


def squares(values: np.ndarray, wide: np.ndarray) -> float:
    """Sum of the squares of `values` in float64, `wide` (float64) at a time.

    float32 and float64 go through one einsum, which widens as it multiplies and adds
    (0.19 s/GB here for float32, where a copy into `wide` and a dot took 0.42); other
    dtypes (float16, bfloat16) are copied into `wide` first."""
    if values.dtype in _EINSUM_SQUARES:
        return float(np.einsum("i,i->", values, values, dtype=np.float64))
    total = 0.0
    step = wide.size
    for i in range(0, values.size, step):
        part = values[i : i + step]
        x = wide[: part.size]
        np.copyto(x, part)
        total += float(np.dot(x, x))
    return total


@dataclass
class _Arena:
    """One worker's reusable buffers: raw bytes, viewed per block in the tensor's dtype."""

    acc: np.ndarray  # the accumulator (float tensors: their dtype; integers: float64)
    wide: np.ndarray  # float64, for a FoldScan's squares (empty without one)
    buf: np.ndarray  # a contribution's block, read with O_DIRECT: an aligned window
    scratch: np.ndarray  # integer tensors: the weighted block in float64; halves: float32

    @classmethod
    def of(cls, block_bytes: int, needs_scratch: bool, scanning: bool = False) -> _Arena:
        size = max(block_bytes, 8)
        return cls(
            np.empty(size, dtype=np.uint8),
            np.empty(size // 8 if scanning else 0, dtype=np.float64),
            aligned_buffer(window_bytes(size)),  # a contribution's block read with O_DIRECT
            np.empty(size if needs_scratch else 0, dtype=np.uint8),
        )


@dataclass(frozen=True)
class _Fold:
    """What every block of one fold shares."""

    base_fd: int
    files: Sequence[DirectFile]  # the contributions' delta files: cold, read with O_DIRECT
    contributions: Sequence[Contribution]
    total: int  # sum of num_examples
    scan: FoldScan | None = None

    def block(
        self, index: int, spec: TensorSpec, first: int, count: int, arena: _Arena
    ) -> memoryview:
        """base + sum(n_i * delta_i) / total for `count` elements of spec from byte `first`,
        in a buffer of its own (the base is read straight into it: no copy to hand it out)."""
        dtype = spec.np_dtype
        acc_dtype = _acc_dtype(spec)
        axpy = _AXPY.get(acc_dtype) if spec.is_float else None
        acc = arena.acc[: count * acc_dtype.itemsize].view(acc_dtype)
        nbytes = count * dtype.itemsize
        # float16/bfloat16: each block widened to float32 here, the sum rounded once.
        wide = arena.scratch[: count * 4].view(np.float32) if spec.is_half else None
        acc.fill(0)
        for i, (file, c) in enumerate(zip(self.files, self.contributions, strict=True)):
            raw = file.read(first, nbytes, arena.buf)
            if raw.size != nbytes:
                raise ValueError(f"short read at offset {first}: {raw.size} of {nbytes} bytes")
            if self.scan is not None:
                self.scan.feed(i, index, raw, spec, arena.wide)
            buf = raw.view(dtype)
            weight = c.scale * c.num_examples / self.total
            if wide is not None:
                wide[...] = buf
                blas.saxpy(wide, acc, a=weight)
            elif axpy is not None:
                axpy(buf, acc, a=weight)  # acc in place
            elif spec.is_float:
                np.multiply(buf, dtype.type(weight), out=buf)
                np.add(acc, buf, out=acc)
            else:
                weighted = arena.scratch[: count * 8].view(np.float64)
                np.multiply(buf, float(c.num_examples), out=weighted)
                np.add(acc, weighted, out=acc)
        out = np.empty(count, dtype=dtype)
        _read(self.base_fd, out, first)
        if wide is not None:
            wide[...] = out
            np.add(wide, acc, out=wide)
            out[...] = wide  # round to nearest even, once
        elif spec.is_float:
            np.add(out, acc, out=out)
        else:
            np.divide(acc, self.total, out=acc)
            np.rint(acc, out=acc)
            mean_delta = arena.scratch[: count * dtype.itemsize].view(dtype)
            add_integer_mean(out, acc, f"tensor {spec.name!r}", mean_delta)
        return out.view(np.uint8).data


def _acc_dtype(spec: TensorSpec) -> np.dtype[Any]:
    """What a tensor's fold sums in: float32 for float16/bfloat16 (Flower sums a float16
    model in float16, losing the small updates), its own dtype for float32/float64, float64
    for integers (rounded back exactly: add_integer_mean)."""
    if spec.is_half:
        return np.dtype(np.float32)
    return spec.np_dtype if spec.is_float else np.dtype(np.float64)


def _blocks(schema: Schema, block_bytes: int) -> Iterator[tuple[TensorSpec, int, int]]:
    """(tensor, first byte, element count) of every block, in payload order."""
    for spec, start, end in schema.spans():
        dtype = spec.np_dtype
        acc_itemsize = _acc_dtype(spec).itemsize
        # Elements per block: as many as fit block_bytes in the wider of the two dtypes.
        step = max(block_bytes // max(dtype.itemsize, acc_itemsize), 1)
        for first in range(start, end, step * dtype.itemsize):
            yield spec, first, min(step, (end - first) // dtype.itemsize)


def fold_fedavg(
    schema: Schema,
    base_path: Path,
    contributions: Sequence[Contribution],
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int = FOLD_WORKERS,
    scan: FoldScan | None = None,
) -> Generator[memoryview, None, None]:
    """Yield the new global payload, base + sum(n_i * delta_i) / sum(n_i), block by block
    (each a view of a buffer of its own, never reused).

    Contributions are folded in the given order, so the same order gives the same bytes.
    Float tensors accumulate in their own dtype (float32 like Flower's `aggregate`), with
    one BLAS axpy per block and contribution for float32/float64 (its rounding may differ
    from numpy's multiply-then-add in the last bit; the same machine gives the same bytes).
    Integer tensors (BatchNorm's num_batches_tracked) accumulate in float64 and the
    weighted mean delta is rounded half-to-even: a counter stays an integer, unlike
    Flower's in-place FedAvg, which multiplies it by a weight truncated to 0.

    `workers` threads fold consecutive blocks at once (the reads and numpy's copies and
    additions release the GIL) while the caller consumes the blocks before them, in order.

    The contributions are read with O_DIRECT (their spools are cold: store/direct.py).
    `scan`: each contribution's sha256 and norm are taken from these reads (FoldScan).

    Memory: per worker one arena of three blocks of `block_bytes` (accumulator, read
    buffer, scratch for integer tensors; a fourth, float64, with a scan), plus the
    finished blocks waiting to be yielded (at most workers + 1): whatever the number of
    contributions or the size of the model.
    """
    if not contributions:
        raise ValueError("fold_fedavg needs at least one contribution")
    total = sum(c.num_examples for c in contributions)
    if total <= 0 or any(c.num_examples <= 0 for c in contributions):
        raise ValueError("every contribution needs num_examples > 0")
    workers = max(workers, 1)
    needs_scratch = any(not spec.is_float or spec.is_half for spec in schema.tensors)
    arenas: queue.SimpleQueue[_Arena] = queue.SimpleQueue()
    for _ in range(workers):
        arenas.put(_Arena.of(block_bytes, needs_scratch, scan is not None))
    with ExitStack() as stack:
        stack.enter_context(one_blas_thread())
        base_fd = open_regular_in(stack, base_path)
        files = [stack.enter_context(DirectFile(c.path)) for c in contributions]
        fold = _Fold(base_fd, files, contributions, total, scan)

        def run(index: int, spec: TensorSpec, first: int, count: int) -> memoryview:
            arena = arenas.get()  # never waits long: at most `workers` tasks run at once
            try:
                # An overflow gives inf, silently: the round manager refuses a non-finite
                # result as a whole (numpy's error state is per thread, so it is set here).
                with np.errstate(over="ignore", invalid="ignore"):
                    return fold.block(index, spec, first, count, arena)
            except BaseException:
                if scan is not None:
                    scan.failed(index)  # the blocks after this one would wait for its turn
                raise
            finally:
                arenas.put(arena)

        # Unwound before the descriptors close: no worker reads a closed (or reused) fd,
        # also when the caller stops early.
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fold")
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        # A caller that stops early leaves no block waiting: blocks start in order, so a
        # running block's predecessors are running or done (the cancelled ones come after).
        pending: deque[Future[memoryview]] = deque()
        for index, (spec, first, count) in enumerate(_blocks(schema, block_bytes)):
            if len(pending) > workers:
                yield pending.popleft().result()
            pending.append(pool.submit(run, index, spec, first, count))
        while pending:
            yield pending.popleft().result()
