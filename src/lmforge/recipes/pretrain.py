"""Pretraining recipe: prepared token shards + a model (preset, custom sizes, or a loaded model) -> Trainer.

A recipe wires components together from plain settings (a YAML file, CLI flags or keyword arguments); it holds
no training logic of its own. ``lmforge pretrain`` and ``torchrun -m lmforge pretrain`` both land here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge.config import Config
from lmforge.data.text import TokenShards
from lmforge.errors import LmforgeError
from lmforge.loading import LoadedModel
from lmforge.model import Transformer
from lmforge.recipes.storing import store_run, training_recipe
from lmforge.store import parse_ref
from lmforge.tokenizer import Tokenizer
from lmforge.train import LanguageModelingTask, TrainConfig, Trainer
from lmforge.train.loop import TrainResult

RECIPE_KEYS = ("model", "model_config", "init", "data", "tokenizer", "train", "resume", "save_as")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a pretraining YAML file: the ``RECIPE_KEYS``, with ``train`` a mapping of TrainConfig settings."""
    recipe = load_yaml(path)
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise LmforgeError(
            f"{path}: unknown keys {', '.join(unknown)}", hint=f"known keys: {', '.join(RECIPE_KEYS)}"
        )
    return recipe


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings, with one-line errors for a missing file or bad syntax."""
    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file", hint="check the path of the YAML config") from None
    except yaml.YAMLError as e:
        raise LmforgeError(
            f"{path}: not valid YAML ({e})".replace("\n", " "), hint="fix the YAML syntax"
        ) from None
    if not isinstance(recipe, dict):
        raise LmforgeError(
            f"{path}: expected a mapping of settings", hint=f"use the keys {', '.join(RECIPE_KEYS)}"
        )
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise LmforgeError(
            f"{path}: unknown keys {', '.join(unknown)}", hint=f"known keys: {', '.join(RECIPE_KEYS)}"
        )
    return recipe


def build_model(
    tokenizer: Tokenizer, model: str | None, model_config: dict[str, Any] | None, seed: int
) -> Transformer:
    """A freshly initialised model from a preset and/or explicit sizes; the vocabulary follows the tokenizer."""
    overrides = dict(model_config or {})
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    overrides.setdefault("bos_token_id", tokenizer.bos_id)
    overrides.setdefault("eos_token_id", tokenizer.eos_id)
    overrides.setdefault("pad_token_id", tokenizer.pad_id)
    try:
        config = Config.from_name(model, **overrides) if model else Config(name="custom", **overrides)
    except TypeError as e:
        raise LmforgeError(
            f"invalid model setting: {e}", hint="see lmforge.Config for the field names"
        ) from None
    torch.manual_seed(seed)  # the initial weights are part of what a seed reproduces
    return Transformer(config)


def pretrain(
    data: str | Path,
    *,
    model: str | None = None,
    model_config: dict[str, Any] | None = None,
    init: str | None = None,
    tokenizer: str | Path | None = None,
    train: TrainConfig | dict[str, Any] | None = None,
    resume: bool = False,
    save_as: str | None = None,
) -> TrainResult:
    """Pretrain (or continue pretraining, with ``init``) a model on token shards prepared by ``prepare_corpus``.

    ``save_as="name:tag"`` puts the final model into the model store with its lineage (the ``init`` model,
    these settings, the data's sha256) and the run's final losses.
    """
    train_config = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(dict(train or {}))
    if save_as:
        parse_ref(save_as)  # a bad name fails now, not after the run
    lineage: dict[str, Any] = {"recipe": "pretrain"}
    if init:
        if model or model_config:
            raise LmforgeError(
                "a model preset or model settings were given together with --init",
                hint="--init continues an existing model as it is; drop --model / model settings",
            )
        llm = LoadedModel.load(init, dtype="float32", device="cpu")
        tok, net = llm.tokenizer, llm.model
        lineage["parent"] = llm.source
    else:
        tok = Tokenizer.load(Path(tokenizer)) if tokenizer else TokenShards(data).tokenizer()
        net = build_model(tok, model, model_config, train_config.seed)
        lineage["preset"] = model or "custom"
    shards = TokenShards(data, tok)
    block = train_config.block_size or net.config.block_size
    task = LanguageModelingTask(shards, train_config.micro_batch_size, block, seed=train_config.seed)
    result = Trainer(net, tok, task, train_config, lineage=lineage).fit(resume=resume)
    if save_as:
        recipe = training_recipe(lineage, train_config, model_config=model_config or None)
        store_run(result, save_as, parent=lineage.get("parent"), recipe=recipe, data=[data])
    return result
