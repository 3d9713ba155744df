"""Bits hidden in weight values: hiding, reading, and what the gateway's fold leaves of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.lowbits import (
    Recovery,
    embed,
    extract,
    float32_words,
    fold,
    fold_weights,
    read_floats,
    recover_trained,
    release,
    secret_symbols,
    weighted_sum,
    with_floats,
)
from sluice.gateway.core.aggregation import Contribution
from sluice.models.schema import Schema, TensorSpec

# An integer tensor between the float ones: the carriers are the float32 words around it.
SCHEMA = Schema(
    (
        TensorSpec("conv.weight", (40, 250), "<f4"),
        TensorSpec("bn.num_batches_tracked", (), "<i8"),
        TensorSpec("fc.bias", (100,), "<f4"),
    )
)
NUM_EXAMPLES = (1800, 950, 4200, 2600, 700)
SECRET = bytes(range(256)) * 3


def _round(tmp: Path, k: int, bits: int, noise_std: float = 0.0) -> dict[str, Recovery]:
    """The attacker (first of k trainers) hides `bits` per weight; what each receiver reads."""
    rng = np.random.default_rng(k)
    words = float32_words(SCHEMA)
    n = words.size
    # Weights of magnitude 0.5..1 and deltas ~1e-3: trained - base is exact in float32.
    base = (rng.uniform(0.5, 1.0, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    deltas = [(rng.standard_normal(n) * 1e-3).astype(np.float32) for _ in range(k)]
    symbols = secret_symbols(SECRET, n, bits, key=7)
    deltas[0] = embed(base + deltas[0], symbols, bits) - base

    template = bytes(SCHEMA.payload_bytes)
    zero_path = tmp / "zero.bin"
    zero_path.write_bytes(template)
    contributions = []
    for i, (delta, examples) in enumerate(zip(deltas, NUM_EXAMPLES, strict=False)):
        path = tmp / f"delta-{i}.bin"
        path.write_bytes(with_floats(template, words, delta))
        contributions.append(Contribution(path, examples))
    aggregate = read_floats(fold(SCHEMA, zero_path, contributions), words)
    noise = (rng.standard_normal(n) * noise_std).astype(np.float32) if noise_std else None
    released = release(base, aggregate, noise)

    w = fold_weights(NUM_EXAMPLES[:k])
    others = weighted_sum(n, deltas[1:], w[1:])
    informed = recover_trained(released, base, others, float(w[0]))
    return {
        "naive": Recovery.of(extract(released, bits), symbols, bits),
        "informed": Recovery.of(extract(informed, bits), symbols, bits),
    }


@pytest.mark.parametrize("bits", [1, 4, 8, 16, 23])
def test_embed_then_extract_returns_the_symbols_and_keeps_the_high_bits(bits: int) -> None:
    values = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    symbols = secret_symbols(SECRET, values.size, bits, key=1)
    hidden = embed(values, symbols, bits)
    assert np.array_equal(extract(hidden, bits), symbols)
    high = ~np.uint32((1 << bits) - 1)
    assert np.array_equal(hidden.view(np.uint32) & high, values.view(np.uint32) & high)


def test_secret_symbols_are_the_secret_under_a_keystream() -> None:
    bits, n = 4, 1000
    keystream = secret_symbols(bytes(len(SECRET)), n, bits, key=3)
    plain = secret_symbols(SECRET, n, bits, key=3) ^ keystream
    stream = np.resize(np.unpackbits(np.frombuffer(SECRET, np.uint8)), n * bits).reshape(n, bits)
    assert np.array_equal(plain, (stream.astype(np.uint32) << np.arange(bits)).sum(axis=1))


def test_recovery_measures_exact_and_chance_reads() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.integers(0, 256, 100_000, dtype=np.uint32)
    exact = Recovery.of(hidden, hidden, 8)
    assert (exact.accuracy, exact.capacity_bits, exact.symbol_bits) == (1.0, 8.0, 8.0)
    guess = Recovery.of(rng.integers(0, 256, hidden.size, dtype=np.uint32), hidden, 8)
    assert guess.accuracy == pytest.approx(0.5, abs=0.01)
    assert guess.capacity_bits < 0.01
    assert guess.symbol_bits is not None and guess.symbol_bits < 0.01


@pytest.mark.parametrize("bits", [1, 8, 16])
def test_one_trainer_no_noise_every_hidden_bit_comes_through_the_fold(
    tmp_path: Path, bits: int
) -> None:
    got = _round(tmp_path, k=1, bits=bits)
    assert got["naive"].accuracy == 1.0
    assert got["informed"].accuracy == 1.0


@pytest.mark.parametrize(("k", "bits"), [(3, 1), (3, 8), (3, 16), (5, 8), (5, 16)])
def test_naive_receiver_is_near_chance_with_three_or_more_trainers(
    tmp_path: Path, k: int, bits: int
) -> None:
    assert 0.4 < _round(tmp_path, k, bits)["naive"].accuracy < 0.6


def test_large_noise_drives_the_informed_receiver_to_chance(tmp_path: Path) -> None:
    # Without noise, knowing the other deltas gives back most of 16 hidden bits...
    assert _round(tmp_path, k=3, bits=16)["informed"].accuracy > 0.85
    # ...noise far above 2^16 ulps of the weights leaves nothing to read.
    noisy = _round(tmp_path, k=3, bits=16, noise_std=0.05)["informed"]
    assert 0.45 < noisy.accuracy < 0.55
    assert noisy.capacity_bits < 0.05
