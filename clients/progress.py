"""Progress for long transfers and rounds: a rich progress bar on a terminal, plain lines
(at most one every few seconds) when stderr is not one (CI, a log file, a pipe)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

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
