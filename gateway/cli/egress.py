"""The global team's commands: pull, verify and export-weights (no torch needed)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from sluice.gateway.cli.common import (
    CliError,
    Exit,
    add_identity,
    add_limits,
    check_target,
    identity,
    iso_ms,
    limits,
    plural,
    rpc_failure,
    size,
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 86_400:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, more than 0 and at most 86400")
    return value


def _pull(args: argparse.Namespace) -> int:
    import grpc

    from sluice.clients.pins import Pins
    from sluice.clients.progress import transfer
    from sluice.clients.sdk import EgressClient
    from sluice.models.manifest import ManifestRefused, load_public_key

    try:  # local inputs first: a garbage key or pin file is a one-line refusal
        key = load_public_key(args.public_key)
        pins = Pins.load(args.pin_file) if args.pin_file else None
    except ManifestRefused as exc:
        raise CliError(Exit.USAGE, f"{exc}; nothing pulled") from exc
    pinned = args.structure_hash or (pins.get(args.model) if pins else None)
    me = identity(args)
    target = check_target(args.egress, "--egress")
    with EgressClient(target, identity=me, idle_s=args.idle_timeout) as client:
        try:
            doc = client.pull_release(
                args.model,
                args.out,
                key,
                version=args.version,
                structure_hash=pinned,
                limits=limits(args),
                progress=transfer,
            )
        except ManifestRefused as exc:
            raise CliError(Exit.REFUSED, f"refused: {exc}; nothing written", bare=True) from exc
        except grpc.RpcError as exc:
            failure = rpc_failure(exc, args)
            if failure.code in (Exit.REFUSED, Exit.BUSY):  # the gateway's answer, as always
                kept = "; run it again to resume" if failure.code == Exit.BUSY else ""
                raise CliError(
                    failure.code, f"{failure.message}; nothing written{kept}", bare=True
                ) from exc
            raise failure from exc
        except KeyboardInterrupt:
            print(
                f"sluice pull: interrupted; {args.out} holds no unverified file, and the same "
                "command resumes where this one stopped",
                file=sys.stderr,
            )
            return Exit.INTERRUPTED
        except (OSError, ValueError) as exc:  # --out unusable, a stream that did not add up
            raise CliError(Exit.REFUSED, f"refused: {exc}; nothing written", bare=True) from exc
    if pins is not None and pins.get(args.model) is None:
        pins.pin(args.model, str(doc["structure_hash"]))
        print(f"{args.pin_file}: pinned the structure of {args.model} (first pull)")
    names = ", ".join(f["name"] for f in doc["files"])
    print(f"{args.out}: {doc['model']} v{doc['version']} ({names}) verified and written")
    return 0


def _releases(args: argparse.Namespace) -> int:
    """The published releases the global team may pull: what ListReleases says, every
    field from the release's verified signed manifest (withheld ones marked)."""
    from sluice.clients.sdk import EgressClient

    me = identity(args)
    with EgressClient(check_target(args.egress, "--egress"), identity=me) as client:
        releases = client.releases(args.model or "")[: args.limit]
    if args.json:
        doc = [
            {
                "model": r.model,
                "version": r.version,
                "round": r.round,
                "created_unix_ms": r.created_unix_ms,
                "num_trainers": r.num_trainers,
                "withheld": r.withheld,
                "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in r.files],
            }
            for r in releases
        ]
        print(json.dumps({"releases": doc}, indent=2))
        return 0
    if not releases:
        print(f"no published release{' of ' + args.model if args.model else ''}")
    for r in releases:
        total = sum(f.size for f in r.files)
        files = ", ".join(f.name for f in r.files)
        mark = "  WITHHELD (its files no longer match the signed manifest)" * r.withheld
        print(
            f"{r.model} v{r.version}  round {r.round}  {iso_ms(r.created_unix_ms)}  "
            f"{plural(r.num_trainers, 'trainer')}  {size(total)} ({files}){mark}"
        )
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
            limits=limits(args),
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
            args.release_dir, key, args.out, args.structure_hash, limits=limits(args)
        )
    except (ManifestRefused, OSError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {doc['model']} v{doc['version']}, {len(doc['weights'])} tensors")
    return 0


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    pull.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=120.0,
        metavar="SECONDS",
        help="after its header, a stream that brings no bytes for this long while the pull "
        "waits is cancelled and resumed, up to 5 tries in all (default 120; the wait for "
        "the header, which a gateway may send after checking the whole file, is not idle)",
    )
    add_limits(pull)
    add_identity(pull, role="reader", listener="egress")
    pull.set_defaults(run=_pull)

    releases = sub.add_parser(
        "releases", help="(global team) the published releases, newest first, from the egress"
    )
    releases.add_argument("--egress", required=True, help="egress listener address")
    releases.add_argument("--model", help="only this model (default: every model)")
    releases.add_argument("--limit", type=int, default=20, help="at most this many")
    releases.add_argument("--json", action="store_true", help="one JSON document")
    add_identity(releases, role="reader", listener="egress")
    releases.set_defaults(run=_releases)

    verify = sub.add_parser("verify", help="(global team) verify a pulled release offline")
    verify.add_argument("file", type=Path, help="model.onnx (model.onnx.data beside it if any)")
    verify.add_argument("manifest", type=Path, help="manifest.json")
    verify.add_argument("--signature", type=Path, help="default: manifest.sig beside it")
    verify.add_argument("--public-key", type=Path, required=True)
    verify.add_argument(
        "--structure-hash", help="refuse a file whose graph structure hash is not this one"
    )
    add_limits(verify)
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
    add_limits(export)
    export.set_defaults(run=_export_weights)
