"""How a call ended, as a gRPC status code name: what the servicers' metrics are labelled by."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from sluice.gateway.core.errors import SluiceError
from sluice.gateway.services.errors import status_for


@contextmanager
def call_status(record: Callable[[str], None]) -> Iterator[None]:
    """Run a servicer's body and record how it ended: OK, the table's code for a Sluice
    error, CANCELLED for a client gone (its request stream failed, or gRPC closed a
    response stream early), INTERNAL for anything else. Used inside `mapped_errors`, which
    turns the exception into the answer."""
    status = "UNKNOWN"
    try:
        yield
        status = "OK"
    except SluiceError as exc:
        status = status_for(exc).name
        raise
    except GeneratorExit:  # gRPC closed the response stream: the client went away
        status = "CANCELLED"
        raise
    except grpc.RpcError:  # reading the request stream of a client that went away
        status = "CANCELLED"
        raise
    except Exception:
        status = "INTERNAL"
        raise
    finally:
        record(status)
