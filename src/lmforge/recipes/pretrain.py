"""Pretraining recipe: prepared token shards + a model (preset, custom sizes, or a loaded model) -> Trainer.

A recipe wires components together from plain settings (a YAML file, CLI flags or keyword arguments); it holds
no training logic of its own. ``lmforge pretrain`` and ``torchrun -m lmforge pretrain`` both land here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.config import Config
from lmforge.data.mlm import MaskedLanguageModelingObjective, prepare_for_mlm
from lmforge.data.seq2seq import CorruptionObjective
from lmforge.data.text import LanguageModelingObjective, TokenShards
from lmforge.errors import LmforgeError
from lmforge.loading import LoadedModel, build_network
from lmforge.model import Network
from lmforge.recipes.settings import (
    given_settings,
    load_yaml,
    override_field,
    resume_field,
    settings_from,
    settings_record,
    settings_to_run,
)
from lmforge.recipes.storing import store_run, training_recipe
from lmforge.store import parse_ref
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, Trainer, checkpoint
from lmforge.train.loop import TrainResult

MODEL_SIZES = ("n_layer", "n_decoder_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "dropout")


@dataclass
class PretrainSettings:
    """What a pretraining run uses: each field is a keyword of ``pretrain``, a YAML key and (but for
    ``model_config``, whose sizes get one flag each) a flag of ``lmforge pretrain``."""

    data: str | Path | None = field(
        default=None, metadata={"help": "token shard folder from `lmforge data prepare`"}
    )
    arch: str | None = field(
        default=None,
        metadata={
            "help": f"architecture preset of a new model, e.g. baby-gpt, tiny-llama, gpt2 "
            f"({len(Config.presets())} presets)",
            "default_help": "custom sizes from model_config",
            "renamed_from": "model",
            "renamed_why": "a preset is an architecture; a model to continue is MODEL or --init",
        },
    )
    model_config: dict[str, Any] | None = field(
        default=None,
        metadata={
            "flags_from": (Config, MODEL_SIZES),
            "title": "model sizes (override the preset; YAML: any Config field under model_config:)",
            "default_help": "the preset's",
        },
    )
    init: str | None = field(
        default=None,
        metadata={
            "help": "continue pretraining this model (folder, .gguf, stored name or hub id); "
            "also the positional MODEL",
            "default_help": "a new model",
        },
    )
    tokenizer: str | Path | None = field(
        default=None, metadata={"help": "tokenizer folder", "default_help": "the one saved with the data"}
    )
    objective: Literal["lm", "mlm", "span", "denoise"] = field(
        default="lm",
        metadata={
            "help": "lm: next-token prediction (decoders); mlm: BERT's masked tokens (0.15 of them chosen, "
            "then 80/10/10 [MASK]/random/kept) (encoders: --arch bert-mini, --init all-minilm-l6-v2); "
            "span: T5's span corruption (15 % of the tokens, spans of mean 3, <extra_id_k> sentinels); "
            "denoise: BART's text infilling (30 % in Poisson(3) spans, one <mask> each) (encoder–decoders: "
            "--arch tiny-t5 / tiny-bart)"
        },
    )
    train: TrainConfig = field(
        default_factory=TrainConfig,
        metadata={"flag_prefix": "", "title": "training (override the YAML file's train: section)"},
    )
    resume: bool = resume_field()
    override: list[str] = override_field()
    save_as: str | None = field(
        default=None,
        metadata={
            "help": "put the final model into the model store as NAME[:TAG], with lineage",
            "per_process": True,
        },
    )


def load_recipe(path: str | Path) -> PretrainSettings:
    """Read a pretraining YAML file: the fields of ``PretrainSettings``, ``train:`` a mapping of TrainConfig."""
    return settings_from(None, load_yaml(path), PretrainSettings, source=path)


def build_model(
    tokenizer: Tokenizer, arch: str | None, model_config: dict[str, Any] | None, seed: int
) -> Network:
    """A freshly initialised model from a preset and/or explicit sizes; the vocabulary follows the tokenizer."""
    overrides = dict(model_config or {})
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    overrides.setdefault("bos_token_id", tokenizer.bos_id)
    overrides.setdefault("eos_token_id", tokenizer.eos_id)
    overrides.setdefault("pad_token_id", tokenizer.pad_id)
    preset = Config.from_name(arch) if arch else None
    if preset is not None and preset.decoder_start_token_id is not None:
        # The preset's decoder starts from its pad (T5) or its eos (BART): the same role in this vocabulary.
        same_as_pad = preset.decoder_start_token_id == preset.pad_token_id
        overrides.setdefault(
            "decoder_start_token_id", overrides["pad_token_id" if same_as_pad else "eos_token_id"]
        )
    try:
        config = Config.from_name(arch, **overrides) if arch else Config(name="custom", **overrides)
    except TypeError as e:
        raise LmforgeError(
            f"invalid model setting: {e}", hint="see lmforge.Config for the field names"
        ) from None
    torch.manual_seed(seed)  # the initial weights are part of what a seed reproduces
    return build_network(config)


def pretrain(data: str | Path, **options: Any) -> TrainResult:
    """Pretrain (or continue pretraining, with ``init``) a model on token shards prepared by ``prepare_corpus``.

    ``options`` are the fields of ``PretrainSettings``: ``arch`` (a preset) and/or ``model_config`` (sizes),
    or ``init`` (a model to continue); ``tokenizer``, ``train`` (a TrainConfig or a mapping of its fields),
    ``resume`` and ``save_as``. ``save_as="name:tag"`` puts the final model into the model store with its
    lineage (the ``init`` model, these settings, the data's sha256) and the run's final losses.
    """
    values = {**options, "data": data}
    settings = settings_from(None, values, PretrainSettings, source="pretrain()")
    return run_pretrain(settings, given=given_settings(None, values, PretrainSettings))


def run_pretrain(settings: PretrainSettings, *, given: Collection[str] | None = None) -> TrainResult:
    """The recipe: tokenizer, shards and model from ``settings``, then the Trainer.

    ``given``: the settings the user gave (``given_settings``); with ``resume`` the others come from the run's
    record. None: those that differ from their defaults.
    """
    recorded = checkpoint.recorded_settings(Path(settings.train.out_dir)) if settings.resume else None
    settings = settings_to_run(settings, given, recorded)
    s, train_config = settings, settings.train
    if not s.data:
        raise LmforgeError(
            "no training data given", hint="pass --data FOLDER (made by `lmforge data prepare`)"
        )
    if s.save_as:
        parse_ref(s.save_as)  # a bad name fails now, not after the run
    lineage: dict[str, Any] = {"recipe": "pretrain"}
    if s.init:
        if s.arch or s.model_config:
            raise LmforgeError(
                "an architecture preset or model sizes were given together with a model to continue",
                hint="MODEL / --init continues an existing model as it is; drop --arch / the model sizes",
            )
        llm = LoadedModel.load(s.init, dtype="float32", device="cpu")
        tok, net = llm.tokenizer, llm.model
        lineage["parent"] = llm.source
    else:
        tok = Tokenizer.load(Path(s.tokenizer)) if s.tokenizer else TokenShards(s.data).tokenizer()
        net = build_model(tok, s.arch, s.model_config, train_config.seed)
        lineage["preset"] = s.arch or "custom"
    shards = TokenShards(s.data, tok)
    block = train_config.block_size or net.config.block_size
    task: Any
    if s.objective == "mlm":
        prepare_for_mlm(net, train_config.seed)
        lineage["objective"] = "mlm"
        task = MaskedLanguageModelingObjective(
            shards, tok, train_config.micro_batch_size, block, seed=train_config.seed
        )
    elif s.objective in ("span", "denoise"):
        lineage["objective"] = s.objective
        task = CorruptionObjective(
            shards, tok, net, s.objective, train_config.micro_batch_size, block, seed=train_config.seed
        )
    elif net.config.is_seq2seq:
        raise LmforgeError(
            f"{net.config.name} is an encoder–decoder (T5/BART-style): it learns from corrupted text, not "
            "next-token prediction (--objective lm)",
            hint="pretrain it with --objective span (T5) or --objective denoise (BART)",
        )
    elif net.config.is_encoder:
        raise LmforgeError(
            f"{net.config.name} is an encoder (BERT-style): it sees the whole text at once, so it cannot "
            "learn next-token prediction (--objective lm)",
            hint="pretrain it with --objective mlm",
        )
    else:
        task = LanguageModelingObjective(shards, train_config.micro_batch_size, block, seed=train_config.seed)
    trainer = Trainer(net, tok, task, train_config, lineage=lineage, settings=settings_record(s))
    result = trainer.fit(resume=s.resume)
    if s.save_as:
        recipe = training_recipe(lineage, train_config, model_config=s.model_config or None)
        store_run(result, s.save_as, parent=lineage.get("parent"), recipe=recipe, data=[s.data])
    return result
