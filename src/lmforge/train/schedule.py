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


def warmup_note(warmup: int, total: int) -> str | None:
    """A warning when the warmup lasts the whole run, else None: the schedule is then all warmup, its peak is
    ``total / warmup`` of lr (on the last step) and it never decays, which is rarely what was meant."""
    if warmup <= 0 or warmup < total:
        return None
    return (
        f"warmup_steps={warmup} is not below max_steps={total}: the learning rate rises for the whole run, "
        f"reaching {min(total, warmup) / warmup:.0%} of its peak on the last step, and never decays; "
        "lower the warmup or train longer"
    )
