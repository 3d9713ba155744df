"""`sluice`: serve the gateway, simulate regional trainers, pull releases, steer rounds."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from sluice.clients.sdk import Identity
    from sluice.models.artifact import StructureLimits


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


def _limits(args: argparse.Namespace) -> StructureLimits | None:
    """The format check's totals from --limit (defaults for the rest); None: all defaults."""
    from sluice.models.artifact import StructureLimits

    return StructureLimits(**dict(args.limit)) if args.limit else None


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        type=_limit,
        action="append",
        metavar="NAME=N",
        help="raise one of the format check's totals for a model the gateway declares with "
        "bigger limits (e.g. structure_bytes=131072); repeatable; default: the defaults",
    )


def _pull(args: argparse.Namespace) -> int:
    import grpc

    from sluice.clients.pins import Pins
    from sluice.clients.sdk import EgressClient
    from sluice.models.manifest import ManifestRefused, load_public_key

    try:  # local inputs first: a garbage key or pin file is a one-line refusal
        key = load_public_key(args.public_key)
        pins = Pins.load(args.pin_file) if args.pin_file else None
    except ManifestRefused as exc:
        print(f"sluice pull: {exc}; nothing pulled", file=sys.stderr)
        return 2
    pinned = args.structure_hash or (pins.get(args.model) if pins else None)
    with EgressClient(args.egress, identity=_identity(args)) as client:
        try:
            doc = client.pull_release(
                args.model,
                args.out,
                key,
                version=args.version,
                structure_hash=pinned,
                limits=_limits(args),
            )
        except ManifestRefused as exc:
            print(f"refused: {exc}; nothing written", file=sys.stderr)
            return 1
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            print(f"refused: {code}: {exc.details()}; nothing written", file=sys.stderr)
            return 1
        except (OSError, ValueError) as exc:  # --out unusable, a stream that did not add up
            print(f"refused: {str(exc)[:300]}; nothing written", file=sys.stderr)
            return 1
    if pins is not None and pins.get(args.model) is None:
        pins.pin(args.model, str(doc["structure_hash"]))
        print(f"{args.pin_file}: pinned the structure of {args.model} (first pull)")
    names = ", ".join(f["name"] for f in doc["files"])
    print(f"{args.out}: {doc['model']} v{doc['version']} ({names}) verified and written")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sluice.clients.verify import verify_release
    from sluice.models.manifest import (
        DATA_FILE,
        MAX_MANIFEST_BYTES,
        MAX_SIGNATURE_BYTES,
        MODEL_FILE,
        ManifestRefused,
        listed_files,
        load_public_key,
        read_bounded,
        verify_signature,
    )

    signature_path = args.signature or args.manifest.with_name("manifest.sig")
    files = {MODEL_FILE: args.file}
    try:
        manifest_json = read_bounded(args.manifest, MAX_MANIFEST_BYTES, "manifest")
        signature = read_bounded(signature_path, MAX_SIGNATURE_BYTES, "signature")
        key = load_public_key(args.public_key)
        # The signature before anything is parsed: which files to read is a signed fact.
        if DATA_FILE in listed_files(verify_signature(manifest_json, signature, key)):
            files[DATA_FILE] = args.file.with_name(DATA_FILE)
        doc = verify_release(
            manifest_json,
            signature,
            key,
            files,
            structure_hash=args.structure_hash,
            limits=_limits(args),
        )
    except (ManifestRefused, OSError) as exc:
        print(f"sluice verify: FAILED: {exc}", file=sys.stderr)
        return 1
    print(
        f"OK: {doc['model']} v{doc['version']}, {doc['num_trainers']} trainers from "
        f"{doc['num_regions']} regions, signed by key {doc['signing_key_id']}"
    )
    return 0


def _export_weights(args: argparse.Namespace) -> int:
    from sluice.clients.weights import export_safetensors
    from sluice.models.manifest import ManifestRefused, load_public_key

    try:
        key = load_public_key(args.public_key)
        doc = export_safetensors(
            args.release_dir, key, args.out, args.structure_hash, limits=_limits(args)
        )
    except (ManifestRefused, OSError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {doc['model']} v{doc['version']}, {len(doc['weights'])} tensors")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    import sqlite3

    from sluice.gateway.config import load_config
    from sluice.gateway.export.release_audit import verify_published
    from sluice.gateway.store.audit import verify_chain

    path = args.data_dir / "sluice.db"
    if not path.exists():
        print(f"sluice audit verify: {path} does not exist", file=sys.stderr)
        return 1
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        count, broken = verify_chain(db)
    finally:
        db.close()
    if broken:
        print(f"sluice audit verify: BROKEN after {count} good entries: {broken}", file=sys.stderr)
        return 1
    print(f"audit chain intact: {count} entries")
    # Every published release against its signed manifest, as a pull would check it.
    try:
        statuses = verify_published(load_config(args.config, {"data_dir": args.data_dir}))
    except (ValueError, OSError, sqlite3.Error) as exc:  # ManifestRefused: no usable key
        print(f"sluice audit verify: releases not checked: {str(exc)[:300]}", file=sys.stderr)
        return 1
    withheld = [s for s in statuses if s.withheld]
    for s in withheld:
        print(f"WITHHELD {s.model} v{s.version}: {s.withheld}", file=sys.stderr)
    print(f"releases: {len(statuses) - len(withheld)} intact, {len(withheld)} withheld")
    return 1 if withheld else 0


def _status(args: argparse.Namespace) -> int:
    from sluice.clients.sdk import AdminClient

    with AdminClient(args.target, identity=_identity(args)) as admin:
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

    with AdminClient(args.target, identity=_identity(args)) as admin:
        closed = admin.close_round(args.model, args.round)
    before = " (the round had already been closed)" if closed.already_closed else ""
    if closed.released:
        print(f"version {closed.version}, released{before}")
    else:
        print(f"version {closed.version}, NOT released: {closed.release_refused}{before}")
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
        with AdminClient(args.target, identity=_identity(args)) as admin:
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


def _identity(args: argparse.Namespace) -> Identity | None:
    """The caller's certificate: --pki DIR --identity NAME; None with --insecure."""
    from sluice.clients.sdk import Identity

    if args.insecure:
        return None
    if args.pki is None or args.identity is None:
        raise SystemExit(
            f"sluice {args.command}: pass --pki DIR --identity NAME (certificates made by "
            "`sluice init`), or --insecure for a gateway run with --insecure-loopback"
        )
    return Identity.from_pki(args.pki, args.identity)


def _add_identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pki", type=Path, help="directory written by `sluice init`")
    p.add_argument("--identity", help="principal name: uses <pki>/clients/<name>.pem/.key")
    p.add_argument("--insecure", action="store_true", help="plain text (--insecure-loopback)")


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
    with AdminClient(args.target, identity=_identity(args)) as admin:
        dropped = admin.revoke(serial, name, args.reason)
    print(f"revoked {name} (serial {serial}); discarded updates: {', '.join(dropped) or 'none'}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from sluice.clients.simulate import run_from_args

    return run_from_args(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

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

    pull = sub.add_parser(
        "pull", help="(global team) pull and verify a release through the egress listener"
    )
    pull.add_argument("--egress", required=True, help="egress listener address")
    pull.add_argument("--model", default="drivenet")
    pull.add_argument("--version", type=int, default=0, help="0: the newest release")
    pull.add_argument("--public-key", type=Path, required=True, help="the gateway's signing key")
    pull.add_argument("--out", type=Path, required=True, help="directory for the release")
    pull.add_argument(
        "--structure-hash", help="refuse a release whose graph structure hash is not this one"
    )
    pull.add_argument(
        "--pin-file",
        type=Path,
        help="JSON file of pinned structure hashes per model: pinned at the first pull, "
        "every later pull must match",
    )
    _add_limits(pull)
    _add_identity(pull)
    pull.set_defaults(run=_pull)

    verify = sub.add_parser("verify", help="(global team) verify a pulled release offline")
    verify.add_argument("file", type=Path, help="model.onnx (model.onnx.data beside it if any)")
    verify.add_argument("manifest", type=Path, help="manifest.json")
    verify.add_argument("--signature", type=Path, help="default: manifest.sig beside it")
    verify.add_argument("--public-key", type=Path, required=True)
    verify.add_argument(
        "--structure-hash", help="refuse a file whose graph structure hash is not this one"
    )
    _add_limits(verify)
    verify.set_defaults(run=_verify)

    export = sub.add_parser(
        "export-weights", help="(global team) a verified release's weights as safetensors"
    )
    export.add_argument("release_dir", type=Path, help="a pulled release: model.onnx, manifest")
    export.add_argument("--public-key", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    export.add_argument(
        "--structure-hash", help="refuse a release whose graph structure hash is not this one"
    )
    _add_limits(export)
    export.set_defaults(run=_export_weights)

    audit = sub.add_parser("audit", help="(compliance) the hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser(
        "verify",
        help="recompute the chain and name a break; check every published release on disk "
        "against its signed manifest and name the withheld ones",
    )
    audit_verify.add_argument("--data-dir", type=Path, default=Path(".sluice"))
    audit_verify.add_argument("--config", type=Path, help="the gateway's TOML (its egress policy)")
    audit_verify.set_defaults(run=_audit_verify)

    init = sub.add_parser("init", help="create a development PKI: CA, listener and client certs")
    init.add_argument("directory", type=Path)
    init.add_argument("--trainer", action="append", default=[], help="NAME:REGION, repeatable")
    init.add_argument("--reader", action="append", default=[], help="global-team principal")
    init.add_argument("--operator", action="append", default=[], help="operator principal")
    init.add_argument("--server-name", action="append", default=[], help="extra listener SAN")
    init.add_argument("--days", type=int, default=365, help="validity of leaf certificates")
    init.set_defaults(run=_init)

    revoke = sub.add_parser("revoke", help="(operator) revoke a certificate, no restart needed")
    revoke.add_argument("--target", required=True, help="internal listener address")
    revoke.add_argument("--cert", type=Path, help="the certificate to revoke")
    revoke.add_argument("--serial", help="or its serial number in hex")
    revoke.add_argument("--principal", help="and its principal name")
    revoke.add_argument("--reason", default="", help="why, for the audit log")
    _add_identity(revoke)
    revoke.set_defaults(run=_revoke)

    status = sub.add_parser("status", help="(operator) models, rounds and versions")
    status.add_argument("--target", required=True, help="internal listener address")
    _add_identity(status)
    status.set_defaults(run=_status)

    close = sub.add_parser("close-round", help="(operator) close the open round now")
    close.add_argument("--target", required=True, help="internal listener address")
    close.add_argument("--model", default="drivenet")
    close.add_argument("--round", type=int, required=True)
    _add_identity(close)
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
    _add_identity(imp)
    imp.set_defaults(run=_import)

    from sluice.gateway.cli_sign import add_parsers

    add_parsers(sub)  # keygen, sign-import: the global program's side, outside the region

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


if __name__ == "__main__":
    sys.exit(main())
