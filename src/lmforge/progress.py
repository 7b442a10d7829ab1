"""Progress bars that read well both in a terminal and in a log file, and a way to stop batched work from
outside (``stop_when``): every batch loop of a task goes through ``tracked``, which checks between batches."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

LOG_REFRESH_SECONDS = 30.0
QUIET_SECONDS = 2.0

T = TypeVar("T")
_stop: ContextVar[threading.Event | None] = ContextVar("lmforge_stop", default=None)


class Stopped(Exception):
    """Batched work stopped because its ``stop_when`` event was set (e.g. the server's client went away)."""


@contextmanager
def stop_when(event: threading.Event) -> Iterator[None]:
    """Within the block (in this thread or context), ``tracked`` loops raise ``Stopped`` before their next
    batch once ``event`` is set."""
    token = _stop.set(event)
    try:
        yield
    finally:
        _stop.reset(token)


class _LogLines:
    """What tqdm draws, as plain lines: a terminal redraws one line with ``\r`` (and moves the cursor with ANSI
    codes for nested bars); a log file would keep every redraw run together on one ever-growing line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = _CURSOR_MOVES.sub("", text).replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def progress_bar(**options: Any) -> tqdm:
    """A tqdm bar (steps, rate, ETA). Written to a file (``nohup``, CI, a cluster job) it prints a plain line
    every 30 s rather than redrawing ten times a second, so a long run's log holds a line per half minute."""
    if not sys.stderr.isatty() and "ipykernel" not in sys.modules:  # notebooks draw a widget instead
        options.setdefault("mininterval", LOG_REFRESH_SECONDS)
        # tqdm's monitor thread forces a redraw after maxinterval (10 s) without one; keep it to the same 30 s.
        options.setdefault("maxinterval", LOG_REFRESH_SECONDS)
        options.setdefault("file", _LogLines(sys.stderr))
        options.setdefault(
            "bar_format",
            "{desc}{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
        )
        return tqdm(**options)
    return tqdm(dynamic_ncols=True, **options)


def tracked(batches: Sequence[T], desc: str, delay: float = QUIET_SECONDS) -> Iterator[T]:
    """Iterate over ``batches`` with a bar that appears only once the work has lasted ``delay`` seconds:
    scoring 3,000 reviews shows its ETA, classifying one sentence prints nothing. Raises ``Stopped`` before
    a batch once the ``stop_when`` event of the caller is set."""
    stop = _stop.get()
    bar = progress_bar(
        iterable=batches, total=len(batches), desc=desc, unit=" batch", delay=delay, leave=False
    )
    for batch in bar:
        if stop is not None and stop.is_set():
            bar.close()
            raise Stopped(f"{desc} stopped")
        yield batch
