"""Progress bars that read well both in a terminal and in a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

LOG_REFRESH_SECONDS = 30.0
QUIET_SECONDS = 2.0

T = TypeVar("T")


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
    scoring 3,000 reviews shows its ETA, classifying one sentence prints nothing."""
    yield from progress_bar(
        iterable=batches, total=len(batches), desc=desc, unit=" batch", delay=delay, leave=False
    )
