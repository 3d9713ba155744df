"""Progress for long transfers and rounds: rich progress bars on a terminal, plain lines
(at most one every few seconds) when the stream is not one (CI, a log file, a pipe).
`transfer` draws one byte count on stderr; a `Board`, rows of work and the lines printed
as they finish (simulated trainers' rounds), on stdout."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Self, TextIO

if TYPE_CHECKING:  # rich is imported only when a terminal shows the bars
    from rich.progress import Progress, TaskID

PLAIN_EVERY_S = 5.0  # at most one plain progress line this often


def is_terminal(stream: TextIO | None = None) -> bool:
    s = stream or sys.stderr
    return bool(getattr(s, "isatty", lambda: False)())


@contextmanager
def transfer(
    label: str, total: int, stream: TextIO | None = None
) -> Iterator[Callable[[int], None]]:
    """Yields advance(n): n more bytes of `total` done. On a terminal a bar with rate and
    time left; otherwise a line now and then, and one at the end."""
    out = stream or sys.stderr
    if is_terminal(out):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(f"[bold]{label}", *columns, console=Console(file=out), transient=True) as bar:
            task = bar.add_task(label, total=total or None)
            yield lambda n: bar.advance(task, n)
        return
    done = [0]
    last = [time.monotonic()]

    def advance(n: int) -> None:
        done[0] += n
        now = time.monotonic()
        if now - last[0] >= PLAIN_EVERY_S:
            last[0] = now
            share = f" ({100 * done[0] / total:.0f}%)" if total else ""
            print(f"{label}: {done[0] / 1e6:.1f} of {total / 1e6:.1f} MB{share}", file=out)

    yield advance


class Board:
    """Rows of work (a trainer each), each with a status and a bar, and lines printed as
    things happen. On a terminal: a rich live view, the lines above the bars. Otherwise
    only the lines, and a summary of every row's status whenever nothing was printed for
    PLAIN_EVERY_S seconds, so that a log never goes quiet for long. Thread-safe."""

    def __init__(self, rows: Sequence[str], stream: TextIO | None = None) -> None:
        self._out = stream or sys.stdout
        self._status = dict.fromkeys(rows, "starting")
        self._lock = threading.Lock()
        self._started = self._last = time.monotonic()
        self._stopping = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Self:
        if is_terminal(self._out):
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=self._out),
                transient=True,  # the lines stay, the bars go when the work is done
                refresh_per_second=4,  # the parent shares the cores with the workers
            )
            width = max((len(row) for row in self._status), default=0)
            for row, status in self._status.items():
                self._tasks[row] = self._bars.add_task(row.ljust(width), total=None, status=status)
            self._bars.start()
        else:
            self._heartbeat = threading.Thread(target=self._beat, daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._bars is not None:
            self._bars.stop()

    def update(
        self, row: str, status: str, done: int | None = None, total: int | None = None
    ) -> None:
        """The row's status now; done of total steps moves its bar."""
        with self._lock:
            self._status[row] = status
            if self._bars is not None:
                self._bars.update(self._tasks[row], status=status, completed=done, total=total)

    def line(self, text: str) -> None:
        """Print text at once (above the bars on a terminal)."""
        with self._lock:
            if self._bars is not None:
                self._bars.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                print(text, file=self._out, flush=True)
            self._last = time.monotonic()

    def _beat(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                now = time.monotonic()
                if now - self._last < PLAIN_EVERY_S:
                    continue
                self._last = now
                rows = "; ".join(f"{row} {status}" for row, status in self._status.items())
                elapsed = now - self._started
                print(f"  [{elapsed:.0f}s] {rows}", file=self._out, flush=True)
