"""sha256 over runs of zero bytes, remembered: the structure hash of a single-file model
hashes a zero for every weight byte (hundreds of MB), the same runs after the same bytes
on every release of a model."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

_ZEROS = bytes(1 << 20)
MAX_ENTRIES = 4096  # a few hundred per model (one per weight); an entry is ~0.2 KB
MIN_RUN = 1 << 16  # shorter runs hash faster than a lookup is worth


class ZeroRuns:
    """Feeds `n` zero bytes to a sha256 object; returns the object to continue with.

    The state after the zeros is a function of the bytes hashed before them and of n. The
    bytes before are named by their own sha256 (a finalized copy of the digest): two
    prefixes share it only if they are the same bytes (else sha256 has a collision), so a
    remembered state is the state the zeros would have produced, and the result is the
    same hash, bit for bit, as feeding the zeros. Bounded: least recently used first out.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max = max_entries
        self._after: OrderedDict[tuple[bytes, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def feed(self, digest: Any, n: int) -> Any:
        if n < MIN_RUN:
            _feed_zeros(digest, n)
            return digest
        key = (digest.copy().digest(), n)
        with self._lock:
            known = self._after.get(key)
            if known is not None:
                self._after.move_to_end(key)
                return known.copy()
        _feed_zeros(digest, n)
        with self._lock:
            self._after[key] = digest.copy()
            while len(self._after) > self._max:
                self._after.popitem(last=False)
        return digest

    def __len__(self) -> int:
        with self._lock:
            return len(self._after)


def _feed_zeros(digest: Any, n: int) -> None:
    for at in range(0, n, len(_ZEROS)):
        digest.update(_ZEROS[: min(len(_ZEROS), n - at)])


ZERO_RUNS = ZeroRuns()  # shared by every structure hash in the process
