"""Tags of a release file's pieces: what lets the egress gate send a file piece by piece
and still send only the bytes its checks read.

While the guard reads a file it tags every `size`-byte piece with Poly1305 under a key
drawn from the OS for that piece alone and kept only in this process's memory; the gate
reads each piece again to send it and sends it only if it still has its tag. Poly1305 is a
one-time authenticator: with a key never seen outside the process, any changed piece has
the same tag with probability below 2^-80 (2 MiB pieces: 8 * 2^17 blocks / 2^106), each try
of which withholds the pull and is audited. It costs ~0.2 s of CPU per GB here, where a
sha256 of each piece cost ~0.7.

A file's tags are also a cheaper proof that it still holds the bytes an earlier check read:
tags recorded while those bytes hashed to the signed sha256 verify again only if every
piece is unchanged (`PieceCheck`), so a later pull checks them instead of the whole-file
sha256. They are recorded by the guard's check at publish and, for a release published
before the gateway started, by its first pull (`PieceCache`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

_KEY_BYTES = 32


@dataclass(frozen=True)
class Pieces:
    """The tag of each `size`-byte piece of one file (the last one may be shorter)."""

    size: int
    keys: tuple[bytes, ...] = field(repr=False)  # secret: never in a log or a message
    tags: tuple[bytes, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.tags)

    def matches(self, index: int, data: bytes | memoryview) -> bool:
        """Whether data is piece `index` as it was tagged."""
        if not 0 <= index < len(self.tags):
            return False
        try:
            Poly1305.verify_tag(self.keys[index], data, self.tags[index])
        except InvalidSignature:
            return False
        return True


class PieceTags:
    """Tags each piece of one file, fed in order as the checks read it."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("a piece holds at least one byte")
        self.size = size
        self._keys: list[bytes] = []
        self._tags: list[bytes] = []
        self._mac: Poly1305 | None = None
        self._filled = 0

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            if self._mac is None:
                key = os.urandom(_KEY_BYTES)
                self._keys.append(key)
                self._mac = Poly1305(key)
            take = min(len(view), self.size - self._filled)
            self._mac.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.size:
                self._close()

    def _close(self) -> None:
        assert self._mac is not None
        self._tags.append(self._mac.finalize())
        self._mac, self._filled = None, 0

    def finish(self) -> Pieces:
        if self._mac is not None:
            self._close()
        return Pieces(self.size, tuple(self._keys), tuple(self._tags))

    def proof(self) -> Callable[[], PieceCheck]:
        """Once every byte was fed: a fresh PieceCheck of these tags per call."""
        pieces = self.finish()
        return functools.partial(PieceCheck, pieces)


class PieceCheck:
    """Verifies a file, fed in order from its start, against the tags of an earlier read:
    `whole()` is True only if every piece matched and nothing was missing or left over."""

    def __init__(self, pieces: Pieces) -> None:
        self.pieces = pieces
        self._index = 0
        self._mac: Poly1305 | None = None
        self._filled = 0
        self.first_bad: int | None = None  # the first piece that did not match

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view) and self.first_bad is None:
            if self._index >= len(self.pieces):
                self.first_bad = self._index  # longer than the file that was tagged
                return
            if self._mac is None:
                self._mac = Poly1305(self.pieces.keys[self._index])
            take = min(len(view), self.pieces.size - self._filled)
            self._mac.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.pieces.size:
                self._close()

    def _close(self) -> None:
        assert self._mac is not None
        mac, self._mac, self._filled = self._mac, None, 0
        try:
            mac.verify(self.pieces.tags[self._index])
        except InvalidSignature:
            self.first_bad = self._index
        self._index += 1

    def whole(self) -> bool:
        if self._mac is not None and self.first_bad is None:
            self._close()  # the last, shorter piece
        if self.first_bad is None and self._index != len(self.pieces):
            self.first_bad = self._index  # shorter than the file that was tagged
        return self.first_bad is None


class PieceCache:
    """Piece tags of release files, by the signed sha256 and piece size they were recorded
    for (while the bytes hashed to that sha256); the most recent `entries`. Shared by
    publish, which records a release's tags as its guard reads it, and the egress gate."""

    def __init__(self, entries: int = 64) -> None:
        self._entries = entries
        self._tags: OrderedDict[tuple[str, int], Pieces] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str, piece_bytes: int) -> Pieces | None:
        with self._lock:
            pieces = self._tags.get((sha256, piece_bytes))
            if pieces is not None:
                self._tags.move_to_end((sha256, piece_bytes))
            return pieces

    def put(self, sha256: str, size: int, pieces: Pieces) -> None:
        """Tags of a file of `size` bytes that hashed to sha256 as they were recorded."""
        if len(pieces) != -(-size // pieces.size):
            raise ValueError(f"{len(pieces)} tags for {size} bytes in pieces of {pieces.size}")
        with self._lock:
            self._tags[(sha256, pieces.size)] = pieces
            self._tags.move_to_end((sha256, pieces.size))
            while len(self._tags) > self._entries:
                self._tags.popitem(last=False)
