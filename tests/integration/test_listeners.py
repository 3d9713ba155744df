"""Each listener serves only its own side: egress cannot reach trainer or admin RPCs, nor
learn their names from reflection; bytes that do not parse are INVALID_ARGUMENT on every
gRPC listener, the plain-text health one included."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.gateway.listeners import reflection_pool
from sluice.gateway.ops import HEALTH_CALLS, HEALTH_THREADS
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.conftest import TINY, Running, start_gateway

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
TRAINER_SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
EGRESS_SERVICE = egress_pb2.DESCRIPTOR.services_by_name["EgressService"]
# What each gRPC listener serves, from the design (docs/ARCHITECTURE.md), not from the
# server's own constants; the operations listener serves health and nothing else.
SERVED = {
    "internal": {TRAINER_SERVICE.full_name, ADMIN_SERVICE.full_name, HEALTH, REFLECTION},
    "egress": {EGRESS_SERVICE.full_name, HEALTH, REFLECTION},
    "health": {HEALTH},
}
REFLECTED = ("internal", "egress")  # the listeners with reflection


def listed_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as ch:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(ch)  # stubs type it loosely
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
    return {s.name for s in resp.list_services_response.service}


def test_reflection_lists_only_each_sides_services(gateway: Running) -> None:
    assert listed_services(gateway.endpoints.egress) == {
        "sluice.v1.EgressService",
        HEALTH,
        REFLECTION,
    }
    assert listed_services(gateway.endpoints.internal) == {
        "sluice.v1.TrainerService",
        "sluice.v1.AdminService",
        HEALTH,
        REFLECTION,
    }


def test_egress_listener_does_not_serve_trainer_or_admin(gateway: Running) -> None:
    with grpc.insecure_channel(gateway.endpoints.egress) as ch:
        trainer = trainer_pb2_grpc.TrainerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            trainer.GetRound(trainer_pb2.GetRoundRequest(model=TINY), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            list(trainer.PullGlobal(trainer_pb2.PullGlobalRequest(model=TINY), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_internal_listener_does_not_serve_egress(gateway: Running) -> None:
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        egress = egress_pb2_grpc.EgressServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            egress.ListReleases(egress_pb2.ListReleasesRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("side", ["internal", "egress"])
def test_health_is_served_on_both_listeners(gateway: Running, side: str) -> None:
    with grpc.insecure_channel(getattr(gateway.endpoints, side)) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
        resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_egress_listener_health_does_not_know_trainer_service(gateway: Running) -> None:
    with grpc.insecure_channel(gateway.endpoints.egress) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="sluice.v1.TrainerService"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("address", ["0.0.0.0:0", "10.1.2.3:0", "[::]:0"])
def test_insecure_mode_refuses_non_loopback_addresses(
    tmp_path: Path, template_cache: Path, address: str
) -> None:
    with pytest.raises(ValueError, match="loopback addresses only"):
        start_gateway(tmp_path / "gw", template_cache, egress_address=address)


def test_tls_mode_without_certificates_says_how_to_make_them(
    tmp_path: Path, template_cache: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="sluice init"):
        start_gateway(tmp_path / "gw", template_cache, insecure_loopback=False)


# ---- reflection describes only the listener's own files ---------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, template_cache: Path) -> Iterator[Running]:
    """One gateway for the read-only checks below."""
    running = start_gateway(tmp_path_factory.mktemp("listeners") / "gw", template_cache)
    yield running
    running.gateway.stop()


def _closure(file: FileDescriptor, into: dict[str, FileDescriptor]) -> dict[str, FileDescriptor]:
    into[file.name] = file
    for dependency in file.dependencies:
        _closure(dependency, into)
    return into


def files_of(services: set[str]) -> dict[str, FileDescriptor]:
    """The files defining `services`, and their imports (as the process knows them)."""
    found: dict[str, FileDescriptor] = {}
    for name in services:
        _closure(descriptor_pool.Default().FindFileContainingSymbol(name), found)
    return found


def _messages(types: Sequence[Descriptor]) -> Iterator[Descriptor]:
    for message in types:
        yield message
        yield from _messages(message.nested_types)


def symbols_of(file: FileDescriptor) -> set[str]:
    """Every name reflection could be asked for in a file: services, methods, messages,
    fields, enums."""
    names = set()
    for service in file.services_by_name.values():
        names.add(service.full_name)
        names.update(method.full_name for method in service.methods)
    for message in _messages(list(file.message_types_by_name.values())):
        names.add(message.full_name)
        names.update(field.full_name for field in message.fields)
        names.update(enum.full_name for enum in message.enum_types)
    names.update(enum.full_name for enum in file.enum_types_by_name.values())
    return names


ALL_FILES = files_of(set().union(*SERVED.values()))
ALL_SYMBOLS = sorted(set().union(*(symbols_of(f) for f in ALL_FILES.values())))


def foreign_files(listener: str) -> dict[str, FileDescriptor]:
    """Files of the other listeners' services that this listener's own files do not import."""
    own = files_of(SERVED[listener])
    others = set().union(*(SERVED[o] for o in REFLECTED if o != listener)) - SERVED[listener]
    return {name: f for name, f in files_of(others).items() if name not in own}


Query = reflection_pb2.ServerReflectionRequest


def reflect(target: str, queries: Sequence[Query]) -> list[reflection_pb2.ServerReflectionResponse]:
    """One reflection stream, one answer per query, as grpcurl asks."""
    with grpc.insecure_channel(target) as ch:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(ch)  # stubs type it loosely
        answers = list(stub.ServerReflectionInfo(iter(queries), timeout=10))
    assert len(answers) == len(queries)
    return answers


def described(
    answer: reflection_pb2.ServerReflectionResponse,
) -> list[descriptor_pb2.FileDescriptorProto]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]


def pool_of(files: Sequence[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """A pool of the files reflection sent, each added after its imports."""
    by_name = {f.name: f for f in files}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dependency in by_name[name].dependency:
                add(dependency)
            pool.Add(by_name[name])
            added.add(name)

    for name in by_name:
        add(name)
    return pool


NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.parametrize("listener", REFLECTED)
def test_reflection_cannot_name_the_other_listeners_services(
    shared: Running, listener: str
) -> None:
    """Every symbol and file name of the other side's files is NOT_FOUND; so is asking for
    the extension numbers of their messages (an answer would confirm the type exists)."""
    foreign = foreign_files(listener)
    assert foreign, "each listener has files of its own"
    queries = [Query(file_by_filename=name) for name in sorted(foreign)]
    for file in foreign.values():
        for symbol in sorted(symbols_of(file)):
            queries.append(Query(file_containing_symbol=symbol))
        for message in file.message_types_by_name.values():
            queries.append(Query(all_extension_numbers_of_type=message.full_name))
            extension = reflection_pb2.ExtensionRequest(
                containing_type=message.full_name, extension_number=1
            )
            queries.append(Query(file_containing_extension=extension))
    answers = reflect(getattr(shared.endpoints, listener), queries)
    found = {
        str(q).strip(): a.WhichOneof("message_response")
        for q, a in zip(queries, answers, strict=True)
        if a.error_response.error_code != NOT_FOUND
    }
    assert found == {}


@pytest.mark.parametrize("listener", REFLECTED)
def test_reflection_still_describes_the_listeners_own_services(
    shared: Running, listener: str
) -> None:
    """What grpcurl does: ask for the file of each listed service, build a pool from the
    answer, and find every method's request and response types there."""
    services = sorted(SERVED[listener])
    answers = reflect(
        getattr(shared.endpoints, listener),
        [Query(file_containing_symbol=name) for name in services],
    )
    for name, answer in zip(services, answers, strict=True):
        files = described(answer)
        assert files, f"{name}: {answer.error_response}"
        pool = pool_of(files)
        service = pool.FindServiceByName(name)
        for method in service.methods:
            assert pool.FindMessageTypeByName(method.input_type.full_name)
            assert pool.FindMessageTypeByName(method.output_type.full_name)


# Queries of any kind, for any name: every known symbol and file, and arbitrary text.
NAMES = st.one_of(st.sampled_from(ALL_SYMBOLS), st.sampled_from(sorted(ALL_FILES)), st.text())
QUERIES = st.one_of(
    st.builds(lambda n: Query(file_containing_symbol=n), NAMES),
    st.builds(lambda n: Query(file_by_filename=n), NAMES),
    st.builds(lambda n: Query(all_extension_numbers_of_type=n), NAMES),
    st.builds(
        lambda n, number: Query(
            file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type=n, extension_number=number
            )
        ),
        NAMES,
        st.integers(0, (1 << 29) - 1),
    ),
    st.just(Query(list_services="")),
)


@pytest.mark.parametrize("listener", REFLECTED)
@settings(max_examples=25, deadline=None, database=None)
@given(queries=st.lists(QUERIES, min_size=1, max_size=40))
def test_no_reflection_answer_names_a_service_the_listener_does_not_serve(
    shared: Running, listener: str, queries: list[Query]
) -> None:
    served = SERVED[listener]
    for answer in reflect(getattr(shared.endpoints, listener), queries):
        for file in described(answer):
            named = {f"{file.package}.{s.name}" for s in file.service}
            assert named <= served, f"{file.name} names {named - served}"
        listed = {s.name for s in answer.list_services_response.service}
        assert listed <= served


def test_the_health_listener_serves_no_reflection(shared: Running) -> None:
    with pytest.raises(grpc.RpcError) as err:
        reflect(shared.endpoints.health, [Query(file_containing_symbol=HEALTH)])
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- bytes that do not parse: INVALID_ARGUMENT on every gRPC listener --------------------

GRPC_LISTENERS = ("internal", "egress", "health")
CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"


def _raw(data: bytes) -> bytes:
    return data


def _parses(data: bytes) -> bool:
    try:
        health_pb2.HealthCheckRequest.FromString(data)
    except Exception:
        return False
    return True


def check_code(target: str, data: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as ch:
        try:
            ch.unary_unary(CHECK, _raw, _raw)(data, timeout=5)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


# Valid messages (any service name) and bytes that are not one (truncated, bad UTF-8).
HEALTH_BYTES = st.one_of(
    st.builds(lambda s: health_pb2.HealthCheckRequest(service=s).SerializeToString(), st.text()),
    st.binary(max_size=64),
    st.just(b"\x0a\x02\xff\xfe"),  # service: not UTF-8
)


@pytest.mark.parametrize("listener", GRPC_LISTENERS)
@settings(max_examples=40, deadline=None, database=None)
@given(data=HEALTH_BYTES)
def test_health_check_answers_bytes_that_do_not_parse_invalid_argument(
    shared: Running, listener: str, data: bytes
) -> None:
    code = check_code(getattr(shared.endpoints, listener), data)
    if _parses(data):
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("listener", GRPC_LISTENERS)
def test_health_watch_answers_bytes_that_do_not_parse_invalid_argument(
    shared: Running, listener: str
) -> None:
    target = getattr(shared.endpoints, listener)
    with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as err:
        list(ch.unary_stream(WATCH, _raw, _raw)(b"\xff\xff\xff", timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_watches_hold_no_thread_of_the_health_listener(shared: Running) -> None:
    """Watch keeps its callback mode behind the parser: more watches than the listener has
    threads, and a Check still answers at once."""
    watches = HEALTH_CALLS - 1
    assert watches > HEALTH_THREADS
    with grpc.insecure_channel(shared.endpoints.health) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
        streams = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(watches)]
        try:
            first = [next(stream).status for stream in streams]
            assert first == [health_pb2.HealthCheckResponse.SERVING] * watches
            resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for stream in streams:
                stream.cancel()


def _file(name: str, body: str, *imports: str) -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name=name, package="sluice_test", syntax="proto3", dependency=imports
    )
    file.message_type.add(name=f"{body}Message")
    service = file.service.add(name=body)
    message = f".sluice_test.{body}Message"
    service.method.add(name="Call", input_type=message, output_type=message)
    return file


def test_a_listener_will_not_reflect_a_file_that_names_another_listeners_service() -> None:
    """A file its services import that defines a service served elsewhere would carry that
    service's RPC names to this listener: the listener is not built."""
    source = descriptor_pool.DescriptorPool()
    source.Add(_file("sluice_test/shared.proto", "Elsewhere"))
    source.Add(_file("sluice_test/own.proto", "Own", "sluice_test/shared.proto"))
    with pytest.raises(ValueError, match=r"shared.proto defines sluice_test.Elsewhere"):
        reflection_pool(["sluice_test.Own"], source)
    both = reflection_pool(["sluice_test.Own", "sluice_test.Elsewhere"], source)
    assert both.FindServiceByName("sluice_test.Elsewhere")
    assert both.FindServiceByName("sluice_test.Own")
