"""Progress bars that read well both in a terminal and in a log file, and a way to stop batched work from
outside (``stop_when``): every batch loop of a task goes through ``tracked``, which checks between batches."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

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


def progress_bar(**options: Any) -> tqdm:
    """A tqdm bar (steps, rate, ETA). Written to a file (``nohup``, CI, a cluster job) it refreshes every 30 s
    rather than ten times a second, so a long run's log holds a line per half minute, not megabytes."""
    if not sys.stderr.isatty() and "ipykernel" not in sys.modules:  # notebooks draw a widget instead
        options.setdefault("mininterval", LOG_REFRESH_SECONDS)
        # tqdm's monitor thread forces a redraw after maxinterval (10 s) without one; keep it to the same 30 s.
        options.setdefault("maxinterval", LOG_REFRESH_SECONDS)
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
