"""Reject NaN and Inf in a payload as it streams past, without a second pass over the file."""

from __future__ import annotations

import numpy as np

from sluice.gateway.core.errors import InvalidInput
from sluice.models.schema import Schema, numpy_dtype

_ALIGN_FROM_BYTES = 64 << 10  # smaller unaligned pieces are checked where they lie
_ALIGN_PIECE_BYTES = 1 << 20  # larger ones go through an aligned buffer of this size


class FiniteCheck:
    """Feed payload bytes in order; raises InvalidInput naming the first non-finite value
    (or, given max_abs, the first value of a larger magnitude)."""

    def __init__(self, schema: Schema, max_abs: float | None = None) -> None:
        self._max_abs = max_abs
        self._spans = list(schema.spans())
        self._index = 0
        self._pos = 0
        self._carry = b""  # a float split across two chunks
        self._scratch = np.empty(0, dtype=np.uint8)  # aligned copies of unaligned views

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view.nbytes:
            while self._index < len(self._spans) and self._pos >= self._spans[self._index][2]:
                self._index += 1
                self._carry = b""
            if self._index >= len(self._spans):
                return  # past the schema: the size check reports it
            spec, start, end = self._spans[self._index]
            take = min(end - self._pos, view.nbytes)
            if spec.is_float:
                self._check(spec.name, spec.dtype, view[:take], self._pos - start)
            self._pos += take
            view = view[take:]

    def _check(self, name: str, dtype: str, piece: memoryview, offset: int) -> None:
        item = numpy_dtype(dtype).itemsize
        if self._carry:
            need = item - len(self._carry)
            self._carry += bytes(piece[:need])
            piece = piece[need:]
            if len(self._carry) < item:
                return
            self._verify(name, dtype, self._carry, offset - (item - need))
            self._carry = b""
            offset += need
        whole = len(piece) // item * item
        if whole:
            self._verify(name, dtype, piece[:whole], offset)
        self._carry = bytes(piece[whole:])

    def _verify(self, name: str, dtype: str, raw: bytes | memoryview, offset: int) -> None:
        values = np.frombuffer(raw, dtype=numpy_dtype(dtype))
        if values.flags.aligned or values.nbytes < _ALIGN_FROM_BYTES:
            with np.errstate(invalid="ignore"):  # a NaN in a reduction is what we look for
                self._verify_values(name, values, offset)
            return
        # A view into a received message (the payload after its few header bytes) or into
        # an ONNX file's raw_data is seldom aligned; numpy then copies it piece by piece for
        # each reduction. One copy into a reused aligned buffer is cheaper than that for min
        # and max both; the buffer holds _ALIGN_PIECE_BYTES, whatever the tensor's size.
        step = max(1, _ALIGN_PIECE_BYTES // values.itemsize)
        for first in range(0, values.size, step):
            piece = self._aligned(values[first : first + step])
            with np.errstate(invalid="ignore"):
                self._verify_values(name, piece, offset + first * values.itemsize)

    def _aligned(self, values: np.ndarray) -> np.ndarray:
        if self._scratch.nbytes < values.nbytes:
            self._scratch = np.empty(values.nbytes, dtype=np.uint8)
        out = self._scratch[: values.nbytes].view(values.dtype)
        out.view(np.uint8)[:] = values.view(np.uint8)
        return out

    def _verify_values(self, name: str, values: np.ndarray, offset: int) -> None:
        bound = self._max_abs
        if bound is None:
            ok = np.isfinite(values)
            if ok.all():
                return
            what = "finite values only"
        else:
            # min/max pass over the values without a copy; NaN fails every comparison.
            low, high = float(values.min()), float(values.max())  # compared in float64
            if -bound <= low and high <= bound:
                return
            ok = np.abs(values.astype(np.float64)) <= bound
            what = f"finite values of magnitude at most {bound:g} only"
        element = int(np.argmin(ok))
        raise InvalidInput(
            f"tensor {name!r}: element {offset // values.itemsize + element} is "
            f"{values[element]}; updates must hold {what}"
        )
