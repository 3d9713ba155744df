"""Streaming FedAvg: fold spooled delta updates block by block, never N updates in memory."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Neither ships type information (scipy's stubs are a separate package we do not need).
from scipy.linalg import blas  # type: ignore[import-untyped]
from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

from models.schema import Schema

# 1 MiB blocks stay in the CPU caches between the read and the axpy, and keep the fold's
# memory at 4 MiB whatever the model (bench/: as fast as 8 MiB blocks at 25M-100M params).
DEFAULT_BLOCK_BYTES = 1 << 20
# y += a * x in one pass (BLAS axpy) for native float32/float64: numpy needs a multiply
# and an add, two passes over the block (bench/README.md: ~3x the arithmetic throughput).
_AXPY = {np.dtype(np.float32): blas.saxpy, np.dtype(np.float64): blas.daxpy}


@functools.cache
def _blas() -> ThreadpoolController:
    """The loaded BLAS libraries. The fold runs them on one thread: on a block of 1 MiB,
    OpenBLAS's thread hand-off costs more than it gains (bench: 0.21 s vs 0.30 s for 16 x
    100 MB), and the gateway's other threads want the other cores anyway."""
    return ThreadpoolController().select(user_api="blas")


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


def fold_fedavg(
    schema: Schema,
    base_path: Path,
    contributions: Sequence[Contribution],
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[bytes]:
    """Yield the new global payload, base + sum(n_i * delta_i) / sum(n_i), block by block.

    Contributions are folded in the given order, so the same order gives the same bytes.
    Float tensors accumulate in their own dtype (float32 like Flower's `aggregate`), with
    one BLAS axpy per block and contribution for float32/float64 (its rounding may differ
    from numpy's multiply-then-add in the last bit; the same machine gives the same bytes).
    Integer tensors (BatchNorm's num_batches_tracked) accumulate in float64 and the
    weighted mean delta is rounded half-to-even: a counter stays an integer, unlike
    Flower's in-place FedAvg, which multiplies it by a weight truncated to 0.

    Memory: three blocks of `block_bytes` (accumulator, read buffer, output), plus one
    scratch block while folding an integer tensor, whatever the number of contributions
    or the size of the model. Accumulator and buffers are allocated once and reused.
    """
    if not contributions:
        raise ValueError("fold_fedavg needs at least one contribution")
    total = sum(c.num_examples for c in contributions)
    if total <= 0 or any(c.num_examples <= 0 for c in contributions):
        raise ValueError("every contribution needs num_examples > 0")
    # Raw byte arenas, viewed per block in the tensor's dtype (ints: float64 accumulator).
    acc_raw = np.empty(max(block_bytes, 8), dtype=np.uint8)
    buf_raw = np.empty(max(block_bytes, 8), dtype=np.uint8)
    has_integers = any(not spec.is_float for spec in schema.tensors)
    scratch_raw = np.empty(max(block_bytes, 8) if has_integers else 0, dtype=np.uint8)
    with ExitStack() as stack:
        stack.enter_context(_blas().limit(limits=1))
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
            # Elements per block: as many as fit block_bytes in the wider of the two dtypes.
            step = max(block_bytes // max(dtype.itemsize, acc_dtype.itemsize), 1)
            axpy = _AXPY.get(dtype) if spec.is_float else None
            for first in range(start, end, step * dtype.itemsize):
                count = min(step, (end - first) // dtype.itemsize)
                acc = acc_raw[: count * acc_dtype.itemsize].view(acc_dtype)
                buf = buf_raw[: count * dtype.itemsize].view(dtype)
                acc.fill(0)
                for fd, c in zip(fds, contributions, strict=True):
                    _read(fd, buf, first)
                    if axpy is not None:
                        axpy(buf, acc, a=c.scale * c.num_examples / total)  # acc in place
                    elif spec.is_float:
                        np.multiply(buf, dtype.type(c.scale * c.num_examples / total), out=buf)
                        np.add(acc, buf, out=acc)
                    else:
                        weighted = scratch_raw[: count * 8].view(np.float64)
                        np.multiply(buf, float(c.num_examples), out=weighted)
                        np.add(acc, weighted, out=acc)
                _read(base_fd, buf, first)
                if spec.is_float:
                    np.add(buf, acc, out=buf)
                else:
                    np.divide(acc, total, out=acc)
                    np.rint(acc, out=acc)
                    mean_delta = scratch_raw[: count * dtype.itemsize].view(dtype)
                    np.copyto(mean_delta, acc, casting="unsafe")
                    np.add(buf, mean_delta, out=buf)
                yield buf.tobytes()
