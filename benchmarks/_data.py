"""The benchmarks' data folder: ../shared/data beside the repository (see its SOURCES.md), or ``--data DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"


def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT,
        metavar="DIR",
        help="data folder laid out as ../shared/data (see its SOURCES.md); default: %(default)s",
    )


def data_files(folder: Path, *names: str) -> list[Path]:
    """``folder / name`` for each name; if the folder or a file is missing, one line on stderr and exit 2."""
    for path in (folder, *(folder / name for name in names)):
        if not path.exists():
            print(
                f"error: no data at {path} — pass --data DIR (see ../shared/data/SOURCES.md)", file=sys.stderr
            )
            raise SystemExit(2)
    return [folder / name for name in names]
