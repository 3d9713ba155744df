"""Push protocol 2: the payload's sha256 in the trailer, so a client hashes as it streams.

The header's sha256 stays accepted (every client before it); exactly one of the two, or
both the same, must name it; a wrong, malformed, doubled or missing one is refused with
nothing kept; a retry of a committed id is answered once its payload hashed to the
committed one, and stores nothing.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.clients.sdk import TRAILER_SHA256_PROTOCOL, TrainerClient, push_wire, push_wire_call
from sluice.gateway.core.ingest import PUSH_PROTOCOL
from sluice.models.schema import Schema
from sluice.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import TINY, Running, random_delta, update_header
from tests.integration.test_bad_input import (
    CHUNK_BYTES,
    TIMEOUT_S,
    assert_nothing_kept,
    snapshot,
    stub,  # noqa: F401 - a fixture
)

Code = grpc.StatusCode


def _push(
    gateway: Running,
    header: trainer_pb2.UpdateHeader,
    payload: bytes,
    in_trailer: bool,
    trailer_sha: str | None = None,
) -> trainer_pb2.PushUpdateResponse:
    """A raw push of serialized messages; trailer_sha replaces what the trailer carries."""
    messages = list(push_wire(header, payload, CHUNK_BYTES, sha256_in_trailer=in_trailer))
    if trailer_sha is not None:
        last = trainer_pb2.PushUpdateRequest.FromString(messages[-1])
        last.trailer.payload_sha256 = trailer_sha
        messages[-1] = last.SerializeToString()
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        response: trainer_pb2.PushUpdateResponse = push_wire_call(ch)(
            iter(messages), timeout=TIMEOUT_S
        )
        return response


def _header(
    schema: Schema, payload: bytes, payload_sha256: str = "", update_id: str = ""
) -> trainer_pb2.UpdateHeader:
    """A header naming no sha256 (unless given one): the trailer carries it."""
    header = update_header(schema, payload)
    header.payload_sha256 = payload_sha256
    if update_id:
        header.update_id = update_id
    return header


def test_the_gateway_announces_protocol_2_and_the_sdk_streams_the_hash(
    gateway: Running, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluice.clients import sdk

    seen: list[bool] = []
    real = sdk.push_wire

    def spy(
        header: trainer_pb2.UpdateHeader, payload: bytes, *args: object, **kw: bool
    ) -> Iterator[bytes]:
        seen.append(kw.get("sha256_in_trailer", False) and header.payload_sha256 == "")
        return real(header, payload, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sdk, "push_wire", spy)
    payload = random_delta(tiny_schema, 7)
    with TrainerClient(gateway.endpoints.internal) as client:
        info = client.round(TINY)
        assert info.push_protocol == PUSH_PROTOCOL >= TRAILER_SHA256_PROTOCOL
        resp = client.push_update(
            model=TINY, round_no=1, base_version=0, schema_hash=tiny_schema.hash,
            trainer="shanghai-01", region="shanghai", num_examples=10, payload=payload,
        )  # fmt: skip
    assert resp.created and seen == [True]
    (row,) = gateway.gateway.store._all("SELECT payload_sha256 FROM updates")
    assert row["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    (accepted,) = gateway.gateway.store.audit_entries("push.accepted")
    assert accepted.detail["payload_sha256"] == row["payload_sha256"]


def test_a_client_that_knows_no_protocol_2_still_sends_it_in_the_header(
    gateway: Running, tiny_schema: Schema
) -> None:
    payload = random_delta(tiny_schema, 8)
    with TrainerClient(gateway.endpoints.internal) as client:
        client._push_protocol = 0  # what a gateway from before announces
        resp = client.push_update(
            model=TINY, round_no=1, base_version=0, schema_hash=tiny_schema.hash,
            trainer="shanghai-01", region="shanghai", num_examples=10, payload=payload,
        )  # fmt: skip
    assert resp.created


@pytest.mark.parametrize(
    ("where", "code", "text"),
    [
        ("neither", Code.INVALID_ARGUMENT, "in neither the header nor the trailer"),
        ("both-differ", Code.INVALID_ARGUMENT, "different payload sha256s"),
        ("trailer-wrong", Code.DATA_LOSS, "trailer said"),
        ("trailer-not-hex", Code.INVALID_ARGUMENT, "trailer payload_sha256: expected 64"),
    ],
)
def test_a_missing_doubled_or_wrong_sha256_is_refused_and_nothing_kept(
    gateway: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,  # noqa: F811 - the fixture
    tiny_schema: Schema,
    where: str,
    code: grpc.StatusCode,
    text: str,
) -> None:
    payload = random_delta(tiny_schema, 9)
    real = hashlib.sha256(payload).hexdigest()
    other = hashlib.sha256(b"other").hexdigest()
    header, trailer = {
        "neither": (_header(tiny_schema, payload), ""),
        "both-differ": (_header(tiny_schema, payload, payload_sha256=real), other),
        "trailer-wrong": (_header(tiny_schema, payload), other),
        "trailer-not-hex": (_header(tiny_schema, payload), real.upper()),
    }[where]
    before = snapshot(gateway, stub)
    with pytest.raises(grpc.RpcError) as err:
        _push(gateway, header, payload, in_trailer=True, trailer_sha=trailer)
    assert err.value.code() == code, err.value.details()
    assert text in (err.value.details() or "")
    assert_nothing_kept(gateway, stub, before)


def test_both_naming_the_same_sha256_is_accepted(gateway: Running, tiny_schema: Schema) -> None:
    payload = random_delta(tiny_schema, 10)
    real = hashlib.sha256(payload).hexdigest()
    header = _header(tiny_schema, payload, payload_sha256=real)
    assert _push(gateway, header, payload, in_trailer=True, trailer_sha=real).created


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=80).filter(lambda t: t != ""))
def test_any_trailer_sha256_but_the_payloads_leaves_nothing(
    gateway: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,  # noqa: F811 - the fixture
    tiny_schema: Schema,
    text: str,
) -> None:
    payload = random_delta(tiny_schema, 11)
    if text == hashlib.sha256(payload).hexdigest():
        return
    before = snapshot(gateway, stub)
    header = _header(tiny_schema, payload, update_id=uuid.uuid4().hex)
    with pytest.raises(grpc.RpcError) as err:
        _push(gateway, header, payload, in_trailer=True, trailer_sha=text)
    assert err.value.code() in (Code.INVALID_ARGUMENT, Code.DATA_LOSS), err.value.details()
    assert len(err.value.details() or "") < 400
    assert_nothing_kept(gateway, stub, before)


def test_a_retry_with_the_sha256_in_the_trailer_is_answered_after_its_payload(
    gateway: Running,
    stub: trainer_pb2_grpc.TrainerServiceStub,  # noqa: F811 - the fixture
    tiny_schema: Schema,
) -> None:
    payload = random_delta(tiny_schema, 12)
    header = _header(tiny_schema, payload)
    first = _push(gateway, header, payload, in_trailer=True)
    assert first.created and first.accepted == 1
    before = snapshot(gateway, stub)
    again = _push(gateway, header, payload, in_trailer=True)  # the same id and payload
    assert (again.created, again.round, again.accepted) == (False, 1, 1)
    assert_nothing_kept(gateway, stub, before)
    # The same id with another payload: another update under a used id.
    other = random_delta(tiny_schema, 13)
    with pytest.raises(grpc.RpcError) as err:
        _push(gateway, _header(tiny_schema, other, update_id=header.update_id), other, True)
    assert err.value.code() == Code.ALREADY_EXISTS, err.value.details()
    assert_nothing_kept(gateway, stub, before)
    # ... and a retry whose payload does not hash to its own trailer: refused as such.
    with pytest.raises(grpc.RpcError) as err:
        _push(gateway, header, payload, True, trailer_sha=hashlib.sha256(other).hexdigest())
    assert err.value.code() == Code.DATA_LOSS, err.value.details()
    assert_nothing_kept(gateway, stub, before)
