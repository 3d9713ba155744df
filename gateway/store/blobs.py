"""Content-addressed blob files: spool to a temp file, fsync, rename; never a partial blob."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from sluice.gateway.store.direct import open_regular
from sluice.models.appender import Appender

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")
# A push's O_DIRECT blocks: two buffers of this each (one being written), 8 MiB per push in
# flight. 4 MiB moved as fast as 8 here and faster than 2 (1 GB, write + fsync: 766-982 vs
# 623-928 vs 485-808 MB/s).
SPOOL_BLOCK = 4 << 20
_TAG_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# sha256 of a piece runs here while the caller inspects the same piece (BlobStore.adopt):
# both release the GIL. Several workers, so concurrent adoptions do not queue.
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sha256")
# Freeing a file's blocks (when its last name is gone and its last descriptor closes) took
# 1.5-2.6 s per GB on this VM's disk, 0.11 s at its best: a worker does it, not a push's
# answer or whoever holds BlobStore.lock.
_FREEING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-free")
# Each file waiting there holds a descriptor: at most this many wait; past it the caller
# frees the file itself (a gc dropping thousands of blobs must not run out of descriptors).
FREE_PENDING = 256
_FREE_SLOTS = threading.BoundedSemaphore(FREE_PENDING)


def _hold(path: Path) -> int | None:
    """A descriptor keeping path's file (not a link) alive after its name goes; None if none."""
    try:
        # O_NONBLOCK: a FIFO planted at a blob's name does not hold the caller (who holds
        # the blob locks) waiting for a writer; for a regular file it changes nothing.
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # missing, or not a file we may open (a planted link: ELOOP)


def _free_later(fd: int | None) -> None:
    if fd is None:
        return
    if not _FREE_SLOTS.acquire(blocking=False):
        os.close(fd)  # FREE_PENDING files wait already: this one is freed here
        return
    try:
        _FREEING.submit(_free, fd)
    except RuntimeError:  # no new work at interpreter exit: freed here
        _FREE_SLOTS.release()
        os.close(fd)


def _free(fd: int) -> None:
    try:
        os.close(fd)
    finally:
        _FREE_SLOTS.release()


def _holds(final: Path, size: int) -> bool:
    """Whether final is already a blob of `size` bytes (a regular file, not a link)."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


class Proof(Protocol):
    """A check that a file still holds bytes that once hashed to its name, recorded while
    they did (export/pieces.py: PieceCheck of their piece tags); fed the file in order."""

    def feed(self, data: bytes | memoryview) -> None: ...

    def whole(self) -> bool:
        """Whether everything fed is those bytes, none missing."""
        ...


class ChangedOnDisk(RuntimeError):
    """A file under blobs/tmp that is not what its writer wrote (someone else wrote to it):
    a retry writes it anew."""


class Tagger(Protocol):
    """Records a proof of bytes fed in order (export/pieces.py: PieceTags)."""

    def feed(self, data: bytes | memoryview) -> None: ...

    def proof(self) -> Callable[[], Proof]:
        """Once every byte was fed: a fresh check of a file against them per call."""
        ...


# A blob whose bytes fail their proof (Proof.whole): the same fact as a wrong sha256.
NOT_AS_HASHED = "its spool file's bytes differ from those that hashed to its name"
# Proofs kept (BlobStore.remember), the newest first: at most this many, covering at most
# this many bytes of blobs. A proof holds ~130 bytes per 2 MiB piece of its blob (a key
# and a tag), so 128 GiB of blobs is ~8.5 MB of this gateway's memory, whatever the model.
PROOFS_KEPT = 1024
PROOF_BYTES_KEPT = 128 << 30


class PieceHash:
    """sha256 of pieces fed in order: each piece is hashed by a worker (_HASHERS) while the
    feeder hands it to `inspect` (which may refuse it by raising) and goes on. A piece must
    not change once fed (a fold's blocks are buffers of their own; a read's are new bytes)."""

    def __init__(self, inspect: Callable[[bytes | memoryview], None] | None = None) -> None:
        self._digest = hashlib.sha256()
        self._pending: Future[None] | None = None
        self._inspect = inspect
        self.size = 0  # bytes fed

    def feed(self, data: bytes | memoryview) -> None:
        self.wait()  # pieces are hashed in order
        self._pending = _HASHERS.submit(self._digest.update, data)
        self.size += memoryview(data).nbytes
        if self._inspect is not None:
            self._inspect(data)  # while a worker hashes the same piece

    def wait(self) -> None:
        """Until every piece fed is hashed (raises what a hash raised)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def hexdigest(self) -> str:
        self.wait()
        return self._digest.hexdigest()


class TempBlob:
    """A file being written under blobs/tmp; hashed as it is written.

    Whole 4 MiB blocks go to the disk with O_DIRECT, by a worker while the next block is
    filled (models/appender.py): a push's bytes never fill the page cache, whose new pages
    cost this gateway's CPU more than receiving them (bench/README: ingest). The sha256
    runs in the caller's thread: with the write off its hands, handing each chunk to a
    hashing thread cost more (thread wake-ups) than it overlapped.
    """

    def __init__(self, path: Path, tagger: Tagger | None = None) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self.tagger = tagger  # fed the bytes beside the sha256: a cheaper proof of them
        self._out = Appender(path, 0, exclusive=True, behind=True, block=SPOOL_BLOCK)
        self._finished = False

    def write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        if self.tagger is not None:
            self.tagger.feed(data)
        self._out.write(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Every byte written on the disk (fsync) and the file closed."""
        if self._finished:
            return  # already finished: commit() after an explicit finish()
        self._out.sync()
        self._out.close()
        self._finished = True

    def discard(self) -> None:
        try:
            self._out.close()  # may raise what its last write raises (a full disk)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class BlobStore:
    """blobs/<aa>/<sha256>; temp files live in blobs/tmp and are dropped on start."""

    def __init__(self, root: Path, tagger: Callable[[], Tagger] | None = None) -> None:
        """`tagger`: what every blob written here is also fed as it is hashed (a gateway's
        piece tags: keys drawn per piece, kept in its memory only); its proof is then
        remembered with the blob's name, and `verify` and a close's reads check the blob
        against it instead of hashing it again (Poly1305: ~0.08 s/GB here, sha256 ~0.6)."""
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Blobs are shared by content: whoever renames one in and then commits its row, or
        # checks that none refers to it and unlinks it, holds this lock across both steps.
        self.lock = threading.Lock()
        self._tagger = tagger
        self._proofs: OrderedDict[str, tuple[int, Callable[[], Proof]]] = OrderedDict()
        self._proof_bytes = 0  # the bytes of blobs the kept proofs cover
        self._proofs_lock = threading.Lock()
        # Blobs placed for a row not committed yet (a close's version while its release is
        # built, seconds): no row refers to them, so whoever drops unreferenced blobs
        # meanwhile would take them; remove() leaves a pinned name alone (Counter: pins).
        self._pins: Counter[str] = Counter()

    def tagger(self) -> Tagger | None:
        """A fresh tagger of the kind every blob here is fed (None: this store tags none)."""
        return self._tagger() if self._tagger is not None else None

    def remember(self, sha256: str, size: int, proof: Callable[[], Proof]) -> None:
        """A proof of the `size` bytes that hashed to sha256, recorded as they did (the
        newest PROOFS_KEPT, covering at most PROOF_BYTES_KEPT, are kept; a blob without one,
        as after a restart, is hashed instead)."""
        with self._proofs_lock:
            if sha256 in self._proofs:
                self._proof_bytes -= self._proofs.pop(sha256)[0]
            self._proofs[sha256] = (size, proof)
            self._proof_bytes += size
            while self._proofs and (
                len(self._proofs) > PROOFS_KEPT or self._proof_bytes > PROOF_BYTES_KEPT
            ):
                self._proof_bytes -= self._proofs.popitem(last=False)[1][0]

    def proof(self, sha256: str) -> Proof | None:
        """A fresh check of the blob named sha256 against its remembered proof, if any."""
        with self._proofs_lock:
            kept = self._proofs.get(sha256)
        return None if kept is None else kept[1]()

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not set(sha256) <= _HEX:
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    @contextlib.contextmanager
    def temp(self, tag: str = "") -> Iterator[TempBlob]:
        """A temp blob that is removed unless adopted by commit(). A tag (characters of
        [A-Za-z0-9._+-]) goes into its name, so whoever finds it after a crash can say
        whose it was (temp_tags)."""
        if not set(tag) <= _TAG_CHARS:
            raise ValueError(f"temp blob tag {tag!r}: characters of [A-Za-z0-9._+-] only")
        name = f"{uuid.uuid4().hex}{'~' + tag if tag else ''}.part"
        blob = TempBlob(self.tmp / name, self._tagger() if self._tagger is not None else None)
        try:
            yield blob
        finally:
            blob.discard()

    def temp_tags(self) -> list[tuple[str, int]]:
        """(tag, bytes written) of every tagged temp file: what a crash cut off."""
        found = []
        for part in sorted(self.tmp.glob("*~*.part")):
            with contextlib.suppress(FileNotFoundError):
                found.append((part.name[33:-5], part.stat().st_size))
        return found

    def commit(self, blob: TempBlob) -> Path:
        """fsync and rename the temp blob to its content address; returns the final path."""
        blob.finish()
        final = self.path(blob.hexdigest())
        self._place(blob.path, final, blob.size)
        if blob.tagger is not None:
            self.remember(final.name, blob.size, blob.tagger.proof())
        return final

    def _place(self, src: Path, final: Path, size: int) -> None:
        """Rename src to final, its content address, unless final already holds a blob of
        that size: then final stays as it is and src goes.

        Blobs are shared by content, so the same bytes pushed again (a retry, two trainers
        sending the same delta) name a blob an acknowledged update may already use. Renaming
        over it would give that update's file a new inode while its round is being
        aggregated, which the close takes for a spool file changed after its scan
        (core/scan.py: changed_since) and excludes as corrupt. A kept blob whose bytes are
        damaged is found where every blob is checked: by the close's scan, by the release's
        re-hash. Either way the file that loses its name is freed by a worker (_FREEING)."""
        final.parent.mkdir(exist_ok=True)
        if _holds(final, size):
            self.remove(src)
        else:
            replaced = _hold(final)  # a damaged copy (another size): freed after the rename
            try:
                os.replace(src, final)
            finally:
                _free_later(replaced)
        fsync_dir(final.parent)

    def pin(self, sha256: str) -> None:
        """Keep sha256's blob from remove() until unpin(): it was placed for a row that is
        not committed yet. (A push refused at its commit drops its blob when no row refers
        to it; one carrying a close's version bytes would otherwise take the version's file
        from under its release, and every later close would find its base missing.)"""
        with self._proofs_lock:
            self._pins[sha256] += 1

    def unpin(self, sha256: str) -> None:
        with self._proofs_lock:
            self._pins[sha256] -= 1
            if self._pins[sha256] <= 0:
                del self._pins[sha256]

    def remove(self, path: Path) -> bool:
        """Unlink path (a blob no row needs, a temp file); its blocks are freed by a worker
        (_FREEING), so whoever holds `lock` does not wait for the disk. False if missing,
        or pinned (placed for a row not committed yet: left in place)."""
        held: int | None = None
        try:
            # The pin check and the unlink in one step: a close pinning its version (and
            # finding this very file at its address) between the two would lose it.
            with self._proofs_lock:
                if path.name in self._pins and path == self.path(path.name):
                    return False
                kept = self._proofs.pop(path.name, None)  # bytes that may come back
                if kept is not None:
                    self._proof_bytes -= kept[0]
                held = _hold(path)
                path.unlink()
        except FileNotFoundError:
            return False
        finally:
            _free_later(held)  # the blocks are freed by the worker, outside the lock
        return True

    def adopt(
        self,
        path: Path,
        inspect: Callable[[bytes | memoryview], None] | None = None,
        *,
        pin: bool = False,
    ) -> str:
        """Hash a finished file under blobs/tmp, fsync it and move it to its address;
        `pin`: pinned from before it is placed (the caller unpins once its row is in).

        The fsync runs in a worker, and so does the hash, while this thread hands each piece
        to `inspect`, which may refuse the file by raising.
        """
        hashed = PieceHash(inspect)
        with path.open("rb") as f:
            synced = _HASHERS.submit(os.fsync, f.fileno())
            try:
                while data := f.read(8 << 20):
                    hashed.feed(data)
            finally:
                hashed.wait()
                synced.result()  # before the descriptor closes, also when a read failed
        self._place_pinned(path, hashed.hexdigest(), os.stat(path).st_size, pin)
        return hashed.hexdigest()

    def _place_pinned(self, path: Path, sha256: str, size: int, pin: bool) -> None:
        if pin:
            self.pin(sha256)
        try:
            self._place(path, self.path(sha256), size)
        except BaseException:
            if pin:
                self.unpin(sha256)
            raise

    def adopt_written(self, path: Path, hashed: PieceHash, *, pin: bool = False) -> str:
        """fsync a finished file under blobs/tmp whose writer fed every byte it wrote, in
        order, to `hashed`, and move it to that address: no second read of the file.

        The name is the hash of what was written, not of what the file holds now: a file
        changed in between (an insider with write access to blobs/) is a blob that does not
        hash to its name, which every reader of a blob checks (the next close's base check,
        the egress gate's piece tags, recorded from the same pieces). Raises ChangedOnDisk if
        the file's size is not the bytes fed."""
        sha256 = hashed.hexdigest()
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != hashed.size:  # not the close's fault: the next try writes anew
                raise ChangedOnDisk(f"{path.name} holds {size} bytes; {hashed.size} were written")
            os.fsync(f.fileno())
        self._place_pinned(path, sha256, size, pin)
        return sha256

    def verify(self, sha256: str, size: int) -> str:
        """Why the blob named sha256 is not `size` bytes hashing to that name; "" if it is.

        One front-to-back read in 1 MiB pieces (sha256 releases the GIL): run it in a
        worker beside a fold of the same files, whose reads then come from the page cache.
        Where a proof was remembered as the blob's bytes hashed to its name (its push, the
        close that made it), the read is checked against it instead of hashed: the same
        answer at a fraction of sha256's CPU."""
        proof = self.proof(sha256)
        digest = hashlib.sha256()
        feed = digest.update if proof is None else proof.feed
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        got = 0
        try:
            with os.fdopen(open_regular(self.path(sha256)), "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    feed(view[:n])
                    got += n
        except FileNotFoundError:
            return "its spool file is missing"
        except OSError as exc:  # a bad sector: this file is lost, not the whole disk
            if exc.errno != errno.EIO:
                raise
            return "its spool file cannot be read (I/O error)"
        if got != size:
            return f"its spool file is {got} bytes, expected {size}"
        if proof is not None:
            return "" if proof.whole() else NOT_AS_HASHED
        if digest.hexdigest() != sha256:
            return f"its spool file's sha256 is {digest.hexdigest()}, not its name"
        return ""

    def temp_path(self, suffix: str = ".part") -> Path:
        """A fresh name under blobs/tmp (dropped on start if never adopted)."""
        return self.tmp / f"{uuid.uuid4().hex}{suffix}"

    def write(self, pieces: Iterable[bytes | memoryview]) -> str:
        """Spool pieces into a committed blob; returns its sha256."""
        with self.temp() as blob:
            for piece in pieces:
                blob.write(piece)
            self.commit(blob)
            return blob.hexdigest()

    def drop_orphans(self, referenced: set[str], *, temp_files: bool = True) -> list[str]:
        """Remove temp files (unless temp_files is False) and blobs no row refers to (left
        by a crash before commit).

        Only files: a directory here is not the store's (someone's backup, a copy by hand)
        and is left alone with a warning, as is any directory not named like a shard."""

        def ours(path: Path) -> bool:
            if path.is_symlink() or path.is_file():
                return True
            log.warning("left %s in place: not a file the blob store wrote", path)
            return False

        for part in self.tmp.iterdir() if temp_files else ():
            if ours(part):
                part.unlink()
        dropped = []
        for sub in self.root.iterdir():
            if sub == self.tmp or not sub.is_dir():
                continue
            if sub.is_symlink() or len(sub.name) != 2 or not set(sub.name) <= _HEX:
                log.warning("left %s in place: not a directory the blob store made", sub)
                continue
            for blob in sub.iterdir():
                if blob.name not in referenced and ours(blob):
                    blob.unlink()
                    dropped.append(blob.name)
        return dropped
