"""sluice serve: the gateway, its two listeners, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import resource
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from sluice.gateway.cli.common import CliError, Exit, HelpFormatter

if TYPE_CHECKING:
    from sluice.gateway.server import Gateway

log = logging.getLogger(__name__)


def _startup_failure(exc: BaseException, args: argparse.Namespace) -> CliError:
    """One line, exit status 2, for whatever stops a start: a setting, a declaration, the
    config file, the PKI, a key, a port."""
    import tomllib

    if isinstance(exc, tomllib.TOMLDecodeError):
        return CliError(Exit.USAGE, f"{args.config}: not valid TOML: {exc}")
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        what = "--config" if args.config and Path(exc.filename) == args.config else "file"
        return CliError(Exit.USAGE, f"{what} {exc.filename}: no such file")
    if isinstance(exc, OSError) and exc.filename is not None:
        return CliError(Exit.USAGE, f"{exc.filename}: {exc.strerror or exc}")
    text = str(exc)
    bind = re.search(r"Failed to bind to address (\S+?);", text)  # gRPC's own words
    if bind:
        return CliError(Exit.USAGE, _bind_failure(bind.group(1), args))
    number = _NOT_A_NUMBER.fullmatch(text)
    if number:  # Python's words for int("abc"): say which setting had it
        value = number.group(2)
        named = [k for k, v in sorted(os.environ.items()) if k.startswith("SLUICE_") and v == value]
        where = f"{named[0]}={value!r}" if named else f"a setting in {args.config} is {value!r}"
        return CliError(Exit.USAGE, f"{where}: expected a number")
    return CliError(Exit.USAGE, text)


# int("abc") and float("abc") raise these; the config's coercion does not name the setting.
_NOT_A_NUMBER = re.compile(
    r"(invalid literal for int\(\) with base 10|could not convert string to float): '(.*)'"
)


def _bind_failure(address: str, args: argparse.Namespace) -> str:
    """Why gRPC could not bind: asked of the OS directly, which says in use or not ours."""
    host, _, port = address.rpartition(":")
    flag = "--egress" if args.egress and args.egress == address else "--internal"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host.strip("[]"), int(port)))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"port {port} is in use ({address}): another sluice serve? choose {flag} HOST:PORT"
            )
        return f"cannot listen on {address}: {exc.strerror}; choose {flag} HOST:PORT"
    except ValueError:
        pass
    return f"cannot listen on {address}; choose {flag} HOST:PORT"


def no_core_dumps() -> None:
    """No core file of this process, ever: it holds the release signing key, its TLS key
    and the egress gate's piece-tag keys in memory, and a core dump would write them where
    an insider with filesystem access (THREAT_MODEL) reads them. A soft and hard
    RLIMIT_CORE of 0 (inherited by what it starts); systemd-coredump honours it too."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _serve(args: argparse.Namespace) -> int:
    from sluice.gateway.config import load_config
    from sluice.gateway.server import Gateway

    no_core_dumps()  # before any key is read
    overrides = {
        "data_dir": args.data_dir,
        "internal_address": args.internal,
        "egress_address": args.egress,
        "ops_address": args.ops,
        "health_address": args.health,
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
        raise _startup_failure(exc, args) from exc
    if args.strategy:
        config = config.replace(strategies={m: {"name": args.strategy} for m in config.models})
    # A lock held, another CA, no PKI, an unusable key, a port in use (StartupError is a
    # RuntimeError, and so is gRPC's failed bind), a model that will not export: plainly.
    try:
        gateway = Gateway(config)
    except (RuntimeError, ValueError, OSError) as exc:
        raise _startup_failure(exc, args) from exc
    try:
        endpoints = gateway.start()
    except (RuntimeError, ValueError, OSError) as exc:
        _abandon(gateway)
        raise _startup_failure(exc, args) from exc
    ops = f"  ops {endpoints.ops}" if endpoints.ops else ""
    health = f"  health {endpoints.health}" if endpoints.health else ""
    print(
        f"sluice: internal {endpoints.internal}  egress {endpoints.egress}{ops}{health}", flush=True
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    gateway.stop()
    return 0


def _abandon(gateway: Gateway) -> None:
    """Let go of what a gateway that failed to start holds (the data dir's lock, SQLite),
    so that main() can return in-process; the failure itself is what is reported."""
    try:
        gateway.stop(0)
    except Exception:  # secondary to the start's own failure, which is what is reported
        log.debug("stopping a gateway that failed to start", exc_info=True)


# Flags whose default is the setting's (gateway/config.py), shown by --help.
_SETTINGS = {
    "data_dir": "data_dir",
    "internal": "internal_address",
    "egress": "egress_address",
    "ops": "ops_address",
    "health": "health_address",
    "models": "models",
    "quorum": "quorum",
    "min_updates": "min_updates",
    "round_seconds": "round_seconds",
    "min_trainers": "min_trainers",
}


class _ServeHelp(HelpFormatter):
    """A flag left out takes the config file's value, SLUICE_*'s, or the built-in default:
    --help shows that default, read from Config only when help is asked for (importing
    the gateway's settings costs what `sluice --version` should not)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        setting = _SETTINGS.get(action.dest)
        if setting is None:
            return super()._get_help_string(action)
        from sluice.gateway.config import Config

        value = getattr(Config(), setting)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return f"{action.help or ''} (default: {shown})".replace("%", "%%").lstrip()


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the gateway (internal and egress listeners)",
        description="Each setting is the built-in default, else the TOML file's (--config), "
        "else a SLUICE_* environment variable's, else its flag's here: the last one given wins.",
        formatter_class=_ServeHelp,
    )
    serve.add_argument("--config", type=Path, help="TOML file; SLUICE_* env overrides it")
    serve.add_argument("--data-dir", type=Path, help="sluice.db, blobs/, registry/, keys/")
    serve.add_argument("--internal", help="internal listener address, HOST:PORT")
    serve.add_argument("--egress", help="egress listener address, HOST:PORT")
    serve.add_argument(
        "--ops", help="operations listener (HTTP /metrics, /healthz, /readyz), HOST:PORT; '' off"
    )
    serve.add_argument("--health", help="plain-text gRPC health for probes, HOST:PORT; '' off")
    serve.add_argument("--models", help="comma-separated registry names")
    serve.add_argument("--quorum", type=int, help="distinct trainers that close a round early")
    serve.add_argument("--min-updates", type=int, help="trainers a round needs at its deadline")
    serve.add_argument("--round-seconds", type=float, help="a round's deadline after it opens")
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
