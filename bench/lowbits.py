"""The known limit: bits hidden in the low mantissa bits of one trainer's weights, after FedAvg.

A malicious trainer writes a secret (an encrypted camera frame) into the `bits` lowest
mantissa bits of every float32 value of its trained weights and pushes the honest-looking
delta `trained - base`. The gateway folds it with k-1 honest deltas (the real
`fold_fedavg`, on spooled files), optionally adds Gaussian noise to the aggregate (where a
central-DP stage would), and releases `base + aggregate`. Three receivers read the release;
see RECEIVERS.

Run: python -m bench.lowbits [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS_DIR, Check, Report
from sluice.clients.scenes import REGIONS, make_clips
from sluice.clients.trainer import TrainConfig, compute_delta, train_local
from sluice.gateway.core.aggregation import Contribution, fold_fedavg
from sluice.models import registry
from sluice.models.schema import Schema

MANTISSA_BITS = 23
FRAME_SHAPE = (128, 256, 3)  # the secret: one uint8 camera frame, rows x columns x RGB
NUM_TRAINERS = (1, 2, 3, 5, 8)  # k: trainers in the round, the attacker first in fold order
HIDDEN_BITS = (1, 4, 8, 16)  # low mantissa bits the attacker overwrites per float32
NOISE_STDS = (0.0, 1e-8, 1e-6, 1e-4, 1e-2)  # Gaussian std per coordinate, in units of C
# Self-reported site sizes (the FedAvg weights); the attacker is the first one.
NUM_EXAMPLES = (1800, 950, 4200, 2600, 700, 3100, 1400, 5000)
BATCH_SIZE = 32  # clips per Adam step of the real local training
CLIPS_PER_TRAINER = 256  # 8 steps; --quick: 64 (2 steps)
# |accuracy - 50%| under this, or under 4 standard deviations of a coin, is "at chance".
CHANCE_BAND = 0.01
# Who reads the release. naive: the release alone. base: also the previous release (this
# round's base, public) and the attacker's FedAvg weight. informed: also every other
# trainer's delta, exactly (the worst case for the gateway).
RECEIVERS = ("naive", "base", "informed")


# --- hiding and reading bits ---------------------------------------------------------


def frame_secret(region: str = "shanghai", seed: int = 0) -> bytes:
    """One synthetic camera frame as raw uint8 bytes, (128, 256, 3): what the attacker leaks."""
    height, width, _ = FRAME_SHAPE
    frame = make_clips(region, 1, seed, height=height, width=width).frames[0]  # (3, H, W)
    return bytes((frame.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy().tobytes())


def secret_symbols(secret: bytes, num_values: int, bits: int, key: int) -> np.ndarray:
    """`bits` secret bits per value (uint32), the secret repeated and XORed with a keystream.

    An attacker encrypts before hiding, so every hidden bit is a fair coin: 50% is chance.
    """
    if not 1 <= bits <= MANTISSA_BITS:
        raise ValueError(f"bits: expected 1..{MANTISSA_BITS}, got {bits}")
    stream = np.resize(np.unpackbits(np.frombuffer(secret, np.uint8)), num_values * bits)
    packed = np.packbits(stream.reshape(num_values, bits), axis=1, bitorder="little")
    words = np.zeros((num_values, 4), np.uint8)
    words[:, : packed.shape[1]] = packed
    keystream = np.random.default_rng(key).integers(0, 1 << bits, num_values, dtype=np.uint32)
    return np.asarray(words.view("<u4")[:, 0] ^ keystream, dtype=np.uint32)


def embed(values: np.ndarray, symbols: np.ndarray, bits: int) -> np.ndarray:
    """float32 values with their `bits` lowest mantissa bits replaced by `symbols`."""
    mask = np.uint32((1 << bits) - 1)
    raw = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    out: np.ndarray = ((raw & ~mask) | (symbols & mask)).view(np.float32)
    return out


def extract(values: np.ndarray, bits: int) -> np.ndarray:
    """The `bits` lowest mantissa bits of float32 values, as uint32 symbols."""
    raw = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.asarray(raw & np.uint32((1 << bits) - 1), dtype=np.uint32)


def _entropy(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


@dataclass(frozen=True)
class Recovery:
    error_rates: tuple[float, ...]  # per hidden bit position, lowest mantissa bit first
    # bits - H(read - hidden mod 2^bits): what a decoder reading the bits as one number
    # gets; None where the sample is too small for the plug-in entropy (< 16 per value).
    symbol_bits: float | None

    @classmethod
    def of(cls, read: np.ndarray, hidden: np.ndarray, bits: int) -> Recovery:
        wrong = read ^ hidden
        rates = tuple(
            float(np.count_nonzero(wrong & np.uint32(1 << j))) / wrong.size for j in range(bits)
        )
        symbol = None
        if read.size >= 16 << bits:
            counts = np.bincount((read - hidden) & np.uint32((1 << bits) - 1))
            p = counts[counts > 0] / read.size
            # Miller-Madow: the plug-in entropy is low by about (bins - 1) / 2N nats.
            bias = (p.size - 1) / (2 * read.size * math.log(2))
            symbol = max(0.0, bits - float(-(p * np.log2(p)).sum()) - bias)
        return cls(rates, symbol)

    @property
    def accuracy(self) -> float:
        """Fraction of hidden bits read correctly; 0.5 is chance."""
        return 1.0 - sum(self.error_rates) / len(self.error_rates)

    @property
    def capacity_bits(self) -> float:
        """Surviving bits per parameter, each position a binary channel: sum of 1 - H(p)."""
        return sum(1.0 - _entropy(p) for p in self.error_rates)

    @property
    def best_bits(self) -> float:
        """The symbol estimate where there is one, else the per-position lower bound."""
        return max(self.symbol_bits or 0.0, self.capacity_bits)


# --- the round: payloads, the gateway's fold, the receivers ---------------------------


def float32_words(schema: Schema) -> np.ndarray:
    """Index of every float32 element of a payload viewed as uint32 words: the carriers."""
    parts = []
    for spec, start, end in schema.spans():
        if spec.dtype == "<f4":
            if start % 4:
                raise ValueError(f"tensor {spec.name!r}: offset {start} is not 4-byte aligned")
            parts.append(np.arange(start // 4, end // 4))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def read_floats(payload: bytes, words: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.frombuffer(payload, np.uint32)[words].view(np.float32)
    return out


def with_floats(payload: bytes, words: np.ndarray, values: np.ndarray) -> bytes:
    """`payload` with its float32 elements replaced (integer tensors untouched)."""
    out = np.frombuffer(payload, np.uint32).copy()
    out[words] = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return out.tobytes()


def fold(schema: Schema, base_path: Path, contributions: Sequence[Contribution]) -> bytes:
    return b"".join(fold_fedavg(schema, base_path, contributions))


def fold_weights(num_examples: Sequence[int]) -> np.ndarray:
    """n_i / sum(n) rounded to float32, exactly as fold_fedavg scales each float delta."""
    total = sum(num_examples)
    return np.array([n / total for n in num_examples], dtype=np.float32)


def release(base: np.ndarray, aggregate: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """The released float32 weights: base + (aggregate + noise), each sum rounded to float32."""
    out: np.ndarray = base + (aggregate if noise is None else aggregate + noise)
    return out


def weighted_sum(size: int, deltas: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """sum of float32(w_j * delta_j), accumulated in float64: what the others added."""
    out = np.zeros(size, np.float64)
    for delta, w in zip(deltas, weights, strict=True):
        out += delta * np.float32(w)
    return out


def recover_trained(
    released: np.ndarray, base: np.ndarray, others: np.ndarray | float, weight: float
) -> np.ndarray:
    """The attacker's trained weights as best recovered: base + (released - base - others) / w.

    `others` is weighted_sum of the other trainers' deltas, or 0 when they are unknown.
    What float32 rounding, noise or an unknown delta took stays lost.
    """
    b64 = base.astype(np.float64)
    return (b64 + (released.astype(np.float64) - b64 - others) / weight).astype(np.float32)


# --- the measurement -----------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    schema: Schema
    base: bytes  # payload of version 0
    trained: bytes  # the attacker's trained weights, before hiding anything
    deltas: tuple[bytes, ...]  # trained - base of every trainer, attacker first
    buffers: frozenset[str]  # names of BatchNorm running statistics (not parameters)
    clips: int  # per trainer
    seconds: float


def train_trainers(model: str, num_trainers: int, clips: int) -> Trained:
    """Real local training from version 0: one region per trainer, a few Adam steps each."""
    started = time.perf_counter()
    entry = registry.get(model)
    initial = entry.build(entry.init_seed)
    base_sd = {k: v.clone() for k, v in initial.state_dict().items()}
    schema = Schema.of(base_sd)
    regions = sorted(REGIONS)
    deltas, trained = [], b""
    for i in range(num_trainers):
        local = entry.build(entry.init_seed)
        data = make_clips(regions[i % len(regions)], clips, seed=i)
        train_local(local, data, TrainConfig(batch_size=BATCH_SIZE, seed=i))
        deltas.append(schema.flatten(compute_delta(local.state_dict(), base_sd)))
        if i == 0:
            trained = schema.flatten(local.state_dict())
    buffers = frozenset(name for name, _ in initial.named_buffers())
    seconds = time.perf_counter() - started
    base = schema.flatten(base_sd)
    return Trained(schema, base, trained, tuple(deltas), buffers, clips, seconds)


@dataclass(frozen=True)
class Cell:
    num_trainers: int
    attacker_weight: float  # float32(n_attacker / sum(n)), the fold's scale on its delta
    bits: int  # hidden bits per float32
    receiver: str  # one of RECEIVERS
    noise_rel: float  # noise std per coordinate, in units of C
    recovery: Recovery
    still_accuracy: float | None  # accuracy where no other trainer moved (delta exactly 0)


@dataclass(frozen=True)
class Measured:
    model: str
    clips: int  # trained on per trainer
    num_floats: int  # float32 values of the measured model: the carriers
    drivenet_floats: int  # the same for drivenet, to scale capacities to bytes
    clip_norm: float  # C: the largest natural ||delta|| of the trainers
    buffer_share: float  # share of C^2 that is BatchNorm running statistics
    still: dict[int, float]  # k -> fraction of coordinates no other trainer moved
    carrier_norm: dict[int, float]  # bits -> ||attacker delta - its natural delta|| / C
    identical: bool  # base + aggregate == fold_fedavg's own release, in every round
    train_s: float
    measure_s: float
    cells: tuple[Cell, ...]


def _buffer_share(trained: Trained, delta: np.ndarray) -> float:
    """Share of ||delta||^2 in BatchNorm running statistics rather than weights."""
    specs = [s for s in trained.schema.tensors if s.dtype == "<f4"]
    is_buffer = np.concatenate([np.full(s.num_elements, s.name in trained.buffers) for s in specs])
    squares = delta.astype(np.float64) ** 2
    return float(squares[is_buffer].sum() / squares.sum())


def _read_round(
    k: int,
    bits: int,
    aggregate: np.ndarray,
    base: np.ndarray,
    deltas: Sequence[np.ndarray],
    symbols: np.ndarray,
    noise: tuple[float, np.ndarray],  # C and a standard normal draw per coordinate
) -> list[Cell]:
    """Every receiver at every noise level, on one folded round."""
    w = fold_weights(NUM_EXAMPLES[:k])
    others = weighted_sum(base.size, deltas[1:k], w[1:])
    still = np.all(np.stack(deltas[1:k]) == 0, axis=0) if k > 1 else np.zeros(base.size, bool)
    clip_norm, standard = noise
    cells = []
    for rel in NOISE_STDS:
        released = release(base, aggregate, standard * np.float32(rel * clip_norm) if rel else None)
        reads = {
            "naive": released,
            "base": recover_trained(released, base, 0.0, float(w[0])),
            "informed": recover_trained(released, base, others, float(w[0])),
        }
        for receiver, values in reads.items():
            read = extract(values, bits)
            on_still = None
            if still.any():
                on_still = Recovery.of(read[still], symbols[still], bits).accuracy
            recovery = Recovery.of(read, symbols, bits)
            cells.append(Cell(k, float(w[0]), bits, receiver, rel, recovery, on_still))
    return cells


def measure(model: str, clips: int = CLIPS_PER_TRAINER) -> Measured:
    trained = train_trainers(model, max(NUM_TRAINERS), clips)
    schema, words = trained.schema, float32_words(trained.schema)
    base, natural = read_floats(trained.base, words), read_floats(trained.trained, words)
    deltas = [read_floats(d, words) for d in trained.deltas]
    norms = [float(np.linalg.norm(d.astype(np.float64))) for d in deltas]
    clip_norm = max(norms)
    secret = frame_secret()
    standard = np.random.default_rng(1).standard_normal(base.size, dtype=np.float32)
    started = time.perf_counter()
    cells: list[Cell] = []
    carrier_norm, identical = {}, True
    with tempfile.TemporaryDirectory(prefix="sluice-lowbits-") as tmp:
        directory = Path(tmp)
        base_path, zero_path = directory / "base.bin", directory / "zero.bin"
        base_path.write_bytes(trained.base)
        zero_path.write_bytes(bytes(schema.payload_bytes))
        paths = [directory / f"delta-{i}.bin" for i in range(len(deltas))]
        for path, payload in zip(paths[1:], trained.deltas[1:], strict=True):
            path.write_bytes(payload)
        for bits in HIDDEN_BITS:
            symbols = secret_symbols(secret, base.size, bits, key=bits)
            attack = embed(natural, symbols, bits) - base  # float32, like compute_delta
            carrier = attack - deltas[0].astype(np.float64)
            carrier_norm[bits] = float(np.linalg.norm(carrier)) / clip_norm
            paths[0].write_bytes(with_floats(trained.deltas[0], words, attack))
            for k in NUM_TRAINERS:
                n = NUM_EXAMPLES[:k]
                contributions = [Contribution(p, m) for p, m in zip(paths, n, strict=False)]
                # The fold on a zero base is the aggregate itself (0 + x == x): noise goes
                # between the fold and the base, where a DP stage would add it.
                aggregate = read_floats(fold(schema, zero_path, contributions), words)
                gateway = read_floats(fold(schema, base_path, contributions), words)
                identical &= bool(np.array_equal(release(base, aggregate, None), gateway))
                noise = (clip_norm, standard)
                cells += _read_round(k, bits, aggregate, base, deltas, symbols, noise)
    return Measured(
        model=model,
        clips=clips,
        num_floats=base.size,
        drivenet_floats=float32_words(registry.get("drivenet").schema()).size,
        clip_norm=clip_norm,
        buffer_share=_buffer_share(trained, deltas[norms.index(clip_norm)]),
        still={
            k: float(np.all(np.stack(deltas[1:k]) == 0, axis=0).mean()) for k in NUM_TRAINERS[1:]
        },
        carrier_norm=carrier_norm,
        identical=identical,
        train_s=trained.seconds,
        measure_s=time.perf_counter() - started,
        cells=tuple(cells),
    )


# --- the report ----------------------------------------------------------------------

Table = dict[tuple[int, int, str, float], Cell]  # (k, bits, receiver, noise_rel) -> cell


def channel_bound_bits(num_floats: int, weight: float, noise_rel: float) -> float:
    """Shannon bound, bits per release, for a carrier that spends the whole clip budget C.

    Gaussian channel seen by the informed receiver: signal (w C)^2 / P per coordinate
    against noise (noise_rel C)^2, so C cancels: P/2 log2(1 + w^2 / (P noise_rel^2)).
    """
    return num_floats / 2 * math.log2(1 + weight**2 / (num_floats * noise_rel**2))


def _amount(num_bytes: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= size:
            return f"{num_bytes / size:.3g} {unit}"
    return f"{num_bytes:.3g} B"


def _header(prefix: str, columns: Sequence[str], width: int) -> list[str]:
    head = prefix + "".join(f"{c:>{width}}" for c in columns)
    return [head, "-" * len(head)]


def _tables(m: Measured, at: Table) -> list[str]:
    noises = [f"noise {rel:g}" for rel in NOISE_STDS]
    lines = [
        "bit accuracy (50% = chance) and surviving bits per parameter, per position "
        "(sum of 1 - H(p)); noise: Gaussian std per coordinate, in units of C",
        *_header(f"{'k':>2} {'w_att':>6} {'bits':>4} {'receiver':<9}", noises, 14),
    ]
    for k in NUM_TRAINERS:
        for bits in HIDDEN_BITS:
            for receiver in RECEIVERS:
                row = [at[k, bits, receiver, rel] for rel in NOISE_STDS]
                text = "".join(
                    f"{c.recovery.accuracy:>8.1%} {c.recovery.capacity_bits:5.2f}" for c in row
                )
                lines.append(f"{k:>2} {row[0].attacker_weight:>6.3f} {bits:>4} {receiver:<9}{text}")
    lines += [
        "",
        "informed receiver: surviving bits per parameter, read as one number (bits - H(error); "
        "* per position where the sample is too small) and MB per drivenet release "
        f"({m.drivenet_floats:,} float32; one 128x256x3 frame is {math.prod(FRAME_SHAPE):,} B)",
        *_header(f"{'k':>2} {'bits':>4}", noises, 15),
    ]
    for k in NUM_TRAINERS:
        for bits in HIDDEN_BITS:
            text = ""
            for rel in NOISE_STDS:
                r = at[k, bits, "informed", rel].recovery
                star = "*" if r.symbol_bits is None else " "
                text += f"{r.best_bits:>6.2f}{star}{r.best_bits * m.drivenet_floats / 8e6:>6.2f}MB"
            lines.append(f"{k:>2} {bits:>4}{text}")
    lines += [
        "",
        "bound, computed not measured: what an informed receiver could get per drivenet release "
        "from a carrier spending the whole clip budget C; DP z=1: noise = w_max C",
        *_header(f"{'k':>2} {'w_att':>6}", [*noises[1:], "DP z=1"], 14),
    ]
    for k in NUM_TRAINERS:
        w = fold_weights(NUM_EXAMPLES[:k])
        levels = [*NOISE_STDS[1:], float(w.max())]
        bound = [channel_bound_bits(m.drivenet_floats, float(w[0]), rel) / 8 for rel in levels]
        lines.append(f"{k:>2} {w[0]:>6.3f}" + "".join(f"{_amount(b):>14}" for b in bound))
    lines += [
        "",
        "receiver with the base only, no noise: accuracy on the coordinates no other trainer "
        "moved (dead ReLU units), and their share of all coordinates",
        *_header(f"{'k':>2} {'share':>6}", [f"{b} bits" for b in HIDDEN_BITS], 9),
    ]
    for k in NUM_TRAINERS[1:]:
        accuracies = [at[k, b, "base", 0.0].still_accuracy for b in HIDDEN_BITS]
        text = "".join(f"{a:>9.1%}" if a is not None else f"{'-':>9}" for a in accuracies)
        lines.append(f"{k:>2} {m.still[k]:>6.1%}{text}")
    lines += ["", "what hiding adds to the attacker's delta: ||carrier|| in units of C"]
    lines += [f"{bits:>2} hidden bits: {m.carrier_norm[bits]:.3g} C" for bits in HIDDEN_BITS]
    return lines


def _span(cells: Sequence[Cell]) -> str:
    accuracies = [c.recovery.accuracy for c in cells]
    return f"{min(accuracies):.1%}..{max(accuracies):.1%} over {len(cells)} cells"


def _checks(m: Measured, at: Table) -> list[Check]:
    def cells(receiver: str | None, ks: Sequence[int], noises: Sequence[float]) -> list[Cell]:
        return [
            c
            for c in m.cells
            if receiver in (None, c.receiver) and c.num_trainers in ks and c.noise_rel in noises
        ]

    def at_chance(group: list[Cell]) -> bool:
        return all(
            abs(c.recovery.accuracy - 0.5) < max(CHANCE_BAND, 2 / math.sqrt(m.num_floats * c.bits))
            for c in group
        )

    k1 = cells(None, [1], [0.0])
    naive2, naive3 = cells("naive", [2], NOISE_STDS), cells("naive", [3, 5, 8], NOISE_STDS)
    base3 = cells("base", [3, 5, 8], [0.0])
    loud = cells(None, NUM_TRAINERS, [rel for rel in NOISE_STDS if rel >= 1e-4])
    # The widest hiding whose symbol estimate the sample supports.
    bits = max(b for b in HIDDEN_BITS if at[8, b, "informed", 0.0].recovery.symbol_bits is not None)
    lost = {}
    for k in NUM_TRAINERS:
        c = at[k, bits, "informed", 0.0]
        lost[k] = (bits - c.recovery.best_bits, -math.log2(c.attacker_weight))
    k3, quiet = at[3, 16, "informed", 0.0].recovery, at[3, 16, "informed", 1e-8].recovery
    return [
        Check(
            "noise-free release = base + aggregate is fold_fedavg's own output, every round",
            m.identical,
            "byte for byte on every float32",
        ),
        Check(
            "k=1, no noise: every receiver reads at least 98% of the hidden bits",
            all(c.recovery.accuracy >= 0.98 for c in k1),
            _span(k1),
        ),
        Check("naive receiver, k>=3: at chance", at_chance(naive3), _span(naive3)),
        Check(
            "naive receiver, k=2: under 60%",
            all(c.recovery.accuracy < 0.6 for c in naive2),
            _span(naive2),
        ),
        Check(
            "receiver with the base but not the other deltas, k>=3, no noise: under 60%",
            all(c.recovery.accuracy < 0.6 for c in base3),
            _span(base3),
        ),
        Check(
            "informed receiver, k=3, no noise, 16 bits: most hidden bits recovered",
            k3.accuracy > 0.75,
            f"{k3.accuracy:.1%} of bits, {k3.best_bits:.1f} bits/param, "
            f"{k3.best_bits * m.drivenet_floats / 8e6:.1f} MB per drivenet release",
        ),
        Check(
            f"float32 rounding costs the informed receiver ~log2(N/n_att) of {bits} bits",
            all(abs(lost_k - predicted) <= 1.0 for lost_k, predicted in lost.values()),
            ", ".join(f"k={k}: {a:.1f} (pred. {p:.1f})" for k, (a, p) in lost.items()),
        ),
        Check(
            "noise 1e-8 C: the informed receiver, k=3, 16 bits, still reads some bits",
            quiet.best_bits > 0.1,
            f"{quiet.accuracy:.1%}, {quiet.best_bits:.2f} bits/param",
        ),
        Check("noise >= 1e-4 C: every receiver at chance", at_chance(loud), _span(loud)),
    ]


def build_report(m: Measured) -> Report:
    report = Report(
        "lowbits",
        f"Low bits: a secret in the low mantissa bits of 1 of k trainers' {m.model} updates "
        f"({m.num_floats:,} float32), after the gateway's FedAvg",
    )
    at = {(c.num_trainers, c.bits, c.receiver, c.noise_rel): c for c in m.cells}
    steps = -(-m.clips // BATCH_SIZE)
    report.notes += [
        f"deltas: real training, {m.clips} clips and {steps} Adam steps per trainer "
        f"({m.train_s:.1f} s); C = largest natural ||delta|| = {m.clip_norm:.3f} "
        f"({m.buffer_share:.0%} of C^2 is BatchNorm running statistics)",
        f"num_examples {NUM_EXAMPLES} (attacker first in fold order; w_att = its FedAvg weight)",
        *_tables(m, at),
        f"measured {len(m.cells)} cells in {m.measure_s:.1f} s",
    ]
    report.checks += _checks(m, at)
    report.data = asdict(m)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lowbits", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="drivenet-tiny, 2 training steps per trainer"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    measured = measure("drivenet-tiny", 64) if args.quick else measure("drivenet")
    report = build_report(measured)
    print(f"\n== {report.title}")
    for line in report.notes:
        print(line)
    for check in report.checks:
        print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"lowbits{'-quick' if args.quick else ''}.json"
    saved = {
        "title": report.title,
        "checks": [asdict(c) for c in report.checks],
        "data": report.data,
    }
    out.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"\nresults saved to {out} ({time.perf_counter() - started:.1f} s in all)")
    return 0 if all(c.ok for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
