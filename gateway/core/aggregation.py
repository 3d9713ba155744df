"""Streaming FedAvg: fold spooled delta updates block by block, never N updates in memory."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.schema import Schema, TensorSpec

DEFAULT_BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class Contribution:
    path: Path  # flat payload file: the delta (trained - base) of every tensor
    num_examples: int


def _blocks(spec: TensorSpec, start: int, end: int, block_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(block_bytes // np.dtype(spec.dtype).itemsize, 1) * np.dtype(spec.dtype).itemsize
    for pos in range(start, end, step):
        yield pos, min(pos + step, end)


def _read(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf).cast("B")
    got = os.preadv(fd, [view], offset)
    if got != len(view):
        raise ValueError(f"short read at offset {offset}: {got} of {len(view)} bytes")


def fold_fedavg(
    schema: Schema,
    base_path: Path,
    contributions: Sequence[Contribution],
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[bytes]:
    """Yield the new global payload, base + sum(n_i * delta_i) / sum(n_i), block by block.

    Contributions are folded in the given order, so the same order gives the same bytes.
    Float tensors accumulate in their own dtype (float32 like Flower's `aggregate`).
    Integer tensors (BatchNorm's num_batches_tracked) accumulate in float64 and the
    weighted mean delta is rounded half-to-even: a counter stays an integer, unlike
    Flower's in-place FedAvg which truncates it.

    Memory: three blocks of `block_bytes` (accumulator, read buffer, output), whatever
    the number of contributions or the size of the model.
    """
    if not contributions:
        raise ValueError("fold_fedavg needs at least one contribution")
    total = sum(c.num_examples for c in contributions)
    if total <= 0 or any(c.num_examples <= 0 for c in contributions):
        raise ValueError("every contribution needs num_examples > 0")
    with ExitStack() as stack:
        base_fd = os.open(base_path, os.O_RDONLY)
        stack.callback(os.close, base_fd)
        fds = []
        for c in contributions:
            fd = os.open(c.path, os.O_RDONLY)
            stack.callback(os.close, fd)
            fds.append(fd)
        for spec, start, end in schema.spans():
            dtype = np.dtype(spec.dtype)
            acc_dtype = dtype if spec.is_float else np.dtype(np.float64)
            for lo, hi in _blocks(spec, start, end, block_bytes):
                count = (hi - lo) // dtype.itemsize
                acc = np.zeros(count, dtype=acc_dtype)
                buf = np.empty(count, dtype=dtype)
                for fd, c in zip(fds, contributions, strict=True):
                    _read(fd, buf, lo)
                    if spec.is_float:
                        np.multiply(buf, dtype.type(c.num_examples / total), out=buf)
                        np.add(acc, buf, out=acc)
                    else:
                        acc += buf * float(c.num_examples)
                _read(base_fd, buf, lo)
                if spec.is_float:
                    np.add(buf, acc, out=buf)
                else:
                    buf += np.rint(acc / total).astype(dtype)
                yield buf.tobytes()
