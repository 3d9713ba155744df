"""What the commands share: exit codes, one-line failures, the caller's identity, the format
check's limits and the help formatter.

Every failure a user can cause leaves `main()` as one line on stderr and one of these exit
codes (docs/CLI.md has the table); a traceback only with -v, and only for a bug.
"""

from __future__ import annotations

import argparse
import datetime
import re
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from sluice.clients.sdk import Identity
    from sluice.models.artifact import StructureLimits


class Exit(IntEnum):
    OK = 0
    REFUSED = 1  # the gateway or a check said no: a refusal, a failed verification, no release
    USAGE = 2  # arguments or configuration (argparse's own code for a bad command line)
    UNREACHABLE = 3  # no gateway answers there, the wrong listener, or the TLS setup failed
    IDENTITY = 4  # certificates missing or unusable, or the gateway refuses them for this
    BUSY = 5  # the gateway could not do it now (busy, its storage failed): try again later
    BUG = 70  # an unexpected error inside sluice (sysexits' EX_SOFTWARE): rerun with -v
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class CliError(Exception):
    """A failure to report as one line: `sluice <command>: <message>` (or the message alone
    where the command's output has always started with it, like pull's `refused: ...`)."""

    def __init__(self, code: Exit, message: str, *, bare: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = one_line(message)
        self.bare = bare


MAX_MESSAGE_CHARS = 400  # of a server's status details, or any exception text, echoed


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --- the caller's identity --------------------------------------------------------------

ROLE_WORDS = {
    "operator": "an operator certificate (`sluice init --operator NAME`)",
    "reader": "a reader certificate, the global team's (`sluice init --reader NAME`)",
    "trainer": "a trainer certificate (`sluice init --trainer NAME:REGION`)",
}


def add_identity(p: argparse.ArgumentParser, *, role: str, listener: str) -> None:
    """--pki/--identity/--insecure, and what the command needs: the role its calls are
    authorized for and the listener they go to (for the hints of its failures)."""
    p.add_argument("--pki", type=Path, help="directory written by `sluice init`")
    p.add_argument("--identity", help="principal name: uses <pki>/clients/<name>.pem/.key")
    p.add_argument("--insecure", action="store_true", help="plain text (--insecure-loopback)")
    p.set_defaults(needs_role=role, listener=listener)


def check_target(address: str, flag: str) -> str:
    """HOST:PORT, checked before dialing: gRPC would only say it cannot resolve it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(
            Exit.USAGE,
            f"{flag} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:7070 (`sluice serve` "
            "prints both listeners' addresses)",
        )
    return address


def identity(args: argparse.Namespace) -> Identity | None:
    """The caller's certificate: --pki DIR --identity NAME; None with --insecure.

    The files are checked before anything is dialed, so that a wrong --pki or name is told
    as such, not as a failed TLS handshake."""
    from sluice.clients.sdk import Identity

    if args.insecure:
        return None
    if args.pki is None or args.identity is None:
        raise CliError(
            Exit.USAGE,
            "pass --pki DIR --identity NAME (certificates made by `sluice init`), or "
            "--insecure for a gateway run with --insecure-loopback",
        )
    pki: Path = args.pki
    if not pki.is_dir():
        raise CliError(
            Exit.IDENTITY, f"--pki {pki}: no such directory; pass the one `sluice init` wrote"
        )
    me = Identity.from_pki(pki, args.identity)
    if not me.ca.is_file():
        raise CliError(
            Exit.IDENTITY, f"--pki {pki}: no ca.pem there; is it a directory `sluice init` wrote?"
        )
    if not me.cert.is_file() or not me.key.is_file():
        clients = me.cert.parent
        known = sorted(p.stem for p in clients.glob("*.pem")) if clients.is_dir() else []
        there = f"known: {', '.join(known[:20])}" if known else f"{clients} holds none"
        raise CliError(
            Exit.IDENTITY,
            f"--identity {args.identity!r}: no certificate and key {me.cert.name}/{me.key.name} "
            f"in {clients} ({there})",
        )
    args.principal_role = _check_certificate(me)
    return me


def _check_certificate(me: Identity) -> str | None:
    """The certificate's role; CliError for files TLS could not use (garbled, not a pair,
    expired), which the gateway would only answer with a closed connection."""
    from cryptography import x509

    from sluice.gateway.pki import UnknownPrincipal, key_matches_cert, principal_from_pem

    try:
        x509.load_pem_x509_certificate(me.ca.read_bytes())
        pem = me.cert.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as exc:
        raise CliError(Exit.IDENTITY, f"cannot read the certificates: {exc}") from exc
    if not key_matches_cert(me.cert, me.key):
        raise CliError(
            Exit.IDENTITY,
            f"{me.key} is unreadable or not the key of {me.cert}: restore the pair, or issue it "
            "again with `sluice init`",
        )
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        raise CliError(
            Exit.IDENTITY,
            f"{me.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}: issue a new one "
            "(`sluice init` again)",
        )
    try:
        return principal_from_pem(pem).role
    except UnknownPrincipal as exc:
        raise CliError(Exit.IDENTITY, f"{me.cert} names no Sluice principal: {exc}") from exc


# --- gRPC failures ----------------------------------------------------------------------

# What gRPC's client says when the connection itself failed (never an answer of the gateway).
_NO_CONNECTION = ("failed to connect to all addresses", "errors resolving", "DNS resolution")
_TLS = ("andshake", "Socket closed", "Connection reset", "SSL")


# How gRPC words a message over this client's receive limit (grpc.max_receive_message_length).
_TOO_LARGE = "Received message larger than max"


def rpc_failure(exc: grpc.RpcError, args: argparse.Namespace) -> CliError:
    """One line for a failed call, with what to do: the connection (UNREACHABLE), the
    certificate (IDENTITY), a retryable answer (BUSY) or a refusal (REFUSED)."""
    import grpc

    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = one_line((exc.details() if callable(getattr(exc, "details", None)) else "") or "")
    name = code.name if code is not None else "UNKNOWN"
    listener = getattr(args, "listener", "internal")
    flag = "--egress" if listener == "egress" else "--target"
    address = getattr(args, "egress" if listener == "egress" else "target", None) or "?"
    if code == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _NO_CONNECTION):
        why = one_line(details.rsplit("last error: ", 1)[-1], 160)
        tls = _tls_hint(details, args)
        if tls is not None:
            code_of_it, hint = tls
            return CliError(code_of_it, f"cannot talk to the gateway at {address}: {hint} [{why}]")
        return CliError(
            Exit.UNREACHABLE,
            f"cannot reach the gateway at {address}: is `sluice serve` running there? (wrong "
            f"port? {_listener_hint(listener)}) [{why}]",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
        return CliError(
            Exit.UNREACHABLE,
            f"no answer from {address} in time: is it a sluice listener, and is the gateway "
            "up? (a TLS listener dialed with --insecure, or a port of another program, can "
            "hang like this)",
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(_TOO_LARGE):
        # gRPC's own refusal in this process, not the gateway saying it is busy.
        return CliError(
            Exit.REFUSED,
            f"refused: a message over gRPC's size limit ({details}): is {address} a sluice "
            "gateway of this version?",
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(
            Exit.UNREACHABLE,
            f"{address} does not serve this command: {_listener_hint(listener)}; pass the "
            f"{listener} listener's address to {flag} (`sluice serve` prints both)",
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CliError(Exit.IDENTITY, f"refused: {name}: {details}; {_role_hint(args)}")
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    ):
        return CliError(Exit.BUSY, f"refused: {name}: {details}; try again later")
    return CliError(Exit.REFUSED, f"refused: {name}: {details}")


def _tls_hint(details: str, args: argparse.Namespace) -> tuple[Exit, str] | None:
    """What a connection that failed in TLS setup means (plain text against TLS: the wrong
    kind of listener; certificates the other side refused: the identity); None when it
    was not TLS."""
    pki = getattr(args, "pki", None)
    if "WRONG_VERSION_NUMBER" in details:
        hint = "it speaks plain text (started with --insecure-loopback): pass --insecure"
        return Exit.UNREACHABLE, hint
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return Exit.IDENTITY, (
            f"its certificate is not from the CA in {pki}/ca.pem: is --pki the directory the "
            "gateway was started with?"
        )
    if any(s in details for s in _TLS):
        if getattr(args, "insecure", False):
            hint = "it closed the connection: it wants TLS; pass --pki DIR --identity NAME"
            return Exit.UNREACHABLE, hint
        return Exit.IDENTITY, (
            "it closed the connection during TLS setup: it does not accept this certificate "
            "(issued by another CA than the gateway's, or expired)"
        )
    return None


def _listener_hint(listener: str) -> str:
    if listener == "egress":
        return "this command talks to the egress listener, which serves only EgressService"
    return "the egress port serves only EgressService; this command needs the internal listener"


def _role_hint(args: argparse.Namespace) -> str:
    needs = getattr(args, "needs_role", None)
    if needs is None:
        return "the gateway does not accept this certificate for this command"
    command = f"`sluice {args.command}`"
    have = getattr(args, "principal_role", None)
    if have is not None and have != needs:
        article = "an" if have[:1] in "aeiou" else "a"
        return (
            f"{command} needs {ROLE_WORDS[needs]}; --identity {args.identity} is {article} {have}"
        )
    if have == needs:
        return f"{command} needs {ROLE_WORDS[needs]}: is this one revoked?"
    return f"{command} needs {ROLE_WORDS[needs]}"


# --- the format check's limits -----------------------------------------------------------


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


# --- help and time -----------------------------------------------------------------------


def has_default(action: argparse.Action) -> bool:
    """Whether --help should show the option's default: not for None, False or []."""
    default: Any = action.default
    return not (
        default is None or default is False or default == [] or default is argparse.SUPPRESS
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default when it has one worth showing (has_default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not has_default(action):
            return action.help
        if action.help and "default" in action.help:  # the text says it already
            return action.help
        return super()._get_help_string(action)


_RELATIVE = re.compile(r"-?(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str) -> int:
    """--since/--until: ISO 8601 (a date, or date and time; UTC unless it says otherwise)
    or a time ago (1h, 30m, 2d; `--since=-1h` too); unix milliseconds. argparse type."""
    now = datetime.datetime.now(datetime.UTC)
    m = _RELATIVE.fullmatch(text.strip())
    if m:
        ago = datetime.timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
        return int((now - ago).timestamp() * 1000)
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an ISO 8601 time (2026-05-01, 2026-05-01T12:00:00+08:00) or "
            "a time ago (1h, 30m, 2d, 1w)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


def iso_ms(unix_ms: int) -> str:
    """A unix time in milliseconds as ISO 8601 UTC, to the second."""
    when = datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """Compact: 45s, 9m58s, 3h05m, 2d04h."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"
