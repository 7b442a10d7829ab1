"""lmforge's home folder: ``$LMFORGE_HOME``, default ``~/.lmforge`` (the model store and inductor's cache).

Apart from ``runtime`` (which imports torch) so that the store, and the command line's store commands with it,
start without importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LMFORGE_HOME"


def lmforge_home() -> Path:
    """``$LMFORGE_HOME``, or ``~/.lmforge``: where the store and the compile cache live."""
    return Path(os.environ.get(HOME_ENV) or "~/.lmforge").expanduser()
