"""The gateway's Ed25519 release-signing key: created once in the data dir, private key 0600."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.export.refresh import write_atomic
from models.manifest import key_id

PRIVATE_FILE = "release-signing.key"
PUBLIC_FILE = "release-signing.pub"  # what the global team is given


class Signer:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def load_or_create(cls, directory: Path) -> Signer:
        """Load keys/release-signing.key, or create it (0600) with its public half beside it."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / PRIVATE_FILE
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise PermissionError(f"{path}: private key readable by group or others")
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 private key")
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
        signer = cls(key)
        write_atomic(directory / PUBLIC_FILE, [signer.public_pem()])
        return signer

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)
