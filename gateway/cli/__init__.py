"""`sluice`: serve the gateway, simulate regional trainers, pull releases, steer rounds."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from sluice.gateway import logs
from sluice.gateway.cli import admin, audit, egress, maintain, provision, report, serve, sign
from sluice.gateway.cli.common import (
    CliError,
    Exit,
    HelpFormatter,
    has_default,
    one_line,
    rpc_failure,
)

log = logging.getLogger("sluice.cli")


def _simulate(args: argparse.Namespace) -> int:
    from sluice.clients.simulate_cli import run_from_args

    return run_from_args(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"sluice {version('sluicegate')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "sluice (version unknown: sluicegate is not installed)"


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """-v and --log-format, before the command and after it. A command's copy has no
    default (SUPPRESS), so that it does not overwrite what was given before the command."""
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="debug logging",
    )
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text" if top else argparse.SUPPRESS,
        help="log lines on stderr as text or one JSON object per line",
    )


def _finish(p: argparse.ArgumentParser) -> None:
    """Every command: defaults in --help, and the global options after it too."""
    for action in p._actions:
        if action.help is None and has_default(action):
            action.help = "(default: %(default)s)"  # argparse prints no line without help
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if command.formatter_class is argparse.HelpFormatter:  # not chosen by the command
                    command.formatter_class = HelpFormatter
                _global_options(command, top=False)
                _finish(command)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=_version())
    _global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add(sub)
    egress.add(sub)
    audit.add(sub)
    provision.add(sub)
    admin.add(sub)
    sign.add(sub)  # keygen, sign-import: the global program's side, outside the region
    report.add(sub)
    maintain.add(sub)  # gc, backup, restore: the data dir's upkeep

    from sluice.clients.simulate_cli import add_arguments

    simulate = sub.add_parser("simulate", help="run regional trainer processes against a gateway")
    add_arguments(simulate)
    simulate.set_defaults(run=_simulate, needs_role="trainer", listener="internal")
    _finish(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure a user can cause is one line on stderr and an exit
    code of common.Exit (docs/CLI.md), Ctrl-C is 130 without a word."""
    args = parser().parse_args(argv)  # a bad command line: argparse's usage line, exit 2
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    if not args.verbose:  # gRPC's C core logs a failed TLS handshake itself, before our line
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # read when grpc is first imported
    try:
        code: int = args.run(args)
        return code
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:  # `sluice audit export | head`: the reader has what it wanted
        with contextlib.suppress(OSError, ValueError):  # ValueError: stdout is no file
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.REFUSED
    except CliError as exc:
        return _report(args, exc)
    except BaseException as exc:  # mapped to one line, by class; SystemExit from a command too
        failure = _classify(args, exc)
        if failure is None:
            raise
        return _report(args, failure)


def _report(args: argparse.Namespace, failure: CliError) -> int:
    command = " ".join(filter(None, [args.command, getattr(args, "audit_command", None)]))
    line = failure.message if failure.bare else f"sluice {command}: {failure.message}"
    with contextlib.suppress(BrokenPipeError):
        print(line, file=sys.stderr)
    return failure.code


def _classify(args: argparse.Namespace, exc: BaseException) -> CliError | None:
    """The one line and exit code for an exception a command let through; None: re-raise."""
    import grpc

    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return None  # a command's own exit status (argparse's, too)
        return CliError(Exit.USAGE, str(exc.code).removeprefix(f"sluice {args.command}: "))
    if isinstance(exc, grpc.RpcError):
        return rpc_failure(exc, args)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return CliError(Exit.USAGE, f"{where}{exc.strerror or exc}")
    if isinstance(exc, ValueError):  # a file or value given on the command line is unusable
        return CliError(Exit.USAGE, str(exc))
    if isinstance(exc, Exception):
        log.debug("unexpected error", exc_info=exc)  # the traceback, with -v
        return CliError(
            Exit.BUG,
            f"unexpected error: {type(exc).__name__}: {one_line(str(exc), 200)} (a bug in "
            "sluice; rerun with -v for the traceback and report it)",
        )
    return None
