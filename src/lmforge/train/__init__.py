"""The one training loop (``Trainer``) and what it needs: schedule, checkpoints, metrics, distribution."""

from lmforge.train.loop import LanguageModelingTask, Task, TrainConfig, Trainer

__all__ = ["LanguageModelingTask", "Task", "TrainConfig", "Trainer"]
