"""Fine-tuning recipe: a loaded model + labelled data + a method (full | freeze | lora) -> the one Trainer.

    finetune("default", "spam/train.jsonl", task="classify", method="freeze", train={"out_dir": "runs/spam"})

``freeze`` trains only the last N blocks, the final norm and the task head ("LLMs from scratch" ch. 6);
``lora`` trains low-rank adapters (plus the head for classification) and saves them in PEFT's layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from lmforge.data.tasks import ClassificationTask, SequenceTask, load_classification, load_sequences, pack
from lmforge.errors import LmforgeError
from lmforge.formats.folder import save_model_folder
from lmforge.formats.peft import save_adapter
from lmforge.loading import LoadedModel
from lmforge.lora import LoRAConfig, merge_lora
from lmforge.recipes.storing import store_run, training_recipe
from lmforge.store import parse_ref
from lmforge.train import TrainConfig, Trainer
from lmforge.train.loop import TrainResult
from lmforge.train.methods import Method, add_classifier, choose_trainable

TaskName = Literal["classify", "instruct", "summarize"]


def finetune(
    model: str | Path | LoadedModel,
    train_file: str | Path,
    *,
    task: TaskName = "classify",
    method: Method = "lora",
    val_file: str | Path | None = None,
    freeze_last: int = 2,
    lora: LoRAConfig | dict[str, Any] | None = None,
    merge: bool = True,
    text_field: str = "text",
    label_field: str = "label",
    summary_field: str = "summary",
    balance: str = "none",
    regression: bool = False,
    include_prompt: bool = False,
    packing: bool = False,
    group_by_length: bool = True,
    block_size: int | None = None,
    train: TrainConfig | dict[str, Any] | None = None,
    resume: bool = False,
    save_as: str | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``train_file``; the result's model folder is ready for ``LLM.load``.

    ``save_as="name:tag"`` puts that model into the model store with its lineage (the base model, these
    settings, the data's sha256) and the run's final losses.
    """
    cfg = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(dict(train or {}))
    if save_as:
        parse_ref(save_as)  # a bad name fails now, not after the run
    llm = model if isinstance(model, LoadedModel) else LoadedModel.load(model, dtype="float32", device="cpu")
    net, tok = llm.model, llm.tokenizer
    block = min(block_size or 512, net.config.block_size)
    lora_config = LoRAConfig(**lora) if isinstance(lora, dict) else lora
    if task == "classify":
        data = load_classification(
            train_file, tok, block, text_field=text_field, label_field=label_field, regression=regression
        )
        val = (
            load_classification(
                val_file,
                tok,
                block,
                text_field=text_field,
                label_field=label_field,
                labels=data.labels,
                regression=regression,
            )
            if val_file
            else None
        )
        add_classifier(net, data.labels, regression, cfg.seed)
        job: Any = ClassificationTask(
            data, val, cfg.micro_batch_size, cfg.seed, balance=balance, group_by_length=group_by_length
        )
    elif task in ("instruct", "summarize"):

        def load(path: str | Path) -> Any:
            return load_sequences(
                path,
                tok,
                block,
                kind=task,
                text_field=text_field,
                summary_field=summary_field,
                include_prompt=include_prompt,
            )

        data, val = load(train_file), (load(val_file) if val_file else None)
        if packing:
            data = pack(data, block)
        job = SequenceTask(data, val, cfg.micro_batch_size, cfg.seed, group_by_length and not packing)
    else:
        raise LmforgeError(f"unknown task {task!r}", hint="use classify, instruct or summarize")
    trainable = choose_trainable(net, method, freeze_last, lora_config)
    lineage = {
        "recipe": "finetune",
        "parent": llm.source,
        "method": method,
        "trainable_parameters": trainable,
        "data": str(train_file),
    }
    result = Trainer(net, tok, job, cfg, lineage=lineage).fit(resume=resume)
    if method == "lora":
        save_adapter(net, result.model_dir.parent / "adapter", base_model=llm.source)
        if merge:
            merge_lora(net)
            state = {k: v.float() for k, v in net.state_dict().items()}
            save_model_folder(result.model_dir, net.config, state, tok)
    if save_as:
        recipe = training_recipe(
            lineage,
            cfg,
            task=task,
            freeze_last=freeze_last if method == "freeze" else None,
            lora=dataclasses.asdict(lora_config or LoRAConfig()) if method == "lora" else None,
        )
        data_files = [f for f in (train_file, val_file) if f]
        store_run(result, save_as, parent=llm.source, recipe=recipe, data=data_files)
    return result
