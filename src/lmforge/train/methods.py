"""Fine-tuning methods: which parameters train (``full``, ``freeze``: the last N blocks, ``lora``: adapters), and
the classification head a classifier trains on top. Recipes and the memory estimate (``lmforge.sizing``) both
set up a model through here, so an estimate measures exactly what a run trains.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.lora import LoRAConfig, inject_lora
from lmforge.model import Transformer

Method = Literal["full", "freeze", "lora"]


def add_classifier(
    model: Transformer, labels: list[str], regression: bool, seed: int, pool: Literal["last", "mean"] = "last"
) -> None:
    """Give the model a fresh head with one output per label (one for regression), reading the last real
    token's state or (``pool="mean"``) the mean of the real tokens' states."""
    model.config.labels, model.config.regression = list(labels), regression
    model.config.head_pooling = pool
    torch.manual_seed(seed)
    model.score = nn.Linear(
        model.config.n_embd, len(labels), bias=False, device=model.device, dtype=model.dtype
    )
    nn.init.normal_(model.score.weight, std=0.02)


def choose_trainable(
    model: Transformer, method: Method, train_last_blocks: int, lora: LoRAConfig | None
) -> int:
    """Set requires_grad for the method; returns the number of trainable parameters."""
    head = ["score."] if model.score is not None else []
    if method == "full":
        for name, p in model.named_parameters():
            # A classifier reads its score head: an untied LM head gets no gradient, and a parameter the
            # optimizer never steps has no state to checkpoint (resume needs one for every trainable tensor).
            p.requires_grad_(not (head and name.startswith("lm_head.")))
    elif method == "freeze":
        if not 1 <= train_last_blocks <= model.config.n_layer:
            raise LmforgeError(
                f"train_last_blocks={train_last_blocks} must be between 1 and the model's "
                f"{model.config.n_layer} blocks",
                hint="e.g. --train-last-blocks 2 trains the last two blocks",
            )
        first = model.config.n_layer - train_last_blocks
        trainable = [f"blocks.{i}." for i in range(first, model.config.n_layer)] + ["norm."] + head
        if not head and not model.config.tie_embeddings:
            trainable.append("lm_head.")
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(t) for t in trainable))
    elif method == "lora":
        inject_lora(model, lora or LoRAConfig(), trainable=head)
    else:
        raise LmforgeError(f"unknown method {method!r}", hint="use full, freeze or lora")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
