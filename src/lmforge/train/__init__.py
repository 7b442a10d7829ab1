"""The one training loop (``Trainer``) and what it needs: schedule, checkpoints, metrics, distribution."""

from lmforge.train.loop import Objective, TrainConfig, Trainer

__all__ = ["Objective", "TrainConfig", "Trainer"]
