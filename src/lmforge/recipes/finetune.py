"""Fine-tuning recipe: a loaded model + labelled data + a method (full | freeze | lora) -> the one Trainer.

    finetune("default", "spam/train.jsonl", task="classify", method="freeze", train={"out_dir": "runs/spam"})

``freeze`` trains only the last ``train_last_blocks`` blocks, the final norm and the task head ("LLMs from
scratch" ch. 6) and keeps the rest frozen; ``lora`` trains low-rank adapters (plus the head for classification) and saves them in PEFT's layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.data.labelled import (
    ClassificationObjective,
    SequenceObjective,
    load_classification,
    load_sequences,
    pack,
)
from lmforge.errors import LmforgeError
from lmforge.formats.folder import save_model_folder
from lmforge.formats.peft import save_adapter
from lmforge.loading import LoadedModel
from lmforge.lora import LoRAConfig, merge_lora
from lmforge.recipes.settings import settings_from
from lmforge.recipes.storing import store_run, training_recipe
from lmforge.store import parse_ref
from lmforge.train import TrainConfig, Trainer
from lmforge.train.loop import TrainResult
from lmforge.train.methods import Method, add_classifier, choose_trainable

TaskName = Literal["classify", "instruct", "summarize"]


@dataclass
class FinetuneSettings:
    """What a fine-tuning run uses: each field is a keyword of ``finetune``, a YAML key and a flag of
    ``lmforge finetune`` (``lora`` and ``train`` give theirs to their own fields: ``--lora-rank``, ``--lr``)."""

    model: str | Path | None = field(
        default=None,
        metadata={
            "positional": True,
            "help": "model folder, .gguf file, stored name or hub id",
            "default_help": "the bundled SmolLM2-135M-Instruct",
        },
    )
    data: str | Path | None = field(default=None, metadata={"help": "training data (.jsonl or .csv)"})
    val_file: str | Path | None = field(default=None, metadata={"help": "validation data (.jsonl or .csv)"})
    task: TaskName = field(
        default="classify", metadata={"help": "a label per text, answers to prompts, or summaries"}
    )
    method: Method = field(
        default="lora",
        metadata={"help": "train every weight, only the last blocks (freeze), or low-rank adapters"},
    )
    train_last_blocks: int = field(
        default=2,
        metadata={
            "help": "method freeze: the last N blocks train, the others stay frozen",
            "renamed_from": "freeze_last",
            "renamed_why": "it trains the last N blocks",
        },
    )
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"title": "LoRA (method lora)"})
    merge: bool = field(
        default=True, metadata={"help": "method lora: also fold the adapters into the weights"}
    )
    text_field: str = field(default="text", metadata={"help": "field holding the text"})
    label_field: str = field(default="label", metadata={"help": "classify: field holding the label"})
    summary_field: str = field(default="summary", metadata={"help": "summarize: field holding the summary"})
    balance: Literal["none", "weights", "sample"] = field(
        default="none", metadata={"help": "classify, imbalanced classes: weight the loss or resample"}
    )
    regression: bool = field(default=False, metadata={"help": "classify: predict a number (MSE)"})
    include_prompt: bool = field(
        default=False, metadata={"help": "instruct/summarize: train on the prompt tokens too"}
    )
    packing: bool = field(
        default=False, metadata={"help": "instruct/summarize: pack several examples into each sequence"}
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "batch examples of similar length together (less padding, same data)"},
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "longest example in tokens", "default_help": "512, at most the model's context"},
    )
    train: TrainConfig = field(
        default_factory=TrainConfig,
        metadata={
            "flag_prefix": "",
            "skip_flags": ("block_size",),  # --block-size is the one above: examples have no fixed length
            "title": "training (override the YAML file's train: section)",
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "continue the run in --out from its newest checkpoint"}
    )
    save_as: str | None = field(
        default=None, metadata={"help": "put the tuned model into the model store as NAME[:TAG]"}
    )


def finetune(model: str | Path | LoadedModel, train_file: str | Path, **options: Any) -> TrainResult:
    """Fine-tune ``model`` on ``train_file``; the result's model folder is ready for ``LLM.load``.

    ``options`` are the fields of ``FinetuneSettings`` (``task``, ``method``, ``train_last_blocks``, ``lora``,
    ``train``...; ``lora`` and ``train`` also take a mapping of their fields); an unknown one is an error
    that lists them. ``save_as="name:tag"`` puts the tuned model into the model store with its lineage (the
    base model, these settings, the data's sha256) and the run's final losses.
    """
    if "data" in options:
        raise LmforgeError("finetune() takes its training data as train_file", hint="drop data=")
    llm = model if isinstance(model, LoadedModel) else None
    values = {**options, "model": None if llm else model, "data": train_file}
    return run_finetune(settings_from(None, values, FinetuneSettings, source="finetune()"), llm=llm)


def run_finetune(settings: FinetuneSettings, *, llm: LoadedModel | None = None) -> TrainResult:
    """The recipe: ``settings.model`` (or ``llm``, already loaded) + data + method -> head, task, Trainer."""
    s, cfg = settings, settings.train
    if not s.data:
        raise LmforgeError("no training data given", hint="pass --data FILE.jsonl (or .csv)")
    if s.save_as:
        parse_ref(s.save_as)  # a bad name fails now, not after the run
    llm = llm or LoadedModel.load(s.model, dtype="float32", device="cpu")
    net, tok = llm.model, llm.tokenizer
    block = min(s.block_size or 512, net.config.block_size)
    fields = {"text_field": s.text_field, "label_field": s.label_field, "regression": s.regression}
    if s.task == "classify":
        data = load_classification(s.data, tok, block, **fields)
        val = (
            load_classification(s.val_file, tok, block, **fields, labels=data.labels) if s.val_file else None
        )
        add_classifier(net, data.labels, s.regression, cfg.seed)
        job: Any = ClassificationObjective(
            data, val, cfg.micro_batch_size, cfg.seed, balance=s.balance, group_by_length=s.group_by_length
        )
    elif s.task in ("instruct", "summarize"):

        def load(path: str | Path) -> Any:
            return load_sequences(
                path,
                tok,
                block,
                kind=s.task,
                text_field=s.text_field,
                summary_field=s.summary_field,
                include_prompt=s.include_prompt,
            )

        data, val = load(s.data), (load(s.val_file) if s.val_file else None)
        if s.packing:
            data = pack(data, block)
        job = SequenceObjective(
            data, val, cfg.micro_batch_size, cfg.seed, s.group_by_length and not s.packing
        )
    else:
        raise LmforgeError(f"unknown task {s.task!r}", hint="use classify, instruct or summarize")
    trainable = choose_trainable(net, s.method, s.train_last_blocks, s.lora)
    lineage = {
        "recipe": "finetune",
        "parent": llm.source,
        "method": s.method,
        "trainable_parameters": trainable,
        "data": str(s.data),
    }
    result = Trainer(net, tok, job, cfg, lineage=lineage).fit(resume=s.resume)
    if s.method == "lora":
        save_adapter(net, result.model_dir.parent / "adapter", base_model=llm.source)
        if s.merge:
            merge_lora(net)
            state = {k: v.float() for k, v in net.state_dict().items()}
            save_model_folder(result.model_dir, net.config, state, tok)
    if s.save_as:
        recipe = training_recipe(
            lineage,
            cfg,
            task=s.task,
            train_last_blocks=s.train_last_blocks if s.method == "freeze" else None,
            lora=dataclasses.asdict(s.lora) if s.method == "lora" else None,
        )
        data_files = [f for f in (s.data, s.val_file) if f]
        store_run(result, s.save_as, parent=llm.source, recipe=recipe, data=data_files)
    return result
