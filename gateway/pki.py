"""A development PKI for both listeners, and how a client certificate names a Principal.

Identity encoding. Production users bring their own CA and must issue client
certificates the same way:

- one URI subjectAltName, the authoritative identity:
  `spiffe://sluice/trainer/<region>/<name>` for a trainer,
  `spiffe://sluice/operator/<name>` and `spiffe://sluice/reader/<name>` otherwise
  ("reader" is the global team outside the region);
- subject CN = the principal's name, subject OU = its role, both agreeing with the URI;
- names and regions match `[a-z0-9][a-z0-9_.-]{0,63}`;
- extendedKeyUsage clientAuth, basicConstraints CA:FALSE (or absent), no keyCertSign;
  the serial number is what the revocation list names.

Trust and dates are checked by the TLS handshake against the listener's CA bundle; it
also refuses a certificate whose EKU lacks clientAuth, but lets through one with no EKU
at all, or a CA certificate. principal_from_pem reads the identity of a verified peer and
refuses those two: only a client certificate names a principal.
All keys here are ECDSA P-256 signed with SHA-256: gRPC's BoringSSL handles them on
every platform. Private keys are written 0600 in 0700 directories.

The directory init_pki writes is the operator's: it holds the CA key. Each participant is
handed a kit cut from it instead (gateway/kits.py): its own key and certificate only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

TRAINER = "trainer"
OPERATOR = "operator"
READER = "reader"
ROLES = (TRAINER, OPERATOR, READER)
LISTENERS = ("internal", "egress")
TRUST_DOMAIN = "sluice"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_DNS_NAME = re.compile(
    r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)
# Backdated so that a peer whose clock is a little behind still accepts a fresh cert.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_CA_DAYS = 3650  # the CA outlives many rounds of leaf certificates
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


class UnknownPrincipal(ValueError):
    """A client certificate that does not name a Sluice principal the documented way."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # one of ROLES
    region: str | None  # trainers only
    serial: int  # the certificate's serial number, what the revocation list names

    @property
    def spiffe_id(self) -> str:
        return spiffe_id(self.name, self.role, self.region)


def _check_identity(name: str, role: str, region: str | None) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}, expected one of {', '.join(ROLES)}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r}: expected {_NAME.pattern}")
    if role == TRAINER:
        if region is None or not _NAME.fullmatch(region):
            raise ValueError(f"trainer {name!r}: region {region!r}, expected {_NAME.pattern}")
    elif region is not None:
        raise ValueError(f"{role} {name!r}: only trainers have a region, got {region!r}")


def spiffe_id(name: str, role: str, region: str | None = None) -> str:
    """The URI SAN that names this principal; raises ValueError for a bad identity."""
    _check_identity(name, role, region)
    path = f"{role}/{region}/{name}" if role == TRAINER else f"{role}/{name}"
    return f"spiffe://{TRUST_DOMAIN}/{path}"


def _parse_spiffe_id(uri: str) -> tuple[str, str, str | None]:
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    if not uri.startswith(prefix):
        raise ValueError(f"URI SAN {uri!r}: expected {prefix}<role>/...")
    role, *rest = uri[len(prefix) :].split("/")
    if role not in ROLES:
        raise ValueError(f"URI SAN {uri!r}: unknown role {role!r}, expected one of {ROLES}")
    if role == TRAINER and len(rest) == 2:
        region, name = rest
        _check_identity(name, role, region)
        return name, role, region
    if role != TRAINER and len(rest) == 1:
        _check_identity(rest[0], role, None)
        return rest[0], role, None
    shape = f"{prefix}{role}/<region>/<name>" if role == TRAINER else f"{prefix}{role}/<name>"
    raise ValueError(f"URI SAN {uri!r}: expected {shape}")


def _identity(cert: x509.Certificate) -> tuple[str, str, str | None]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError(f"no subjectAltName, expected a URI spiffe://{TRUST_DOMAIN}/...") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ValueError(f"expected exactly one URI SAN, found {len(uris)}: {uris}")
    name, role, region = _parse_spiffe_id(uris[0])
    for oid, label, want in (
        (NameOID.COMMON_NAME, "CN", name),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "OU", role),
    ):
        got = [attr.value for attr in cert.subject.get_attributes_for_oid(oid)]
        if got != [want]:
            raise ValueError(f"subject {label} {got} disagrees with URI SAN {uris[0]!r}")
    return name, role, region


def _check_client_usage(cert: x509.Certificate) -> None:
    """A client certificate, as the module docstring says: clientAuth, and not a CA."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise ValueError("no extendedKeyUsage; a client certificate names clientAuth") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise ValueError("extendedKeyUsage lacks clientAuth")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise ValueError("a CA certificate (basicConstraints CA:TRUE) is no client certificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and (usage.key_cert_sign or usage.crl_sign):
        raise ValueError("keyUsage allows signing certificates; a client certificate may not")


def principal_from_pem(pem: bytes) -> Principal:
    """The Principal a verified client certificate names (gRPC's auth_context x509_pem_cert).

    Raises UnknownPrincipal for anything but the encoding in the module docstring.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise UnknownPrincipal(f"client certificate: not a PEM X.509 certificate ({exc})") from exc
    try:
        _check_client_usage(cert)
        name, role, region = _identity(cert)
    # The extension parsers raise these for malformed or duplicated extensions.
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise UnknownPrincipal(
            f"client certificate serial {cert.serial_number:x} ({cert.subject.rfc4514_string()}):"
            f" {exc}"
        ) from exc
    return Principal(name, role, region, cert.serial_number)


def load_pem_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        why = f"{path}: not a PEM certificate ({exc}); restore it from a backup"
        raise ValueError(why) from exc


def load_private_key(path: Path, what: str) -> PrivateKeyTypes:
    """The PEM private key at path; a ValueError that says what to do if it is empty or
    corrupt (a crash of an older version while writing it, a bad copy)."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(
            f"{path} is empty ({what}): it was never written completely. Restore it from a "
            "backup; if there is none, move it aside and create a new one explicitly"
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{path} is not a readable unencrypted PEM private key ({what}): restore it from "
            "a backup; if there is none, move it aside and create a new one explicitly"
        ) from exc


def cert_serial(path: Path) -> int:
    """The serial number of the certificate at path, as the revocation list names it."""
    return load_pem_cert(path).serial_number


@dataclass(frozen=True)
class PkiLayout:
    """Where init_pki keeps each file under one directory."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def clients_dir(self) -> Path:
        return self.directory / "clients"

    @property
    def issued_log(self) -> Path:
        """One JSON line per client certificate ever issued here: what Revoke checks against."""
        return self.directory / "issued.jsonl"

    def server_cert(self, listener: str) -> Path:
        return self.directory / f"{_listener(listener)}.pem"

    def server_key(self, listener: str) -> Path:
        return self.directory / f"{_listener(listener)}.key"

    def client_cert(self, name: str) -> Path:
        return self.clients_dir / f"{_file_name(name)}.pem"

    def client_key(self, name: str) -> Path:
        return self.clients_dir / f"{_file_name(name)}.key"

    def client_names(self) -> list[str]:
        if not self.clients_dir.is_dir():
            return []
        return sorted(p.stem for p in self.clients_dir.glob("*.pem") if _NAME.fullmatch(p.stem))


def _listener(listener: str) -> str:
    if listener not in LISTENERS:
        raise ValueError(f"unknown listener {listener!r}, expected one of {LISTENERS}")
    return listener


def _file_name(name: str) -> str:
    # The pattern also keeps a name from leaving clients/ ('/', '..').
    if not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r}: expected {_NAME.pattern}")
    return name


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, fresh from the CA."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        # A random suffix tells two development CAs apart in error messages and trust stores.
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"Sluice dev CA {secrets.token_hex(4)}")]
        )
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, layout: PkiLayout) -> CertificateAuthority:
        if layout.ca_key.stat().st_mode & 0o077:
            raise PermissionError(f"{layout.ca_key}: private key readable by group or others")
        key = load_private_key(layout.ca_key, "the CA's key: every certificate depends on it")
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{layout.ca_key}: expected an ECDSA private key")
        cert = load_pem_cert(layout.ca_cert)
        if cert.public_key() != key.public_key():
            raise ValueError(f"{layout.ca_cert}: does not match the key in {layout.ca_key}")
        return cls(cert, key)

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed cert."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def _serial() -> int:
    return secrets.randbits(128) or 1  # serials must be positive


def _key_usage(*, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not key_cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    ca: CertificateAuthority,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    *,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    if not_after is None:
        # A leaf that outlived its CA would fail verification anyway; say so in its dates.
        not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _CLOCK_SKEW if not_before is None else not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue_client_cert(
    ca: CertificateAuthority,
    name: str,
    role: str,
    region: str | None = None,
    *,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A clientAuth certificate naming one principal (module docstring); nothing is written.

    not_before/not_after override the validity window (tests make expired certificates).
    """
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    uri = x509.UniformResourceIdentifier(spiffe_id(name, role, region))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH
    return _issue(ca, subject, [uri], usage, days=days, not_before=not_before, not_after=not_after)


def server_sans(names: Iterable[str] = ()) -> list[x509.GeneralName]:
    """DNS and IP SANs for DEFAULT_SERVER_NAMES plus names; raises ValueError for a bad name."""
    sans: list[x509.GeneralName] = []
    for name in (*DEFAULT_SERVER_NAMES, *names):
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            if not _DNS_NAME.fullmatch(name):
                raise ValueError(f"server name {name!r}: expected a DNS name or an IP") from None
            san = x509.DNSName(name)
        if san not in sans:
            sans.append(san)
    return sans


def issue_server_cert(
    ca: CertificateAuthority, listener: str, names: Iterable[str] = (), *, days: int = 365
) -> Issued:
    """A serverAuth certificate for one listener with server_sans(names); nothing is written."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sluice {_listener(listener)}")])
    usage = ExtendedKeyUsageOID.SERVER_AUTH
    return _issue(
        ca, subject, server_sans(names), usage, days=days, not_before=None, not_after=None
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write data to path atomically with exactly this mode; overwrite=False never replaces."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created 0600 and exclusively: a private key is never readable by others, not even
    # for a moment, and never written through a planted symlink.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # exact, whatever the umask
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # FileExistsError rather than replace what is there
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the new name is durable only once its directory is
    finally:
        os.close(dir_fd)


def create_private_file(path: Path, data: bytes) -> None:
    """Write a new private key file (0600) atomically and durably; FileExistsError if one
    is there: a key is never replaced by accident. A kill leaves no file or the whole file
    (and perhaps a `.<name>.*.tmp` to delete)."""
    _write(path, data, _PRIVATE_MODE, overwrite=False)


def create_public_file(path: Path, data: bytes, *, executable: bool = False) -> None:
    """create_private_file for a public half (0644; 0755 executable, a kit's run.sh):
    never replaces what is there."""
    _write(path, data, _PUBLIC_MODE | (0o111 if executable else 0), overwrite=False)


def _save(issued: Issued, cert_path: Path, key_path: Path, *, overwrite: bool = True) -> None:
    # Key first: a certificate on disk always has its key beside it.
    _write(key_path, issued.key_pem(), _PRIVATE_MODE, overwrite=overwrite)
    _write(cert_path, issued.cert_pem(), _PUBLIC_MODE, overwrite=overwrite)


def _wanted_clients(
    trainers: Sequence[tuple[str, str]], readers: Sequence[str], operators: Sequence[str]
) -> dict[str, tuple[str, str | None]]:
    wanted: dict[str, tuple[str, str | None]] = {}
    asked = [
        *((name, TRAINER, region) for name, region in trainers),
        *((name, READER, None) for name in readers),
        *((name, OPERATOR, None) for name in operators),
    ]
    for name, role, region in asked:
        _check_identity(name, role, region)
        if wanted.setdefault(name, (role, region)) != (role, region):
            raise ValueError(f"principal {name!r}: asked for twice with different roles or regions")
    return wanted


def _load_ca(layout: PkiLayout) -> CertificateAuthority | None:
    have = [p.exists() for p in (layout.ca_cert, layout.ca_key)]
    if all(have):
        return CertificateAuthority.load(layout)
    if any(have):
        # Never guess which half is right: a new CA would silently orphan every issued cert.
        raise FileExistsError(
            f"{layout.directory}: found only one of ca.pem and ca.key; restore or remove it"
        )
    return None


def _check_existing_client(
    layout: PkiLayout, ca: CertificateAuthority | None, name: str, role: str, region: str | None
) -> bool:
    """Whether name already has a certificate from this CA for this role and region."""
    path = layout.client_cert(name)
    if not path.exists():
        return False
    cert = load_pem_cert(path)
    if ca is None or not ca.issued(cert):
        raise ValueError(f"{path}: not issued by {layout.ca_cert}; remove it to reissue")
    have = principal_from_pem(path.read_bytes())
    if (have.role, have.region) != (role, region):
        raise ValueError(
            f"{path}: already issued to {have.spiffe_id}, asked for {spiffe_id(name, role, region)}"
        )
    if not layout.client_key(name).exists():
        raise FileNotFoundError(f"{layout.client_key(name)}: missing beside {path}")
    return True


def key_matches_cert(cert_path: Path, key_path: Path) -> bool:
    """Whether both files parse and the key is the certificate's (a crash between writing
    the two, or a bad copy, leaves a pair that TLS cannot use)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    return bool(cert.public_key() == key.public_key())


def _server_is_current(
    layout: PkiLayout, ca: CertificateAuthority, listener: str, sans: list[x509.GeneralName]
) -> bool:
    path, key = layout.server_cert(listener), layout.server_key(listener)
    if not (path.exists() and key.exists() and key_matches_cert(path, key)):
        return False  # reissued: a listener's certificate is the CA's to remake at will
    cert = load_pem_cert(path)
    have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ca.issued(cert) and all(san in have for san in sans)


def _record_issued(layout: PkiLayout, issued: Issued) -> None:
    """Append the new client certificate to the issued log (fsynced before its files)."""
    principal = principal_from_pem(issued.cert_pem())
    line = {
        "serial": f"{principal.serial:x}",
        "name": principal.name,
        "role": principal.role,
        "region": principal.region,
    }
    fd = os.open(layout.issued_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _PUBLIC_MODE)
    with os.fdopen(fd, "a") as out:
        out.write(json.dumps(line, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())


def issued_principals(layout: PkiLayout) -> dict[int, Principal]:
    """Serial -> principal of every client certificate this PKI issued: the issued log,
    and the certificates in clients/ (a PKI made before the log existed)."""
    found: dict[int, Principal] = {}
    if layout.issued_log.exists():
        for line in layout.issued_log.read_text().splitlines():
            try:
                doc = json.loads(line)
                serial = int(doc["serial"], 16)
                found[serial] = Principal(doc["name"], doc["role"], doc["region"], serial)
            except (ValueError, KeyError, TypeError):
                log.warning("%s: skipping an unreadable line", layout.issued_log)
    for name in layout.client_names():
        try:
            principal = principal_from_pem(layout.client_cert(name).read_bytes())
        except (OSError, UnknownPrincipal):
            log.warning("%s: not a client certificate; skipped", layout.client_cert(name))
            continue
        found.setdefault(principal.serial, principal)
    return found


def _drop_stale_temps(directory: Path) -> None:
    """Temp files _write left behind when killed: they may hold a private key."""
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def init_pki(
    directory: Path,
    *,
    trainers: Sequence[tuple[str, str]] = (),
    readers: Sequence[str] = (),
    operators: Sequence[str] = (),
    server_names: Sequence[str] = (),
    days: int = 365,
) -> PkiLayout:
    """Create or extend a development PKI in directory and return where its files are.

    trainers are (name, region) pairs. An existing CA is reused and never overwritten. A
    principal that already has a certificate keeps it; asking for it with another role or
    region is a ValueError, raised before anything is written. Server certificates are
    reissued only when they lack one of the SANs asked for. Leaf certificates are valid for
    `days`, the CA for ten years.
    """
    if days < 1:
        raise ValueError(f"days: expected at least 1, got {days}")
    layout = PkiLayout(directory)
    wanted = _wanted_clients(trainers, readers, operators)
    sans = server_sans(server_names)
    ca = _load_ca(layout)
    existing = {
        name
        for name, (role, region) in wanted.items()
        if _check_existing_client(layout, ca, name, role, region)
    }

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    layout.clients_dir.mkdir(exist_ok=True, mode=0o700)
    for place in (directory, layout.clients_dir):
        _drop_stale_temps(place)
    if ca is None:
        ca = CertificateAuthority.create()
        _save(Issued(ca.cert, ca.key), layout.ca_cert, layout.ca_key, overwrite=False)
    for listener in LISTENERS:
        if not _server_is_current(layout, ca, listener, sans):
            issued = issue_server_cert(ca, listener, server_names, days=days)
            _save(issued, layout.server_cert(listener), layout.server_key(listener))
    for name, (role, region) in wanted.items():
        if name not in existing:
            issued = issue_client_cert(ca, name, role, region, days=days)
            _record_issued(layout, issued)
            _save(issued, layout.client_cert(name), layout.client_key(name))
    return layout
