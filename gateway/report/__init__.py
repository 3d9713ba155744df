"""`sluice report`: one HTML page of a model's rounds (losses, norms, epsilon, releases),
read from a gateway's data dir. matplotlib is imported only when a page is rendered."""

from __future__ import annotations

from pathlib import Path

from sluice.gateway.report.data import NoData, ReportData, ReportError, load
from sluice.gateway.report.page import render

__all__ = ["NoData", "ReportData", "ReportError", "load", "render", "write_report"]


def write_report(
    data_dir: Path, model: str, out_dir: Path, *, max_epsilon: float | None = None
) -> Path:
    """Write `out_dir/index.html` for `model` from the gateway data dir `data_dir` (read
    only; a running gateway is fine) and return its path.

    One self-contained file: plots are inlined PNGs. A model with no closed round yet
    gets a page that says so. `max_epsilon`: the DP budget to draw, if known.
    Raises NoData (no data dir, no database, a model it never served) or ReportError
    (the database cannot be read); OSError when out_dir cannot be written.
    """
    return render(load(data_dir, model), out_dir, max_epsilon)
