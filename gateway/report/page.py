"""The report as one self-contained HTML file: tables, PNG plots as data URIs, and the
plotted series as a JSON block (for anyone who wants the numbers rather than the pixels).

Every string from the database is escaped here, in one place (`_e`); the page runs no
script and loads nothing (its Content-Security-Policy says so).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import os
from collections.abc import Iterable
from pathlib import Path

from sluice.gateway.report.data import ReportData
from sluice.gateway.report.plots import Plot, figures, png
from sluice.gateway.report.series import ReportSeries, build, metric_names

PAGE = "index.html"
MAX_TABLE_ROWS = 100  # rounds in the table, newest first
MAX_METRICS = 50  # rows of the metrics table
MAX_TEXT = 300  # characters of a reason or a name shown

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.7em; text-align: left;
  vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #855; } .muted { color: #777; }
img { max-width: 100%; }
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: object, limit: int = MAX_TEXT) -> str:
    """Any value as escaped HTML text, cut to `limit` characters."""
    s = str(value)
    return html.escape(s if len(s) <= limit else s[: limit - 1] + "…", quote=True)


def _when(ms: int | None) -> str:
    if ms is None:
        return ""
    t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(head: Iterable[str], rows: Iterable[Iterable[object]], numeric: set[int]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if th else ""
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>\n"
        for row in rows
    )
    return f"<table>{thead}<tbody>\n{body}</tbody></table>"


def _summary(data: ReportData, series: ReportSeries, max_epsilon: float | None) -> str:
    t = data.totals
    eps = series.epsilon
    spent = f"{eps[-1].epsilon:.3g} after version {eps[-1].version}" if eps else "DP off"
    if eps and max_epsilon is not None:
        spent += f" (budget {max_epsilon:g})"
    strategies = sorted({c.strategy for c in data.closes.values() if c.strategy})
    rows = [
        ("model", data.model),
        ("data dir", str(data.data_dir)),
        ("generated", _when(data.generated_ms)),
        (
            "rounds",
            f"{t.get('rounds', 0)} ({t.get('closed', 0)} closed, {t.get('failed', 0)} failed, "
            f"{t.get('open', 0) + t.get('aggregating', 0)} open)",
        ),
        ("versions", t.get("versions", 0)),
        ("releases", t.get("releases", 0)),
        ("updates", t.get("updates", 0)),
        ("trainers / regions", f"{t.get('trainers', 0)} / {t.get('regions', 0)}"),
        ("epsilon spent", spent),
        ("strategy", ", ".join(strategies) or "-"),
    ]
    return _table((), rows, set())


def _rounds_table(data: ReportData) -> str:
    by_round: dict[int, list[str]] = {}
    regions: dict[int, set[str]] = {}
    for u in data.updates:
        by_round.setdefault(u.round, []).append(u.trainer)
        regions.setdefault(u.round, set()).add(u.region)
    rows = []
    for r in reversed(data.rounds[-MAX_TABLE_ROWS:]):
        trainers = by_round.get(r.round, [])
        release = ""
        if r.version is not None:
            facts = data.releases.get(r.version)
            if facts is not None:
                release = "published" if facts.published else f"refused: {facts.refused}"
        close = data.closes.get(r.round)
        flagged = len(close.flagged) if close else ""
        rows.append(
            (
                r.round,
                r.state,
                r.base_version,
                "" if r.version is None else r.version,
                len(trainers),
                len(set(trainers)),
                len(regions.get(r.round, ())),
                flagged,
                _when(r.opened_ms),
                _when(r.closed_ms),
                release or r.failure,
            )
        )
    head = (
        "round",
        "state",
        "base",
        "version",
        "updates",
        "trainers",
        "regions",
        "flagged",
        "opened",
        "closed",
        "release / failure",
    )
    shown = len(rows)
    note = (
        f'<p class="muted">The newest {shown} of {len(data.rounds)} rounds shown.</p>'
        if shown < len(data.rounds)
        else ""
    )
    return _table(head, rows, {0, 2, 3, 4, 5, 6, 7}) + note


def _metrics_table(data: ReportData) -> str:
    names = metric_names(data)
    if not names:
        return '<p class="note">No trainer reported metrics.</p>'
    rows = []
    for name in names[:MAX_METRICS]:
        values = [(u.round, u.metrics[name]) for u in data.updates if name in u.metrics]
        newest = max(r for r, _ in values)
        latest = [v for r, v in values if r == newest]
        rows.append((name, len(values), newest, f"{sum(latest) / len(latest):.4g}"))
    note = (
        f'<p class="muted">{MAX_METRICS} of {len(names)} metric names shown.</p>'
        if len(names) > MAX_METRICS
        else ""
    )
    return _table(("metric", "updates", "newest round", "mean there"), rows, {1, 2, 3}) + note


def _plot_html(plot: Plot, anchor: str) -> str:
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in plot.notes)
    head = f'<section id="{anchor}"><h3>{_e(plot.title)}</h3>'
    if plot.figure is None:
        return f"{head}{notes}</section>"
    data = base64.b64encode(png(plot.figure)).decode("ascii")
    image = f'<img alt="{_e(plot.title)}" src="data:image/png;base64,{data}">'
    return f"{head}{image}{notes}</section>"


def series_json(model: str, series: ReportSeries) -> str:
    """The plotted numbers as JSON, safe inside a <script> element (no '<', '>', '&')."""
    doc = {"model": model, **dataclasses.asdict(series)}
    text = json.dumps(doc, sort_keys=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(
    data: ReportData, series: ReportSeries, plots: list[Plot], max_epsilon: float | None = None
) -> str:
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in data.notes)
    if not data.ended_rounds:
        notes += '<p class="note">No round has closed or failed yet: nothing to plot.</p>'
    body = "\n".join(
        [
            f"<h1>Sluice report: {_e(data.model)}</h1>",
            notes,
            "<h2>Summary</h2>",
            _summary(data, series, max_epsilon),
            "<h2>Plots</h2>",
            *(_plot_html(p, f"plot-{i}") for i, p in enumerate(plots)),
            "<h2>Rounds</h2>",
            _rounds_table(data),
            "<h2>Trainer metrics</h2>",
            _metrics_table(data),
            '<script type="application/json" id="series">'
            + series_json(data.model, series)
            + "</script>",
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>Sluice report: {_e(data.model)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def render(data: ReportData, out_dir: Path, max_epsilon: float | None = None) -> Path:
    """Write out_dir/index.html (replaced atomically); returns its path."""
    series = build(data)
    page = render_html(data, series, figures(series, max_epsilon), max_epsilon)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PAGE
    tmp = path.with_name(f".{PAGE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
