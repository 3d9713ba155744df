"""A participant's kit (`sluice init --kits`, `sluice kit`), read and checked on its host.

A kit is one principal's certificate and key, the CA certificate and the endpoints it
dials, laid out like the operator's PKI directory cut down to that one principal, so
`--pki KIT --identity NAME` works as well as `load_kit(KIT).identity`:

    ca.pem                 the CA the gateway's listeners present certificates from
    clients/<name>.pem     the principal's client certificate
    clients/<name>.key     its private key (0600)
    kit.json               principal, role, region, endpoints, CA fingerprint, validity
    README.txt, run.sh     what to do with it, and a ready command line for the role
    release-signing.pub    readers only, when the operator included the gateway's key
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from sluice.clients.sdk import Identity

KIT_FORMAT = "sluice.kit/1"
KIT_FILE = "kit.json"
CA_FILE = "ca.pem"
RELEASE_KEY_FILE = "release-signing.pub"
MAX_KIT_FILE_BYTES = 64 << 10  # kit.json is a few hundred bytes
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # as gateway/pki.py: also keeps paths inside
_ROLES = ("trainer", "operator", "reader")


class KitError(ValueError):
    """A directory that is not a usable kit; the message says what is wrong and what to do."""


def cert_path(directory: Path, name: str) -> Path:
    return directory / "clients" / f"{name}.pem"


def key_path(directory: Path, name: str) -> Path:
    return directory / "clients" / f"{name}.key"


def ca_sha256(ca_pem: bytes) -> str:
    """sha256 over the DER of each certificate in the bundle: the gateway records the same
    value in `<data dir>/trusted-ca.sha256` at its first start."""
    digest = hashlib.sha256()
    for cert in x509.load_pem_x509_certificates(ca_pem):
        digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.hexdigest()


@dataclass(frozen=True)
class Kit:
    directory: Path
    principal: str
    role: str  # trainer, operator or reader
    region: str | None  # trainers only
    endpoints: Mapping[str, str]  # "internal" (trainer, operator) or "egress" (reader)
    ca_sha256: str
    not_after: str  # ISO 8601, UTC: the certificate's last valid moment

    @property
    def identity(self) -> Identity:
        return Identity.from_pki(self.directory, self.principal)

    @property
    def release_key(self) -> Path | None:
        """The gateway's release-signing public key, where the operator included it."""
        path = self.directory / RELEASE_KEY_FILE
        return path if path.is_file() else None

    def endpoint(self, listener: str) -> str:
        try:
            return self.endpoints[listener]
        except KeyError:
            raise KitError(
                f"{self.directory}: a {self.role} kit names no {listener} endpoint "
                f"(it has: {', '.join(self.endpoints) or 'none'})"
            ) from None


def _field(doc: Mapping[str, Any], name: str, where: Path) -> Any:
    if name not in doc:
        raise KitError(f"{where}: no {name!r}; export the kit again with `sluice kit`")
    return doc[name]


def _read_document(directory: Path) -> dict[str, Any]:
    path = directory / KIT_FILE
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KIT_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KitError(f"{directory}: no {KIT_FILE}; not a kit from `sluice kit`") from None
    if len(data) > MAX_KIT_FILE_BYTES:
        raise KitError(f"{path}: over {MAX_KIT_FILE_BYTES} bytes; not a kit file")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise KitError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != KIT_FORMAT:
        raise KitError(f"{path}: expected format {KIT_FORMAT!r}")
    return doc


def _check_files(directory: Path, name: str, spiffe_id: str, fingerprint: str) -> None:
    ca_pem = (directory / CA_FILE).read_bytes()
    if ca_sha256(ca_pem) != fingerprint:
        raise KitError(f"{directory / CA_FILE}: not the CA named in {KIT_FILE} (sha256 differs)")
    cert = x509.load_pem_x509_certificate(cert_path(directory, name).read_bytes())
    key_file = key_path(directory, name)
    if key_file.stat().st_mode & 0o077:
        raise KitError(f"{key_file}: readable by group or others; chmod 600 it")
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if key.public_key() != cert.public_key():
        raise KitError(f"{key_file}: not the key of {cert_path(directory, name)}")
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificates(ca_pem)[0])
    except (ValueError, TypeError, InvalidSignature):
        raise KitError(f"{cert_path(directory, name)}: not issued by {CA_FILE}") from None
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if sans.get_values_for_type(x509.UniformResourceIdentifier) != [spiffe_id]:
        raise KitError(f"{cert_path(directory, name)}: does not name {spiffe_id}")


def load_kit(directory: Path) -> Kit:
    """The kit in directory, after checking that its files belong together: the CA is the
    one kit.json names, the certificate is the CA's and names the principal, the key is the
    certificate's and readable by its owner only. Raises KitError otherwise."""
    doc = _read_document(directory)
    where = directory / KIT_FILE
    name, role = _field(doc, "principal", where), _field(doc, "role", where)
    region = doc.get("region")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KitError(f"{where}: principal {name!r}: expected {_NAME.pattern}")
    if role not in _ROLES:
        raise KitError(f"{where}: role {role!r}: expected one of {', '.join(_ROLES)}")
    endpoints = _field(doc, "endpoints", where)
    if not isinstance(endpoints, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in endpoints.items()
    ):
        raise KitError(f"{where}: endpoints: expected a table of listener -> HOST:PORT")
    fingerprint = str(_field(doc, "ca_sha256", where))
    try:
        _check_files(directory, name, str(_field(doc, "spiffe_id", where)), fingerprint)
    except KitError:
        raise
    except FileNotFoundError as exc:
        raise KitError(f"{exc.filename}: missing from the kit; export it again") from None
    except (ValueError, TypeError, x509.ExtensionNotFound) as exc:  # garbled PEM, not a pair
        raise KitError(f"{directory}: unreadable certificate or key ({exc})") from None
    return Kit(
        directory=directory,
        principal=name,
        role=role,
        region=region if isinstance(region, str) else None,
        endpoints=dict(endpoints),
        ca_sha256=fingerprint,
        not_after=str(doc.get("not_after", "")),
    )
