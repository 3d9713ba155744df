"""The numbers each plot draws, built from ReportData alone: the plots draw exactly these,
the page embeds them as JSON, and tests compare them with what was pushed.

Bounded here, so that what is drawn and what is embedded are the same: at most
MAX_REGIONS regions per loss plot (those with the most points) and MAX_POINTS points per
scatter plot, spread evenly over the commit order; the totals say what was left out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from sluice.gateway.report.data import ReportData

MAX_LOSS_PLOTS = 4  # metrics whose name has "loss" in it, drawn one plot each
MAX_REGIONS = 20  # lines per loss plot
MAX_POINTS = 5_000  # points per scatter plot
PREFERRED = ("holdout_loss", "train_loss")  # what sluice's own trainers report
T = TypeVar("T")


@dataclass(frozen=True)
class MetricPoint:
    round: int
    region: str
    trainer: str
    value: float


@dataclass(frozen=True)
class MetricSeries:
    metric: str
    # region -> (round, mean over the region's trainers), rounds ascending
    region_means: dict[str, list[tuple[int, float]]]
    points: list[MetricPoint]  # one per trainer and round (its first update there)
    num_regions: int  # before the cap
    num_points: int  # of those regions, before thinning


@dataclass(frozen=True)
class NormPoint:
    round: int
    update_id: str
    trainer: str
    region: str
    norm: float | None  # None: not finite
    flagged: bool
    dropped: bool
    reason: str


@dataclass(frozen=True)
class EpsilonPoint:
    version: int
    round: int
    epsilon: float
    released: bool


@dataclass(frozen=True)
class ReleasePoint:
    version: int
    round: int
    published: bool
    total_bytes: int  # 0 when refused
    stages_s: dict[str, float]  # "fold" first when recorded, then the release's stages
    refused: str


def metric_names(data: ReportData) -> list[str]:
    """Every metric name trainers reported, sorted."""
    return sorted({name for u in data.updates for name in u.metrics})


def loss_metrics(data: ReportData) -> list[str]:
    """The metrics plotted as losses: sluice's own first, then others named like a loss."""
    names = metric_names(data)
    losses = [n for n in PREFERRED if n in names]
    losses += [n for n in names if "loss" in n.lower() and n not in PREFERRED]
    return losses[:MAX_LOSS_PLOTS]


def thin(items: Sequence[T], limit: int = MAX_POINTS) -> list[T]:
    """At most `limit` of the items, evenly spread, in order."""
    if len(items) <= limit:
        return list(items)
    step = -(-len(items) // limit)
    return list(items[::step])


def metric_series(data: ReportData, metric: str) -> MetricSeries:
    """Per region and round the mean of `metric` over the region's trainers, and the points
    it is the mean of (a trainer's first update in a round, as the fold counts it)."""
    seen: set[tuple[int, str]] = set()
    points = []
    for u in data.updates:  # commit order
        value = u.metrics.get(metric)
        if value is None or (u.round, u.trainer) in seen:
            continue
        seen.add((u.round, u.trainer))
        points.append(MetricPoint(u.round, u.region, u.trainer, value))
    groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        groups[p.region][p.round].append(p.value)
    size = {region: sum(len(v) for v in by_round.values()) for region, by_round in groups.items()}
    shown = sorted(sorted(groups, key=lambda r: (-size[r], r))[:MAX_REGIONS])
    means = {
        region: [(r, sum(vs) / len(vs)) for r, vs in sorted(groups[region].items())]
        for region in shown
    }
    points = [p for p in points if p.region in means]
    return MetricSeries(metric, means, thin(points), len(groups), len(points))


def norm_points(data: ReportData) -> list[NormPoint]:
    """Every screened update's norm, with screening's verdict, round by round."""
    who = {u.update_id: u for u in data.updates}
    out = []
    for round_no, c in sorted(data.closes.items()):
        if len(c.screened) != len(c.norms):
            continue  # an entry from before norms were recorded
        for i, (update_id, norm) in enumerate(zip(c.screened, c.norms, strict=True)):
            u = who.get(update_id)
            out.append(
                NormPoint(
                    round=round_no,
                    update_id=update_id,
                    trainer=u.trainer if u else "",
                    region=u.region if u else "",
                    norm=norm,
                    flagged=i in c.flagged,
                    dropped=i in c.dropped,
                    reason=c.reasons.get(i, ""),
                )
            )
    return out


def epsilon_points(data: ReportData) -> list[EpsilonPoint]:
    """Epsilon spent after each version (DP on); empty when DP was off throughout."""
    return [
        EpsilonPoint(
            c.version,
            round_no,
            c.epsilon,
            c.version in data.releases and data.releases[c.version].published,
        )
        for round_no, c in sorted(data.closes.items())
        if c.epsilon is not None
    ]


def release_points(data: ReportData) -> list[ReleasePoint]:
    """Per version: its release's total size and where the close's time went."""
    out = []
    for v in data.versions:
        r = data.releases.get(v.version)
        close = data.closes.get(v.round)
        stages = {} if close is None or close.fold_s is None else {"fold": close.fold_s}
        if r is not None:
            stages.update(r.stages_s)
        out.append(
            ReleasePoint(
                version=v.version,
                round=v.round,
                published=r is not None and r.published,
                total_bytes=sum(size for _, size in r.files) if r is not None else 0,
                stages_s=stages,
                refused=r.refused if r is not None else "",
            )
        )
    return out


@dataclass(frozen=True)
class ReportSeries:
    """Everything the plots draw, built once: the figures and the page's JSON block both
    come from this."""

    loss: list[MetricSeries]
    norms: list[NormPoint]  # flagged and not flagged thinned to MAX_POINTS each
    num_norms: int  # before thinning
    epsilon: list[EpsilonPoint]
    releases: list[ReleasePoint]


def build(data: ReportData) -> ReportSeries:
    norms = norm_points(data)
    kept = set(thin([i for i, p in enumerate(norms) if not p.flagged]))
    kept |= set(thin([i for i, p in enumerate(norms) if p.flagged]))
    return ReportSeries(
        loss=[metric_series(data, m) for m in loss_metrics(data)],
        norms=[p for i, p in enumerate(norms) if i in kept],
        num_norms=len(norms),
        epsilon=epsilon_points(data),
        releases=release_points(data),
    )
