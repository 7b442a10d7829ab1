"""The one training loop (``Trainer``) and what it needs: schedule, checkpoints, metrics, distribution."""

from lmforge.train.loop import LanguageModelingObjective, Objective, TrainConfig, Trainer

__all__ = ["LanguageModelingObjective", "Objective", "TrainConfig", "Trainer"]
