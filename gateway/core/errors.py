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
├── Busy                try again shortly (a buffer being folded)
└── Unavailable         the gateway's storage failed (disk full, I/O error): retry later
"""

from __future__ import annotations

import errno
import sqlite3


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


class Unavailable(SluiceError):
    pass


# A write or read of the gateway's own storage that failed for a reason that may go away:
# a full disk or quota, an I/O error, no memory.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EIO: "I/O error", errno.ENOMEM: "out of memory"}  # fmt: skip
_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_NOMEM = 13, 10, 7  # primary result codes


def storage_fault(exc: BaseException) -> str | None:
    """What went wrong if exc is a storage failure worth retrying later, else None."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return _STORAGE_ERRNOS[exc.errno]
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # extended codes keep the primary
        if code == _SQLITE_FULL:
            return "no space left on device (database)"
        if code in (_SQLITE_IOERR, _SQLITE_NOMEM):
            return f"database {getattr(exc, 'sqlite_errorname', 'error')}"
    return None
