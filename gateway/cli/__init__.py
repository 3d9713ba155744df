"""`sluice`: serve the gateway, simulate regional trainers, pull releases, steer rounds."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO

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


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is at the time of each record (not the stream of the
    first call: main() may run many times in one process, under a replaced stderr)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[_StderrHandler()],
    )
    code: int = args.run(args)
    return code
