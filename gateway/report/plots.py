"""The report's figures, drawn with matplotlib's object API (no pyplot, no display) from the
series in series.py and nothing else.

Every artist that carries data has a gid naming what it is ("mean:<region>", "points",
"norms:flagged", ...), so a test can read back exactly what was drawn. Text from trainers
(metric names) never reaches mathtext: titles are set with parse_math=False, legend labels
have their dollar signs escaped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sluice.gateway.report.series import (
    EpsilonPoint,
    MetricSeries,
    NormPoint,
    ReleasePoint,
    ReportSeries,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_STAGES = 8  # stacked timing bars
MAX_BARS = 60  # versions drawn as bars; more as points (sizes) or stacked areas (timings)
# The close's stages in the order they run (gateway/core/folding.py, gateway/export/publish.py);
# the audit entry stores them as a JSON object, which does not keep an order.
STAGES = ("fold", "trim", "write", "parity", "guard", "sync")
_SIZE = (8.0, 3.6)  # inches; 100 dpi


@dataclass
class Plot:
    key: str  # stable, for anchors and tests: "loss:holdout_loss", "norms", ...
    title: str  # may hold a trainer's metric name: escape it for HTML
    figure: Figure | None  # None: nothing to draw, see note
    notes: list[str]


def _cut(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def label(value: str) -> str:
    """A trainer's string as a legend label: cut, its dollar signs escaped (mathtext would
    parse them, and raise on bad TeX), not hidden (labels starting with '_' are)."""
    cut = _cut(value).replace("$", r"\$")
    return " " + cut if cut.startswith("_") else cut


def _integer_x(ax: Axes) -> None:
    """Rounds and versions are whole numbers: no 1.5 on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure() -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=_SIZE, dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _legend(ax: Axes, entries: int, outside: bool = False) -> None:
    """Inside the axes while it is small, else to the right (two columns past 12)."""
    if entries <= 6 and not outside:
        ax.legend(fontsize="small")
        return
    ax.legend(
        fontsize="small" if entries <= 12 else "x-small",
        ncols=1 if entries <= 12 else 2,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )


def _thinned(shown: int, total: int) -> list[str]:
    return [f"{shown} of {total} points drawn, evenly spread."] if shown < total else []


def figures(series: ReportSeries, max_epsilon: float | None = None) -> list[Plot]:
    """Every plot of the report, in page order (figures not yet rendered)."""
    plots = [loss_plot(s) for s in series.loss]
    if not plots:
        plots.append(Plot("loss", "Loss per region", None, ["No trainer reported a loss."]))
    plots.append(norms_plot(series.norms, series.num_norms))
    plots.append(epsilon_plot(series.epsilon, max_epsilon))
    plots.extend(release_plots(series.releases))
    return plots


def png(figure: Figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def loss_plot(s: MetricSeries) -> Plot:
    import matplotlib as mpl

    notes = _thinned(len(s.points), s.num_points)
    if len(s.region_means) < s.num_regions:
        notes.append(
            f"{len(s.region_means)} of {s.num_regions} regions drawn (those with most points)."
        )
    figure, ax = _figure()
    cmap = mpl.colormaps["tab20" if len(s.region_means) > 10 else "tab10"]
    colors = {region: cmap(i % cmap.N) for i, region in enumerate(s.region_means)}
    ax.scatter(
        [p.round for p in s.points],
        [p.value for p in s.points],
        s=12,
        alpha=0.45,
        c=[colors[p.region] for p in s.points],
        gid="points",
    )
    for region, points in s.region_means.items():
        ax.plot(
            [r for r, _ in points],
            [v for _, v in points],
            marker="o" if len(points) <= 30 else None,
            color=colors[region],
            label=label(region),
            gid=f"mean:{region}",
        )
    # Titles from trainers' strings are set with parse_math=False: shown as sent.
    ax.set_xlabel("round")
    ax.set_ylabel(_cut(s.metric), parse_math=False)
    title = _cut(f"{s.metric}: mean per region (lines), per trainer (dots)", 80)
    ax.set_title(title, parse_math=False)
    _integer_x(ax)
    if s.region_means:
        _legend(ax, len(s.region_means))
    return Plot(f"loss:{s.metric}", f"{s.metric} per region and round", figure, notes)


def norms_plot(points: list[NormPoint], total: int) -> Plot:
    title = "Update norms and screening"
    if not points:
        return Plot("norms", title, None, ["No round has closed with recorded update norms."])
    notes = _thinned(len(points), total)
    infinite = sum(1 for p in points if p.norm is None)
    if infinite:
        notes.append(f"{infinite} infinite norms (always flagged) are not drawn.")
    figure, ax = _figure()
    # (name, gid, which, marker, size, colour)
    for name, gid, which, marker, size, color in (
        ("not flagged", "norms:plain", (False, False), "o", 14, "tab:blue"),
        ("flagged, kept", "norms:flagged", (True, False), "^", 40, "tab:orange"),
        ("flagged, dropped", "norms:dropped", (True, True), "x", 60, "tab:red"),
    ):
        chosen = [
            (p.round, p.norm)
            for p in points
            if (p.flagged, p.dropped) == which and p.norm is not None
        ]
        if not chosen and which != (False, False):
            continue
        ax.scatter(
            [r for r, _ in chosen],
            [n for _, n in chosen],
            marker=marker,
            s=size,
            color=color,
            alpha=1.0 if which[0] else 0.6,
            label=f"{name} ({len(chosen)})",
            gid=gid,
            zorder=3 if which[0] else 2,
        )
    finite = [p.norm for p in points if p.norm is not None]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("L2 norm of the update")
    ax.set_title(title)
    _integer_x(ax)
    ax.legend(fontsize="small")
    return Plot("norms", title, figure, notes)


def epsilon_plot(points: list[EpsilonPoint], max_epsilon: float | None) -> Plot:
    title = "Privacy budget: epsilon spent"
    if not points:
        return Plot("epsilon", title, None, ["DP is off: no round recorded an epsilon."])
    figure, ax = _figure()
    ax.plot(
        [p.version for p in points],
        [p.epsilon for p in points],
        color="tab:purple",
        marker="o",
        label="epsilon after the version",
        gid="epsilon",
    )
    refused = [p for p in points if not p.released]
    if refused:
        ax.scatter(
            [p.version for p in refused],
            [p.epsilon for p in refused],
            marker="x",
            s=60,
            color="tab:red",
            label="not released",
            gid="epsilon:refused",
            zorder=3,
        )
    if max_epsilon is not None:
        ax.axhline(
            max_epsilon,
            color="tab:red",
            linestyle="--",
            label=f"budget {max_epsilon:g}",
            gid="epsilon:budget",
        )
    ax.set_xlabel("version")
    ax.set_ylabel("epsilon")
    ax.set_title(title)
    _integer_x(ax)
    ax.legend(fontsize="small")
    return Plot("epsilon", title, figure, [])


def release_plots(points: list[ReleasePoint]) -> list[Plot]:
    if not points:
        note = ["No version has been made yet."]
        return [
            Plot("release:size", "Release sizes", None, note),
            Plot("release:time", "Where each close's time went", None, note),
        ]
    return [_sizes(points), _timings(points)]


def size_unit(largest: int) -> tuple[str, float]:
    for name, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if largest >= size:
            return name, size
    return "bytes", 1.0


def _sizes(points: list[ReleasePoint]) -> Plot:
    title = "Release sizes"
    notes = []
    figure, ax = _figure()
    published = [p for p in points if p.published]
    unit, scale = size_unit(max((p.total_bytes for p in published), default=0))
    versions = [p.version for p in published]
    sizes = [p.total_bytes / scale for p in published]
    if len(points) <= MAX_BARS:
        ax.bar(versions, sizes, color="tab:green", label="published", gid="sizes")
    else:  # thousands of bar patches draw slowly and read no better
        ax.plot(versions, sizes, ".", color="tab:green", label="published", gid="sizes")
    refused = [p for p in points if not p.published]
    if refused:
        ax.scatter(
            [p.version for p in refused],
            [0.0] * len(refused),
            marker="x",
            s=60,
            color="tab:red",
            label="not released",
            gid="sizes:refused",
            zorder=3,
            clip_on=False,
        )
        notes.append(f"Versions not released: {len(refused)} (the reasons are in the table).")
    ax.set_xlabel("version")
    ax.set_ylabel(f"{unit}, all files")
    ax.set_title(title)
    _integer_x(ax)
    ax.legend(fontsize="small")
    return Plot("release:size", title, figure, notes)


def _timings(points: list[ReleasePoint]) -> Plot:
    title = "Where each close's time went"
    notes = []
    seen = {name for p in points for name in p.stages_s}
    order = [n for n in STAGES if n in seen] + sorted(seen - set(STAGES))
    if not order:
        return Plot("release:time", title, None, ["No stage timings recorded."])
    if len(order) > MAX_STAGES:
        notes.append(f"{MAX_STAGES} of {len(order)} stages drawn.")
        order = order[:MAX_STAGES]
    figure, ax = _figure()
    versions = [p.version for p in points]
    stacked = [[p.stages_s.get(stage, 0.0) for p in points] for stage in order]
    if len(points) <= MAX_BARS:
        bottom = [0.0] * len(points)
        for stage, seconds in zip(order, stacked, strict=True):
            ax.bar(versions, seconds, bottom=bottom, label=label(stage), gid=f"stage:{stage}")
            bottom = [b + s for b, s in zip(bottom, seconds, strict=True)]
    else:
        areas = ax.stackplot(versions, stacked, labels=[label(stage) for stage in order])
        for stage, area in zip(order, areas, strict=True):
            area.set_gid(f"stage:{stage}")
    ax.set_xlabel("version")
    ax.set_ylabel("seconds")
    ax.set_title(title + " (fold, then the release's stages)")
    _integer_x(ax)
    _legend(ax, len(order), outside=True)
    return Plot("release:time", title, figure, notes)
