"""The egress gate: what the cross-border side may list and pull, decided from signed facts
only, each call audited with who asked, what for and what came of it."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sluice.gateway.core.errors import IntegrityError, InvalidInput, NotFound, SluiceError, bounded
from sluice.gateway.core.records import Release, ReleaseFile
from sluice.gateway.export.guard import GuardRefused
from sluice.gateway.export.pieces import PieceCache, Pieces, PieceTags
from sluice.gateway.export.release_check import ReleaseChecker, SignedRelease
from sluice.gateway.metrics import Metrics
from sluice.gateway.store.audit import Coalescer
from sluice.gateway.store.chunks import SEND_CHUNK_BYTES
from sluice.gateway.store.sqlite import Store
from sluice.models.manifest import MODEL_FILE


@dataclass(frozen=True)
class Caller:
    """Who is asking: the principal of the client certificate (or "anonymous" in plain-text
    loopback mode) and the transport peer."""

    principal: str
    peer: str


@dataclass(frozen=True)
class Listed:
    release: Release  # signed facts only
    withheld: bool  # its files or policy fail the guard now: a pull would be refused


@dataclass(frozen=True)
class Pull:
    release: Release
    file: ReleaseFile
    chunks: Iterator[tuple[int, bytes]]  # (offset, data) from the requested offset
    close: Callable[[], None]  # gives the descriptor back (idempotent), streamed or not


@dataclass
class _Opened:
    """The descriptor a pull streams from, and the tags of the pieces the checks read."""

    fd: int = -1
    pieces: Pieces | None = None


class _Withheld(Exception):
    """A candidate release failed the checks; the reason goes to the audit log only."""

    def __init__(self, version: int, reason: str, layers: tuple[str, ...]) -> None:
        super().__init__(reason)
        self.version = version
        self.reason = reason
        self.layers = layers


class EgressGate:
    """Lists, manifests and pulls for readers. Every call is audited; repeats of a listing,
    a manifest, a refusal or a skip go through `coalesce` (one row per window with a count,
    so a reader in a loop cannot flood the log), while each pull that sends bytes is a row
    of its own."""

    def __init__(
        self,
        store: Store,
        checker: ReleaseChecker,
        coalesce: Coalescer | None = None,
        *,
        metrics: Metrics | None = None,
        pieces: PieceCache | None = None,
    ) -> None:
        self.store = store
        self.checker = checker
        self._pieces = pieces or PieceCache()  # shared with publish, which fills it too
        self.coalesce = coalesce
        self.metrics = metrics or Metrics()

    # -- what readers may call ------------------------------------------------------------

    def releases(self, caller: Caller, model: str = "") -> list[Listed]:
        """Releases whose manifests verify, newest first, each marked withheld or not; rows
        whose manifest does not verify are not releases and are left out."""
        listed, withheld, unsigned = [], [], []
        for row in self.store.list_releases(model):
            try:
                signed = self.checker.signed(row)
            except GuardRefused:
                unsigned.append(row.version)
                continue
            ok = self._looks_intact(signed)
            if not ok:
                withheld.append(row.version)
            listed.append(Listed(signed.release, withheld=not ok))
        self._audit(
            "egress.list",
            caller,
            bounded(model) if model else "*",
            {"asked": {"model": bounded(model)}, "outcome": "ok", "listed": len(listed)}
            | ({"withheld": withheld} if withheld else {})
            | ({"unsigned": unsigned} if unsigned else {}),
        )
        return listed

    def manifest(self, caller: Caller, model: str, version: int) -> Release:
        """The signed manifest of a release (0: the newest intact one)."""
        asked = {"model": bounded(model), "version": version}
        subject = f"{bounded(model)}/release/{version or 'newest'}"
        try:
            signed = self._resolve(caller, model, version, thorough=False)
        except _Withheld as exc:
            raise self._withheld(caller, asked, model, exc) from None
        except SluiceError as exc:
            self._refused(caller, subject, asked, exc)
            raise
        r = signed.release
        self._audit(
            "egress.manifest", caller, f"{r.model}/release/{r.version}", asked | {"outcome": "ok"}
        )
        return r

    def open_pull(self, caller: Caller, model: str, version: int, file: str, offset: int) -> Pull:
        """Check the whole release against its signed manifest, audit, then stream the file
        from the descriptor the checks read."""
        name = file or MODEL_FILE
        asked = {"model": bounded(model), "version": version, "file": bounded(name)}
        asked["offset"] = offset
        subject = f"{bounded(model)}/release/{version or 'newest'}/{bounded(name)}"
        opened = _Opened()
        try:
            signed = self._resolve(caller, model, version, thorough=True, file=name, fds=opened)
        except _Withheld as exc:
            raise self._withheld(caller, asked, model, exc) from None
        except SluiceError as exc:
            self._refused(caller, subject, asked, exc)
            raise
        fd = opened.fd
        try:
            r, entry = signed.release, signed.files[name]
            subject = f"{r.model}/release/{r.version}/{entry.name}"
            if offset > entry.size:
                past = InvalidInput(f"offset {offset} is past the end ({entry.size} bytes)")
                self._refused(caller, subject, asked, past)
                raise past
            self._audit(
                "egress.pull", caller, subject, asked | {"outcome": "sending"}, repeatable=False
            )
        except BaseException:
            os.close(fd)
            raise

        def interrupted(reason: str) -> None:
            self.metrics.egress_refused("withheld mid-stream")
            self._audit(
                "egress.refused",
                caller,
                subject,
                asked | {"outcome": "withheld mid-stream", "reason": reason},
                repeatable=False,
            )

        assert opened.pieces is not None
        descriptor = _Descriptor(fd)
        chunks = _verified_chunks(descriptor, offset, entry.size, opened.pieces, interrupted)
        return Pull(r, entry, chunks, descriptor.close)

    # -- the checks -----------------------------------------------------------------------

    def _looks_intact(self, signed: SignedRelease) -> bool:
        if self.checker.unchanged_since_checked(signed):
            return True
        try:
            self.checker.check(signed)
        except Exception:  # any failure to check is a withheld release, never a crash
            return False
        return True

    def _resolve(
        self,
        caller: Caller,
        model: str,
        version: int,
        *,
        thorough: bool,
        file: str = "",
        fds: _Opened | None = None,
    ) -> SignedRelease:
        """The asked release, checked; 0 asks for the newest intact one (skips audited).

        thorough: every file is read and checked (a pull); otherwise a release unchanged
        since its last full check passes without reading it again (a manifest). With fds,
        `file` is opened before the checks read it; its descriptor and the tags of the
        pieces the checks read are left in fds.
        """
        if not model:
            raise InvalidInput("name the model whose release you want")
        rows = self.store.list_releases(model) if version == 0 else []
        if version:
            row = self.store.get_release(model, version)
            rows = [row] if row is not None else []
        if not rows:
            which = f"version {version}" if version else "release"
            raise NotFound(f"model {bounded(model)!r} has no published {which}")
        first: _Withheld | None = None
        for row in rows:
            try:
                signed = self._check(row, thorough, file, fds)
            except _Withheld as exc:
                if version:
                    raise
                first = first or exc
                self.metrics.guard_refused("egress", exc.layers)
                self._audit(
                    "egress.skipped",
                    caller,
                    f"{row.model}/release/{row.version}",
                    {
                        "outcome": "withheld, an older release answers 'newest'",
                        "reason": exc.reason,
                    },
                )
                continue
            return signed
        assert first is not None
        raise first

    def _check(self, row: Release, thorough: bool, file: str, fds: _Opened | None) -> SignedRelease:
        fd = -1
        entry: ReleaseFile | None = None
        known: Pieces | None = None  # the file's piece tags, from an earlier check
        filling: PieceTags | None = None  # or filled by this one
        try:
            signed = self.checker.signed(row)
            if fds is not None:
                entry = signed.files.get(file)
                if entry is None:
                    listed = ", ".join(signed.files)
                    raise NotFound(
                        f"release {row.version} of {row.model!r} has no file "
                        f"{bounded(file)!r}: {listed}"
                    )
                # Open before the checks read it, and stream from this descriptor: the bytes
                # that leave are the inode the checks read, whatever happens to the name.
                path = self.checker.directory(signed.release) / entry.name
                fd = _open_no_follow(path)
                opened = os.fstat(fd)
                # The tags an earlier check recorded while these bytes hashed to the signed
                # sha256: the file holds those bytes now only if every piece still has its
                # tag, so this check reads it against them instead of hashing it whole.
                known = self._pieces.get(entry.sha256, SEND_CHUNK_BYTES)
                if known is None:
                    filling = PieceTags(SEND_CHUNK_BYTES)
            if thorough or entry is not None or not self.checker.unchanged_since_checked(signed):
                fill = {entry.name: filling} if entry is not None and filling is not None else None
                tagged = {entry.name: known} if entry is not None and known is not None else None
                self.checker.check(signed, fill, tagged)
            if fds is not None and entry is not None:
                _same_file(path, opened, os.fstat(fd))
                pieces = filling.finish() if filling is not None else known
                if pieces is None:
                    raise ValueError(f"{entry.name}: the checks did not read it")
                self._pieces.put(entry.sha256, entry.size, pieces)  # raises unless whole
                fds.fd, fds.pieces = fd, pieces
                fd = -1
            return signed
        except GuardRefused as exc:
            raise _Withheld(row.version, exc.reason, exc.layers) from None
        except (OSError, ValueError) as exc:
            raise _Withheld(row.version, bounded(str(exc), 300), ("files",)) from None
        except SluiceError:
            raise
        except Exception as exc:  # a check must end in a verdict; a crash is a refusal
            reason = bounded(f"the check failed: {type(exc).__name__}: {exc}", 300)
            raise _Withheld(row.version, reason, ("check",)) from None
        finally:
            if fd >= 0:
                os.close(fd)

    # -- the record -----------------------------------------------------------------------

    def _audit(
        self,
        kind: str,
        caller: Caller,
        subject: str,
        detail: dict[str, object],
        *,
        repeatable: bool = True,
    ) -> None:
        row = {"peer": caller.peer} | detail
        if repeatable and self.coalesce is not None:
            self.coalesce.record(kind, caller.principal, subject, row, str(detail["outcome"]))
        else:
            self.store.record(kind, caller.principal, subject, row)

    def _refused(
        self, caller: Caller, subject: str, asked: dict[str, object], exc: SluiceError
    ) -> None:
        outcome = "not found" if isinstance(exc, NotFound) else "invalid request"
        self.metrics.egress_refused(outcome)
        self._audit(
            "egress.refused",
            caller,
            subject,
            asked | {"outcome": outcome, "reason": bounded(str(exc), 300)},
        )

    def _withheld(
        self, caller: Caller, asked: dict[str, object], model: str, exc: _Withheld
    ) -> IntegrityError:
        self.metrics.egress_refused("withheld")
        self.metrics.guard_refused("egress", exc.layers)
        subject = f"{bounded(model)}/release/{exc.version}"
        if "file" in asked:
            subject += f"/{asked['file']}"
        self._audit(
            "egress.refused",
            caller,
            subject,
            asked | {"outcome": "withheld", "release": exc.version, "reason": exc.reason},
        )
        # What the reader is told names the failing checks from a fixed vocabulary, never
        # the reason itself: it can quote file names and fields an insider chose.
        layers = ", ".join(exc.layers) or "check"
        which = f"release {exc.version}" if asked.get("version") else "every release"
        return IntegrityError(
            f"{which} of {bounded(model)!r} is withheld: the egress guard refused it "
            f"({layers}); the gateway's audit log has the reason"
        )


def _open_no_follow(path: Path) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO does not hold the pull for a writer
    except OSError as exc:
        raise ValueError(f"{path.name}: cannot be opened as a regular file ({exc})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path.name}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def _same_file(path: Path, opened: os.stat_result, now: os.stat_result) -> None:
    """The name still points at the unchanged inode the descriptor holds."""
    named = os.stat(path, follow_symlinks=False)
    key = (opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns)
    if (named.st_dev, named.st_ino, named.st_size, named.st_mtime_ns) != key or (
        now.st_size,
        now.st_mtime_ns,
    ) != (opened.st_size, opened.st_mtime_ns):
        raise ValueError(f"{path.name} changed while the guard was checking it")


def _verified_chunks(
    descriptor: _Descriptor,
    offset: int,
    total: int,
    pieces: Pieces,
    interrupted: Callable[[str], None],
) -> Iterator[tuple[int, bytes]]:
    """Chunks read from the guarded descriptor, each sent only after the whole piece it lies
    in matched the tag the checks recorded (`pieces`, one per `pieces.size` bytes): a file
    changed in place after the check never has a changed byte leave, in whatever chunk it
    lies; the pull ends there (audited through `interrupted`). A resumed pull reads the piece
    its offset falls in and sends from the offset: nothing before it is read.

    The next piece is read and checked in a worker while gRPC sends this one; at most two
    pieces are in memory.
    """
    size = pieces.size
    try:
        index = offset // size
        pos = index * size
        ahead = (
            descriptor.read_ahead(pos, min(size, total - pos), pieces, index)
            if pos < total
            else None
        )
        while ahead is not None:
            want = min(size, total - pos)
            try:
                data, matched = ahead.result()
            except Exception as exc:  # a read that fails (EIO): what follows is unchecked
                reason = f"release file unreadable during the pull ({type(exc).__name__})"
                raise IntegrityError(f"{reason}; it is withheld") from exc
            after = pos + want
            ahead = (
                descriptor.read_ahead(after, min(size, total - after), pieces, index + 1)
                if after < total
                else None
            )
            if len(data) != want or not matched:
                raise IntegrityError("release file changed during the pull; it is withheld")
            skip = max(0, offset - pos)
            if skip < len(data):
                yield pos + skip, data[skip:]
            pos = after
            index += 1
    except IntegrityError as exc:
        interrupted(str(exc))
        raise
    finally:
        descriptor.close()


# Reads and checks the next piece of a pull while its handler thread sends the current one.
_READ_AHEAD = ThreadPoolExecutor(max_workers=4, thread_name_prefix="egress-read")


class _Descriptor:
    """A file descriptor closed exactly once: by the stream when it ends, or by the caller
    when the stream never started (a client gone before the first chunk); a read ahead in
    flight finishes before it closes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._ahead: Future[tuple[bytes, bool]] | None = None

    def read_ahead(
        self, pos: int, size: int, pieces: Pieces, index: int
    ) -> Future[tuple[bytes, bool]]:
        """(data, whether it is piece `index` as tagged) of up to size bytes at pos, read
        in a worker."""
        with self._lock:
            if self.fd < 0:
                raise IntegrityError("the release file was closed during the pull")
            self._ahead = _READ_AHEAD.submit(_read_piece, self.fd, size, pos, pieces, index)
            return self._ahead

    def close(self) -> None:
        with self._lock:
            fd, self.fd, ahead = self.fd, -1, self._ahead
        if ahead is not None:
            futures.wait([ahead])  # it reads fd: the number must not be reused before
        if fd >= 0:
            os.close(fd)


def _read_piece(fd: int, size: int, pos: int, pieces: Pieces, index: int) -> tuple[bytes, bool]:
    data = _pread_exactly(fd, size, pos)
    return data, len(data) == size and pieces.matches(index, data)


def _pread_exactly(fd: int, size: int, pos: int) -> bytes:
    """Up to size bytes at pos; fewer only where the file ends."""
    parts, got = [], 0
    while got < size:
        data = os.pread(fd, size - got, pos + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)
