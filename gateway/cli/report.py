"""sluice report: one HTML page of a model's rounds, from a gateway's data dir."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from sluice.gateway.report import ReportError, load, render

    data_dir: Path = args.data_dir or Path(".sluice")
    max_epsilon = None
    if args.config is not None:  # torch comes with the configuration: only when asked
        from sluice.gateway.config import load_config

        try:
            config = load_config(args.config, {"data_dir": args.data_dir})
        except (ValueError, OSError) as exc:
            print(f"sluice report: {exc}", file=sys.stderr)
            return 2
        data_dir = config.data_dir
        max_epsilon = config.dp_max_epsilon if config.dp_noise_multiplier > 0 else None
    try:
        data = load(data_dir, args.model)
    except ReportError as exc:
        print(f"sluice report: {exc}", file=sys.stderr)
        return exc.exit_code
    if not data.ended_rounds:
        print(
            f"sluice report: nothing to report: no round of {args.model!r} has closed yet",
            file=sys.stderr,
        )
        return 1
    try:
        path = render(data, args.out, max_epsilon)
    except ImportError as exc:  # the client install has no matplotlib
        print(
            f"sluice report: needs matplotlib ({exc.name} is missing): "
            "pip install 'sluicegate[gateway]'",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        print(f"sluice report: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser(
        "report",
        help="(operator) write an HTML page of a model's rounds: losses per region, update "
        "norms and screening, epsilon spent, release sizes and timings",
    )
    report.add_argument(
        "--data-dir", type=Path, help="the gateway's data dir (default: the config's, .sluice)"
    )
    report.add_argument("--model", required=True, help="the served model to report on")
    report.add_argument(
        "--out", type=Path, required=True, help="directory to write index.html into"
    )
    report.add_argument(
        "--config", type=Path, help="the gateway's TOML (its data dir and DP budget)"
    )
    report.set_defaults(run=_report)
