"""The safetensors reader (gateway/core/tensorfile.py): a header is a valid layout of the
schema or an InvalidInput; a tied parameter's other name holds the very same bytes."""

from __future__ import annotations

import functools
import io
import itertools
import json
import struct
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.gateway.core.errors import InvalidInput
from sluice.gateway.core.tensorfile import DTYPES, check_ties, max_file_bytes, parse_layout
from sluice.models.schema import Schema, TensorSpec
from tests.integration.test_import_base import global_weights, kept, layout_of, schema

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


# 9. The header parser, fuzzed: any mutation is a layout that fits or an InvalidInput.


@functools.cache
def _valid_header() -> tuple[str, int]:
    header, data = layout_of(global_weights(seed=1))
    return json.dumps(header), len(data)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, int]:
    text, data_bytes = _valid_header()
    header = json.loads(text)
    names = list(header)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(names))
        op = draw(st.sampled_from(["drop", "value", "field", "offset", "shape", "add", "dtype"]))
        entry = header.get(name)
        if op == "drop":
            header.pop(name, None)
        elif op == "value":
            header[name] = draw(JSON)
        elif op == "add":
            header[draw(st.text(max_size=12))] = draw(JSON)
        elif isinstance(entry, dict):
            key = {"field": draw(st.text(max_size=12)), "offset": "data_offsets",
                   "shape": "shape", "dtype": "dtype"}[op]  # fmt: skip
            if op == "offset" and isinstance(entry.get(key), list) and entry[key]:
                i = draw(st.integers(0, len(entry[key]) - 1))
                entry[key][i] = entry[key][i] + draw(st.integers(-8, 8))
            elif op == "dtype":
                entry[key] = draw(st.sampled_from([*DTYPES, "U8", "BOOL", "f32"]))
            else:
                entry[key] = draw(JSON)
    raw = json.dumps(header).encode()
    if draw(st.booleans()):  # and sometimes the bytes themselves
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=4)) + raw[cut + draw(st.integers(0, 4)) :]
    return raw, data_bytes + draw(st.sampled_from([0, 0, 1, -1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_malformed_headers_are_refused_with_a_reason(case: tuple[bytes, int]) -> None:
    raw, data_bytes = case
    try:
        layout = parse_layout(raw, schema(), data_bytes)
    except InvalidInput as exc:
        assert str(exc)
        return
    # Accepted: it must be exactly a valid layout of the schema.
    specs = {t.name: t for t in schema().tensors}
    spans = sorted(layout.spans.values())
    assert spans[0][0] == 8 + len(raw) and spans[-1][1] == 8 + len(raw) + data_bytes
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    for name, (begin, end) in layout.spans.items():
        assert end - begin == specs[name].num_bytes
    assert set(layout.spans) | set(layout.kept) == set(specs)
    assert all(kept(n) for n in layout.kept)


# 10. Tied parameters: the other name may come along, only with the very same bytes.

TIED = Schema(
    (TensorSpec("embed.weight", (4, 3), "<f4"), TensorSpec("bias", (3,), "<f4")),
    aliases=(("out.weight", "embed.weight"),),
)


def _tied_file(arrays: Mapping[str, np.ndarray]) -> tuple[bytes, int, io.BytesIO]:
    header, data = layout_of(arrays)
    raw = json.dumps(header).encode()
    return raw, len(data), io.BytesIO(struct.pack("<Q", len(raw)) + raw + data)


def test_a_tied_name_is_optional_and_must_hold_its_first_names_bytes() -> None:
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    for arrays in ({"embed.weight": embed, "bias": bias},  # absent: fine
                   {"embed.weight": embed, "out.weight": embed.copy(), "bias": bias},
                   {"out.weight": embed.copy(), "bias": bias, "embed.weight": embed}):  # fmt: skip
        raw, data_bytes, f = _tied_file(arrays)
        layout = parse_layout(raw, TIED, data_bytes)
        assert set(layout.spans) == {"embed.weight", "bias"} and not layout.kept
        assert set(layout.ties) == ({"out.weight"} if "out.weight" in arrays else set())
        check_ties(f, layout, TIED)

    differ = embed.copy()
    differ[2, 1] = np.nextafter(differ[2, 1], np.float32(np.inf))  # one ulp
    raw, data_bytes, f = _tied_file({"embed.weight": embed, "out.weight": differ, "bias": bias})
    layout = parse_layout(raw, TIED, data_bytes)
    with pytest.raises(InvalidInput, match=r"'embed\.weight' and 'out\.weight' are tied"):
        check_ties(f, layout, TIED)
    negzero = np.zeros((4, 3), np.float32)  # equal as numbers, not as bytes
    raw, data_bytes, f = _tied_file({"embed.weight": negzero, "out.weight": -negzero, "bias": bias})
    with pytest.raises(InvalidInput, match="tied"):
        check_ties(f, parse_layout(raw, TIED, data_bytes), TIED)

    bads: list[tuple[dict[str, np.ndarray], str]] = [
        ({"embed.weight": embed, "out.weight": embed[:2].copy(), "bias": bias}, "'out.weight'"),
        ({"embed.weight": embed, "out.weight": embed.astype(np.float64), "bias": bias}, "dtype"),
        ({"out.weight": embed, "bias": bias}, "lacks 1 tensors"),
    ]
    for bad, says in bads:
        raw, data_bytes, _ = _tied_file(bad)
        with pytest.raises(InvalidInput, match=says):
            parse_layout(raw, TIED, data_bytes)
    # The bound on a file counts the tied copy: a file that carries it is not too large.
    _, _, whole = _tied_file({"embed.weight": embed, "out.weight": embed, "bias": bias})
    assert max_file_bytes(TIED) >= len(whole.getvalue())
    assert max_file_bytes(TIED) - max_file_bytes(Schema(TIED.tensors)) > embed.nbytes
