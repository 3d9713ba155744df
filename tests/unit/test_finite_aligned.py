"""FiniteCheck on views that are not aligned (a payload inside a received message, a
tensor inside an ONNX file's raw_data): checked through a bounded aligned buffer, the first
bad element named exactly, whatever the size of the tensor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.gateway.core import finite
from sluice.gateway.core.errors import InvalidInput
from sluice.gateway.core.finite import FiniteCheck
from sluice.models.schema import Schema, TensorSpec


@settings(max_examples=80, deadline=None)
@given(
    count=st.integers(1, 3000),
    bad=st.one_of(st.none(), st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(
        [float("nan"), float("inf"), float("-inf"), 1e30]))),
    dtype=st.sampled_from(["<f4", "<f8", "<f2"]),
    shift=st.integers(1, 7),
    piece=st.integers(1, 512),
)  # fmt: skip
def test_unaligned_views_are_checked_in_bounded_pieces(
    count: int,
    bad: tuple[float, float] | None,
    dtype: str,
    shift: int,
    piece: int,
) -> None:
    values = np.linspace(-1, 1, count).astype(dtype)
    if bad is not None:
        with np.errstate(over="ignore"):  # 1e30 is inf in float16: bad either way
            values[int(bad[0] * count)] = bad[1]
    raw = memoryview(b"\0" * shift + values.tobytes())[shift:]  # unaligned for 2+ byte types
    schema = Schema((TensorSpec("w", (count,), dtype),))
    check = FiniteCheck(schema, max_abs=1e6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finite, "_ALIGN_FROM_BYTES", 0)
        mp.setattr(finite, "_ALIGN_PIECE_BYTES", piece)
        if bad is None:
            check.feed(raw)
        else:
            with pytest.raises(
                InvalidInput, match=rf"tensor 'w': element {int(bad[0] * count)} is"
            ):
                check.feed(raw)
    assert check._scratch.nbytes <= max(piece, values.itemsize)
