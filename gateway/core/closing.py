"""What a failed round close means, and the checks that tell: spool integrity, finite weights.

A close fails in one of three ways (RoundManager sorts them; README: rounds and updates):

- `CorruptUpdates`: spool files that no longer hash to their names (changed, truncated or
  missing after the push was acknowledged); those updates are excluded and the close runs
  again without them;
- `CloseRefused`: a reason that will not go away (weights that are not finite, a corrupt
  base, a sum of examples past what can be stored, a strategy's refusal); the round fails;
- anything else, storage faults first (`errors.storage_fault`): retried with backoff.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sluice.gateway.core.errors import InvalidInput, NotFound, PreconditionFailed
from sluice.gateway.core.finite import FiniteCheck
from sluice.gateway.store.blobs import BlobStore
from sluice.models.schema import Schema

# Threads hashing the files a close checks this way (the base version's weights; the
# updates are checked by the read that folds or scans them: core/scan.py).
CHECK_WORKERS = 2


class CloseRefused(Exception):
    """The round can never be folded as it is; the message says why, for the audit log."""


class CorruptUpdates(Exception):
    """Spool files that are not what was acknowledged: payload sha256 -> what is wrong."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        super().__init__(f"{len(problems)} corrupt spool file(s)")
        self.problems = dict(problems)


@dataclass(frozen=True)
class Retry:
    """A close that failed for a reason that may go away: when to try it again."""

    attempts: int
    due: float  # time.monotonic() of the next attempt
    error: str


class SpoolCheck:
    """The sha256 and size of files a close reads, checked in worker threads while the
    close goes on (the base version's weights, read by the fold through the page cache).
    Memory: one 1 MiB buffer per worker."""

    def __init__(self, blobs: BlobStore, size: int, shas: Iterable[str]) -> None:
        pool = ThreadPoolExecutor(max_workers=CHECK_WORKERS, thread_name_prefix="spool-check")
        self._checks: dict[str, Future[str]] = {
            sha: pool.submit(blobs.verify, sha, size) for sha in dict.fromkeys(shas)
        }
        pool.shutdown(wait=False)  # the checks run on; the threads end with the last one

    def problems(self) -> dict[str, str]:
        """sha256 -> what is wrong with that file, once every check has finished; raises
        what a read raised (an I/O error is the storage's fault, not the file's)."""
        return {sha: why for sha, check in self._checks.items() if (why := check.result())}


def check_finite(schema: Schema, path: Path, what: str) -> None:
    """Refuse a file in payload layout holding NaN or Inf in a float tensor."""
    check = FiniteCheck(schema)
    with path.open("rb") as f:
        while data := f.read(8 << 20):
            feed(check, data, what)


def feed(check: FiniteCheck, data: bytes | memoryview, what: str) -> None:
    """FiniteCheck.feed, its refusal restated as a refused close."""
    try:
        check.feed(data)
    except InvalidInput as exc:
        found = str(exc).split(";")[0]  # "tensor 'x': element 5 is inf"
        raise CloseRefused(f"{what} is not finite ({found})") from None


def deterministic(exc: BaseException) -> bool:
    """Whether a close that raised exc would raise it again, whatever the retry: the
    strategy's and the numbers' refusals, not the storage's."""
    return isinstance(exc, ValueError | ArithmeticError | PreconditionFailed | NotFound)
