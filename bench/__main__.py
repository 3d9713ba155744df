"""Run the benchmark suite: `python -m bench` (make bench) or `python -m bench --quick`
(make bench-quick, ~2 minutes on small models: a smoke test of the same code paths).

Writes bench/results/latest.json and latest.md (quick: latest-quick.*); a full run also
rewrites the README's performance table between its bench markers. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.aggregation import bench_aggregation
from bench.common import RESULTS_DIR, Options, Report, machine, workdir
from bench.gateway_round import bench_gateway_round
from bench.ingest import bench_ingest
from bench.precision import bench_precision
from bench.release import bench_release
from bench.report import README, render_markdown, report_doc, sync_readme

Bench = Callable[[Options, Path], list[Report]]
BENCHMARKS: dict[str, Bench] = {
    "aggregation": lambda options, templates: [bench_aggregation(options)],
    "precision": lambda options, templates: [bench_precision(options)],
    "ingest": lambda options, templates: [bench_ingest(options, templates)],
    "release": lambda options, templates: [bench_release(options, templates)],
    "round": lambda options, templates: list(bench_gateway_round(options, templates)),
}


def _print(report: Report) -> None:
    print(f"\n== {report.title}")
    widths = [max(len(row[i]) for row in report.rows) for i in range(len(report.rows[0]))]
    for n, row in enumerate(report.rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))  # fmt: skip
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for note in report.notes:
        print(f"  {note}")
    for check in report.checks:
        print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    sys.stdout.flush()


def merge(previous: Path, fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`--only` reruns replace their own reports in the last results and keep the others
    (each report carries its own date and machine), in BENCHMARKS order."""
    old = json.loads(previous.read_text())["reports"] if previous.exists() else []
    by_key = {r["key"]: r for r in old} | {r["key"]: r for r in fresh}
    order = ["aggregation", "precision", "ingest", "release", "memory", "egress"]
    return sorted(by_key.values(), key=lambda r: order.index(r["key"]) if r["key"] in order else 99)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small models, ~2 minutes")
    parser.add_argument("--workdir", type=Path, help="spools and data dirs (default: temp)")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (3; quick 1)")
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only these (repeatable)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    options = Options(quick=args.quick, workdir=args.workdir, repeats=repeats)
    selected = args.only or list(BENCHMARKS)

    started = time.perf_counter()
    reports: list[Report] = []
    with workdir(options, "templates") as templates:
        for name in selected:
            for report in BENCHMARKS[name](options, Path(templates)):
                reports.append(report)
                _print(report)
    stem = "latest-quick" if options.quick else "latest"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    fresh = [{**report_doc(r), "date": stamp, "machine": machine()} for r in reports]
    doc: dict[str, Any] = {
        "mode": "quick" if options.quick else "full",
        "date": stamp,
        "machine": machine(),
        "repeats": repeats,
        "seconds": round(time.perf_counter() - started, 1),
        "reports": merge(RESULTS_DIR / f"{stem}.json", fresh) if args.only else fresh,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS_DIR / f"{stem}.md").write_text(render_markdown(doc))
    print(f"\nresults: {RESULTS_DIR / f'{stem}.json'} and {stem}.md ({doc['seconds']} s in all)")
    if not options.quick:
        sync_readme(README, doc)
        print(f"README performance table updated: {README}")
    if options.quick:
        print("quick run: the models are too small for the floors (fixed costs dominate); its")
        print("PASS/FAIL lines are for information and do not set the exit status")
        return 0
    return 0 if all(c["ok"] for r in fresh for c in r["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
