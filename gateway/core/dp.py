"""Central differential privacy: clip each update's norm, noise the aggregate, account epsilon.

The unit of privacy is one trainer's update in one round (add-or-remove-one, the relation
of Flower's DP wrappers and of McMahan et al. 2018). A DP round, in order:

    norms = update_norms(schema, contributions)         # one streamed pass per update
    scales = clip_scales(norms, C)                      # min(1, C / norm): Contribution.scale
    ... the strategy folds the clipped deltas ...
    add_noise(schema, out, GaussianNoise(noise_stddev(z_model, C, weights)))
    clipping = clipping.updated(norms)                  # adaptive: next round's C, after
    ledger = ledger.record(z, q)                        # epsilon(delta) for the manifest

z is the policy's noise multiplier for the whole round; z_model is z itself with fixed
clipping, and a little more with adaptive clipping, whose count noise spends the rest
(DpPolicy.model_noise_multiplier). The noise is calibrated to the C that clipped this
round; Flower calibrates it to the C already updated for the next round.

Clipping bounds what one update can move the example-weighted mean to w_max * C, so the
noise std is z * C * w_max (Flower's z * C / m when the m weights are equal). That bound
is FedAvg's: strategies that are not a weighted mean of the clipped deltas (FedAdam's
server optimizer, Krum's selection, the median) need their own sensitivity analysis.
Every version in a model's lineage is noised and recorded, and a release is
post-processing of it, so the ledger is per lineage, not per release.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sluice.gateway.core.aggregation import DEFAULT_BLOCK_BYTES, Contribution, _read
from sluice.gateway.core.scan import SCAN_WORKERS, scan_updates
from sluice.gateway.store.blobs import ChangedOnDisk, Proof
from sluice.models.schema import Schema

# --- norms and clipping --------------------------------------------------------------


def update_norms(
    schema: Schema,
    contributions: Sequence[Contribution],
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int = SCAN_WORKERS,
) -> list[float]:
    """L2 norm of each spooled delta's float tensors, as spooled (`scale` not applied): one
    streamed O_DIRECT pass per update (core/scan.py, which also checks its sha256 at a
    close).

    Integer tensors (BatchNorm counters) are left out: FedAvg rounds their mean and no
    scale reaches them, so clipping could not bound them anyway.
    """
    scans = scan_updates(schema, [c.path for c in contributions], None, block_bytes, workers)
    return [s.norm for s in scans]


def clip_scales(norms: Sequence[float], clipping_norm: float) -> list[float]:
    """min(1, C / norm) per update (1 for a zero update): the clipped delta has norm <= C."""
    if not clipping_norm > 0:
        raise ValueError(f"clipping_norm: expected > 0, got {clipping_norm}")
    return [1.0 if n <= clipping_norm else clipping_norm / n for n in norms]


def with_scales(
    contributions: Sequence[Contribution], scales: Sequence[float]
) -> list[Contribution]:
    """The contributions with their scale multiplied (FedBuff's staleness weight stays)."""
    return [replace(c, scale=c.scale * s) for c, s in zip(contributions, scales, strict=True)]


# --- adaptive clipping ---------------------------------------------------------------


@dataclass(frozen=True)
class AdaptiveClipping:
    """The clipping norm C of Andrew et al. 2021 (arXiv:1905.03871), kept with each version.

    After each round C moves geometrically toward the `target_quantile` of the update
    norms, from the noised fraction b of updates that C left unclipped:

        C <- C * exp(-clip_norm_lr * (b - target_quantile))

    as TF Privacy's QuantileEstimatorQuery (the authors' code): too many unclipped, C
    shrinks. Flower 1.42's `_geometric_update` applies the same formula to the *clipped*
    fraction, which pushes C away from the target (tests/unit/test_dp.py shows both).
    """

    clipping_norm: float  # C used to clip this round's updates
    target_quantile: float = 0.5  # fraction of updates C should leave unclipped
    clip_norm_lr: float = 0.2  # eta: C changes by at most a factor exp(eta) a round
    clipped_count_stddev: float = 0.0  # sigma_b: Gaussian noise on the unclipped count

    def __post_init__(self) -> None:
        if not self.clipping_norm > 0:
            raise ValueError(f"clipping_norm: expected > 0, got {self.clipping_norm}")
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"target_quantile: expected 0..1, got {self.target_quantile}")
        if not self.clip_norm_lr > 0:
            raise ValueError(f"clip_norm_lr: expected > 0, got {self.clip_norm_lr}")
        if not self.clipped_count_stddev >= 0:
            raise ValueError(
                f"clipped_count_stddev: expected >= 0, got {self.clipped_count_stddev}"
            )

    def unclipped_fraction(self, norms: Sequence[float], rng: np.random.Generator) -> float:
        """Noised fraction of norms <= C, kept in [0, 1] (TF Privacy clamps it too)."""
        if not norms:
            raise ValueError("adaptive clipping needs the norms of at least one update")
        count = sum(1 for n in norms if n <= self.clipping_norm)
        noised = count + self.clipped_count_stddev * float(rng.standard_normal())
        return min(1.0, max(0.0, noised / len(norms)))

    def updated(
        self, norms: Sequence[float], rng: np.random.Generator | None = None
    ) -> AdaptiveClipping:
        """The state for the next round, from this round's (unclipped) update norms."""
        fraction = self.unclipped_fraction(norms, rng or secure_generator())
        factor = math.exp(-self.clip_norm_lr * (fraction - self.target_quantile))
        return replace(self, clipping_norm=self.clipping_norm * factor)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdaptiveClipping:
        doc = json.loads(text)
        return cls(**{k: float(v) for k, v in doc.items()})


def adaptive_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """z for the model noise so that it and the count noise together spend `noise_multiplier`.

    The unclipped count has sensitivity 1/2, so the round is a Gaussian mechanism with
    z^-2 = z_model^-2 + (2 sigma_b)^-2 (Andrew et al.; Flower's
    compute_adaptive_noise_params). Needs z < 2 sigma_b.
    """
    if noise_multiplier == 0:
        return 0.0
    if not noise_multiplier < 2 * clipped_count_stddev:
        raise ValueError(
            f"clipped_count_stddev {clipped_count_stddev:g} is too small for noise_multiplier "
            f"{noise_multiplier:g}: adaptive clipping needs noise_multiplier < "
            f"2 * clipped_count_stddev"
        )
    return float((noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5)


# --- noise ---------------------------------------------------------------------------


def secure_generator() -> np.random.Generator:
    """A generator seeded with 128 bits from the OS's CSPRNG, for one round's noise."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def noise_stddev(noise_multiplier: float, clipping_norm: float, weights: Sequence[float]) -> float:
    """Per-coordinate std of the noise on a weighted mean of clipped deltas: z * C * max(w).

    `weights` are the fold's (n_i / sum n). One update moves the mean by at most w_i * C;
    with m equal weights this is Flower's compute_stdv, z * C / m. Calibrating to the
    largest weight means a trainer that inflates its num_examples raises everyone's
    noise instead of weakening the guarantee.
    """
    if not weights:
        raise ValueError("noise_stddev needs the weights of at least one update")
    return float(noise_multiplier * clipping_norm * max(weights))


# The noised release keeps this many bits below the leading bit of the noise std; finer
# bits are zero. See GaussianNoise.
SNAP_BITS = 12


class GaussianNoise:
    """Adds N(0, stddev^2) to float blocks in place, from a freshly seeded generator.

    The seed is drawn from `secrets` and never stored or logged: anyone holding it could
    regenerate the noise and subtract it from the release, which would undo the DP
    guarantee and reopen the low-bit channel (bench/README.md). A fresh generator per
    release also means noise recovered from one release says nothing about another.
    `rng` is for tests only.

    Floating point leaks what real-valued noise would hide (Mironov, CCS 2012): the
    rounding of `w + noise` depends on the low bits of w, so a weight's hidden low bits
    tilt the low bits of the noised value (bench/README.md, "With DP on"). The sum is
    therefore taken in float64 and snapped to a grid of 2^(floor(log2 stddev) - SNAP_BITS)
    before it is stored: every released value is a multiple of the grid, nothing below
    it survives, and the snapping error (grid / sqrt(12), about stddev / 7000) is small
    against the noise.
    """

    def __init__(self, stddev: float, rng: np.random.Generator | None = None) -> None:
        if not (math.isfinite(stddev) and stddev >= 0):
            raise ValueError(f"stddev: expected a finite value >= 0, got {stddev}")
        self.stddev = stddev
        self.grid = 2.0 ** (math.floor(math.log2(stddev)) - SNAP_BITS) if stddev > 0 else 0.0
        self._rng = rng or secure_generator()

    def add(self, block: np.ndarray) -> None:
        """block = snap(block + noise), the sum in float64, stored in the block's dtype."""
        if block.dtype.kind != "f":
            raise ValueError(f"noise goes on float tensors, got a {block.dtype} block")
        if self.stddev == 0:
            return
        total = self._rng.standard_normal(block.size)  # (n,) float64
        total *= self.stddev
        total += block.reshape(-1)
        total /= self.grid  # a power of two: exact
        np.rint(total, out=total)
        total *= self.grid
        np.copyto(block, total.reshape(block.shape), casting="same_kind")


def add_noise(
    schema: Schema,
    path: Path,
    noise: GaussianNoise,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    check: Proof | None = None,
    written: Callable[[memoryview], None] | None = None,
) -> None:
    """Add noise to every float tensor of a flat payload file, in place, block by block.

    Integer tensors (BatchNorm counters) are left as they are. Given `check` (a proof of
    what the strategy wrote, recorded as it wrote it), every block read is checked against
    it first, and ChangedOnDisk is raised at the end if the file was not that (someone
    wrote to it in between: a retry writes it anew); given `written`, every block of the
    result is fed to it in file order, as RoundInput.written is. Memory: one block, and
    one float64 draw of as many elements.
    """
    whole = check is not None or written is not None  # every block read, integers too
    with ExitStack() as stack:
        fd = os.open(path, os.O_RDWR)
        stack.callback(os.close, fd)
        raw = np.empty(max(block_bytes, 8), dtype=np.uint8)
        for spec, start, end in schema.spans():
            if not spec.is_float and not whole:
                continue
            dtype = spec.np_dtype
            step = max(block_bytes // dtype.itemsize, 1)
            for first in range(start, end, step * dtype.itemsize):
                count = min(step, (end - first) // dtype.itemsize)
                buf = raw[: count * dtype.itemsize].view(dtype)
                _read(fd, buf, first)
                if check is not None:
                    check.feed(buf.view(np.uint8).data)  # as read, before the noise
                if spec.is_float:
                    noise.add(buf)
                    if os.pwrite(fd, buf.view(np.uint8).data, first) != buf.nbytes:
                        raise OSError(f"short write at offset {first} of {path}")
                if written is not None:
                    written(memoryview(bytes(buf.view(np.uint8).data)))  # raw is reused
    if check is not None and not check.whole():
        raise ChangedOnDisk(
            f"{path.name}: not what the strategy wrote when the noise was added; a retry "
            "writes it anew"
        )


# --- policy and accounting -----------------------------------------------------------


@dataclass(frozen=True)
class DpPolicy:
    noise_multiplier: float  # z: noise std over the sensitivity, for the whole round
    clipping_norm: float  # C: fixed, or the first round's when adaptive
    max_epsilon: float  # egress: no release once the lineage has spent more
    delta: float = 1e-5  # the delta epsilon is reported at (well below 1 / population)
    # q: the chance each trainer of the population takes part in a round. Below 1 only if
    # participation is random and secret (Poisson sampling); who pushes first is neither.
    sampling_rate: float = 1.0
    adaptive: bool = False  # C follows AdaptiveClipping from clipping_norm
    target_quantile: float = 0.5  # adaptive: fraction of updates C leaves unclipped
    clip_norm_lr: float = 0.2  # adaptive: eta of the geometric update
    # adaptive: sigma_b, the std of the noise on the unclipped count. Andrew et al. and
    # Flower suggest (updates per round) / 20; it must exceed noise_multiplier / 2.
    clipped_count_stddev: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier: expected >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"clipping_norm: expected > 0, got {self.clipping_norm}")
        if not self.max_epsilon >= 0:
            raise ValueError(f"max_epsilon: expected >= 0, got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta: expected 0 < delta < 1, got {self.delta}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate: expected 0 < q <= 1, got {self.sampling_rate}")
        if self.adaptive:
            self.initial_clipping()  # validates the adaptive fields
            self.model_noise_multiplier()  # refuses a sigma_b too small for z

    def initial_clipping(self) -> AdaptiveClipping:
        """Adaptive clipping state before the first DP round of a lineage."""
        return AdaptiveClipping(
            self.clipping_norm, self.target_quantile, self.clip_norm_lr, self.clipped_count_stddev
        )

    def model_noise_multiplier(self) -> float:
        """z for the model noise: all of z with fixed clipping, less the count's share if not."""
        if not self.adaptive:
            return self.noise_multiplier
        return adaptive_noise_multiplier(self.noise_multiplier, self.clipped_count_stddev)


@dataclass(frozen=True)
class DpRound:
    noise_multiplier: float  # z of the whole round (model and count noise together)
    sampling_rate: float  # q


@dataclass(frozen=True)
class PrivacyLedger:
    """Every DP round in a model's lineage, oldest first; epsilon by RDP accounting.

    Each round is a Poisson-subsampled Gaussian mechanism, composed with dp-accounting's
    RdpAccountant (the analysis behind TF Privacy's compute_dp_sgd_privacy). A round
    without noise (z = 0), e.g. before DP was turned on, makes epsilon infinite.
    """

    rounds: tuple[DpRound, ...] = ()

    def record(self, noise_multiplier: float, sampling_rate: float) -> PrivacyLedger:
        return PrivacyLedger((*self.rounds, DpRound(noise_multiplier, sampling_rate)))

    def epsilon(self, delta: float) -> float:
        if not self.rounds:
            return 0.0
        # Imported here: dp-accounting (with scipy.signal) costs ~50 MB of RSS and ~0.9 s,
        # which a gateway without DP never needs. It ships no type information.
        import dp_accounting  # type: ignore[import-untyped]

        accountant = dp_accounting.rdp.RdpAccountant()
        # Composition commutes: equal rounds compose as one event, O(settings) not O(rounds).
        for r, count in Counter(self.rounds).items():
            event = dp_accounting.PoissonSampledDpEvent(
                r.sampling_rate, dp_accounting.GaussianDpEvent(r.noise_multiplier)
            )
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, count))
        return float(accountant.get_epsilon(delta))

    def to_json(self) -> str:
        return json.dumps({"rounds": [[r.noise_multiplier, r.sampling_rate] for r in self.rounds]})

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        doc = json.loads(text)
        return cls(tuple(DpRound(float(z), float(q)) for z, q in doc["rounds"]))


def dp_facts(
    ledger: PrivacyLedger, policy: DpPolicy, clipping_norm: float | None = None
) -> dict[str, object]:
    """What the release manifest states; `clipping_norm`: the last round's C if adaptive."""
    return {
        "epsilon": ledger.epsilon(policy.delta),
        "delta": policy.delta,
        "noise_multiplier": policy.noise_multiplier,
        "clipping_norm": policy.clipping_norm if clipping_norm is None else clipping_norm,
        "adaptive_clipping": policy.adaptive,
        "sampling_rate": policy.sampling_rate,
        "rounds": len(ledger.rounds),
        "accountant": "rdp",
    }
