"""What the commands share: the caller's identity and the format check's limits."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sluice.clients.sdk import Identity
    from sluice.models.artifact import StructureLimits


def identity(args: argparse.Namespace) -> Identity | None:
    """The caller's certificate: --pki DIR --identity NAME; None with --insecure."""
    from sluice.clients.sdk import Identity

    if args.insecure:
        return None
    if args.pki is None or args.identity is None:
        raise SystemExit(
            f"sluice {args.command}: pass --pki DIR --identity NAME (certificates made by "
            "`sluice init`), or --insecure for a gateway run with --insecure-loopback"
        )
    return Identity.from_pki(args.pki, args.identity)


def add_identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pki", type=Path, help="directory written by `sluice init`")
    p.add_argument("--identity", help="principal name: uses <pki>/clients/<name>.pem/.key")
    p.add_argument("--insecure", action="store_true", help="plain text (--insecure-loopback)")


def _limit(text: str) -> tuple[str, int]:
    """--limit NAME=N: one StructureLimits field (argparse type: a bad one is one line)."""
    import dataclasses

    from sluice.models.artifact import StructureLimits

    known = [f.name for f in dataclasses.fields(StructureLimits)]
    name, _, value = text.partition("=")
    if name not in known or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=N, N a positive integer, NAME one of {', '.join(known)}"
        )
    return name, int(value)


def limits(args: argparse.Namespace) -> StructureLimits | None:
    """The format check's totals from --limit (defaults for the rest); None: all defaults."""
    from sluice.models.artifact import StructureLimits

    return StructureLimits(**dict(args.limit)) if args.limit else None


def add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        type=_limit,
        action="append",
        metavar="NAME=N",
        help="raise one of the format check's totals for a model the gateway declares with "
        "bigger limits (e.g. structure_bytes=131072); repeatable; default: the defaults",
    )
