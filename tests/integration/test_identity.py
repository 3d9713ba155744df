"""Identity and control over real mTLS: authorization before parsing, bounded answers,
revocation that names the right certificate, client certificates only, least privilege
and a refusal flood that costs one audit row per window."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import Message

from sluice.clients.sdk import AdminClient, Identity, RetryPolicy, TrainerClient, channel
from sluice.gateway.pki import (
    CertificateAuthority,
    Issued,
    PkiLayout,
    cert_serial,
    init_pki,
    issue_client_cert,
    spiffe_id,
)
from sluice.gateway.services.auth import ROLE_TABLE
from sluice.gateway.services.errors import MAX_MESSAGE_CHARS
from sluice.gateway.store.audit import AuditEntry
from sluice.models.schema import Schema
from sluice.v1 import admin_pb2, egress_pb2, trainer_pb2
from tests.conftest import TINY, Running, random_delta, stored_state, update_header
from tests.integration.test_auth import identity, mtls_gateway

Code = grpc.StatusCode
TIMEOUT_S = 10.0
TRAINERS = (
    ("shanghai-01", "shanghai"),
    ("chengdu-01", "chengdu"),
    ("shenzhen-01", "shenzhen"),
    ("harbin-01", "harbin"),  # revoked in the shared gateway
)
READER, OPERATOR = "global-team", "ops"
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field longer than the message

GET_ROUND = "/sluice.v1.TrainerService/GetRound"
PULL_GLOBAL = "/sluice.v1.TrainerService/PullGlobal"
PUSH = "/sluice.v1.TrainerService/PushUpdate"
REVOKE = "/sluice.v1.AdminService/Revoke"
CLOSE = "/sluice.v1.AdminService/CloseRound"
GET_MANIFEST = "/sluice.v1.EgressService/GetManifest"
PULL_RELEASE = "/sluice.v1.EgressService/PullRelease"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(
        tmp_path_factory.mktemp("identity-pki") / "pki",
        trainers=TRAINERS,
        readers=[READER],
        operators=[OPERATOR],
    )


mtls = mtls_gateway


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, template_cache: Path, layout: PkiLayout
) -> Iterator[Running]:
    running = mtls(tmp_path_factory.mktemp("identity") / "gw", template_cache, layout)
    serial = cert_serial(layout.client_cert("harbin-01"))
    with AdminClient(running.endpoints.internal, identity=identity(layout, OPERATOR)) as admin:
        admin.revoke(f"{serial:x}", "harbin-01", "identity tests: a revoked caller")
    yield running
    running.gateway.stop()


def raw_call(
    running: Running,
    who: Identity,
    listener: str,
    method: str,
    data: bytes | list[bytes],
    *,
    client_streaming: bool = False,
    server_streaming: bool = False,
) -> grpc.RpcError | None:
    """Call method with raw bytes, no serializer at all: what an outside tester sends."""
    with channel(getattr(running.endpoints, listener), who) as ch:
        try:
            if client_streaming:
                assert isinstance(data, list)
                send: Any = ch.stream_unary(method)  # no serializer: bytes as they are
                send(iter(data), timeout=TIMEOUT_S)
            elif server_streaming:
                assert isinstance(data, bytes)
                pull: Any = ch.unary_stream(method)
                for _ in pull(data, timeout=TIMEOUT_S):
                    pass
            else:
                assert isinstance(data, bytes)
                call: Any = ch.unary_unary(method)
                call(data, timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            return err
    return None


def denials(running: Running, actor: str, method: str) -> list[AuditEntry]:
    return [
        e
        for e in running.gateway.store.audit_entries("auth.denied")
        if (e.actor, e.subject) == (actor, method)
    ]


# 8. Bytes that do not parse: authorization first, then INVALID_ARGUMENT.


class Logged(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    ("caller", "listener", "method", "want"),
    [
        (READER, "internal", REVOKE, Code.PERMISSION_DENIED),  # learns nothing of Revoke
        ("harbin-01", "internal", GET_ROUND, Code.UNAUTHENTICATED),  # revoked
        ("harbin-01", "egress", GET_MANIFEST, Code.UNAUTHENTICATED),
        ("shanghai-01", "egress", REVOKE, Code.PERMISSION_DENIED),
        (OPERATOR, "internal", REVOKE, Code.INVALID_ARGUMENT),
        (OPERATOR, "internal", CLOSE, Code.INVALID_ARGUMENT),
        ("shanghai-01", "internal", GET_ROUND, Code.INVALID_ARGUMENT),
        ("shanghai-01", "internal", PULL_GLOBAL, Code.INVALID_ARGUMENT),
        ("shanghai-01", "internal", PUSH, Code.INVALID_ARGUMENT),
        (READER, "egress", GET_MANIFEST, Code.INVALID_ARGUMENT),
        (READER, "egress", PULL_RELEASE, Code.INVALID_ARGUMENT),
        (READER, "egress", HEALTH_CHECK, Code.INVALID_ARGUMENT),
        ("shanghai-01", "internal", HEALTH_CHECK, Code.INVALID_ARGUMENT),
    ],
)
def test_unparseable_requests_are_authorized_first_then_invalid(
    world: Running,
    layout: PkiLayout,
    caller: str,
    listener: str,
    method: str,
    want: Code,
) -> None:
    before = len(denials(world, caller, method))
    logged = Logged()
    logging.getLogger().addHandler(logged)  # gRPC logs a traceback per undecodable request
    try:
        err = raw_call(
            world,
            identity(layout, caller),
            listener,
            method,
            [GARBAGE] if method == PUSH else GARBAGE,
            client_streaming=method == PUSH,
            server_streaming=method in (PULL_GLOBAL, PULL_RELEASE),
        )
    finally:
        logging.getLogger().removeHandler(logged)
    assert err is not None and err.code() == want, err
    if want == Code.INVALID_ARGUMENT:
        assert "not a valid message" in (err.details() or "")
    else:  # refused before a byte was parsed, and audited
        assert "valid message" not in (err.details() or "")
        assert len(denials(world, caller, method)) == before + 1
    assert not [r for r in logged.records if "deserializ" in r.getMessage()]


def test_an_unparseable_message_mid_push_is_invalid_and_leaves_nothing(
    world: Running, layout: PkiLayout, tiny_schema: Schema
) -> None:
    payload = random_delta(tiny_schema, seed=8)
    header = trainer_pb2.PushUpdateRequest(header=update_header(tiny_schema, payload))
    before = stored_state(world)
    err = raw_call(
        world,
        identity(layout, "shanghai-01"),
        "internal",
        PUSH,
        [header.SerializeToString(), GARBAGE],
        client_streaming=True,
    )
    assert err is not None and err.code() == Code.INVALID_ARGUMENT
    assert stored_state(world) == before


# 9. Echoed strings are bounded; header sizes are checked before identity.

LONG = "x" * 100_000  # a single echo of this would pass gRPC's 16 KiB metadata limit


@dataclass(frozen=True)
class Echo:
    caller: str
    listener: str
    method: str
    request: Message
    want: Code


ECHOES = {
    "GetRound-model": Echo(
        "shanghai-01", "internal", GET_ROUND, trainer_pb2.GetRoundRequest(model=LONG),
        Code.NOT_FOUND,
    ),
    "PullGlobal-model": Echo(
        "shanghai-01", "internal", PULL_GLOBAL, trainer_pb2.PullGlobalRequest(model=LONG),
        Code.NOT_FOUND,
    ),
    "CloseRound-model": Echo(
        OPERATOR, "internal", CLOSE, admin_pb2.CloseRoundRequest(model=LONG, round=1),
        Code.NOT_FOUND,
    ),
    "Revoke-principal": Echo(
        OPERATOR, "internal", REVOKE, admin_pb2.RevokeRequest(serial_hex="ab", principal=LONG),
        Code.INVALID_ARGUMENT,
    ),
    "Revoke-serial": Echo(
        OPERATOR, "internal", REVOKE, admin_pb2.RevokeRequest(serial_hex=LONG, principal="a"),
        Code.INVALID_ARGUMENT,
    ),
    "Revoke-reason": Echo(
        OPERATOR, "internal", REVOKE,
        admin_pb2.RevokeRequest(serial_hex="ab", principal="shanghai-01", reason=LONG * 10),
        Code.INVALID_ARGUMENT,
    ),
    "GetManifest-model": Echo(
        READER, "egress", GET_MANIFEST, egress_pb2.GetManifestRequest(model=LONG), Code.NOT_FOUND
    ),
    "PullRelease-file": Echo(
        READER, "egress", PULL_RELEASE, egress_pb2.PullReleaseRequest(model=LONG, file=LONG),
        Code.NOT_FOUND,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", ECHOES.values(), ids=ECHOES.keys())
def test_long_request_strings_get_the_real_answer(
    world: Running, layout: PkiLayout, case: Echo
) -> None:
    err = raw_call(
        world,
        identity(layout, case.caller),
        case.listener,
        case.method,
        case.request.SerializeToString(),
        server_streaming=case.method in (PULL_GLOBAL, PULL_RELEASE),
    )
    assert err is not None
    assert err.code() == case.want, err.details()
    assert len(err.details() or "") <= MAX_MESSAGE_CHARS + 32
    assert LONG[:1000] not in (err.details() or "")  # cut to a short excerpt


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"trainer": "x" * 15_000}, Code.INVALID_ARGUMENT),  # not PERMISSION_DENIED first
        ({"region": "Y" * 15_000}, Code.INVALID_ARGUMENT),
        ({"update_id": "z" * 15_000}, Code.INVALID_ARGUMENT),
        ({"model": "m" * 15_000}, Code.NOT_FOUND),
        ({"trainer": "t" * 20_000}, Code.RESOURCE_EXHAUSTED),  # over the 16 KiB header cap
    ],
    ids=["trainer", "region", "update_id", "model", "oversized-header"],
)
def test_push_header_sizes_are_checked_before_identity(
    world: Running,
    layout: PkiLayout,
    tiny_schema: Schema,
    fields: dict[str, Any],
    want: Code,
) -> None:
    payload = random_delta(tiny_schema, seed=9)
    header = update_header(tiny_schema, payload, **fields)
    message = trainer_pb2.PushUpdateRequest(header=header).SerializeToString()
    before = stored_state(world)
    err = raw_call(
        world, identity(layout, "shanghai-01"), "internal", PUSH, [message], client_streaming=True
    )
    assert err is not None
    assert err.code() == want, err.details()
    assert len(err.details() or "") <= MAX_MESSAGE_CHARS + 32
    assert stored_state(world) == before


# 11. A revocation names one certificate: serial and principal must belong together.


def _push(running: Running, layout: PkiLayout, schema: Schema, name: str, seed: int) -> str:
    with TrainerClient(
        running.endpoints.internal, retry=RetryPolicy(attempts=1), identity=identity(layout, name)
    ) as client:
        resp = client.push_update(
            model=TINY,
            round_no=1,
            base_version=0,
            schema_hash=schema.hash,
            trainer=name,
            region=name.split("-")[0],
            num_examples=10,
            payload=random_delta(schema, seed=seed),
        )
    return resp.update_id


def _revoke(running: Running, layout: PkiLayout, serial: str, principal: str) -> Any:
    with AdminClient(
        running.endpoints.internal, identity=identity(layout, OPERATOR), retry=RetryPolicy(1)
    ) as admin:
        try:
            return admin.revoke(serial, principal, "identity test")
        except grpc.RpcError as err:
            return err


def test_revoke_refuses_a_serial_of_another_principal(
    tmp_path: Path, template_cache: Path, layout: PkiLayout, tiny_schema: Schema
) -> None:
    running = mtls(tmp_path / "gw", template_cache, layout, quorum=10)
    store = running.gateway.store
    try:
        innocent = _push(running, layout, tiny_schema, "chengdu-01", seed=1)
        culprit = _push(running, layout, tiny_schema, "shenzhen-01", seed=2)
        wrong = f"{cert_serial(layout.client_cert('shenzhen-01')):x}"
        err = _revoke(running, layout, wrong, "chengdu-01")
        assert isinstance(err, grpc.RpcError) and err.code() == Code.INVALID_ARGUMENT
        assert "belongs to 'shenzhen-01'" in (err.details() or "")
        err = _revoke(running, layout, "1234abcd", "chengdu-01")  # a serial nobody holds
        assert isinstance(err, grpc.RpcError) and err.code() == Code.NOT_FOUND
        assert not store.is_revoked(int(wrong, 16))
        assert {u.update_id for u in store.round_updates(TINY, 1)} == {innocent, culprit}
        refused = store.audit_entries("cert.revoke_refused")
        assert [(e.actor, e.subject) for e in refused] == [(OPERATOR, "chengdu-01")] * 2
        # The right pair works and takes only the culprit's update.
        assert _revoke(running, layout, wrong, "shenzhen-01") == [culprit]
        assert {u.update_id for u in store.round_updates(TINY, 1)} == {innocent}
    finally:
        running.gateway.stop()


def _raw_client_cert(
    ca: CertificateAuthority,
    name: str,
    role: str,
    region: str | None = None,
    *,
    eku: list[x509.ObjectIdentifier] | None = None,
    ca_flag: bool = False,
    key_cert_sign: bool = False,
) -> Issued:
    """A CA-signed certificate naming a principal, with the usage a test asks for."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id(name, role, region))]
            ),
            critical=False,
        )
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if ca_flag:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    if key_cert_sign:
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip
        builder = builder.add_extension(usage, critical=True)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _identity_of(tmp_path: Path, layout: PkiLayout, issued: Issued) -> Identity:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    key.chmod(0o600)
    return Identity(layout.ca_cert, cert, key)


def test_revoke_knows_certificates_seen_on_a_call_across_restarts(
    tmp_path: Path, template_cache: Path, layout: PkiLayout, tiny_schema: Schema
) -> None:
    # Issued outside `sluice init` (a production CA): known once it has called.
    ca = CertificateAuthority.load(layout)
    outsider = issue_client_cert(ca, "lhasa-01", "trainer", "lhasa")
    serial = f"{outsider.cert.serial_number:x}"
    running = mtls(tmp_path / "gw", template_cache, layout)
    try:
        err = _revoke(running, layout, serial, "lhasa-01")
        assert isinstance(err, grpc.RpcError) and err.code() == Code.NOT_FOUND
        who = _identity_of(tmp_path / "lhasa", layout, outsider)
        with TrainerClient(running.endpoints.internal, identity=who) as client:
            assert client.round(TINY).round == 1
        running.restart()
        err = _revoke(running, layout, serial, "chengdu-01")
        assert isinstance(err, grpc.RpcError) and err.code() == Code.INVALID_ARGUMENT
        assert _revoke(running, layout, serial, "lhasa-01") == []
        with TrainerClient(running.endpoints.internal, identity=who, retry=RetryPolicy(1)) as c:
            with pytest.raises(grpc.RpcError) as refused:
                c.round(TINY)
            assert refused.value.code() == Code.UNAUTHENTICATED
    finally:
        running.gateway.stop()


# 12. Only client certificates name a principal.


@pytest.mark.parametrize(
    ("usage", "why"),
    [
        ({"eku": None}, "no extendedKeyUsage"),
        ({"eku": [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.CLIENT_AUTH],
          "ca_flag": True}, "CA:TRUE"),
        ({"eku": [ExtendedKeyUsageOID.CLIENT_AUTH], "ca_flag": True}, "CA:TRUE"),
        ({"eku": [ExtendedKeyUsageOID.CLIENT_AUTH], "key_cert_sign": True}, "signing certif"),
    ],
    ids=["no-eku", "ca-codesigning", "ca-true", "key-cert-sign"],
)  # fmt: skip
def test_a_ca_signed_certificate_that_is_no_client_certificate_is_unauthenticated(
    world: Running, layout: PkiLayout, tmp_path: Path, usage: dict[str, Any], why: str
) -> None:
    ca = CertificateAuthority.load(layout)
    forged = _raw_client_cert(ca, "mallory", "operator", **usage)
    who = _identity_of(tmp_path, layout, forged)
    for method, request in (
        ("/sluice.v1.AdminService/GetStatus", admin_pb2.GetStatusRequest()),
        (HEALTH_CHECK, admin_pb2.GetStatusRequest()),  # empty bytes: a valid Check request
    ):
        before = len(denials(world, "unknown", method))
        err = raw_call(world, who, "internal", method, request.SerializeToString())
        assert err is not None and err.code() == Code.UNAUTHENTICATED, err
        assert why in (err.details() or "")
        new = denials(world, "unknown", method)[before:]
        assert new or before  # audited (repeats within the window are counted)


# 13. Operators administer and revoke; no raw weights.


def test_operator_has_least_privilege(world: Running, layout: PkiLayout) -> None:
    assert "operator" not in ROLE_TABLE[PULL_GLOBAL]
    assert "operator" not in ROLE_TABLE[GET_ROUND]
    ops = identity(layout, OPERATOR)
    for method, server_streaming in ((PULL_GLOBAL, True), (GET_ROUND, False)):
        request = trainer_pb2.PullGlobalRequest(model=TINY).SerializeToString()
        err = raw_call(world, ops, "internal", method, request, server_streaming=server_streaming)
        assert err is not None and err.code() == Code.PERMISSION_DENIED
    # Its own service still answers: the request reaches the servicer's checks.
    request = admin_pb2.RevokeRequest(serial_hex="not-hex", principal="x").SerializeToString()
    err = raw_call(world, ops, "internal", REVOKE, request)
    assert err is not None and err.code() == Code.INVALID_ARGUMENT


# 14. A flood of refusals: one fsynced row per window per (principal, method, kind).


def test_a_flood_of_denied_calls_is_coalesced_and_still_counted(
    tmp_path: Path, template_cache: Path, layout: PkiLayout
) -> None:
    running = mtls(tmp_path / "gw", template_cache, layout, audit_window_seconds=0.5)
    store = running.gateway.store
    flood = 0
    with ExitStack() as stack:
        stack.callback(running.gateway.stop)
        ch = stack.enter_context(channel(running.endpoints.internal, identity(layout, READER)))
        call: Any = ch.unary_unary(GET_ROUND)
        started = time.monotonic()
        while time.monotonic() - started < 1.6:
            with pytest.raises(grpc.RpcError) as err:
                call(trainer_pb2.GetRoundRequest(model=TINY).SerializeToString(), timeout=5)
            assert err.value.code() == Code.PERMISSION_DENIED
            flood += 1
        rows = denials(running, READER, GET_ROUND)
        # At most one row per 0.5 s window (and the first at once), however many calls.
        assert 1 <= len(rows) <= 5, len(rows)
        assert flood > 20 * len(rows), (flood, len(rows))
        time.sleep(1.2)  # the flusher writes the last window's count without a new call
        rows = denials(running, READER, GET_ROUND)
        assert sum(int(str(e.detail.get("count", 1))) for e in rows) == flood
        assert all(e.detail["status"] == "PERMISSION_DENIED" for e in rows)
        assert store.verify_audit() == (len(store.audit_entries()), None)
