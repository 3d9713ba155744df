"""`sluice keygen`, `sluice sign-import`: the global program's side of an import, run outside
the region, in the client install (no torch).

    sluice keygen --out keys/global-import             # global-import.key (0600) and .pub
    sluice sign-import --model drivenet --weights w.safetensors --key keys/global-import.key \\
        --schema-hash H --out w.sig                    # or --manifest RELEASE/manifest.json
    sluice sign-import --model drivenet --weights RELEASE_DIR --public-key release.pub \\
        --key keys/global-import.key --out w.sig       # writes w.safetensors beside w.sig

The operator inside the region is given the .pub once (the gateway's import_keys), and
then each base as the .safetensors file and its .sig (`sluice import`).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _fail(command: str, why: str) -> int:
    print(f"sluice {command}: refused: {why[:300]}; nothing written", file=sys.stderr)
    return 1


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sluice.gateway.pki import create_private_file, create_public_file
    from sluice.models.manifest import key_id

    private, public = (args.out.with_name(f"{args.out.name}{s}") for s in (".key", ".pub"))
    there = [str(p) for p in (private, public) if p.exists() or p.is_symlink()]
    if there:
        return _fail("keygen", f"{', '.join(there)} already exists: a key is never replaced")
    key = Ed25519PrivateKey.generate()
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        create_private_file(
            private,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        create_public_file(
            public,
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    except OSError as exc:  # FileExistsError: made meanwhile; a private key alone is harmless
        return _fail("keygen", str(exc))
    print(
        f"{private}: import key {key_id(key.public_key())} (keep it outside the region); "
        f"{public}: give it to the region's operator for import_keys"
    )
    return 0


def _load_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sluice.gateway.pki import load_private_key

    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path}: private key readable by group or others (chmod 600 it)")
    key = load_private_key(path, "the import key")
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key (make one with `sluice keygen`)")
    return key


def _manifest_schema_hash(path: Path) -> str:
    """A release manifest's schema hash. Its signature is not needed here: a wrong hash only
    makes the gateway refuse the import."""
    from sluice.models.manifest import MAX_MANIFEST_BYTES, parse, read_bounded

    doc = parse(read_bounded(path, MAX_MANIFEST_BYTES, "manifest"))
    value = doc.get("schema_hash")
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError(f"{path}: the manifest holds no schema_hash")
    return value


def _from_release(args: argparse.Namespace, schema_hash: str) -> tuple[Path, str]:
    """Verify a release directory (as `sluice verify`) and write its weights beside --out;
    (that file, the release's schema hash)."""
    from sluice.clients.weights import export_safetensors
    from sluice.models.manifest import load_public_key

    if args.public_key is None:
        raise ValueError(f"{args.weights} is a release directory: pass --public-key")
    out = args.out.with_suffix(".safetensors")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out")
    key = load_public_key(args.public_key)
    doc = export_safetensors(args.weights, key, out, args.structure_hash)
    if schema_hash and schema_hash != doc["schema_hash"]:
        out.unlink()
        raise ValueError(
            f"--schema-hash {schema_hash[:16]}... is not the release's "
            f"({str(doc['schema_hash'])[:16]}...)"
        )
    return out, str(doc["schema_hash"])


def _sign_import(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError, safe_open

    from sluice.models.import_statement import ImportStatement, sign_statement
    from sluice.models.manifest import file_digest, key_id

    made: Path | None = None  # the weights file this call wrote, removed on a refusal
    try:
        key = _load_key(args.key)
        if args.out.exists() or args.out.suffix == ".safetensors":
            raise FileExistsError(f"{args.out}: exists or names a weights file; choose another")
        schema_hash = args.schema_hash
        if args.manifest is not None:
            schema_hash = _manifest_schema_hash(args.manifest)
        weights = args.weights
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: no such file or release directory")
        if weights.is_dir():
            weights, schema_hash = _from_release(args, schema_hash)
            made = weights
        elif args.public_key is not None:
            raise ValueError(
                f"{weights} is a file: --public-key verifies a release directory; sign a "
                "file with --schema-hash or --manifest"
            )
        if not _HEX64.fullmatch(schema_hash):
            raise ValueError(
                "the model's schema hash is needed: --schema-hash (64 hex digits) or "
                "--manifest (a release manifest of the model)"
            )
        with safe_open(str(weights), framework="numpy") as f:  # a safetensors file at all
            f.keys()
        size, sha256 = file_digest(weights)
        statement = ImportStatement(args.model, schema_hash, sha256, int(time.time() * 1000))
        sign_statement(statement, key).write(args.out)
    except (ValueError, OSError, SafetensorError) as exc:  # ManifestRefused is a ValueError
        if made is not None:
            made.unlink(missing_ok=True)
        return _fail("sign-import", str(exc) or type(exc).__name__)
    print(
        f"{args.out}: {weights} ({size} bytes, sha256 {sha256[:16]}...) signed as a base of "
        f"{args.model} with import key {key_id(key.public_key())}"
    )
    return 0


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen = sub.add_parser(
        "keygen", help="(global program, outside the region) create an Ed25519 import key pair"
    )
    keygen.add_argument(
        "--out", type=Path, required=True, help="DIR/NAME: writes NAME.key (0600) and NAME.pub"
    )
    keygen.set_defaults(run=_keygen)

    sign = sub.add_parser(
        "sign-import",
        help="(global program, outside the region) sign a base for `sluice import`",
    )
    sign.add_argument("--model", required=True, help="the model the region imports it into")
    sign.add_argument(
        "--weights",
        type=Path,
        required=True,
        help="a safetensors file, or a release directory verified with --public-key (its "
        "weights are written as OUT.safetensors beside the signature)",
    )
    sign.add_argument("--key", type=Path, required=True, help="the import key (sluice keygen)")
    schema = sign.add_mutually_exclusive_group()
    schema.add_argument("--schema-hash", default="", help="the model's schema hash")
    schema.add_argument("--manifest", type=Path, help="or read it from a release manifest.json")
    sign.add_argument("--public-key", type=Path, help="the key a release directory is signed with")
    sign.add_argument("--structure-hash", help="refuse a release of another graph structure")
    sign.add_argument("--out", type=Path, required=True, help="the signature file to write")
    sign.set_defaults(run=_sign_import)
