"""sluice init: a development PKI."""

from __future__ import annotations

import argparse
from pathlib import Path


def _init(args: argparse.Namespace) -> int:
    from sluice.gateway.pki import init_pki

    trainers = []
    for spec in args.trainer:
        name, sep, region = spec.partition(":")
        if not sep:
            raise SystemExit(f"--trainer {spec!r}: expected NAME:REGION, e.g. shanghai-01:shanghai")
        trainers.append((name, region))
    layout = init_pki(
        args.directory,
        trainers=trainers,
        readers=args.reader,
        operators=args.operator,
        server_names=args.server_name,
        days=args.days,
    )
    print(f"PKI in {layout.directory}: CA {layout.ca_cert}")
    for name in layout.client_names():
        print(f"  {name}: {layout.client_cert(name)}")
    return 0


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = sub.add_parser("init", help="create a development PKI: CA, listener and client certs")
    init.add_argument("directory", type=Path)
    init.add_argument("--trainer", action="append", default=[], help="NAME:REGION, repeatable")
    init.add_argument("--reader", action="append", default=[], help="global-team principal")
    init.add_argument("--operator", action="append", default=[], help="operator principal")
    init.add_argument("--server-name", action="append", default=[], help="extra listener SAN")
    init.add_argument("--days", type=int, default=365, help="validity of leaf certificates")
    init.set_defaults(run=_init)
