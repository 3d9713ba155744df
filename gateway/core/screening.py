"""Screen a round's updates before aggregation: flag, and by policy drop, outlier norms.

Non-finite values never get this far: ingest refuses NaN and Inf as the payload streams
in (gateway.core.finite). What is left to catch here is an update that is finite but far
larger than the round's others, e.g. a delta scaled 100x to drag FedAvg.

The rule, on the norms from gateway.core.dp.update_norms: with at least `min_updates`
updates, take x = log(norm) and the round's median m and median absolute deviation MAD
of x. An update is an outlier when both

    0.6745 * (x - m) / MAD > max_robust_z      (Iglewicz and Hoaglin's modified z-score)
    norm > min_ratio * median norm             (so a tight round does not flag 1.2x)

The log makes the rule scale-free (a 100x update is the same outlier whatever the
model), and median and MAD stay put when fewer than half the updates are hostile. Only
large norms are flagged: a small update moves the aggregate little. An infinite norm
(a float64 tensor whose squares overflow) is always flagged.

What a norm cannot see: a sign-flipped update has its honest norm, and low-bit hiding
adds almost nothing to it (bench/README.md). Robust strategies (median, Krum, Bulyan)
answer the first, DP noise the second. With DP on, clipping already bounds a scaled
update to C, and a rule that drops updates by comparing them with the others is not
covered by the DP accounting (one trainer's update can change whether another's is
dropped): flag, but leave `drop_outliers` off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

T = TypeVar("T")

_MAD_TO_Z = 0.6745  # the normal's MAD is 0.6745 sigma: scales MAD to a z-score


@dataclass(frozen=True)
class ScreeningPolicy:
    drop_outliers: bool = False  # False: flag and audit only; True: also leave them out
    max_robust_z: float = 3.5  # modified z-score of log(norm) above which an update is flagged
    min_ratio: float = 3.0  # and its norm must exceed this many times the round's median
    min_updates: int = 3  # with fewer, there is no robust "rest of the round": flag nothing


@dataclass(frozen=True)
class ScreeningResult:
    flagged: list[int]  # indices (in the order given) of outlier updates
    dropped: list[int]  # the flagged ones left out of the aggregate (drop_outliers)
    reasons: dict[int, str] = field(default_factory=dict)  # index -> why, for the audit log
    norms: tuple[float, ...] = ()  # every update's norm, in the order given

    def kept(self, items: Sequence[T]) -> list[T]:
        """The items (contributions, norms, update ids) of the updates not dropped."""
        dropped = set(self.dropped)
        return [item for i, item in enumerate(items) if i not in dropped]

    def facts(self) -> dict[str, object]:
        """For the audit log: JSON-ready, indices as strings."""
        return {
            "flagged": self.flagged,
            "dropped": self.dropped,
            "reasons": {str(i): r for i, r in self.reasons.items()},
            "norms": [n if math.isfinite(n) else None for n in self.norms],  # JSON has no inf
        }


def screen(norms: Sequence[float], policy: ScreeningPolicy | None = None) -> ScreeningResult:
    """Flag (and by policy drop) the updates whose norm is an outlier against the round."""
    policy = policy or ScreeningPolicy()
    reasons: dict[int, str] = {}
    for i, n in enumerate(norms):
        if not math.isfinite(n):
            reasons[i] = f"norm {n} is not finite"
    finite = [(i, n) for i, n in enumerate(norms) if math.isfinite(n)]
    if len(norms) >= policy.min_updates and finite:
        values = np.array([n for _, n in finite], dtype=np.float64)
        median = float(np.median(values))
        logs = np.log(np.maximum(values, np.finfo(np.float64).tiny))
        centre = float(np.median(logs))
        mad = float(np.median(np.abs(logs - centre)))
        for (i, n), x in zip(finite, logs, strict=True):
            z = math.inf if mad == 0 else _MAD_TO_Z * (float(x) - centre) / mad
            if z > policy.max_robust_z and n > policy.min_ratio * median:
                times = f"{n / median:.3g}x" if median > 0 else "above"
                reasons[i] = (
                    f"norm {n:.4g} is {times} the round's median {median:.4g} "
                    f"(robust z {z:.3g} over {len(norms)} updates)"
                )
    flagged = sorted(reasons)
    dropped = flagged if policy.drop_outliers else []
    return ScreeningResult(
        flagged, list(dropped), {i: reasons[i] for i in flagged}, tuple(float(n) for n in norms)
    )
