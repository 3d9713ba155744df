"""Domain errors of the gateway; services map each class to one gRPC status in one table.

SluiceError
├── InvalidInput        malformed header, wrong sizes, non-finite values, bad order
├── IntegrityError      payload bytes do not match their declared sha256
├── TooLarge            a header or chunk over its limit
├── NotFound            unknown model, round, version or release
├── Conflict            an update id reused for different content
├── PreconditionFailed  schema mismatch, stale base version, round not open
├── PolicyRefused       the egress policy refuses a release
├── Forbidden           a known principal acting outside its rights (another region)
├── Idle                a stream that stopped sending
└── Busy                try again shortly (a buffer being folded)
"""

from __future__ import annotations


class SluiceError(Exception):
    """Base of every error a caller may see; the message is meant for a person."""


class InvalidInput(SluiceError):
    pass


class IntegrityError(SluiceError):
    pass


class TooLarge(SluiceError):
    pass


class NotFound(SluiceError):
    pass


class Conflict(SluiceError):
    pass


class PreconditionFailed(SluiceError):
    pass


class PolicyRefused(SluiceError):
    pass


class Forbidden(SluiceError):
    pass


class Idle(SluiceError):
    pass


class Busy(SluiceError):
    pass


def bounded(text: str, limit: int = 64) -> str:
    """A caller- or file-controlled string cut to `limit` characters for a message or the
    audit log: echoing it whole would let its size choose the answer (gRPC refuses
    metadata over 16 KiB) and fill the log."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"
