"""Identity and access over real mTLS: the role matrix, region binding, revocation, limits."""

from __future__ import annotations

import datetime as dt
import hashlib
import stat
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sluice.clients.sdk import AdminClient, Identity, RetryPolicy, TrainerClient, channel
from sluice.gateway.pki import (
    OPERATOR,
    READER,
    TRAINER,
    CertificateAuthority,
    Issued,
    PkiLayout,
    cert_serial,
    init_pki,
    issue_client_cert,
)
from sluice.gateway.services.auth import ROLE_TABLE
from sluice.gateway.store.audit import AuditEntry
from sluice.models.schema import Schema
from sluice.v1 import admin_pb2, egress_pb2, egress_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.conftest import TINY, Running, random_delta, start_gateway, stored_state, update_header
from tests.integration.test_round import wait_for_round

Code = grpc.StatusCode

CALL_TIMEOUT_S = 5.0  # every call: a gateway that hangs fails the cell instead of blocking
TRAINERS = (
    ("shanghai-01", "shanghai"),
    ("beijing-01", "beijing"),
    ("harbin-01", "harbin"),  # revoked at setup
    ("chengdu-01", "chengdu"),
    ("shenzhen-01", "shenzhen"),
)
READER_NAME = "global-team"
OPERATOR_NAME = "ops"
REVOKED_NAME = "harbin-01"
NO_RETRY = RetryPolicy(attempts=1)

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
TRAINER_SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
EGRESS_SERVICE = egress_pb2.DESCRIPTOR.services_by_name["EgressService"]
# What each listener must serve, from the issue, not from the server's own constants.
SERVED = {
    "internal": {TRAINER_SERVICE.full_name, ADMIN_SERVICE.full_name, HEALTH},
    "egress": {EGRESS_SERVICE.full_name, HEALTH},
}
LISTENERS = tuple(SERVED)

# Callers of the matrix. The first three fail the TLS handshake: the client sees
# UNAVAILABLE and no call reaches the gateway, so there is nothing to audit.
HANDSHAKE_REFUSED = ("no-cert", "foreign-ca", "expired")
ROLE_OF = {"trainer": TRAINER, "operator": OPERATOR, "reader": READER, "revoked": TRAINER}
CALLERS = (*ROLE_OF, *HANDSHAKE_REFUSED)
NAME_OF = {
    "trainer": "shanghai-01",
    "operator": OPERATOR_NAME,
    "reader": READER_NAME,
    "revoked": REVOKED_NAME,
}


def path_of(rpc: MethodDescriptor) -> str:
    return f"/{rpc.containing_service.full_name}/{rpc.name}"


# Every Sluice RPC from the generated descriptors, plus the health Check.
RPCS: tuple[MethodDescriptor, ...] = (
    *(m for s in (TRAINER_SERVICE, ADMIN_SERVICE, EGRESS_SERVICE) for m in s.methods),
    # health_pb2 registered it in the default pool; its stubs type the descriptor loosely.
    descriptor_pool.Default().FindMethodByName(f"{HEALTH}.Check"),
)


@dataclass(frozen=True)
class Harmless:
    """A request that changes nothing, and the status it gets once past the auth layer."""

    requests: tuple[Message, ...]  # one for a unary request; the whole stream otherwise
    passes: Code


HARMLESS: dict[str, Harmless] = {
    "/sluice.v1.TrainerService/GetRound": Harmless(
        (trainer_pb2.GetRoundRequest(model=TINY),), Code.OK
    ),
    "/sluice.v1.TrainerService/PullGlobal": Harmless(
        (trainer_pb2.PullGlobalRequest(model=TINY),), Code.OK
    ),
    # An empty stream: no header, so validation refuses it before anything is spooled.
    "/sluice.v1.TrainerService/PushUpdate": Harmless((), Code.INVALID_ARGUMENT),
    "/sluice.v1.AdminService/GetStatus": Harmless((admin_pb2.GetStatusRequest(),), Code.OK),
    "/sluice.v1.AdminService/CloseRound": Harmless(
        (admin_pb2.CloseRoundRequest(model=TINY, round=999),), Code.NOT_FOUND
    ),
    # An empty stream: no header, refused before anything is spooled.
    "/sluice.v1.AdminService/ImportBase": Harmless((), Code.INVALID_ARGUMENT),
    "/sluice.v1.AdminService/Revoke": Harmless(
        (admin_pb2.RevokeRequest(serial_hex="not-hex", principal="nobody"),),
        Code.INVALID_ARGUMENT,
    ),
    "/sluice.v1.EgressService/ListReleases": Harmless((egress_pb2.ListReleasesRequest(),), Code.OK),
    # Nothing was ever released from the matrix's gateway.
    "/sluice.v1.EgressService/GetManifest": Harmless(
        (egress_pb2.GetManifestRequest(model=TINY),), Code.NOT_FOUND
    ),
    "/sluice.v1.EgressService/PullRelease": Harmless(
        (egress_pb2.PullReleaseRequest(model=TINY),), Code.NOT_FOUND
    ),
    "/grpc.health.v1.Health/Check": Harmless((health_pb2.HealthCheckRequest(),), Code.OK),
}


def expected(path: str, caller: str, listener: str) -> Code:
    """The status a cell must get, derived from ROLE_TABLE."""
    if caller in HANDSHAKE_REFUSED:
        return Code.UNAVAILABLE
    if caller == "revoked":
        return Code.UNAUTHENTICATED
    if ROLE_OF[caller] not in ROLE_TABLE.get(path, frozenset()):
        return Code.PERMISSION_DENIED
    if path.split("/")[1] not in SERVED[listener]:
        return Code.UNIMPLEMENTED
    return HARMLESS[path].passes


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def invoke(channel: grpc.Channel, rpc: MethodDescriptor, requests: Sequence[Message]) -> Code:
    """Call rpc generically from its descriptor; the status it ended with."""
    path = path_of(rpc)
    deserialize = message_factory.GetMessageClass(rpc.output_type).FromString
    try:
        if rpc.client_streaming and rpc.server_streaming:
            raise NotImplementedError(f"{path}: no bidirectional RPC is expected")
        if rpc.client_streaming:
            channel.stream_unary(path, _serialize, deserialize)(
                iter(requests), timeout=CALL_TIMEOUT_S
            )
        elif rpc.server_streaming:
            for _ in channel.unary_stream(path, _serialize, deserialize)(
                requests[0], timeout=CALL_TIMEOUT_S
            ):
                pass
        else:
            channel.unary_unary(path, _serialize, deserialize)(requests[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


# The shared PKI and gateway.


def _write_identity(directory: Path, ca_cert: Path, issued: Issued) -> Identity:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "client.pem", directory / "client.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    key.chmod(0o600)
    return Identity(ca_cert, cert, key)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(
        tmp_path_factory.mktemp("auth-pki") / "pki",
        trainers=TRAINERS,
        readers=[READER_NAME],
        operators=[OPERATOR_NAME],
    )


def identity(layout: PkiLayout, name: str) -> Identity:
    return Identity.from_pki(layout.directory, name)


def trainer_client(running: Running, layout: PkiLayout, name: str) -> TrainerClient:
    return TrainerClient(
        running.endpoints.internal,
        retry=NO_RETRY,
        timeout_s=CALL_TIMEOUT_S,
        identity=identity(layout, name),
    )


def mtls_gateway(
    data_dir: Path, template_cache: Path, layout: PkiLayout, **settings: Any
) -> Running:
    return start_gateway(
        data_dir, template_cache, insecure_loopback=False, pki_dir=layout.directory, **settings
    )


@dataclass
class World:
    """One mTLS gateway, a credential per caller, and one channel per (caller, listener)."""

    running: Running
    layout: PkiLayout
    credentials: dict[str, grpc.ChannelCredentials]
    channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)

    def channel(self, caller: str, listener: str) -> grpc.Channel:
        key = (caller, listener)
        if key not in self.channels:
            target = getattr(self.running.endpoints, listener)
            self.channels[key] = grpc.secure_channel(target, self.credentials[caller])
        return self.channels[key]

    def denials(self) -> list[AuditEntry]:
        return self.running.gateway.store.audit_entries("auth.denied")


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, template_cache: Path, layout: PkiLayout
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("auth-world")
    running = mtls_gateway(root / "gw", template_cache, layout)
    # The operator cuts off harbin-01 through the API, as in production.
    serial = cert_serial(layout.client_cert(REVOKED_NAME))
    ops = identity(layout, OPERATOR_NAME)
    with AdminClient(running.endpoints.internal, identity=ops) as admin:
        assert admin.revoke(f"{serial:x}", REVOKED_NAME, "matrix: revoked caller") == []

    foreign = init_pki(root / "foreign", operators=[OPERATOR_NAME])  # same name, other CA
    now = dt.datetime.now(dt.UTC)
    expired = issue_client_cert(
        CertificateAuthority.load(layout),
        OPERATOR_NAME,
        OPERATOR,
        not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    )
    ca = layout.ca_cert
    credentials = {caller: identity(layout, name).credentials() for caller, name in NAME_OF.items()}
    credentials["foreign-ca"] = Identity(
        ca, foreign.client_cert(OPERATOR_NAME), foreign.client_key(OPERATOR_NAME)
    ).credentials()
    credentials["expired"] = _write_identity(root / "expired", ca, expired).credentials()
    credentials["no-cert"] = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    world = World(running, layout, credentials)
    yield world
    for open_channel in world.channels.values():
        open_channel.close()
    running.gateway.stop()


# 1. The full matrix: every RPC x every caller x both listeners, from ROLE_TABLE.


def test_every_sluice_rpc_has_a_role_entry_and_a_harmless_request() -> None:
    paths = [path_of(rpc) for rpc in RPCS]
    assert len(set(paths)) == len(paths)
    assert set(HARMLESS) == set(paths)
    assert set(paths) <= set(ROLE_TABLE)


def test_role_table_gives_each_role_only_its_side() -> None:
    # The issue's rule, checked against the table itself: the matrix only derives from it.
    common = {HEALTH, REFLECTION}
    for path, roles in ROLE_TABLE.items():
        service = path.split("/")[1]
        if service in common:
            continue
        if READER in roles:
            assert service == EGRESS_SERVICE.full_name, path
        if service == EGRESS_SERVICE.full_name:
            assert roles == {READER}, path
        if service == ADMIN_SERVICE.full_name:
            assert roles == {OPERATOR}, path
        if service == TRAINER_SERVICE.full_name:
            # Least privilege: operators administer (GetStatus shows rounds and versions)
            # and revoke; the round's training contract and the raw weights are trainers'.
            assert roles == {TRAINER}, path
    assert ROLE_TABLE[path_of(TRAINER_SERVICE.methods_by_name["PushUpdate"])] == {TRAINER}


MATRIX = [
    pytest.param(rpc, caller, listener, id=f"{rpc.name}-{caller}-{listener}")
    for rpc in RPCS
    for caller in CALLERS
    for listener in LISTENERS
]


@pytest.mark.parametrize(("rpc", "caller", "listener"), MATRIX)
def test_matrix(world: World, rpc: MethodDescriptor, caller: str, listener: str) -> None:
    path = path_of(rpc)
    want = expected(path, caller, listener)
    before = len(world.denials())
    got = invoke(world.channel(caller, listener), rpc, HARMLESS[path].requests)
    assert got == want, f"{path} by {caller} on {listener}: {got.name}, expected {want.name}"
    new = world.denials()[before:]
    if want in (Code.PERMISSION_DENIED, Code.UNAUTHENTICATED):
        (entry,) = new
        assert (entry.actor, entry.subject) == (NAME_OF[caller], path)
        assert entry.detail["status"] == want.name
        assert entry.detail["listener"] == listener
    else:
        assert new == []  # refused at the handshake (never reached us) or let through


# 2. A trainer pushes only for itself and its own region.


@pytest.mark.parametrize(
    ("trainer", "region"),
    [("shanghai-01", "beijing"), ("beijing-01", "beijing")],
    ids=["other-region", "other-trainer"],
)
def test_trainer_cannot_push_for_another_region(
    world: World, tiny_schema: Schema, trainer: str, region: str
) -> None:
    running = world.running
    payload = random_delta(tiny_schema, seed=3)
    with trainer_client(running, world.layout, "shanghai-01") as client:
        accepted = client.round(TINY).accepted
        before = stored_state(running)
        with pytest.raises(grpc.RpcError) as err:
            client.push_update(
                model=TINY,
                round_no=1,
                base_version=0,
                schema_hash=tiny_schema.hash,
                trainer=trainer,
                region=region,
                num_examples=10,
                payload=payload,
            )
        assert err.value.code() == Code.PERMISSION_DENIED
        assert "shanghai-01" in (err.value.details() or "")
        assert client.round(TINY).accepted == accepted
    assert stored_state(running) == before
    assert not list((running.data_dir / "blobs" / "tmp").iterdir())


# 3. Each listener lists only its own services.


def listed_services(world: World, listener: str) -> set[str]:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(world.channel("reader", listener))
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=CALL_TIMEOUT_S))
    return {s.name for s in resp.list_services_response.service}


def test_reflection_over_mtls_lists_only_each_sides_services(world: World) -> None:
    assert listed_services(world, "egress") == {EGRESS_SERVICE.full_name, HEALTH, REFLECTION}
    assert listed_services(world, "internal") == {
        TRAINER_SERVICE.full_name,
        ADMIN_SERVICE.full_name,
        HEALTH,
        REFLECTION,
    }


# 4. Revoking a trainer mid-round.


def push(client: TrainerClient, schema: Schema, payload: bytes, trainer: str, n: int) -> str:
    resp = client.push_update(
        model=TINY,
        round_no=1,
        base_version=0,
        schema_hash=schema.hash,
        trainer=trainer,
        region=trainer.split("-")[0],
        num_examples=n,
        payload=payload,
    )
    assert resp.created
    return resp.update_id


def test_revoking_a_trainer_mid_round_cuts_it_off_and_drops_its_update(
    tmp_path: Path, template_cache: Path, layout: PkiLayout, tiny_schema: Schema
) -> None:
    running = mtls_gateway(tmp_path / "gw", template_cache, layout, quorum=3, min_trainers=2)
    a, b, c, d = "shanghai-01", "beijing-01", "chengdu-01", "shenzhen-01"
    weights = {a: 500, b: 40, c: 120, d: 240}  # A's large weight would show in the mean
    payloads = {name: random_delta(tiny_schema, seed=i) for i, name in enumerate(weights)}
    store = running.gateway.store
    with ExitStack() as stack:
        stack.callback(running.gateway.stop)
        clients = {
            name: stack.enter_context(trainer_client(running, layout, name)) for name in weights
        }
        base = clients[b].pull_global(TINY)
        a_id = push(clients[a], tiny_schema, payloads[a], a, weights[a])
        push(clients[b], tiny_schema, payloads[b], b, weights[b])
        assert clients[b].round(TINY).accepted == 2  # below quorum: the round stays open

        serial = cert_serial(layout.client_cert(a))
        ops = identity(layout, OPERATOR_NAME)
        with AdminClient(running.endpoints.internal, identity=ops) as admin:
            assert admin.revoke(f"{serial:x}", a, "key leaked") == [a_id]
        # A's open channel, no restart: its very next call is refused.
        with pytest.raises(grpc.RpcError) as err:
            clients[a].round(TINY)
        assert err.value.code() == Code.UNAUTHENTICATED
        assert clients[b].round(TINY).accepted == 1
        a_blob = running.gateway.blobs.path(hashlib.sha256(payloads[a]).hexdigest())
        assert not a_blob.exists()

        push(clients[c], tiny_schema, payloads[c], c, weights[c])
        push(clients[d], tiny_schema, payloads[d], d, weights[d])
        wait_for_round(clients[b], 2, timeout_s=30)
        merged = clients[b].pull_global(TINY)
        assert merged.version == 1
        version = store.latest_version(TINY)
        assert version is not None and version.num_trainers == 3
        (revoked,) = store.audit_entries("cert.revoked")
        assert (revoked.subject, revoked.detail["serial"]) == (a, f"{serial:x}")
        (discarded,) = store.audit_entries("push.discarded")
        assert discarded.detail["update_id"] == a_id

    counted = (b, c, d)  # never A
    total = sum(weights[n] for n in counted)
    base_views = tiny_schema.views(base.data)
    got = tiny_schema.views(merged.data)
    for spec in tiny_schema.tensors:
        deltas = {n: tiny_schema.views(payloads[n])[spec.name].astype(np.float64) for n in counted}
        mean = sum(deltas[n] * weights[n] for n in counted) / total
        if spec.is_float:
            want = base_views[spec.name] + mean
            np.testing.assert_allclose(got[spec.name], want, rtol=1e-5, atol=1e-6)
        else:
            want = base_views[spec.name] + np.rint(mean).astype(spec.dtype)
            np.testing.assert_array_equal(got[spec.name], want)


# 5. Private keys stay private.


def test_private_keys_of_the_gateways_pki_are_not_readable_by_others(layout: PkiLayout) -> None:
    keys = sorted(layout.directory.rglob("*.key"))
    assert len(keys) == 3 + len(TRAINERS) + 2  # CA, two listeners, every client
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) & 0o077 == 0, key


# 6. Limits that protect the service.


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, template_cache: Path, layout: PkiLayout
) -> Iterator[Running]:
    running = mtls_gateway(
        tmp_path_factory.mktemp("auth-limits") / "gw",
        template_cache,
        layout,
        max_streams_per_principal=1,
        idle_stream_seconds=1.0,
    )
    yield running
    running.gateway.stop()


def _round_status(client: TrainerClient) -> Code:
    try:
        client.round(TINY)
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def _status_within(client: TrainerClient, want: Code, timeout_s: float = 5.0) -> Code:
    """Poll GetRound until it ends with want (or time runs out); the last status."""
    deadline = time.monotonic() + timeout_s
    while (got := _round_status(client)) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_second_concurrent_call_of_a_principal_is_refused(
    tmp_path: Path, template_cache: Path, layout: PkiLayout, tiny_schema: Schema
) -> None:
    # Its own gateway: a long idle timeout, so the held push is not dropped meanwhile.
    running = mtls_gateway(
        tmp_path / "gw", template_cache, layout, max_streams_per_principal=1,
        idle_stream_seconds=30.0,
    )  # fmt: skip
    release = threading.Event()
    payload = random_delta(tiny_schema, seed=3)
    header = update_header(tiny_schema, payload, update_id=uuid.uuid4().hex)

    def held() -> Iterator[trainer_pb2.PushUpdateRequest]:
        # A first message, so the call surely reached the gateway; then nothing for a while.
        yield trainer_pb2.PushUpdateRequest(header=header)
        release.wait(timeout=10)

    # The held call on a channel of its own: the limit counts the principal, not a connection.
    try:
        with (
            channel(running.endpoints.internal, identity(layout, "shanghai-01")) as held_channel,
            trainer_client(running, layout, "shanghai-01") as same,
            trainer_client(running, layout, "beijing-01") as other,
        ):
            stub = trainer_pb2_grpc.TrainerServiceStub(held_channel)
            first = stub.PushUpdate.future(held(), timeout=10)
            interceptor = running.gateway.auth["internal"]
            deadline = time.monotonic() + 5
            while interceptor.open_calls("shanghai-01") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # the held call is admitted before the second one is tried
            try:
                got = _status_within(same, Code.RESOURCE_EXHAUSTED)
                assert got == Code.RESOURCE_EXHAUSTED, (
                    f"held call done={first.done()}: {first.exception() if first.done() else ''}"
                )
                assert not first.done()
                assert _round_status(other) == Code.OK  # the limit is per principal
            finally:
                release.set()
            with pytest.raises(grpc.RpcError) as err:
                first.result(timeout=CALL_TIMEOUT_S)
            assert err.value.code() == Code.INVALID_ARGUMENT  # ended without a trailer
            assert _status_within(same, Code.OK) == Code.OK  # the slot came back
    finally:
        running.gateway.stop()


def test_a_principal_at_its_call_cap_can_call_again_once_it_has_its_answer(
    limited: Running, layout: PkiLayout, tiny_schema: Schema
) -> None:
    # With one call allowed at a time, the next call made the moment the last one's answer
    # (an OK or a refusal) arrives is admitted: a call the gateway has answered holds
    # nothing of its principal's, even while gRPC is still ending it.
    header = update_header(
        tiny_schema, b"", trainer="beijing-01", region="beijing", update_id=uuid.uuid4().hex
    )
    with (
        channel(limited.endpoints.internal, identity(layout, "beijing-01")) as raw,
        trainer_client(limited, layout, "beijing-01") as client,
    ):
        stub = trainer_pb2_grpc.TrainerServiceStub(raw)
        refused, before = [], stored_state(limited)
        for _ in range(100):
            assert client.round(TINY).round >= 1  # raises RESOURCE_EXHAUSTED if still held
            with pytest.raises(grpc.RpcError) as err:  # an empty payload: refused
                stub.PushUpdate(iter([trainer_pb2.PushUpdateRequest(header=header)]), timeout=10)
            refused.append(err.value.code())
        assert set(refused) == {Code.INVALID_ARGUMENT}
        assert client.round(TINY).accepted == 0  # still serving; the refusals stored nothing
    assert stored_state(limited) == before
    assert not list((limited.data_dir / "blobs" / "tmp").iterdir())


def test_a_silent_push_stream_is_dropped(
    limited: Running, layout: PkiLayout, tiny_schema: Schema
) -> None:
    payload = random_delta(tiny_schema, seed=7)
    header = update_header(
        tiny_schema, payload, trainer="beijing-01", region="beijing", update_id=uuid.uuid4().hex
    )
    stop = threading.Event()

    def header_then_silence() -> Iterator[trainer_pb2.PushUpdateRequest]:
        yield trainer_pb2.PushUpdateRequest(header=header)
        stop.wait(timeout=15)

    before = stored_state(limited)
    with (
        channel(limited.endpoints.internal, identity(layout, "beijing-01")) as raw,
        trainer_client(limited, layout, "beijing-01") as client,
    ):
        stub = trainer_pb2_grpc.TrainerServiceStub(raw)
        started = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as err:
                stub.PushUpdate(header_then_silence(), timeout=10)
        finally:
            stop.set()
        elapsed = time.monotonic() - started
        assert err.value.code() == Code.DEADLINE_EXCEEDED
        assert "no message for 1 s" in (err.value.details() or "")
        assert elapsed < 5.0, f"dropped after {elapsed:.1f} s, idle limit 1 s"
        assert client.round(TINY).accepted == 0
    assert stored_state(limited) == before
    assert not list((limited.data_dir / "blobs" / "tmp").iterdir())


@pytest.mark.parametrize(
    ("caller", "listener", "rpc"),
    [
        ("reader", "egress", EGRESS_SERVICE.methods_by_name["GetManifest"]),
        ("trainer", "internal", TRAINER_SERVICE.methods_by_name["GetRound"]),
    ],
    ids=["egress-GetManifest", "internal-GetRound"],
)
def test_a_request_over_the_message_cap_is_refused(
    world: World, caller: str, listener: str, rpc: MethodDescriptor
) -> None:
    # 5 MiB, over the 4 MiB + 64 KiB cap. The matrix's channels set no send cap of their
    # own, so what refuses it is the gateway, and before any servicer runs.
    request = message_factory.GetMessageClass(rpc.input_type)(model="m" * (5 << 20))
    before = len(world.denials())
    assert invoke(world.channel(caller, listener), rpc, [request]) == Code.RESOURCE_EXHAUSTED
    assert len(world.denials()) == before


def test_egress_calls_are_audited_with_the_readers_principal(world: World) -> None:
    """Every egress call names the reader from its certificate, not only the peer address."""
    stub = egress_pb2_grpc.EgressServiceStub(world.channel("reader", "egress"))
    stub.ListReleases(egress_pb2.ListReleasesRequest(model=TINY), timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.PullRelease(egress_pb2.PullReleaseRequest(model=TINY, file="../sluice.db"),
                              timeout=CALL_TIMEOUT_S))  # fmt: skip
    assert err.value.code() in (Code.NOT_FOUND,)
    world.running.gateway.audit.flush(everything=True)
    store = world.running.gateway.store
    listed = [e for e in store.audit_entries("egress.list") if e.actor == READER_NAME]
    refused = [e for e in store.audit_entries("egress.refused") if e.actor == READER_NAME]
    assert listed and refused
    assert refused[-1].detail["file"] == "../sluice.db"
    assert str(refused[-1].detail["peer"]).startswith("ipv4:127.0.0.1")
