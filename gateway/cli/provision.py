"""sluice init and sluice kit: the operator's PKI, and one kit per participant from it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sluice.gateway.cli.common import CliError, Exit

if TYPE_CHECKING:
    from sluice.gateway.kits import KitOutcome


def _print_kits(kits_dir: Path, outcomes: list[KitOutcome]) -> None:
    print(f"kits in {kits_dir}: hand each participant its own directory out of band")
    for kit in outcomes:
        region = f", {kit.region}" if kit.region else ""
        done = "written" if kit.written else "kept (already there, the same kit)"
        print(f"  {kit.name} ({kit.role}{region}): {kit.path} {done}")


def _kit_options_without_kits(args: argparse.Namespace) -> bool:
    return args.kits is None and bool(
        args.internal_endpoint or args.egress_endpoint or args.release_key
    )


def _init(args: argparse.Namespace) -> int:
    from sluice.gateway.kits import export_kits
    from sluice.gateway.pki import init_pki

    trainers = []
    for spec in args.trainer:
        name, sep, region = spec.partition(":")
        if not sep:
            raise CliError(
                Exit.USAGE, f"--trainer {spec!r}: expected NAME:REGION, e.g. shanghai-01:shanghai"
            )
        trainers.append((name, region))
    if _kit_options_without_kits(args):
        raise CliError(
            Exit.USAGE,
            "--internal-endpoint, --egress-endpoint and --release-key describe kits: add --kits",
        )
    try:
        layout = init_pki(
            args.directory,
            trainers=trainers,
            readers=args.reader,
            operators=args.operator,
            server_names=args.server_name,
            days=args.days,
        )
        print(f"PKI in {layout.directory}: CA {layout.ca_cert} (its key stays here, in no kit)")
        for name in layout.client_names():
            print(f"  {name}: {layout.client_cert(name)}")
    except (ValueError, OSError) as exc:  # a bad name, another role, an unusable file
        raise CliError(Exit.USAGE, str(exc)) from exc
    if args.kits is None:
        return 0
    names = [name for name, _ in trainers] + [*args.reader, *args.operator]
    try:
        outcomes = export_kits(
            layout,
            names,
            args.kits,
            internal_endpoint=args.internal_endpoint,
            egress_endpoint=args.egress_endpoint,
            release_key=args.release_key,
        )
    except (ValueError, OSError) as exc:  # a kit already there, an endpoint TLS would refuse
        raise CliError(Exit.USAGE, f"the PKI is complete, but no kit was written: {exc}") from exc
    _print_kits(args.kits, outcomes)
    return 0


def _kit(args: argparse.Namespace) -> int:
    from sluice.gateway.kits import export_kits
    from sluice.gateway.pki import PkiLayout

    layout = PkiLayout(args.pki_dir)
    if args.all == bool(args.names):
        raise CliError(Exit.USAGE, "name the principals to export, or pass --all (not both)")
    names = layout.client_names() if args.all else args.names
    if not names:
        raise CliError(
            Exit.USAGE, f"{args.pki_dir}: no client certificates; `sluice init` issues them"
        )
    try:
        outcomes = export_kits(
            layout,
            names,
            args.out,
            internal_endpoint=args.internal_endpoint,
            egress_endpoint=args.egress_endpoint,
            release_key=args.release_key,
        )
    except (ValueError, OSError) as exc:  # as for init
        raise CliError(Exit.USAGE, str(exc)) from exc
    _print_kits(args.out, outcomes)
    return 0


def _add_kit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--internal-endpoint",
        metavar="HOST:PORT",
        help="the internal listener as trainers and operators dial it (default: the first "
        "--server-name, else 127.0.0.1, port 7070); HOST must be a listener SAN",
    )
    p.add_argument(
        "--egress-endpoint",
        metavar="HOST:PORT",
        help="the egress listener as the global team dials it (default as above, port 7071)",
    )
    p.add_argument(
        "--release-key",
        type=Path,
        metavar="PUB",
        help="the gateway's <data dir>/keys/release-signing.pub, put in readers' kits",
    )


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = sub.add_parser(
        "init", help="(operator) create or extend a PKI: CA, listener and client certs, kits"
    )
    init.add_argument("directory", type=Path, help="the operator's PKI directory (holds ca.key)")
    init.add_argument("--trainer", action="append", default=[], help="NAME:REGION, repeatable")
    init.add_argument("--reader", action="append", default=[], help="global-team principal")
    init.add_argument("--operator", action="append", default=[], help="operator principal")
    init.add_argument("--server-name", action="append", default=[], help="extra listener SAN")
    init.add_argument("--days", type=int, default=365, help="validity of leaf certificates")
    init.add_argument(
        "--kits",
        type=Path,
        metavar="DIR",
        help="also write DIR/<name>/, one kit per principal named here (see `sluice kit`)",
    )
    _add_kit_options(init)
    init.set_defaults(run=_init)

    kit = sub.add_parser(
        "kit",
        help="(operator) export participants' kits from the PKI: each holds its own key and "
        "certificate, the CA certificate, endpoints and a ready command line",
    )
    kit.add_argument("pki_dir", type=Path, help="the PKI directory `sluice init` wrote")
    kit.add_argument("names", nargs="*", metavar="NAME", help="principals already issued")
    kit.add_argument("--all", action="store_true", help="every principal in the PKI")
    kit.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/<name>/")
    _add_kit_options(kit)
    kit.set_defaults(run=_kit)
