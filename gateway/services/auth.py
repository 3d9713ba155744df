"""One interceptor, one table: who may call which RPC, and within what (services/idle.py).

Every call on a listener goes through AuthInterceptor, in this order, before a byte of its
request is parsed: authenticate the client certificate (mTLS only), check revocation,
authorize by ROLE_TABLE, then admit it within the listener's budget (CallLimits). Only
then is the request decoded (bytes that do not parse: INVALID_ARGUMENT), and a client
stream paced. A unary health Check runs on a pool of its own and never queues behind
streams; Health/Watch keeps its callback mode and holds a call but no thread; a response
stream whose client stops reading is cancelled by the listener's watchdog.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any, NoReturn

import grpc

from sluice.gateway.core.errors import InvalidInput, NotFound, SluiceError, TooLarge, bounded
from sluice.gateway.listeners import handler_parts, parse_request
from sluice.gateway.metrics import Metrics
from sluice.gateway.pki import (
    OPERATOR,
    READER,
    ROLES,
    TRAINER,
    PkiLayout,
    Principal,
    UnknownPrincipal,
    issued_principals,
    principal_from_pem,
)
from sluice.gateway.services import errors
from sluice.gateway.services.chunk_wire import ChunkView, chunk_bytes, decode_push_request
from sluice.gateway.services.idle import Budget, CallLimits, HeldStream, Slot, Watchdog, paced
from sluice.gateway.store.audit import Coalescer
from sluice.gateway.store.sqlite import Store
from sluice.v1 import admin_pb2, egress_pb2, trainer_pb2

log = logging.getLogger(__name__)

_ANY = frozenset(ROLES)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
PUSH_UPDATE = "/sluice.v1.TrainerService/PushUpdate"
IMPORT_BASE = "/sluice.v1.AdminService/ImportBase"

# The one table. A method missing here is denied to everyone, whatever the listener.
# Least privilege: trainers use TrainerService, operators AdminService (GetStatus shows
# them rounds and versions; no raw weights), readers EgressService; health for all.
ROLE_TABLE: Mapping[str, frozenset[str]] = {
    "/sluice.v1.TrainerService/GetRound": frozenset({TRAINER}),
    "/sluice.v1.TrainerService/PullGlobal": frozenset({TRAINER}),
    PUSH_UPDATE: frozenset({TRAINER}),
    "/sluice.v1.AdminService/GetStatus": frozenset({OPERATOR}),
    "/sluice.v1.AdminService/CloseRound": frozenset({OPERATOR}),
    "/sluice.v1.AdminService/Revoke": frozenset({OPERATOR}),
    IMPORT_BASE: frozenset({OPERATOR}),  # a new base from the global program: signed, audited
    "/sluice.v1.EgressService/ListReleases": frozenset({READER}),
    "/sluice.v1.EgressService/GetManifest": frozenset({READER}),
    "/sluice.v1.EgressService/PullRelease": frozenset({READER}),
    HEALTH_CHECK: _ANY,
    "/grpc.health.v1.Health/Watch": _ANY,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _ANY,
}


def _chunk_bytes(message: Any) -> int:
    """Payload bytes a PushUpdate or ImportBase request or a pull response carries: what
    counts as progress. A pull response may come serialized (chunk_wire.chunk_message)."""
    if type(message) is bytes:
        return chunk_bytes(message)
    return len(message.chunk.data) if message.WhichOneof("kind") == "chunk" else 0


def _push_bytes(message: Any) -> int:
    """_chunk_bytes of a decoded PushUpdate request (push_decode), without a copy."""
    if type(message) is ChunkView:
        return len(message.data)
    return _chunk_bytes(message)


# Methods whose messages make measurable progress; the rest are paced by time only.
_REQUEST_PROGRESS: Mapping[str, Callable[[Any], int]] = {
    PUSH_UPDATE: _push_bytes,
    IMPORT_BASE: _chunk_bytes,
}
_RESPONSE_PROGRESS: Mapping[str, Callable[[Any], int]] = {
    "/sluice.v1.TrainerService/PullGlobal": _chunk_bytes,
    "/sluice.v1.EgressService/PullRelease": _chunk_bytes,
}


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


class Certificates:
    """Whose each certificate serial is: what `sluice init` issued, and every certificate
    that has called the gateway (audited once as `cert.seen`, so it survives restarts).
    Revoke checks that the serial it is given belongs to the principal it names."""

    def __init__(self, store: Store, pki: PkiLayout | None) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._owners: dict[int, str] = {}
        for entry in store.audit_entries("cert.seen"):
            self._owners.setdefault(int(entry.subject, 16), entry.actor)
        if pki is not None:
            for serial, principal in issued_principals(pki).items():
                self._owners.setdefault(serial, principal.name)

    def note(self, principal: Principal) -> None:
        with self._lock:
            if principal.serial in self._owners:
                return
            self._owners[principal.serial] = principal.name
        detail = {"role": principal.role, "region": principal.region}
        try:
            self._store.record("cert.seen", principal.name, f"{principal.serial:x}", detail)
        except Exception:  # a full disk must not turn away a valid caller
            log.exception("could not audit the first call of certificate %x", principal.serial)

    def owner(self, serial: int) -> str | None:
        with self._lock:
            return self._owners.get(serial)

    def check_revocation(self, serial: int, principal: str, actor: str) -> None:
        """Raises NotFound or InvalidInput (audited `cert.revoke_refused`) unless the
        certificate with this serial is known and names this principal."""
        owner = self.owner(serial)
        if owner == principal:
            return
        error: SluiceError
        if owner is None:
            error = NotFound(
                f"certificate {serial:x}: not issued by this gateway's PKI and never seen "
                "on a call; revoke with the serial of a certificate the principal holds"
            )
        else:
            error = InvalidInput(
                f"certificate {serial:x} belongs to {owner!r}, not {bounded(principal)!r}; "
                "nothing was revoked"
            )
        self._store.record(
            "cert.revoke_refused",
            actor,
            bounded(principal),
            {"serial": f"{serial:x}", "reason": str(error)},
        )
        raise error


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while shift < 64:
        if pos >= len(data):
            raise InvalidInput("the request is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise InvalidInput("the request holds a malformed varint")


MAX_PUSH_FIELDS = 4  # top-level fields in one PushUpdateRequest (a client sends one)


def push_header_bytes(data: bytes, max_header_bytes: int) -> None:
    """Refuse a serialized PushUpdateRequest whose header field is over max_header_bytes,
    before it is parsed: a 4 MiB header of a few hundred thousand metrics costs about a
    second of CPU (and the GIL) to parse, and is refused by size afterwards anyway. Reads
    only the top-level tags and lengths of at most MAX_PUSH_FIELDS fields."""
    pos, fields, header = 0, 0, 0
    while pos < len(data):
        fields += 1
        if fields > MAX_PUSH_FIELDS:
            raise InvalidInput(
                f"a push message carries one of header, chunk or trailer; this one has more "
                f"than {MAX_PUSH_FIELDS} fields"
            )
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise InvalidInput("the request is truncated: a field runs past its end")
            if key >> 3 == 1:
                header += length
            pos += length
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            return  # a group or garbage: the parser refuses it
    if header > max_header_bytes:
        raise TooLarge(f"update header is {header} bytes; at most {max_header_bytes}")


def _decoded(
    requests: Iterator[bytes],
    decode: Callable[[bytes], Any] | None,
    method: str,
    precheck: Callable[[bytes], None] | None = None,
) -> Iterator[Any]:
    for data in requests:
        yield parse_request(data, decode, method, precheck)


class _Guarded:
    """A method's behaviour behind the interceptor: admit, decode, pace, run, give back."""

    def __init__(
        self,
        interceptor: AuthInterceptor,
        method: str,
        inner: Callable[..., Any],
        decode: Callable[[bytes], Any] | None,
        request_streaming: bool,
        response_streaming: bool,
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._inner = inner
        # PushUpdate's chunks are read as views of the received bytes (push_decode), every
        # other message of it by the generated parser, as is every other method's.
        self._decode = decode_push_request if method == PUSH_UPDATE and decode else decode
        self._request_streaming = request_streaming
        self._response_streaming = response_streaming
        # gRPC reads these two off the behaviour: keep Health/Watch's callback mode (it then
        # holds no thread), and answer Check from a pool that streams cannot fill.
        self.experimental_non_blocking = bool(getattr(inner, "experimental_non_blocking", False))
        self.experimental_thread_pool = interceptor.health_pool if method == HEALTH_CHECK else None

    def __call__(self, request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
        slot = self._interceptor.admit(self._method, context)
        try:
            if self._request_streaming:
                precheck = self._interceptor.precheck(self._method)
                request = self._interceptor.pace(
                    self._method, _decoded(request, self._decode, self._method, precheck)
                )
            else:
                request = parse_request(request, self._decode, self._method)
            result = self._inner(request, context, *callback)
        except SluiceError as exc:
            _answered(slot)
            errors.abort(context, exc)
        except BaseException:
            _answered(slot)
            raise
        if slot is None:
            return result
        if self._response_streaming and not self.experimental_non_blocking:
            held = HeldStream(result, slot, context, _RESPONSE_PROGRESS.get(self._method))
            self._interceptor.watchdog.watch(held, context)
            return held
        if self._response_streaming:
            slot.end_thread()  # Health/Watch: its stream goes on in callbacks, holding no thread
            return result
        _answered(slot)
        return result


def _answered(slot: Slot | None) -> None:
    """The behaviour returned its one answer, or ended the call with a status: nothing of the
    call runs any more, so its thread and its principal's call are given back now, before
    gRPC sends the answer. (Otherwise a client calling again the moment its answer arrived
    could find its call still counted, until gRPC's end-of-call callback ran.)"""
    if slot is not None:
        slot.end_thread()
        slot.end_call()


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call by its client certificate, authorizes it by ROLE_TABLE and
    admits it within CallLimits.

    No certificate reaches here without a valid chain to the CA (TLS refuses it first);
    what arrives may still be revoked, carry no Sluice identity, or not be a client
    certificate (no clientAuth EKU, a CA): UNAUTHENTICATED. A known principal whose role
    the table does not allow: PERMISSION_DENIED. Both audited, repeats coalesced. A
    principal at its cap: RESOURCE_EXHAUSTED; a listener at its budget: UNAVAILABLE.
    With authenticate=False (--insecure-loopback) there are no principals: only the
    listener's budget, pacing and decoding apply.
    """

    def __init__(
        self,
        store: Store,
        listener: str,
        limits: CallLimits,
        audit: Coalescer,
        certificates: Certificates,
        *,
        authenticate: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        limits.check()
        self.store = store
        self.listener = listener
        self.limits = limits
        self.audit = audit
        self.certificates = certificates
        self.authenticate = authenticate  # False: plain text, nobody to authenticate
        self.metrics = metrics or Metrics()
        self.health_pool = futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"{listener}-health"
        )
        self.budget = Budget(limits)
        self.watchdog = Watchdog(limits, listener)

    def start(self) -> None:
        """Start the watchdog for response streams (with the listener)."""
        self.watchdog.start()

    def close(self) -> None:
        self.watchdog.stop()
        self.health_pool.shutdown(wait=False)

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
        return _guarded(self, method, handler)

    def open_calls(self, principal: str) -> int:
        """Calls of a principal open on this listener now (the per-principal cap counts these)."""
        return self.budget.calls(principal)

    def held_threads(self) -> int:
        """Handler threads admitted calls hold on this listener now."""
        return self.budget.threads()

    def admit(self, method: str, context: grpc.ServicerContext) -> Slot | None:
        """Authenticate, authorize and take a slot, or abort; None for a health Check."""
        principal = self._authenticate(method, context)
        if method == HEALTH_CHECK:
            return None  # answered at once on its own pool: holds nothing worth counting
        actor = principal.name if principal is not None else None
        taken = self.budget.take(actor)
        if isinstance(taken, tuple):
            code, why = taken
            self._refuse(context, code, actor or "anonymous", method, why, "auth.limited")
        if not context.add_callback(taken.end_call):  # runs when the RPC ends, however
            taken.end_call()  # it already has: give the slot back now
            taken.end_thread()
            context.abort(grpc.StatusCode.CANCELLED, "the call ended before it started")
        opened = self.metrics.open_calls.labels(self.listener, method)  # a method served here
        opened.inc()
        if not context.add_callback(opened.dec):
            opened.dec()
        return taken

    def precheck(self, method: str) -> Callable[[bytes], None] | None:
        """What to check of a request message's raw bytes before parsing it."""
        if method != PUSH_UPDATE:
            return None
        return functools.partial(push_header_bytes, max_header_bytes=self.limits.max_header_bytes)

    def pace(self, method: str, requests: Iterator[Any]) -> Iterator[Any]:
        progress = _REQUEST_PROGRESS.get(method)
        pace = self.limits.push if progress is not None else self.limits.stream
        return paced(requests, pace, progress)

    def _authenticate(self, method: str, context: grpc.ServicerContext) -> Principal | None:
        if not self.authenticate:
            return None
        try:
            principal = principal_of(context)
        except UnknownPrincipal as exc:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "unknown", method, str(exc))
        if principal is None:
            self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "anonymous",
                method,
                "a client certificate issued by the gateway's CA is required",
            )
        if self.store.is_revoked(principal.serial):
            self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                principal.name,
                method,
                f"certificate {principal.serial:x} of {principal.name!r} is revoked",
            )
        self.certificates.note(principal)
        if principal.role not in ROLE_TABLE.get(method, frozenset()):
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                principal.name,
                method,
                f"{principal.role} {principal.name!r} may not call {method} "
                f"on the {self.listener} listener",
                role=principal.role,
            )
        return principal

    def _refuse(
        self,
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        actor: str,
        method: str,
        why: str,
        kind: str = "auth.denied",
        *,
        role: str = "none",  # the caller's role, where its identity is trusted
    ) -> NoReturn:
        # Labels from fixed sets only: a method served here, a code, a role; never the actor.
        if kind == "auth.denied":
            self.metrics.denied(self.listener, method, code.name, role)
        else:
            self.metrics.calls_limited.labels(self.listener, code.name).inc()
        why = errors.public(why)
        detail = {"listener": self.listener, "status": code.name, "reason": why}
        self.audit.record(
            kind, actor, method, {**detail, "peer": context.peer()}, group=self.listener
        )
        context.abort(code, why)


def _guarded(
    interceptor: AuthInterceptor, method: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler behind the interceptor, taking raw bytes: the request is decoded
    only after the caller is authorized."""
    make, behaviour = handler_parts(handler)
    return make(
        _Guarded(
            interceptor,
            method,
            behaviour,
            handler.request_deserializer,
            handler.request_streaming,
            handler.response_streaming,
        ),
        request_deserializer=None,  # raw bytes: nothing is parsed before authorization
        response_serializer=_serializer(handler.response_serializer),
    )


def _serializer(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """The handler's serializer, passing through messages a servicer serialized itself
    (bytes: the pulls' chunks, chunk_wire.chunk_message)."""
    if serialize is None:
        return None

    def serialized(message: Any) -> bytes:
        return message if type(message) is bytes else serialize(message)

    return serialized


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
