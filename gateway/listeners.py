"""The gateway's ports: addresses checked and every port bound before the slow part of a
start (a port in use fails at once, in one line), and the two gRPC listeners built."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sluice.gateway.config import Config
from sluice.gateway.core.errors import InvalidInput
from sluice.gateway.pki import PkiLayout, key_matches_cert
from sluice.gateway.services.health import Health

log = logging.getLogger(__name__)

_MESSAGE_SLACK = 64 << 10  # room for the chunk message's own fields
# gRPC's bandwidth-delay probing grows each stream's receive window past what a handler
# writing to disk can take in, and the bytes received ahead of it pile up in the gateway:
# 16 pushes of a 404 MB model peaked at 3.5-8.9x the model with it, 1.06-1.10x without,
# at the same total rate (the disk's); one push ran 15-25% faster without it (bench/README).
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.http2.bdp_probe", 0),
)
# Each address setting: what it serves, for messages.
ADDRESSES: Mapping[str, str] = {
    "internal_address": "internal listener",
    "egress_address": "egress listener",
    "ops_address": "operations listener, HTTP",
    "health_address": "operations listener, gRPC health",
}


class StartupError(RuntimeError):
    """The gateway will not start; the message says why and what to do."""


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError when it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r}: expected host:port, e.g. 127.0.0.1:7070 or [::1]:7070")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _hint(setting: str) -> str:
    return f"set {setting} (sluice.toml, SLUICE_{setting.upper()} or its flag)"


def check_addresses(config: Config) -> None:
    """Every address well formed and no two the same port; plain text on loopback only."""
    seen: dict[tuple[str, int], str] = {}
    for setting in ADDRESSES:
        address = getattr(config, setting)
        if not address:
            if setting in ("internal_address", "egress_address"):
                raise StartupError(f"{setting} is empty: the {ADDRESSES[setting]} needs one")
            continue  # an operations listener turned off
        try:
            key = split_address(address)
        except ValueError as exc:
            raise StartupError(f"{setting} {exc}") from None
        if key[1] and key in seen:
            raise StartupError(
                f"{seen[key]} and {setting} are both {address}: each listener needs a port "
                f"of its own; {_hint(setting)}"
            )
        seen[key] = setting
    if config.insecure_loopback:
        for address in (config.internal_address, config.egress_address):
            if not is_loopback(address):
                raise ValueError(
                    f"{address}: --insecure-loopback binds loopback addresses only; "
                    "anything else needs mTLS"
                )


def warn_exposed(config: Config) -> None:
    """At start: plain-text listeners, and operations listeners that others can reach."""
    if config.insecure_loopback:
        log.warning(
            "INSECURE: plain-text listeners, no client certificates, no roles: "
            "loopback demos and tests only"
        )
    for setting in ("ops_address", "health_address"):
        address = getattr(config, setting)
        if address and not is_loopback(address):
            log.warning(
                "%s %s is not loopback: metrics and health are served without TLS or "
                "authentication to whoever reaches it; let a network policy decide who does",
                setting,
                address,
            )


def claim(address: str, setting: str) -> None:
    """Fail now, in one line, if `address` cannot be bound (in use, not this host's): gRPC
    would say so only in its own log. A check, not a reservation: the bind follows at once."""
    host, port = split_address(address)
    what = ADDRESSES.get(setting, setting)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(
            f"{setting} {address}: cannot resolve {host!r} ({exc.strerror}); {_hint(setting)}"
        ) from None
    failed: list[OSError] = []
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"port {address} ({what}) is in use: {exc.strerror}; stop what "
                        f"listens there, or {_hint(setting)}"
                    ) from None
                failed.append(exc)
    if failed and len(failed) == len(found):  # gRPC binds what it can of a name's addresses
        raise StartupError(
            f"cannot bind {address} ({what}): {failed[0].strerror}; {_hint(setting)}"
        )


def bind(
    server: grpc.Server, address: str, setting: str, creds: grpc.ServerCredentials | None
) -> str:
    """Bind `server` to `address` now (it listens; calls wait until it starts); the address
    with the port bound."""
    claim(address, setting)
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        port, why = 0, str(exc).split(";")[0]
    else:
        why = "gRPC bound no address"
    if port == 0:
        raise StartupError(f"cannot bind {address} ({ADDRESSES[setting]}): {why}")
    return f"{address.rsplit(':', 1)[0]}:{port}"


def grpc_listener(
    config: Config, services: tuple[str, ...], interceptors: list[grpc.ServerInterceptor]
) -> tuple[grpc.Server, Health]:
    """A gRPC server for `services`, with health and reflection listing only those, and
    reflection describing only their files (reflection_pool)."""
    limit = config.max_chunk_bytes + _MESSAGE_SLACK
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            *GRPC_OPTIONS,
        ],
    )
    checker = Health(config.send_stall_seconds)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    listed = (*services, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(listed, server, pool=reflection_pool(listed))
    for name in services:
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, checker


def reflection_pool(
    services: Iterable[str], source: descriptor_pool.DescriptorPool | None = None
) -> descriptor_pool.DescriptorPool:
    """The descriptors reflection on a listener may describe: the files of `source` (the
    default pool) that define its `services` and the files they import, nothing else. The
    default pool holds every file the process imported (trainer.proto and admin.proto on
    the egress listener too), and reflection answers any symbol or file name it holds;
    from this pool, the other listeners' services, methods and messages are NOT_FOUND.

    A file among them that defines a service not in `services` is refused (ValueError): a
    shared file (tensors.proto: messages only) would otherwise carry another listener's RPC
    names to every listener that imports it. Its messages are described wherever it is
    imported: shared files hold only what every side may see."""
    served = set(services)
    source = source or descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # a file's imports go into a pool before it
            add(dependency)
        others = sorted(
            service.full_name
            for service in file.services_by_name.values()
            if service.full_name not in served
        )
        if others:
            raise ValueError(
                f"{file.name} defines {', '.join(others)}, not served on this listener: "
                "move what both sides share into a file without services"
            )
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for name in sorted(served):
        try:
            file = source.FindFileContainingSymbol(name)
        except KeyError:  # no descriptor loaded: reflection could not describe it anyway
            continue
        add(file)
    return pool


def handler_parts(
    handler: grpc.RpcMethodHandler[Any, Any],
) -> tuple[Callable[..., grpc.RpcMethodHandler[Any, Any]], Any]:
    """How to make a handler of the same kind (unary or streaming, each way), and its
    behaviour: for an interceptor that wraps the behaviour and keeps the kind."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler, handler.unary_unary
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler, handler.unary_stream
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler, handler.stream_unary
    return grpc.stream_stream_rpc_method_handler, handler.stream_stream


def parse_request(
    data: bytes,
    decode: Callable[[bytes], Any] | None,
    method: str,
    precheck: Callable[[bytes], None] | None = None,
) -> Any:
    """A request's bytes parsed by `decode` (None: the bytes as they are); InvalidInput
    for bytes that do not parse, or that `precheck` refuses."""
    if decode is None:
        return data
    if precheck is not None:
        try:
            precheck(data)
        except InvalidInput as exc:
            raise InvalidInput(f"the request is not a valid message for {method}: {exc}") from None
    try:
        return decode(data)
    except Exception:  # protobuf's DecodeError, or whatever a parser raises on garbage
        raise InvalidInput(f"the request is not a valid message for {method}") from None


class RequestParser(grpc.ServerInterceptor):
    """For a gRPC server without services/auth.py's interceptor (which parses the same way,
    after admission): each request is parsed by the method's behaviour, not by gRPC, which
    answers bytes its deserializer refuses with INTERNAL ("Exception deserializing
    request!"). Here they are INVALID_ARGUMENT, and nothing else changes: the behaviour's
    callback mode (Health/Watch) and thread pool are kept."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        make, behaviour = handler_parts(handler)
        parsed = _Parsed(
            handler_call_details.method,
            behaviour,
            handler.request_deserializer,
            handler.request_streaming,
        )
        return make(
            parsed, request_deserializer=None, response_serializer=handler.response_serializer
        )


class _Parsed:
    """A behaviour that parses its request bytes itself; bytes that do not parse end the
    call with INVALID_ARGUMENT (the message services/auth.py gives)."""

    def __init__(
        self,
        method: str,
        inner: Callable[..., Any],
        parse: Callable[[bytes], Any],
        request_streaming: bool,
    ) -> None:
        self._method = method
        self._inner = inner
        self._parse = parse
        self._request_streaming = request_streaming
        # gRPC reads these two off the behaviour.
        self.experimental_non_blocking = bool(getattr(inner, "experimental_non_blocking", False))
        self.experimental_thread_pool = getattr(inner, "experimental_thread_pool", None)

    def __call__(self, request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
        if self._request_streaming:
            request = self._each(request, context)
        else:
            request = self._one(request, context)
        return self._inner(request, context, *callback)

    def _each(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        for data in requests:
            yield self._one(data, context)

    def _one(self, data: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return parse_request(data, self._parse, self._method)
        except InvalidInput as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def server_credentials(layout: PkiLayout, listener: str) -> grpc.ServerCredentials:
    """TLS with a required client certificate from the CA, for one listener."""
    paths = (layout.server_key(listener), layout.server_cert(listener), layout.ca_cert)
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        # The advice first, the directory once: a long path must not push it off the line.
        raise FileNotFoundError(
            f"no TLS material for the {listener} listener: run `sluice init "
            f"{layout.directory}` (or use --insecure-loopback for a loopback demo); missing "
            f"there: {', '.join(missing)}"
        )
    if not key_matches_cert(layout.server_cert(listener), layout.server_key(listener)):
        raise StartupError(
            f"{layout.server_key(listener)} and {layout.server_cert(listener)} are unreadable or "
            f"not a pair: run `sluice init {layout.directory}` again to reissue them"
        )
    key, cert, ca = (p.read_bytes() for p in paths)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def release_unstarted(server: grpc.Server) -> None:
    """Give back the port of a server bound but never started: gRPC keeps it until the
    server has started and stopped."""
    server.start()
    stop_server(server, None)


STOP_S = 30.0  # past a stop's grace, the longest a stop waits for gRPC to say it ended


def stop_server(server: grpc.Server, grace: float | None) -> None:
    """Stop a gRPC server, waiting at most grace + STOP_S for it to end: a server whose
    own thread is stuck must not hold the process's stop (or a test's teardown) forever."""
    if not server.stop(grace).wait((grace or 0.0) + STOP_S):
        log.warning("a gRPC server did not end within %.0f s of its stop", (grace or 0.0) + STOP_S)
