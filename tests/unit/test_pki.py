"""The development PKI: files and modes, idempotent init, identity parsing, and real mTLS."""

from __future__ import annotations

import ast
import datetime as dt
import ipaddress
import stat
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sluice.gateway import pki
from sluice.gateway.pki import (
    LISTENERS,
    CertificateAuthority,
    Issued,
    PkiLayout,
    Principal,
    UnknownPrincipal,
    init_pki,
    issue_client_cert,
    principal_from_pem,
)

TRAINERS = (("shanghai-01", "shanghai"), ("beijing-01", "beijing"))
READERS = ("global-team",)
OPERATORS = ("ops",)


def init_full(directory: Path, **settings: Any) -> PkiLayout:
    values: dict[str, Any] = {"trainers": TRAINERS, "readers": READERS, "operators": OPERATORS}
    values.update(settings)
    return init_pki(directory, **values)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def all_files(layout: PkiLayout) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in layout.directory.rglob("*") if p.is_file()}


def test_init_creates_every_file_with_private_keys_0600(tmp_path: Path) -> None:
    layout = init_full(tmp_path / "pki")
    names = [n for n, _ in TRAINERS] + [*READERS, *OPERATORS]
    keys = [layout.ca_key, *(layout.server_key(side) for side in LISTENERS)]
    keys += [layout.client_key(n) for n in names]
    certs = [layout.ca_cert, *(layout.server_cert(side) for side in LISTENERS)]
    certs += [layout.client_cert(n) for n in names]
    for path in keys:
        assert mode(path) & 0o077 == 0, f"{path}: {oct(mode(path))}"
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    for path in certs:
        assert mode(path) == 0o644, f"{path}: {oct(mode(path))}"
        assert path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    for directory in (layout.directory, layout.clients_dir):
        assert mode(directory) & 0o077 == 0
    assert sorted(layout.client_names()) == sorted(names)
    # No stray temp files; the issued log is public (Revoke checks serials against it).
    assert set(all_files(layout)) == set(keys) | set(certs) | {layout.issued_log}
    assert mode(layout.issued_log) == 0o644


def test_rerun_adds_principals_and_changes_nothing_else(tmp_path: Path) -> None:
    layout = init_full(tmp_path / "pki")
    before = all_files(layout)
    init_full(tmp_path / "pki", readers=[*READERS, "auditor"])
    after = all_files(layout)
    log = layout.issued_log  # appended to, never rewritten
    assert {p: after[p] for p in before if p != log} == {p: before[p] for p in before if p != log}
    assert after[log].startswith(before[log]) and b'"auditor"' in after[log][len(before[log]) :]
    assert set(after) - set(before) == {
        layout.client_cert("auditor"),
        layout.client_key("auditor"),
    }
    assert principal_from_pem(layout.client_cert("auditor").read_bytes()).role == "reader"


def test_rerun_with_another_role_or_region_is_refused_before_writing(tmp_path: Path) -> None:
    layout = init_full(tmp_path / "pki")
    before = all_files(layout)
    with pytest.raises(ValueError, match="already issued"):
        init_pki(layout.directory, readers=["new-reader", "ops"])
    with pytest.raises(ValueError, match="already issued"):
        init_pki(layout.directory, trainers=[("shanghai-01", "beijing")])
    assert all_files(layout) == before


def test_same_name_twice_with_different_roles_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="asked for twice"):
        init_pki(tmp_path / "pki", readers=["dup"], operators=["dup"])
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"readers": ["../escape"]},
        {"readers": ["Upper"]},
        {"operators": [""]},
        {"trainers": [("t1", "Bad Region")]},
        {"server_names": ["not a host"]},
    ],
)
def test_bad_names_are_refused(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        init_pki(tmp_path / "pki", **kwargs)
    assert not (tmp_path / "pki").exists()


def test_half_a_ca_is_refused_not_replaced(tmp_path: Path) -> None:
    layout = init_full(tmp_path / "pki")
    key = layout.ca_key.read_bytes()
    layout.ca_cert.unlink()
    with pytest.raises(FileExistsError, match=r"ca\.pem and ca\.key"):
        init_pki(layout.directory)
    assert layout.ca_key.read_bytes() == key


def test_a_ca_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    layout = init_full(tmp_path / "pki")
    layout.ca_key.chmod(0o640)
    with pytest.raises(PermissionError):
        init_pki(layout.directory, readers=["late"])


@pytest.mark.parametrize(
    ("name", "role", "region"),
    [
        ("shanghai-01", "trainer", "shanghai"),
        ("global-team", "reader", None),
        ("ops", "operator", None),
    ],
)
def test_principal_round_trips(tmp_path: Path, name: str, role: str, region: str | None) -> None:
    layout = init_full(tmp_path / "pki")
    path = layout.client_cert(name)
    got = principal_from_pem(path.read_bytes())
    assert got == Principal(name, role, region, pki.cert_serial(path))
    assert got.serial.bit_length() <= 128
    assert got.spiffe_id == pki.spiffe_id(name, role, region)


def forge(
    ca: CertificateAuthority,
    *,
    cn: Sequence[str] = ("x",),
    ou: Sequence[str] = ("reader",),
    uris: Sequence[str] = ("spiffe://sluice/reader/x",),
    dns: Sequence[str] = (),
) -> Issued:
    """A CA-signed client certificate with whatever subject and SANs a test asks for."""
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, v) for v in cn]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, v) for v in ou]
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load(init_pki(tmp_path_factory.mktemp("ca") / "pki"))


def test_forge_builds_an_accepted_certificate_by_default(ca: CertificateAuthority) -> None:
    forged = forge(ca, dns=["x.example"])  # other kinds of SAN beside the URI are ignored
    assert principal_from_pem(forged.cert_pem()) == Principal(
        "x", "reader", None, forged.cert.serial_number
    )


@pytest.mark.parametrize(
    ("forged", "message"),
    [
        ({"uris": ()}, "no subjectAltName"),
        ({"uris": (), "dns": ["x.example"]}, "exactly one URI SAN, found 0"),
        ({"uris": ("spiffe://sluice/reader/x", "spiffe://sluice/reader/y")}, "found 2"),
        ({"uris": ("https://sluice/reader/x",)}, "expected spiffe://sluice/"),
        ({"uris": ("spiffe://other/reader/x",)}, "expected spiffe://sluice/"),
        ({"uris": ("spiffe://sluice/admin/x",), "ou": ["admin"]}, "unknown role 'admin'"),
        ({"uris": ("spiffe://sluice/reader/X",), "cn": ["X"]}, "name 'X'"),
        ({"uris": ("spiffe://sluice/reader/a/x",)}, "expected spiffe://sluice/reader/<name>"),
        (
            {"uris": ("spiffe://sluice/trainer/x",), "ou": ["trainer"]},
            "expected spiffe://sluice/trainer/<region>/<name>",
        ),
        ({"uris": ("spiffe://sluice/trainer/Sh/x",), "ou": ["trainer"]}, "region 'Sh'"),
        ({"uris": ("spiffe://sluice/reader/x/",)}, "expected spiffe://sluice/reader/<name>"),
        ({"cn": ["y"]}, "subject CN"),
        ({"cn": ["x", "x"]}, "subject CN"),
        ({"cn": []}, "subject CN"),
        ({"ou": ["operator"]}, "subject OU"),
        ({"ou": []}, "subject OU"),
    ],
)
def test_malformed_identities_are_refused(
    ca: CertificateAuthority, forged: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnknownPrincipal, match=message):
        principal_from_pem(forge(ca, **forged).cert_pem())


def test_a_server_certificate_is_no_principal(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki")
    with pytest.raises(UnknownPrincipal, match="extendedKeyUsage lacks clientAuth"):
        principal_from_pem(layout.server_cert("egress").read_bytes())


def test_garbage_is_no_principal() -> None:
    with pytest.raises(UnknownPrincipal, match="not a PEM"):
        principal_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_server_sans_hold_loopback_and_extra_names(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", server_names=["gw.example", "10.1.2.3"])
    for side in LISTENERS:
        cert = pki.load_pem_cert(layout.server_cert(side))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["localhost", "gw.example"]
        assert sans.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("127.0.0.1"),
            ipaddress.ip_address("::1"),
            ipaddress.ip_address("10.1.2.3"),
        ]


def test_server_cert_is_reissued_only_for_a_new_name(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", server_names=["gw.example"])
    first = layout.server_cert("internal").read_bytes()
    init_pki(layout.directory)  # the loopback names are a subset: kept
    assert layout.server_cert("internal").read_bytes() == first
    init_pki(layout.directory, server_names=["gw2.example"])
    assert layout.server_cert("internal").read_bytes() != first
    assert mode(layout.server_key("internal")) & 0o077 == 0


def test_certificates_verify_against_the_ca(tmp_path: Path) -> None:
    layout = init_full(tmp_path / "pki", server_names=["gw.example"])
    ca_cert = pki.load_pem_cert(layout.ca_cert)
    store = verification.Store([ca_cert])
    for name in layout.client_names():
        leaf = pki.load_pem_cert(layout.client_cert(name))
        leaf.verify_directly_issued_by(ca_cert)
        verification.PolicyBuilder().store(store).build_client_verifier().verify(leaf, [])
    for side in LISTENERS:
        leaf = pki.load_pem_cert(layout.server_cert(side))
        leaf.verify_directly_issued_by(ca_cert)
        for host in (
            x509.DNSName("localhost"),
            x509.DNSName("gw.example"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ):
            builder = verification.PolicyBuilder().store(store)
            builder.build_server_verifier(host).verify(leaf, [])
    foreign = pki.load_pem_cert(init_pki(tmp_path / "other").ca_cert)
    leaf = pki.load_pem_cert(layout.client_cert("ops"))
    with pytest.raises(verification.VerificationError):
        verification.PolicyBuilder().store(
            verification.Store([foreign])
        ).build_client_verifier().verify(leaf, [])


def test_pki_does_not_import_grpc() -> None:
    tree = ast.parse(Path(pki.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m == "grpc" or m.startswith("grpc.")}


# Real mTLS through gRPC, the way both listeners will use these files.


@dataclass
class TlsServer:
    target: str
    layout: PkiLayout
    auth_contexts: list[dict[str, list[bytes]]] = field(default_factory=list)


class RecordingHealth(health.HealthServicer):
    """The standard health service, keeping each caller's auth_context."""

    def __init__(self, seen: list[dict[str, list[bytes]]]) -> None:
        super().__init__()
        self._seen = seen

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        # types-grpcio says Mapping[str, bytes]; gRPC gives a list of bytes per property.
        auth: Mapping[str, Any] = context.auth_context()
        self._seen.append({k: list(v) for k, v in auth.items()})
        return super().Check(request, context)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    layout = init_full(tmp_path_factory.mktemp("tls") / "pki")
    side = "internal"
    creds = grpc.ssl_server_credentials(
        [(layout.server_key(side).read_bytes(), layout.server_cert(side).read_bytes())],
        root_certificates=layout.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    running = TlsServer("", layout)
    health_pb2_grpc.add_HealthServicer_to_server(RecordingHealth(running.auth_contexts), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    running.target = f"127.0.0.1:{port}"
    yield running
    server.stop(None)


def check(server: TlsServer, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> Any:
    """A health Check over mTLS: the response, or the status code it failed with."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=server.layout.ca_cert.read_bytes(),
        private_key=key_pem,
        certificate_chain=cert_pem,
    )
    with grpc.secure_channel(server.target, creds) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stub's methods are untyped
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as err:
            return err.code()


@pytest.mark.parametrize("name", ["shanghai-01", "global-team", "ops"])
def test_mtls_client_from_our_ca_is_served_and_named(tls_server: TlsServer, name: str) -> None:
    layout = tls_server.layout
    resp = check(
        tls_server, layout.client_cert(name).read_bytes(), layout.client_key(name).read_bytes()
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    seen = tls_server.auth_contexts[-1]
    # The server sees the verified leaf as PEM; gRPC also exposes the lone URI SAN itself.
    (pem,) = seen["x509_pem_cert"]
    principal = principal_from_pem(pem)
    assert principal.name == name
    assert principal.serial == pki.cert_serial(layout.client_cert(name))
    assert seen["peer_spiffe_id"] == [principal.spiffe_id.encode()]
    assert seen["transport_security_type"] == [b"ssl"]


def test_mtls_signed_but_malformed_identity_reaches_the_server(
    tls_server: TlsServer,
) -> None:
    # TLS only checks the chain: a CA-signed cert without our URI SAN gets through, so the
    # authorization interceptor must refuse it (UNAUTHENTICATED) from principal_from_pem.
    forged = forge(CertificateAuthority.load(tls_server.layout), uris=(), dns=["x.example"])
    resp = check(tls_server, forged.cert_pem(), forged.key_pem())
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(UnknownPrincipal):
        principal_from_pem(tls_server.auth_contexts[-1]["x509_pem_cert"][0])


# Every refused certificate fails the TLS handshake: the server never sees a call (no
# interceptor runs, nothing can be audited there) and the CLIENT sees UNAVAILABLE
# ("failed to connect to all addresses; ... Socket closed"), not UNAUTHENTICATED.
# The server only logs the reason (PEER_DID_NOT_RETURN_A_CERTIFICATE, "unable to get
# local issuer certificate", "certificate has expired").


def test_mtls_without_a_client_cert_fails_the_handshake(tls_server: TlsServer) -> None:
    calls = len(tls_server.auth_contexts)
    assert check(tls_server) == grpc.StatusCode.UNAVAILABLE
    assert len(tls_server.auth_contexts) == calls


def test_mtls_with_a_cert_from_another_ca_fails_the_handshake(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    other = init_pki(tmp_path / "other", readers=["global-team"])
    calls = len(tls_server.auth_contexts)
    code = check(
        tls_server,
        other.client_cert("global-team").read_bytes(),
        other.client_key("global-team").read_bytes(),
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert len(tls_server.auth_contexts) == calls


@pytest.mark.parametrize("days", [-2, 1], ids=["expired", "not-yet-valid"])
def test_mtls_with_a_cert_outside_its_dates_fails_the_handshake(
    tls_server: TlsServer, days: int
) -> None:
    ca = CertificateAuthority.load(tls_server.layout)
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
    issued = issue_client_cert(
        ca, "late", "reader", not_before=start, not_after=start + dt.timedelta(days=1)
    )
    calls = len(tls_server.auth_contexts)
    assert check(tls_server, issued.cert_pem(), issued.key_pem()) == grpc.StatusCode.UNAVAILABLE
    assert len(tls_server.auth_contexts) == calls


def test_mtls_with_a_server_cert_as_client_cert_fails_the_handshake(
    tls_server: TlsServer,
) -> None:
    layout = tls_server.layout
    calls = len(tls_server.auth_contexts)
    code = check(  # serverAuth only: BoringSSL says "unsupported certificate purpose"
        tls_server,
        layout.server_cert("egress").read_bytes(),
        layout.server_key("egress").read_bytes(),
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert len(tls_server.auth_contexts) == calls
