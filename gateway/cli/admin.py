"""The operator's commands: status, close-round, revoke, import."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.gateway.cli.common import (
    CliError,
    Exit,
    add_identity,
    check_target,
    duration,
    identity,
    iso_ms,
    plural,
    rpc_failure,
    size,
)

if TYPE_CHECKING:
    from sluice.v1 import admin_pb2


def _status(args: argparse.Namespace) -> int:
    from sluice.clients.sdk import AdminClient

    me = identity(args)
    with AdminClient(check_target(args.target, "--target"), identity=me) as admin:
        status = admin.status()
    models = [m for m in status.models if not args.model or m.model == args.model]
    if args.model and not models:
        known = ", ".join(m.model for m in status.models)
        raise CliError(Exit.REFUSED, f"the gateway serves no model {args.model!r} ({known})")
    if args.json:
        doc = {"now_unix_ms": status.now_unix_ms, "models": [status_doc(m) for m in models]}
        print(json.dumps(doc, indent=2, allow_nan=False))
        return 0
    for m in models:
        print("\n".join(status_lines(m, status.now_unix_ms)))
    return 0


def _number(x: float) -> float | str:
    """JSON has no Infinity or NaN: those are the strings "inf" and "unknown"."""
    if math.isinf(x):
        return "inf"
    return "unknown" if math.isnan(x) else x


def _epsilon(m: admin_pb2.ModelStatus) -> float | str | None:
    return _number(m.dp_epsilon) if m.dp_enabled else None


def status_doc(m: admin_pb2.ModelStatus) -> dict[str, Any]:
    """`sluice status --json`: one object per model (docs/CLI.md names every key)."""
    return {
        "model": m.model,
        "round": {
            "number": m.open_round,
            "state": m.round_state or "open",
            "base_version": m.base_version,
            "opened_unix_ms": m.opened_unix_ms,
            "deadline_unix_ms": m.deadline_unix_ms,
            "updates": m.updates,
            "trainers": m.accepted,
            "close_error": m.close_error or None,
        },
        "policy": {
            "strategy": m.strategy,
            "fedbuff": m.fedbuff,
            "quorum": m.quorum,
            "min_updates": m.min_updates,
            "min_trainers": m.min_trainers,
        },
        "dp": {
            "enabled": m.dp_enabled,
            "epsilon_spent": _epsilon(m),
            "max_epsilon": _number(m.dp_max_epsilon) if m.dp_enabled else None,
        },
        "latest_version": m.latest_version,
        "latest_release": m.latest_release or None,
        "releases": [
            {
                "version": r.version,
                "round": r.round,
                "created_unix_ms": r.created_unix_ms,
                "num_trainers": r.num_trainers,
                "num_files": r.num_files,
                "total_bytes": r.total_bytes,
            }
            for r in m.releases
        ],
        "failed_round": (
            {"number": m.failed_round, "reason": m.failed_reason} if m.failed_round else None
        ),
    }


def status_lines(m: admin_pb2.ModelStatus, now_ms: int) -> list[str]:
    """A compact block per model: the round, how it closes, privacy, releases, failures."""
    state = m.round_state or "open"
    left = (m.deadline_unix_ms - now_ms) / 1000
    when = f"in {duration(left)}" if left > 0 else "passed: closes once it has enough updates"
    quorum = f"quorum {m.quorum}" + (" (FedBuff: a version every quorum updates)" * m.fedbuff)
    lines = [
        f"{m.model}: round {m.open_round} {state} on version {m.base_version}, latest version "
        f"{m.latest_version}",
        f"  deadline  {iso_ms(m.deadline_unix_ms)} ({when})",
        f"  updates   {plural(m.updates, 'update')} from {plural(m.accepted, 'trainer')}; "
        f"{quorum}, at the deadline {m.min_updates}",
        f"  policy    {m.strategy}; a release needs k={plural(m.min_trainers, 'trainer')}",
    ]
    if m.dp_enabled:
        eps = _epsilon(m)
        spent = f"{eps:.3g}" if isinstance(eps, float) else eps
        lines.append(f"  privacy   DP epsilon spent {spent} of at most {m.dp_max_epsilon:g}")
    else:
        lines.append("  privacy   DP off")
    if m.releases:
        shown = [
            f"v{r.version} ({iso_ms(r.created_unix_ms)}, {plural(r.num_trainers, 'trainer')}, "
            f"{size(r.total_bytes)})"
            for r in m.releases[:3]
        ]
        lines.append(f"  releases  {'; '.join(shown)}")
    else:
        lines.append("  releases  none yet")
    if m.close_error:
        lines.append(f"  CLOSING   round {m.open_round} failed to close, retrying: {m.close_error}")
    if m.failed_round:
        lines.append(f"  FAILED    round {m.failed_round}: {m.failed_reason}")
    return lines


def _close_round(args: argparse.Namespace) -> int:
    from sluice.clients.sdk import AdminClient

    me = identity(args)
    with AdminClient(check_target(args.target, "--target"), identity=me) as admin:
        closed = admin.close_round(args.model, args.round or 0)
    before = " (the round had already been closed)" if closed.already_closed else ""
    which = f"round {closed.round or args.round} of {args.model}"
    if closed.released:
        print(f"{which}: version {closed.version}, released{before}")
        return 0
    why = closed.release_refused or "no reason recorded (see `sluice audit list`)"
    print(f"{which}: version {closed.version}, NOT released: {why}{before}")
    return Exit.REFUSED


def _revoke(args: argparse.Namespace) -> int:
    from sluice.clients.sdk import AdminClient
    from sluice.gateway.pki import load_pem_cert, principal_from_pem

    if args.cert is not None:
        pem = args.cert.read_bytes()
        principal = principal_from_pem(pem)
        serial, name = f"{load_pem_cert(args.cert).serial_number:x}", principal.name
    else:
        if not (args.serial and args.principal):
            raise CliError(Exit.USAGE, "pass --cert FILE, or --serial HEX --principal NAME")
        serial, name = args.serial, args.principal
    me = identity(args)
    with AdminClient(check_target(args.target, "--target"), identity=me) as admin:
        dropped = admin.revoke(serial, name, args.reason)
    print(f"revoked {name} (serial {serial}); discarded updates: {', '.join(dropped) or 'none'}")
    return 0


def _import(args: argparse.Namespace) -> int:
    """`sluice import`: a safetensors file and the global program's signature for it
    (`sluice sign-import`, outside the region). Checked here first so that a mismatch is
    told before the upload; the gateway verifies it all again, under its own keys."""
    import grpc

    from sluice.clients.progress import transfer
    from sluice.clients.sdk import AdminClient
    from sluice.models.import_statement import SignedStatement
    from sluice.models.manifest import file_digest

    try:
        if args.weights.is_dir():
            raise ValueError(
                f"{args.weights} is a directory: `sluice sign-import` (outside the region) "
                "turns a release into a signed safetensors file; import that file"
            )
        signed = SignedStatement.read(args.signature)
        statement = signed.statement
        if statement.model != args.model:
            raise ValueError(
                f"{args.signature} is for model {statement.model!r}, not {args.model!r}"
            )
        _, sha256 = file_digest(args.weights)
        if sha256 != statement.sha256:
            raise ValueError(
                f"{args.weights} is not the file {args.signature} signs (sha256 "
                f"{sha256[:16]}..., signed {statement.sha256[:16]}...)"
            )
    except (ValueError, OSError) as exc:  # StatementRefused is a ValueError
        print(f"sluice import: refused: {str(exc)[:300]}; nothing imported", file=sys.stderr)
        return 1
    me = identity(args)
    try:
        with (
            AdminClient(check_target(args.target, "--target"), identity=me) as admin,
            transfer(f"import {args.weights.name}", args.weights.stat().st_size) as advance,
        ):
            done = admin.import_base(
                args.model, args.weights, signed, reason=args.reason, advance=advance
            )
    except grpc.RpcError as exc:
        failure = rpc_failure(exc, args)
        if failure.code == Exit.REFUSED:  # refusals say that nothing was imported
            failure.message += "; nothing imported"
        raise failure from exc
    except OSError as exc:  # the file went away while it was read
        print(f"sluice import: {str(exc)[:300]}; nothing imported", file=sys.stderr)
        return 1
    kept = f", {len(done.kept_tensors)} buffers kept" if done.kept_tensors else ""
    print(
        f"{done.model}: version {done.version} imported (sha256 {done.weights_sha256[:16]}...) "
        f"signed by import key {done.signing_key_id}{kept}; round {done.round} trains from it"
    )
    return 0


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    revoke = sub.add_parser("revoke", help="(operator) revoke a certificate, no restart needed")
    revoke.add_argument("--target", required=True, help="internal listener address")
    revoke.add_argument("--cert", type=Path, help="the certificate to revoke")
    revoke.add_argument("--serial", help="or its serial number in hex")
    revoke.add_argument("--principal", help="and its principal name")
    revoke.add_argument("--reason", default="", help="why, for the audit log")
    add_identity(revoke, role="operator", listener="internal")
    revoke.set_defaults(run=_revoke)

    status = sub.add_parser(
        "status",
        help="(operator) per model: the round, its deadline, updates and trainers, strategy, "
        "quorum, k, DP epsilon spent, the newest releases and any failed round",
    )
    status.add_argument("--target", required=True, help="internal listener address")
    status.add_argument("--model", help="only this model (default: every served model)")
    status.add_argument("--json", action="store_true", help="one JSON document (docs/CLI.md)")
    add_identity(status, role="operator", listener="internal")
    status.set_defaults(run=_status)

    close = sub.add_parser(
        "close-round",
        help="(operator) close the open round now; exit status 1 when no release came of it",
    )
    close.add_argument("--target", required=True, help="internal listener address")
    close.add_argument("--model", default="drivenet")
    close.add_argument("--round", type=int, help="the round to close (default: the one open now)")
    add_identity(close, role="operator", listener="internal")
    close.set_defaults(run=_close_round)

    imp = sub.add_parser(
        "import",
        help="(operator) set a new base version from the global program's signed weights",
    )
    imp.add_argument("--target", required=True, help="internal listener address")
    imp.add_argument("--model", required=True)
    imp.add_argument("--weights", type=Path, required=True, help="the safetensors file")
    imp.add_argument(
        "--signature",
        type=Path,
        required=True,
        help="its signature file, from the global program (sluice sign-import)",
    )
    imp.add_argument("--reason", default="", help="why, for the audit log")
    add_identity(imp, role="operator", listener="internal")
    imp.set_defaults(run=_import)
