"""Learning-rate schedules: linear warmup, then cosine (or linear, or constant) decay to ``min_lr``."""

from __future__ import annotations

import math
from typing import Literal

Decay = Literal["cosine", "linear", "constant"]


def learning_rate(step: int, *, lr: float, min_lr: float, warmup: int, total: int, decay: Decay) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
