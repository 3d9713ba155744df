"""The global team's commands: pull, verify and export-weights (no torch needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sluice.gateway.cli.common import add_identity, add_limits, identity, limits


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
    with EgressClient(args.egress, identity=identity(args)) as client:
        try:
            doc = client.pull_release(
                args.model,
                args.out,
                key,
                version=args.version,
                structure_hash=pinned,
                limits=limits(args),
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
    add_limits(pull)
    add_identity(pull)
    pull.set_defaults(run=_pull)

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
