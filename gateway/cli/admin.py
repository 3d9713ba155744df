"""The operator's commands: status, close-round, revoke, import."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sluice.gateway.cli.common import add_identity, identity


def _status(args: argparse.Namespace) -> int:
    from sluice.clients.sdk import AdminClient

    with AdminClient(args.target, identity=identity(args)) as admin:
        for m in admin.status().models:
            print(
                f"{m.model}: round {m.open_round} {m.round_state or 'open'} on version "
                f"{m.base_version} ({m.accepted} trainers), latest version {m.latest_version}, "
                f"latest release {m.latest_release or '-'}"
            )
            if m.close_error:
                print(f"  closing round {m.open_round} failed, retrying: {m.close_error}")
            if m.failed_round:
                print(f"  round {m.failed_round} FAILED: {m.failed_reason}")
    return 0


def _close_round(args: argparse.Namespace) -> int:
    from sluice.clients.sdk import AdminClient

    with AdminClient(args.target, identity=identity(args)) as admin:
        closed = admin.close_round(args.model, args.round)
    before = " (the round had already been closed)" if closed.already_closed else ""
    if closed.released:
        print(f"version {closed.version}, released{before}")
    else:
        print(f"version {closed.version}, NOT released: {closed.release_refused}{before}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from sluice.clients.sdk import AdminClient
    from sluice.gateway.pki import load_pem_cert, principal_from_pem

    if args.cert is not None:
        pem = args.cert.read_bytes()
        principal = principal_from_pem(pem)
        serial, name = f"{load_pem_cert(args.cert).serial_number:x}", principal.name
    else:
        if not (args.serial and args.principal):
            raise SystemExit("sluice revoke: pass --cert FILE, or --serial HEX --principal NAME")
        serial, name = args.serial, args.principal
    with AdminClient(args.target, identity=identity(args)) as admin:
        dropped = admin.revoke(serial, name, args.reason)
    print(f"revoked {name} (serial {serial}); discarded updates: {', '.join(dropped) or 'none'}")
    return 0


def _import(args: argparse.Namespace) -> int:
    """`sluice import`: a safetensors file and the global program's signature for it
    (`sluice sign-import`, outside the region). Checked here first so that a mismatch is
    told before the upload; the gateway verifies it all again, under its own keys."""
    import grpc

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
    try:
        with AdminClient(args.target, identity=identity(args)) as admin:
            done = admin.import_base(args.model, args.weights, signed, reason=args.reason)
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() else "UNKNOWN"
        print(f"sluice import: refused: {code}: {exc.details()}", file=sys.stderr)
        return 1
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
    add_identity(revoke)
    revoke.set_defaults(run=_revoke)

    status = sub.add_parser("status", help="(operator) models, rounds and versions")
    status.add_argument("--target", required=True, help="internal listener address")
    add_identity(status)
    status.set_defaults(run=_status)

    close = sub.add_parser("close-round", help="(operator) close the open round now")
    close.add_argument("--target", required=True, help="internal listener address")
    close.add_argument("--model", default="drivenet")
    close.add_argument("--round", type=int, required=True)
    add_identity(close)
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
    add_identity(imp)
    imp.set_defaults(run=_import)
