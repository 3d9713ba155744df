"""The one table from domain errors to gRPC statuses, applied in one place."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import grpc

from sluice.gateway.core import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.SluiceError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IntegrityError: grpc.StatusCode.DATA_LOSS,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Conflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PolicyRefused: grpc.StatusCode.PERMISSION_DENIED,
    errors.Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    errors.Idle: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Busy: grpc.StatusCode.ABORTED,  # the SDK retries ABORTED
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,  # and UNAVAILABLE: a full disk, say
}


def status_for(exc: errors.SluiceError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:  # walk the hierarchy, like Starlette's handlers
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


# gRPC carries the message in a header and refuses headers over 16 KiB (percent-encoded,
# up to 12 bytes a character): a longer message would replace the answer with a transport
# error. Callers bound what they echo (errors.bounded); this is the last net.
MAX_MESSAGE_CHARS = 1024


def public(message: str) -> str:
    """A status message cut to what the transport always carries."""
    return errors.bounded(message, MAX_MESSAGE_CHARS)


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    if isinstance(exc, errors.SluiceError):
        context.abort(status_for(exc), public(str(exc)))
    ref = uuid.uuid4().hex[:12]
    log.error("internal error %s", ref, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see the gateway log")


@contextmanager
def mapped_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn any exception raised inside into context.abort with the table's status."""
    try:
        yield
    except errors.SluiceError as exc:
        abort(context, exc)
    except grpc.RpcError:
        raise  # the call itself failed (client cancelled, or abort already raised)
    except Exception as exc:
        if not context.is_active():
            raise  # the client went away mid-stream; nothing to answer
        abort(context, exc)
