"""No caller's string reaches the audit log unbounded: every string field of every RPC's
request, on the listener that serves it, set to any text of any length, and every audit
row the calls write keeps its subject to a few bounded pieces and each detail string to a
bounded reason. (A ListReleases model name of 3 MiB once became a 3 MiB subject.)"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.v1 import admin_pb2, egress_pb2, trainer_pb2
from tests.conftest import Running, start_gateway

# A subject is a few pieces each cut to 64 characters (errors.bounded: 64 and a suffix of
# at most 18), e.g. "<model>/release/<version>/<file>": at most ~200 characters.
SUBJECT_CHARS = 256
ACTOR_CHARS = 128
# A detail string: a value cut to 64, or a reason cut to 300 or 500 that may quote them.
DETAIL_CHARS = 600

SERVICES = {
    "internal": (
        trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
        admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    ),
    "egress": (egress_pb2.DESCRIPTOR.services_by_name["EgressService"],),
}
RPCS = [(side, m) for side, services in SERVICES.items() for s in services for m in s.methods]
CALL_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, template_cache: Path) -> Iterator[Running]:
    gateway = start_gateway(tmp_path_factory.mktemp("audit-bounded") / "gw", template_cache)
    yield gateway
    gateway.gateway.stop()


def _fill(message: Message, text: str) -> None:
    """Every string field of `message` (and of its sub-messages, the first member of each
    oneof, the keys of string-keyed maps) set to `text`."""
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and field is not oneof.fields[0]:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            scalar = {FieldDescriptor.TYPE_DOUBLE: 1.0, FieldDescriptor.TYPE_STRING: text}
            if key.type == FieldDescriptor.TYPE_STRING and value.type in scalar:
                getattr(message, field.name)[text] = scalar[value.type]
        elif field.is_repeated:
            continue
        elif field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, text)
        elif entry is not None:
            _fill(getattr(message, field.name), text)


def hostile(rpc: MethodDescriptor, text: str) -> bytes:
    message = message_factory.GetMessageClass(rpc.input_type)()
    _fill(message, text)
    return message.SerializeToString()


def _raw(data: bytes) -> bytes:
    return data


def call(channel: grpc.Channel, rpc: MethodDescriptor, request: bytes) -> grpc.StatusCode:
    path = f"/{rpc.containing_service.full_name}/{rpc.name}"
    try:
        if rpc.client_streaming:
            channel.stream_unary(path, _raw, _raw)(iter([request]), timeout=CALL_TIMEOUT_S)
        elif rpc.server_streaming:
            for _ in channel.unary_stream(path, _raw, _raw)(request, timeout=CALL_TIMEOUT_S):
                pass
        else:
            channel.unary_unary(path, _raw, _raw)(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings(item)


def _repeated(piece: str, chars: int) -> str:
    return (piece * (chars // len(piece) + 1))[:chars]


# Any characters; lengths from none to ~1 M characters (under the 4 MiB message cap for
# the egress requests' one or two strings; the larger requests are refused by size).
HOSTILE = st.one_of(
    st.text(max_size=100),
    st.builds(_repeated, st.text(min_size=1, max_size=8), st.integers(100, 20_000)),
    st.builds(_repeated, st.text(min_size=1, max_size=8), st.integers(20_000, 1 << 20)),
)


@settings(max_examples=20, deadline=None, database=None)
@given(text=HOSTILE)
def test_no_request_string_reaches_an_audit_row_unbounded(running: Running, text: str) -> None:
    store, coalescer = running.gateway.store, running.gateway.audit
    before = max((e.seq for e in store.audit_entries()), default=0)
    codes = {}
    channels = {side: grpc.insecure_channel(getattr(running.endpoints, side)) for side in SERVICES}
    try:
        for side, rpc in RPCS:
            codes[rpc.name] = call(channels[side], rpc, hostile(rpc, text))
    finally:
        for channel in channels.values():
            channel.close()
    assert grpc.StatusCode.INTERNAL not in codes.values(), codes
    coalescer.flush(everything=True)
    written = [e for e in store.audit_entries() if e.seq > before]
    for e in written:
        where = f"{e.kind} (seq {e.seq})"
        assert len(e.subject) <= SUBJECT_CHARS, f"{where}: subject of {len(e.subject)} chars"
        assert len(e.actor) <= ACTOR_CHARS, f"{where}: actor of {len(e.actor)} chars"
        longest = max(map(len, strings(e.detail)), default=0)
        assert longest <= DETAIL_CHARS, f"{where}: a detail string of {longest} chars"


def test_a_listing_by_a_3_mib_name_is_audited_by_its_first_characters(running: Running) -> None:
    """The probe's own case: ListReleases(model=<3 MiB>) on the egress listener."""
    store = running.gateway.store
    before = max((e.seq for e in store.audit_entries()), default=0)
    name = "m" + "x" * (3 << 20)
    rpc = SERVICES["egress"][0].methods_by_name["ListReleases"]
    with grpc.insecure_channel(running.endpoints.egress) as channel:
        request = egress_pb2.ListReleasesRequest(model=name).SerializeToString()
        assert call(channel, rpc, request) == grpc.StatusCode.OK
    running.gateway.audit.flush(everything=True)
    (listed,) = [e for e in store.audit_entries("egress.list") if e.seq > before]
    assert listed.subject == f"m{'x' * 63}...({len(name)} chars)"
