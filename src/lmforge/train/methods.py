"""Fine-tuning methods: which parameters train (``full``, ``freeze``: the last N blocks, ``lora``: adapters), and
the classification head a classifier trains on top. Recipes and the memory estimate (``lmforge.sizing``) both
set up a model through here, so an estimate measures exactly what a run trains.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from lmforge.encoder import Encoder
from lmforge.errors import LmforgeError
from lmforge.lora import LoRAConfig, inject_lora
from lmforge.model import Network

Method = Literal["full", "freeze", "lora"]


def add_classifier(
    model: Network, labels: list[str], regression: bool, seed: int, pooling: Literal["last", "mean"] = "last"
) -> None:
    """Give the model a fresh head with one output per label (one for regression).

    A decoder's head reads the last real token's state or (``pooling="mean"``) the mean of the real tokens'
    states. An encoder gets BERT's (``encoder.Encoder``): pooled by its ``config.pooling``, through a fresh
    pooler for [CLS], into a linear layer with bias; a masked-LM head it had is dropped (the classifier
    replaces it)."""
    model.config.labels, model.config.regression = list(labels), regression
    torch.manual_seed(seed)
    if isinstance(model, Encoder):
        model.config.masked_lm, model.config.tie_embeddings = False, False
        model.mlm = model.lm_head = None
        width, kind = model.config.n_embd, {"device": model.device, "dtype": model.dtype}
        model.pooler = nn.Linear(width, width, **kind) if model.config.pooling == "cls" else None
        model.score = nn.Linear(width, len(labels), **kind)
        for layer in (model.pooler, model.score):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.02)  # BERT's initializer_range
                nn.init.zeros_(layer.bias)
        return
    model.config.head_pooling = pooling
    model.score = nn.Linear(
        model.config.n_embd, len(labels), bias=False, device=model.device, dtype=model.dtype
    )
    nn.init.normal_(model.score.weight, std=0.02)


def choose_trainable(model: Network, method: Method, train_last_blocks: int, lora: LoRAConfig | None) -> int:
    """Set requires_grad for the method; returns the number of trainable parameters."""
    head = ["score."] if getattr(model, "score", None) is not None else []  # an encoder–decoder has none
    head += ["pooler."] if getattr(model, "pooler", None) is not None else []  # an encoder's [CLS] pooler
    if method == "full":
        for name, p in model.named_parameters():
            # A classifier reads its score head: an untied LM head gets no gradient, and a parameter the
            # optimizer never steps has no state to checkpoint (resume needs one for every trainable tensor).
            p.requires_grad_(not (head and name.startswith("lm_head.")))
    elif method == "freeze":
        # An encoder–decoder trains the last blocks of its decoder (the ones nearest the output).
        seq2seq = model.config.is_seq2seq
        blocks = model.config.n_decoder_layer if seq2seq else model.config.n_layer
        prefix = "decoder." if seq2seq else ""
        if not 1 <= train_last_blocks <= blocks:
            raise LmforgeError(
                f"train_last_blocks={train_last_blocks} must be between 1 and the model's "
                f"{blocks} {'decoder ' if seq2seq else ''}blocks",
                hint="e.g. --train-last-blocks 2 trains the last two blocks",
            )
        first = blocks - train_last_blocks
        trainable = [f"{prefix}blocks.{i}." for i in range(first, blocks)] + [f"{prefix}norm."] + head
        if not head and not model.config.tie_embeddings:
            trainable.append("lm_head.")
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(t) for t in trainable))
    elif method == "lora":
        inject_lora(model, lora or LoRAConfig(), trainable=head)
    else:
        raise LmforgeError(f"unknown method {method!r}", hint="use full, freeze or lora")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
