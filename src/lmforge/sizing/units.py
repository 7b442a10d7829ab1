"""Amounts of memory: an estimate's parts (``Component``), and sizes as people write them (``4GB``,
``512MiB``) and as estimates print them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.errors import LmforgeError

MiB, GiB = 2**20, 2**30


@dataclass
class Component:
    """One part of an estimate's peak: what it is, its bytes, and how they were counted."""

    name: str
    bytes: int
    note: str = ""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes from ``4GB`` (10^9), ``512MiB`` / ``512M`` (2^20) or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if match is None or match.group(2).lower() not in _UNITS:
        raise LmforgeError(
            f"cannot read the size {text!r}", hint="write a number and a unit, e.g. 4GB, 512MiB or 1.5G"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / MiB:.1f} MiB"
