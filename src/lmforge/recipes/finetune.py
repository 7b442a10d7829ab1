"""Fine-tuning recipe: a loaded model + labelled data + a method (full | freeze | lora) -> the one Trainer.

    finetune("default", "spam/train.jsonl", task="classify", method="freeze", train={"out_dir": "runs/spam"})

``freeze`` trains only the last ``train_last_blocks`` blocks, the final norm and the task head ("LLMs from
scratch" ch. 6) and keeps the rest frozen; ``lora`` trains low-rank adapters (plus the head for classification) and saves them in PEFT's layout.

An encoder (BERT-style, e.g. all-MiniLM-L6-v2) fine-tunes for ``classify`` only, with BERT's head
(``encoder.py``) on its tokens pooled by ``pooling`` (mean, or [CLS] through BERT's pooler); the other tasks
write text, which an encoder cannot, and are one clear error.

Validation by default: ``val_split`` (10 %) of the training data is held out (stratified by label for
classification, at random for instructions and summaries, the same rows for the same seed), or ``val_file``
is read instead; the Trainer evaluates on it every ``eval_every`` steps and the final model is the evaluation
with the best ``select_by`` figure, stopping early after ``patience`` evaluations without a better one (or, with
``average_last`` K, the mean of the trainable weights at the last K evaluations). The run folder's
``validation.json`` says which rows were held out, the validation curve and the step chosen (or averaged). No
test file is read: a test set is for ``lmforge eval`` on the finished model, once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.config import Config
from lmforge.data.labelled import (
    ClassificationObjective,
    SequenceObjective,
    check_label_smoothing,
    load_classification,
    load_sequences,
    pack,
    split_validation,
)
from lmforge.data.seq2seq import PairObjective, load_pairs
from lmforge.errors import LmforgeError
from lmforge.formats.folder import save_model_folder
from lmforge.formats.peft import save_adapter
from lmforge.loading import LoadedModel
from lmforge.lora import LoRAConfig, merge_lora
from lmforge.recipes.settings import (
    given_settings,
    override_field,
    resume_field,
    settings_from,
    settings_record,
    settings_to_run,
)
from lmforge.recipes.storing import store_run, training_recipe
from lmforge.store import parse_ref
from lmforge.train import TrainConfig, Trainer, checkpoint
from lmforge.train.loop import Selection, TrainResult
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
    val_file: str | Path | None = field(
        default=None,
        metadata={"help": "validation data (.jsonl or .csv), instead of holding out part of --data"},
    )
    val_split: float = field(
        default=0.1,
        metadata={
            "help": "fraction of --data held out for validation (classify: stratified by label); 0: none, "
            "the final model is then the last step's"
        },
    )
    select_by: Literal["val_loss", "accuracy", "macro_f1"] | None = field(
        default=None,
        metadata={
            "help": "the validation figure that picks the final model among the evaluations",
            "default_help": "macro_f1 for classify with labels, val_loss otherwise",
        },
    )
    patience: int | None = field(
        default=None,
        metadata={
            "help": "stop after N evaluations in a row without a better --select-by figure",
            "default_help": "train all --max-steps",
        },
    )
    average_last: int | None = field(
        default=None,
        metadata={
            "help": "the final model is the mean of the trained weights at the last N evaluations (checkpoint "
            "averaging; method lora averages the adapters), not the best evaluation's",
            "default_help": "the best evaluation's weights",
        },
    )
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
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "classify: train toward (1 - e) on the label and e spread over all labels; 0: none"
        },
    )
    regression: bool = field(default=False, metadata={"help": "classify: predict a number (MSE)"})
    pooling: Literal["last", "mean", "cls"] | None = field(
        default=None,
        metadata={
            "help": "classify: what the head reads. A decoder: the last real token's state, or the mean of all "
            "tokens' (saved in config.json). An encoder (BERT-style): the mean, or [CLS] through BERT's pooler "
            "(what transformers' BertForSequenceClassification does, so its export loads there with the same "
            "logits)",
            "default_help": "last for a decoder; the encoder's own for an encoder (mean for all-minilm-l6-v2)",
        },
    )
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
    resume: bool = resume_field()
    override: list[str] = override_field()
    save_as: str | None = field(
        default=None,
        metadata={"help": "put the tuned model into the model store as NAME[:TAG]", "per_process": True},
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
    settings = settings_from(None, values, FinetuneSettings, source="finetune()")
    given = given_settings(None, values, FinetuneSettings) - ({"model"} if llm else set())
    return run_finetune(settings, llm=llm, given=given)


def run_finetune(
    settings: FinetuneSettings, *, llm: LoadedModel | None = None, given: Collection[str] | None = None
) -> TrainResult:
    """The recipe: ``settings.model`` (or ``llm``, already loaded) + data + method -> head, task, Trainer.

    ``given``: the settings the user gave (``given_settings``); with ``resume`` the others come from the run's
    record. None: those that differ from their defaults.
    """
    recorded = checkpoint.recorded_settings(Path(settings.train.out_dir)) if settings.resume else None
    settings = settings_to_run(settings, given, recorded)
    s, cfg = settings, settings.train
    if not s.data:
        raise LmforgeError("no training data given", hint="pass --data FILE.jsonl (or .csv)")
    if s.save_as:
        parse_ref(s.save_as)  # a bad name fails now, not after the run
    selection = _selection(s)
    check_label_smoothing(s.label_smoothing)  # before the model loads, so a bad value costs nothing
    llm = llm or LoadedModel.load(s.model, dtype="float32", device="cpu")
    net, tok = llm.model, llm.tokenizer
    check_encoder_task(net.config, s.task, s.pooling)
    if s.pooling and net.config.is_encoder:
        net.config.pooling = s.pooling
    block = min(s.block_size or 512, net.config.block_size)
    fields = {"text_field": s.text_field, "label_field": s.label_field, "regression": s.regression}
    if s.task == "classify":
        data = load_classification(s.data, tok, block, **fields)
        classes = None if s.regression else [int(t) for t in data.targets]
        data, val, held_out = _hold_out(s, data, classes)
        if s.val_file:
            val = load_classification(s.val_file, tok, block, **fields, labels=data.labels)
        # an encoder's pooling is in its config (set above); a decoder's head reads the last token unless told
        add_classifier(net, data.labels, s.regression, cfg.seed, "mean" if s.pooling == "mean" else "last")
        job: Any = ClassificationObjective(
            data,
            val,
            cfg.micro_batch_size,
            cfg.seed,
            balance=s.balance,
            group_by_length=s.group_by_length,
            label_smoothing=s.label_smoothing,
        )
    elif s.task in ("instruct", "summarize"):

        def load(path: str | Path) -> Any:
            if (
                net.config.is_seq2seq
            ):  # input → output pairs: the encoder reads the input, no prompt around it
                return load_pairs(
                    path, tok, block, kind=s.task, text_field=s.text_field, summary_field=s.summary_field
                )
            return load_sequences(
                path,
                tok,
                block,
                kind=s.task,
                text_field=s.text_field,
                summary_field=s.summary_field,
                include_prompt=s.include_prompt,
            )

        data, val, held_out = _hold_out(s, load(s.data), None)
        if s.val_file:
            val = load(s.val_file)
        if s.packing and net.config.is_seq2seq:
            raise LmforgeError(
                "--packing joins examples into one sequence, and an encoder–decoder reads each input apart",
                hint="drop --packing (--group-by-length batches similar lengths instead)",
            )
        if s.packing:
            data = pack(data, block)
        if net.config.is_seq2seq:
            job = PairObjective(net, data, val, cfg.micro_batch_size, cfg.seed, s.group_by_length)
        else:
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
    split = {"file": str(s.val_file)} if s.val_file else held_out
    selected = (
        selection if split else None
    )  # nothing to select on: the last step's weights, as in pretraining
    trainer = Trainer(net, tok, job, cfg, lineage=lineage, settings=settings_record(s), selection=selected)
    result = trainer.fit(resume=s.resume)
    if selected:  # written once the run is done: an earlier one would overwrite a finished run's by mistake
        _write_validation(Path(cfg.out_dir), split, selected, result)
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
            validation={"val_file": str(s.val_file)} if s.val_file else {"val_split": s.val_split},
            select_by=selected.metric if selected else None,
            patience=selected.patience if selected else None,
            average_last=selected.average_last if selected else None,
        )
        data_files = [f for f in (s.data, s.val_file) if f]
        store_run(result, s.save_as, parent=llm.source, recipe=recipe, data=data_files)
    return result


def check_encoder_task(config: Config, task: str, pooling: str | None) -> None:
    """An encoder fine-tunes for classification only; ``pooling`` is last or mean for a decoder, mean or cls
    for an encoder."""
    if config.is_seq2seq and task == "classify":
        raise LmforgeError(
            f"{config.name} is an encoder–decoder (T5/BART-style): lmforge fine-tunes it to write an output "
            "(--task summarize or instruct), not with a classification head",
            hint="use --task summarize (input → output pairs), or an encoder (all-minilm-l6-v2) for classify",
        )
    if config.is_encoder and task != "classify":
        raise LmforgeError(
            f"{config.name} is a sentence encoder (BERT-style): it cannot learn to write, so --task {task} "
            "(a decoder-only recipe) does not apply",
            hint="fine-tune it with --task classify, or give a language model (e.g. the default) for this task",
        )
    allowed = ("mean", "cls") if config.is_encoder else ("last", "mean")
    if pooling and pooling not in allowed:
        kind = "a sentence encoder (BERT-style)" if config.is_encoder else "a decoder"
        raise LmforgeError(
            f"--pooling {pooling} does not apply to {config.name}, {kind}",
            hint=f"use --pooling {' or '.join(allowed)}",
        )


def _selection(s: FinetuneSettings) -> Selection:
    """How the final model is chosen (checked before the model loads, so a bad value costs nothing)."""
    labelled = s.task == "classify" and not s.regression
    # macro-F1 for labels: on imbalanced data (SMS spam is 13 % spam) accuracy rewards the majority class,
    # and macro-F1 weighs every class alike; ties between evaluations go to the lower validation loss
    metric = s.select_by or ("macro_f1" if labelled else "val_loss")
    if metric != "val_loss" and not labelled:
        what = "scores (--regression)" if s.task == "classify" else f"{s.task} examples"
        raise LmforgeError(
            f"--select-by {metric} needs class labels, but this run trains on {what}",
            hint="use --select-by val_loss",
        )
    if not 0 <= s.val_split < 1:
        raise LmforgeError(
            f"--val-split {s.val_split} must be at least 0 and below 1",
            hint="use e.g. 0.1 (10 %), or 0 for no validation",
        )
    given = (("--select-by", s.select_by), ("--patience", s.patience), ("--average-last", s.average_last))
    for flag, value in given:
        if value is not None and not (s.val_file or s.val_split):
            raise LmforgeError(
                f"{flag} needs validation data, and --val-split 0 gave none",
                hint="give a --val-split above 0 or a --val-file",
            )
    for flag, value in (("--patience", s.patience), ("--average-last", s.average_last)):
        if value is not None and s.train.eval_every == 0:
            raise LmforgeError(
                f"{flag} needs evaluations, and --eval-every 0 turns them off", hint="give --eval-every N"
            )
    return Selection(metric, s.patience, s.average_last)


def _hold_out(s: FinetuneSettings, data: Any, classes: list[int] | None) -> tuple[Any, Any, dict | None]:
    """(training data, validation data, what was held out) by ``--val-split``; no split with a
    ``--val-file`` or ``--val-split 0``."""
    if s.val_file or not s.val_split:
        return data, None, None
    kept, held = split_validation(len(data), s.val_split, s.train.seed, classes=classes)
    record: dict[str, Any] = {
        "file": str(s.data),
        "fraction": s.val_split,
        "seed": s.train.seed,
        "stratified": classes is not None,
        "examples": len(held),
        "rows": held,  # 0-based positions among the file's examples (blank lines are not examples)
    }
    if classes is not None:
        record["per_label"] = {
            label: sum(classes[i] == k for i in held) for k, label in enumerate(data.labels)
        }
    return data.subset(kept), data.subset(held), record


def _write_validation(
    run_dir: Path, split: dict[str, Any], selection: Selection, result: TrainResult
) -> None:
    """``validation.json``: the held-out rows (or the file), the validation curve and the evaluation kept."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    record = {
        "split": split,
        "select_by": selection.metric,
        "patience": selection.patience,
        "best": result.best,
        "averaged": result.averaged,  # average_last: the evaluations averaged into the final model, its figures
        "stopped_early": result.stopped_early,
        "curve": result.evaluations,
    }
    path = run_dir / "validation.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
