"""`sluice`: serve the gateway, simulate regional trainers, pull releases, steer rounds."""

from __future__ import annotations

import argparse
import logging

from sluice.gateway import logs
from sluice.gateway.cli import admin, audit, egress, provision, serve, sign


def _simulate(args: argparse.Namespace) -> int:
    from sluice.clients.simulate import run_from_args

    return run_from_args(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    serve.add(sub)
    egress.add(sub)
    audit.add(sub)
    provision.add(sub)
    admin.add(sub)
    sign.add(sub)  # keygen, sign-import: the global program's side, outside the region

    from sluice.clients.simulate import add_arguments

    simulate = sub.add_parser("simulate", help="run regional trainer processes against a gateway")
    add_arguments(simulate)
    simulate.set_defaults(run=_simulate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    code: int = args.run(args)
    return code
