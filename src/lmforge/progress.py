"""Progress bars that read well both in a terminal and in a log file."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_REFRESH_SECONDS = 30.0


def progress_bar(**options: Any) -> tqdm:
    """A tqdm bar (steps, rate, ETA). Written to a file (``nohup``, CI, a cluster job) it refreshes every 30 s
    rather than ten times a second, so a long run's log holds a line per half minute, not megabytes."""
    if not sys.stderr.isatty() and "ipykernel" not in sys.modules:  # notebooks draw a widget instead
        options.setdefault("mininterval", LOG_REFRESH_SECONDS)
    return tqdm(dynamic_ncols=True, **options)
