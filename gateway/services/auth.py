"""One authorization interceptor, one table: which roles may call which RPC, and stream limits."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.pki import (
    OPERATOR,
    READER,
    ROLES,
    TRAINER,
    Principal,
    UnknownPrincipal,
    principal_from_pem,
)
from gateway.store.sqlite import Store
from sluice.v1 import admin_pb2, egress_pb2, trainer_pb2

log = logging.getLogger(__name__)

_ANY = frozenset(ROLES)

# The one table. A method missing here is denied to everyone, whatever the listener.
ROLE_TABLE: Mapping[str, frozenset[str]] = {
    "/sluice.v1.TrainerService/GetRound": frozenset({TRAINER, OPERATOR}),
    "/sluice.v1.TrainerService/PullGlobal": frozenset({TRAINER, OPERATOR}),
    "/sluice.v1.TrainerService/PushUpdate": frozenset({TRAINER}),
    "/sluice.v1.AdminService/GetStatus": frozenset({OPERATOR}),
    "/sluice.v1.AdminService/CloseRound": frozenset({OPERATOR}),
    "/sluice.v1.AdminService/Revoke": frozenset({OPERATOR}),
    "/sluice.v1.EgressService/ListReleases": frozenset({READER}),
    "/sluice.v1.EgressService/GetManifest": frozenset({READER}),
    "/sluice.v1.EgressService/PullRelease": frozenset({READER}),
    "/grpc.health.v1.Health/Check": _ANY,
    "/grpc.health.v1.Health/Watch": _ANY,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _ANY,
}


@dataclass(frozen=True)
class StreamLimits:
    max_streams_per_principal: int = 8  # concurrent calls of one principal on one listener


@functools.lru_cache(maxsize=1024)
def _principal(pem: bytes) -> Principal:
    return principal_from_pem(pem)


def principal_of(context: grpc.ServicerContext) -> Principal | None:
    """The caller's principal from its verified client certificate, None in plain-text mode."""
    # The stubs type the values as bytes; gRPC hands over a list of bytes per property.
    properties: Mapping[str, Any] = context.auth_context()
    pems: list[bytes] | None = properties.get("x509_pem_cert")
    if not pems:
        return None
    return _principal(pems[0])


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    guard: Callable[[grpc.ServicerContext], Callable[[], None]],
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, with guard(context) run first; guard returns the release callback."""

    def around(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            release = guard(context)
            if not context.add_callback(release):  # runs when the RPC ends, however it ends
                release()  # it already has: give the slot back now
                context.abort(grpc.StatusCode.CANCELLED, "the call ended before it started")
            return behaviour(request, context)

        return call

    make: Callable[..., grpc.RpcMethodHandler[Any, Any]]
    behaviour: Any
    if handler.unary_unary:
        make, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        make, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        make, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        make, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return make(
        around(behaviour),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call by its client certificate and authorizes it by ROLE_TABLE.

    No certificate reaches here without a valid chain to the CA (TLS refuses it first);
    what arrives may still be revoked or carry no Sluice identity: UNAUTHENTICATED. A
    known principal whose role the table does not allow: PERMISSION_DENIED. Both audited.
    """

    def __init__(self, store: Store, listener: str, limits: StreamLimits) -> None:
        self.store = store
        self.listener = listener
        self.limits = limits
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            # Not served on this listener: still authenticate and authorize first, so that
            # only a known principal with the right role learns that it is not here.
            handler = _unimplemented_handler(method)
            if handler is None:
                return None
        return _wrap(handler, functools.partial(self._admit, method))

    def open_calls(self, principal: str) -> int:
        """Calls of a principal open on this listener now (the stream limit counts these)."""
        with self._lock:
            return self._active.get(principal, 0)

    def _deny(
        self,
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        actor: str,
        method: str,
        why: str,
    ) -> None:
        self.store.record(
            "auth.denied",
            actor,
            method,
            {"listener": self.listener, "status": code.name, "reason": why, "peer": context.peer()},
        )
        context.abort(code, why)

    def _admit(self, method: str, context: grpc.ServicerContext) -> Callable[[], None]:
        try:
            principal = principal_of(context)
        except UnknownPrincipal as exc:
            self._deny(context, grpc.StatusCode.UNAUTHENTICATED, "unknown", method, str(exc))
            raise AssertionError("unreachable") from exc
        if principal is None:
            self._deny(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "anonymous",
                method,
                "a client certificate issued by the gateway's CA is required",
            )
        assert principal is not None
        if self.store.is_revoked(principal.serial):
            self._deny(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                principal.name,
                method,
                f"certificate {principal.serial:x} of {principal.name!r} is revoked",
            )
        if principal.role not in ROLE_TABLE.get(method, frozenset()):
            self._deny(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                principal.name,
                method,
                f"{principal.role} {principal.name!r} may not call {method} "
                f"on the {self.listener} listener",
            )
        key = principal.name
        with self._lock:
            if self._active.get(key, 0) >= self.limits.max_streams_per_principal:
                busy = True
            else:
                busy = False
                self._active[key] = self._active.get(key, 0) + 1
        if busy:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{principal.name!r} already has {self.limits.max_streams_per_principal} "
                "calls open on this listener; wait for one to finish",
            )

        def release() -> None:
            with self._lock:
                self._active[key] -= 1

        return release


def _unimplemented(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not served on this listener")


def _streaming_kinds() -> dict[str, tuple[bool, bool]]:
    """'/pkg.Service/Method' -> (client streaming, server streaming) for every Sluice RPC."""
    kinds = {}
    for module in (admin_pb2, egress_pb2, trainer_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                kinds[f"/{service.full_name}/{m.name}"] = (m.client_streaming, m.server_streaming)
    return kinds


_KINDS = _streaming_kinds()


def _unimplemented_handler(method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
    kind = _KINDS.get(method)
    if kind is None:
        return None
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(_unimplemented)
