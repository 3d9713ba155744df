"""sluice serve: the gateway, its two listeners, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType


def _serve(args: argparse.Namespace) -> int:
    from sluice.gateway.config import load_config
    from sluice.gateway.server import Gateway, StartupError

    overrides = {
        "data_dir": args.data_dir,
        "internal_address": args.internal,
        "egress_address": args.egress,
        "models": args.models,
        "quorum": args.quorum,
        "min_updates": args.min_updates,
        "round_seconds": args.round_seconds,
        "min_trainers": args.min_trainers,
        "pki_dir": args.pki,
        "insecure_loopback": args.insecure_loopback or None,
        "fedbuff": args.fedbuff or None,
        "accept_new_ca": args.accept_new_ca or None,
        "import_keys": tuple(args.import_key) or None,
    }

    try:
        config = load_config(args.config, overrides)
    except (ValueError, OSError) as exc:  # a setting, a model declaration, the file itself
        print(f"sluice serve: {exc}", file=sys.stderr)
        return 2
    if args.strategy:
        config = config.replace(strategies={m: {"name": args.strategy} for m in config.models})
    try:
        gateway = Gateway(config)
        endpoints = gateway.start()
    except (StartupError, ValueError) as exc:  # a lock held, another CA, an unusable key, a
        print(f"sluice serve: {exc}", file=sys.stderr)  # model that will not export: plainly
        return 2
    print(f"sluice: internal {endpoints.internal}  egress {endpoints.egress}", flush=True)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    gateway.stop()
    return 0


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the gateway (internal and egress listeners)")
    serve.add_argument("--config", type=Path, help="TOML file; SLUICE_* env overrides it")
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--internal", help="internal listener address, e.g. 127.0.0.1:7070")
    serve.add_argument("--egress", help="egress listener address, e.g. 127.0.0.1:7071")
    serve.add_argument("--models", help="comma-separated registry names")
    serve.add_argument("--quorum", type=int)
    serve.add_argument("--min-updates", type=int)
    serve.add_argument("--round-seconds", type=float)
    serve.add_argument("--min-trainers", type=int, help="k: trainers a release must aggregate")
    serve.add_argument("--pki", type=Path, help="CA and listener certs (default <data-dir>/pki)")
    serve.add_argument("--strategy", help="Flower strategy name for every served model")
    serve.add_argument("--fedbuff", action="store_true", help="buffered async aggregation")
    serve.add_argument(
        "--import-key",
        type=Path,
        action="append",
        default=[],
        help="the global program's public key an imported base must be signed with "
        "(repeatable; import_keys in sluice.toml)",
    )
    serve.add_argument(
        "--accept-new-ca",
        action="store_true",
        help="serve with a CA other than the one this data dir was first served with",
    )
    serve.add_argument(
        "--insecure-loopback",
        action="store_true",
        help="plain text, no client certificates: loopback addresses only, for demos",
    )
    serve.set_defaults(run=_serve)
