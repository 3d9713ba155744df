"""The gateway's Ed25519 release-signing key: created once in the data dir, private key 0600.

The key is written atomically (temp file, fsync, link: a kill leaves no key or the whole
key) and never replaced: an empty, corrupt or missing key with its public half still there
stops the start with a SigningKeyError that says what to do, since a new key silently made
would invalidate what the global team has pinned.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sluice.gateway.export.refresh import write_atomic
from sluice.gateway.pki import create_private_file, load_private_key
from sluice.models.manifest import key_id

PRIVATE_FILE = "release-signing.key"
PUBLIC_FILE = "release-signing.pub"  # what the global team is given


class SigningKeyError(RuntimeError):
    """The signing key on disk cannot be used; the message says what to do."""


def _fresh_start_hint(directory: Path) -> str:
    return (
        f"only if it is lost for good, remove {directory / PRIVATE_FILE} and "
        f"{directory / PUBLIC_FILE} and start again: a new key is made, and the global team "
        f"must be given the new {PUBLIC_FILE}"
    )


def _load(directory: Path) -> Ed25519PrivateKey:
    path = directory / PRIVATE_FILE
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path}: private key readable by group or others")
    if path.stat().st_size == 0:
        # Only an interrupted first start makes this: nothing was ever signed with it.
        raise SigningKeyError(
            f"{path} is empty: a first start was interrupted before the key was written, so "
            f"nothing was signed with it. Remove it (and {PUBLIC_FILE} beside it, if any) "
            "and start again to create the key"
        )
    try:
        key = load_private_key(path, "the release-signing key")
    except ValueError as exc:
        raise SigningKeyError(
            f"{exc}. Restore it from a backup; {_fresh_start_hint(directory)}"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"{path}: not an Ed25519 private key; restore the gateway's own key from a backup"
        )
    return key


class Signer:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def load_or_create(cls, directory: Path) -> Signer:
        """Load keys/release-signing.key, or create it (0600) with its public half beside it."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in directory.glob(f".{PRIVATE_FILE}.*.tmp"):  # a kill mid-write
            stale.unlink()
        path, public = directory / PRIVATE_FILE, directory / PUBLIC_FILE
        if path.exists():
            key = _load(directory)
        elif public.exists():
            raise SigningKeyError(
                f"{path} is missing but {PUBLIC_FILE} is there: releases were signed with a key "
                f"that is gone. Restore it from a backup; {_fresh_start_hint(directory)}"
            )
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            create_private_file(path, pem)
        signer = cls(key)
        want = signer.public_pem()
        if not public.exists():
            write_atomic(public, [want])
        elif public.read_bytes() != want:
            raise SigningKeyError(
                f"{public} is not the public half of {path}: one of them was replaced. Restore "
                f"the pair from a backup, or remove {PUBLIC_FILE} to have it written from the "
                "private key (the global team must then be given it again)"
            )
        return signer

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)
