"""Which evaluation of a run is the best, and when a run stops early: ``Selection``.

The Trainer keeps ``checkpoints/best`` by it. With a ``Selection`` (fine-tuning) "best" is by the metric it names
(validation loss, accuracy or macro-F1), the run stops after ``patience`` evaluations without a better one, and
the final model is the best evaluation's weights, not the last step's. With ``average_last`` K it is instead the
mean of the trainable weights at the last K evaluations (checkpoint averaging: several nearby points of one run
usually generalize better than any one of them, at no training cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError

HIGHER_IS_BETTER = {"val_loss": False, "accuracy": True, "macro_f1": True}  # what a Selection may go by


@dataclass(frozen=True)
class Selection:
    """Which weights a run ends with: those of the evaluation with the best ``metric`` (a tie on accuracy or
    macro-F1 goes to the lower validation loss: small validation sets tie often), stopping once ``patience``
    evaluations in a row brought no better one (None: never early). ``average_last`` K: end with the mean of the
    trainable weights at the last K evaluations instead (None: the best evaluation's)."""

    metric: str = "val_loss"
    patience: int | None = None
    average_last: int | None = None

    def __post_init__(self) -> None:
        if self.metric not in HIGHER_IS_BETTER:
            raise LmforgeError(
                f"select_by={self.metric!r} is not a validation metric",
                hint=f"use {', '.join(HIGHER_IS_BETTER)}",
            )
        if self.patience is not None and self.patience < 1:
            raise LmforgeError(
                f"patience={self.patience} must be at least 1", hint="leave it out to never stop early"
            )
        if self.average_last is not None and self.average_last < 2:
            raise LmforgeError(
                f"average_last={self.average_last} must be at least 2",
                hint="leave it out to keep the best evaluation's weights",
            )

    def better(self, values: dict[str, float], best: dict[str, float] | None) -> bool:
        """Whether the evaluation ``values`` beats ``best`` (the best one so far, or None)."""
        if best is None:
            return True
        sign = 1 if HIGHER_IS_BETTER[self.metric] else -1
        return (sign * values[self.metric], -values["val_loss"]) > (
            sign * best[self.metric],
            -best["val_loss"],
        )

    @staticmethod
    def start() -> dict[str, Any]:
        """A run's progress before its first evaluation (checkpoints keep it, so resume selects alike)."""
        return {"evaluations": [], "best": None, "without_improvement": 0}

    def record(self, progress: dict[str, Any], values: dict[str, float]) -> bool:
        """Add an evaluation (``{"step", "val_loss", ...}``) to ``progress``; whether it is the new best."""
        progress["evaluations"].append(values)
        if self.better(values, progress["best"]):
            progress["best"], progress["without_improvement"] = values, 0
            return True
        progress["without_improvement"] += 1
        return False

    def stopped(self, progress: dict[str, Any]) -> bool:
        """Whether ``patience`` evaluations in a row have brought no better one."""
        return self.patience is not None and progress["without_improvement"] >= self.patience
