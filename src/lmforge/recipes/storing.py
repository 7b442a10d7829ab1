"""Training results into the model store: the glue between a finished run and ``lmforge.store``.

The store only keeps folders and manifests; what a training run records there (its lineage, settings, data and
final losses) is decided here, once for every recipe.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmforge.loading import describe_source
from lmforge.model import perplexity_from_loss
from lmforge.store import Manifest, Store
from lmforge.train.loop import TrainResult


def store_run(
    result: TrainResult,
    save_as: str,
    *,
    parent: str | None,
    recipe: Mapping[str, Any],
    data: Sequence[str | Path],
) -> Manifest | None:
    """Store a finished training run's model with its lineage and final metrics (main process only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    best = result.best or {}  # the best evaluation: a fine-tuned model's weights are its
    train = {
        "steps": result.steps,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_perplexity": perplexity_from_loss(result.val_loss) if result.val_loss is not None else None,
        "best_val_loss": result.best_val_loss,
        "best_step": best.get("step"),
        "best_val_accuracy": best.get("accuracy"),
        "best_val_macro_f1": best.get("macro_f1"),
    }
    metrics = {"train": {k: v for k, v in train.items() if v is not None}}
    store = Store()
    lineage = describe_source(parent, store) if parent else None
    return store.put(result.model_dir, save_as, parent=lineage, recipe=recipe, data=data, metrics=metrics)


def training_recipe(lineage: Mapping[str, Any], settings: Any, **more: Any) -> dict[str, Any]:
    """The recipe record of a training run: its lineage fields, extra options and the TrainConfig."""
    return {
        **lineage,
        **{k: v for k, v in more.items() if v is not None},
        "train": dataclasses.asdict(settings),
    }
