"""Kits: what the operator hands each participant out of band, cut from the operator's PKI.

A kit holds one principal's certificate and private key, the CA certificate, the endpoints
that principal dials, its CA fingerprint and validity (kit.json) and a ready command line
(run.sh, README.txt); the layout is in clients/kit.py. Never in a kit: the CA key, another
principal's key, a listener's key. Those stay in the operator's PKI directory, and the
listener certificates go to the gateway host only.

A kit is built in a temporary directory beside its place and renamed into place whole, so
a kill leaves no kit or the whole kit. An existing kit is never replaced: the same kit
asked for again is kept, and any other (another certificate, other endpoints) is refused.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from sluice.clients.kit import (
    CA_FILE,
    KIT_FILE,
    KIT_FORMAT,
    RELEASE_KEY_FILE,
    KitError,
    ca_sha256,
)
from sluice.gateway.kit_text import readme, run_script
from sluice.gateway.pki import (
    DEFAULT_SERVER_NAMES,
    READER,
    PkiLayout,
    create_private_file,
    create_public_file,
    key_matches_cert,
    load_pem_cert,
    principal_from_pem,
)
from sluice.models.manifest import key_id, load_public_key

INTERNAL_PORT = 7070  # the gateway's default listener ports (gateway/config.py)
EGRESS_PORT = 7071
_DIR_MODE = 0o700


@dataclass(frozen=True)
class Endpoints:
    """HOST:PORT of each listener as participants dial it (a name in its certificate)."""

    internal: str
    egress: str

    def for_role(self, role: str) -> dict[str, str]:
        # Only what the role may call: a reader never learns the internal listener.
        return {"egress": self.egress} if role == READER else {"internal": self.internal}


@dataclass(frozen=True)
class KitOutcome:
    name: str
    role: str
    region: str | None
    path: Path
    written: bool  # False: the same kit was already there and was kept


def parse_endpoint(text: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [IPv6]:PORT; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {text!r}: expected HOST:PORT, e.g. gateway.example.cn:7070")
    return host, int(port)


def _sans(layout: PkiLayout, listener: str) -> list[x509.GeneralName]:
    cert = load_pem_cert(layout.server_cert(listener))
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def _covers(sans: Sequence[x509.GeneralName], host: str) -> bool:
    """Whether TLS hostname verification of host passes against these SANs."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        host = host.lower().rstrip(".")
        for name in (s.value.lower() for s in sans if isinstance(s, x509.DNSName)):
            parent = host.partition(".")[2]
            if name == host or (name.startswith("*.") and parent and name[2:] == parent):
                return True
        return False
    return any(isinstance(s, x509.IPAddress) and s.value == ip for s in sans)


def _default_host(sans: Sequence[x509.GeneralName]) -> str:
    """The first name `sluice init --server-name` added; loopback without one."""
    for san in sans:
        value = str(san.value)
        if value not in DEFAULT_SERVER_NAMES and not value.startswith("*."):
            return f"[{value}]" if ":" in value else value
    return "127.0.0.1"


def resolve_endpoints(
    layout: PkiLayout, internal: str | None = None, egress: str | None = None
) -> Endpoints:
    """The endpoints asked for, or HOST:7070 / HOST:7071 with HOST the listener
    certificate's first extra name; each host must be a name in its listener's certificate,
    or every participant's first call would fail TLS hostname verification."""
    chosen = {}
    for listener, asked, port in (
        ("internal", internal, INTERNAL_PORT),
        ("egress", egress, EGRESS_PORT),
    ):
        if not layout.server_cert(listener).exists():
            raise KitError(f"{layout.server_cert(listener)}: missing; run `sluice init` first")
        sans = _sans(layout, listener)
        endpoint = asked or f"{_default_host(sans)}:{port}"
        host, _ = parse_endpoint(endpoint)
        if not _covers(sans, host):
            names = ", ".join(str(s.value) for s in sans)
            raise KitError(
                f"{listener} endpoint {endpoint!r}: {host!r} is not a name in "
                f"{layout.server_cert(listener)} ({names}), so TLS would refuse every call; "
                f"add it: sluice init {layout.directory} --server-name {host}"
            )
        chosen[listener] = endpoint
    return Endpoints(chosen["internal"], chosen["egress"])


@dataclass(frozen=True)
class _Plan:
    name: str
    role: str
    region: str | None
    document: dict[str, Any]
    files: tuple[tuple[str, bytes, str], ...]  # (path in the kit, bytes, "key"/"file"/"script")


def _plan(
    layout: PkiLayout,
    ca_pem: bytes,
    name: str,
    endpoints: Endpoints,
    release: tuple[bytes, str] | None,
) -> _Plan:
    cert_file, key_file = layout.client_cert(name), layout.client_key(name)
    if not cert_file.exists():
        raise KitError(
            f"{name!r}: no certificate in {layout.clients_dir}; issue it first: sluice init "
            f"{layout.directory} --trainer {name}:REGION (or --reader/--operator {name})"
        )
    if not key_matches_cert(cert_file, key_file):
        raise KitError(f"{key_file}: missing, unreadable or not the key of {cert_file}")
    cert_pem = cert_file.read_bytes()
    principal = principal_from_pem(cert_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        cert.verify_directly_issued_by(load_pem_cert(layout.ca_cert))
    except (ValueError, TypeError, InvalidSignature):
        raise KitError(f"{cert_file}: not issued by {layout.ca_cert}; reissue it") from None
    doc: dict[str, Any] = {
        "format": KIT_FORMAT,
        "principal": principal.name,
        "role": principal.role,
        "region": principal.region,
        "spiffe_id": principal.spiffe_id,
        "serial": f"{principal.serial:x}",
        "endpoints": endpoints.for_role(principal.role),
        "ca_sha256": ca_sha256(ca_pem),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    files = [
        (f"clients/{name}.key", key_file.read_bytes(), "key"),  # first: a cert has its key
        (f"clients/{name}.pem", cert_pem, "file"),
        (CA_FILE, ca_pem, "file"),
    ]
    if release is not None and principal.role == READER:
        doc["release_key_id"] = release[1]
        files.append((RELEASE_KEY_FILE, release[0], "file"))
    files += [
        (KIT_FILE, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), "file"),
        ("README.txt", readme(doc).encode(), "file"),
        ("run.sh", run_script(doc).encode(), "script"),
    ]
    return _Plan(principal.name, principal.role, principal.region, doc, tuple(files))


def _already_there(dest: Path, plan: _Plan) -> bool:
    """True if dest is this very kit; False if absent; KitError for anything else."""
    if not dest.exists() and not dest.is_symlink():
        return False
    if dest.is_symlink() or not dest.is_dir():
        raise KitError(f"{dest}: exists and is not a kit directory; move it away first")
    try:
        have = json.loads((dest / KIT_FILE).read_text())
    except (OSError, ValueError):
        raise KitError(
            f"{dest}: exists without a readable {KIT_FILE}; it was left as it is. Move it "
            "away to export this kit"
        ) from None
    if have != plan.document:
        differ = sorted(k for k in {*have, *plan.document} if have.get(k) != plan.document.get(k))
        raise KitError(
            f"{dest}: holds another kit for {plan.name!r} (it differs in {', '.join(differ)}); "
            "it was left as it is. Move it away, and withdraw any copy handed out, to export "
            "a new one"
        )
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(kits_dir: Path, plan: _Plan) -> Path:
    dest = kits_dir / plan.name
    tmp = kits_dir / f".{plan.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir(mode=_DIR_MODE)
    try:
        os.chmod(tmp, _DIR_MODE)  # exact, whatever the umask
        (tmp / "clients").mkdir(mode=_DIR_MODE)
        os.chmod(tmp / "clients", _DIR_MODE)
        for rel, data, kind in plan.files:
            if kind == "key":
                create_private_file(tmp / rel, data)
            else:
                create_public_file(tmp / rel, data, executable=kind == "script")
        if dest.exists() or dest.is_symlink():  # appeared meanwhile: never replaced
            raise KitError(f"{dest}: appeared while the kit was written; nothing replaced")
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(kits_dir)
    return dest


def _drop_stale(kits_dir: Path) -> None:
    """Half-built kits a kill left behind: they may hold a private key."""
    for stale in kits_dir.glob(".*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def export_kits(
    layout: PkiLayout,
    names: Sequence[str],
    kits_dir: Path,
    *,
    internal_endpoint: str | None = None,
    egress_endpoint: str | None = None,
    release_key: Path | None = None,
) -> list[KitOutcome]:
    """Write kits_dir/<name>/ for each principal named (already issued in layout).

    Everything is checked before anything is written: each principal's certificate and
    key, the endpoints (resolve_endpoints), the release key (an Ed25519 PEM public key,
    put in readers' kits), and each existing kit (kept if it is this same kit, else
    KitError). kits_dir is kept apart from the PKI directory: neither inside the other.
    """
    pki, kits = layout.directory.resolve(), kits_dir.resolve()
    if pki.is_relative_to(kits) or kits.is_relative_to(pki):
        raise KitError(
            f"{kits_dir}: kits are handed out and the PKI directory holds the CA key; keep "
            f"them apart (neither inside {layout.directory} nor around it)"
        )
    endpoints = resolve_endpoints(layout, internal_endpoint, egress_endpoint)
    release = None
    if release_key is not None:
        release = (release_key.read_bytes(), key_id(load_public_key(release_key)))
    ca_pem = layout.ca_cert.read_bytes()
    plans = [_plan(layout, ca_pem, name, endpoints, release) for name in dict.fromkeys(names)]
    kept = {plan.name for plan in plans if _already_there(kits_dir / plan.name, plan)}

    kits_dir.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    _drop_stale(kits_dir)
    outcomes = []
    for plan in plans:
        written = plan.name not in kept
        path = _write(kits_dir, plan) if written else kits_dir / plan.name
        outcomes.append(KitOutcome(plan.name, plan.role, plan.region, path, written))
    return outcomes
