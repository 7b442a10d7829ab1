"""BERT-style sentence encoders (all-MiniLM-L6-v2 and its kin), in one small file.

They reuse the decoder's attention and MLP (``model.py``); three things differ and live here: the embeddings
add a segment ("token type") vector and are normalised, every token attends to every real token (no causal
mask), and each block normalises after its residual sum (post-norm) rather than before. An encoder embeds
text. Two heads train on top (``train/methods.py`` and ``data/mlm.py`` put them there), each BERT's own so an
exported folder loads in transformers' matching class:

- a classification head (``config.labels``), transformers' ``BertForSequenceClassification``: the text's vector,
  pooled by ``config.pooling``, then ``score`` (a linear layer with bias, HF's ``classifier``). ``[CLS]`` pooling
  first passes the first token through BERT's ``pooler`` (dense + tanh), exactly as HF does, so a CLS-pooled
  classifier's export gives HF's logits. Mean pooling (the sentence encoders' own, e.g. all-MiniLM-L6-v2's, and
  the default for them) feeds the masked mean straight to ``score``: it often tunes better from a sentence
  encoder, but HF's class always pools [CLS], so its export carries the head's weights and the pooling in
  ``config.json``'s ``lmforge`` section, and only lmforge reads it back with the same logits.
- a masked-language-model head (``config.masked_lm``), ``BertForMaskedLM``'s ``cls.predictions``: dense, the
  activation, LayerNorm, then ``lm_head`` (its weight is the word embeddings, plus a bias).

An encoder never generates: a decoder-only job (generate, chat, next-token training) is a clear error.

Shapes: B batch, T tokens, C n_embd. Batches are left-padded like the decoder's, and positions are counted
over real tokens only, so a padded text gets exactly the vector it gets alone.
"""

from __future__ import annotations

from typing import NoReturn

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.errors import UnsupportedError
from lmforge.model import ACTIVATIONS, IGNORE_INDEX, MLP, Attention, Network, make_norm


class EncoderBlock(nn.Module):
    """Post-norm residual block (BERT): x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    def __init__(self, config: Config, layer: int) -> None:
        super().__init__()
        self.attn = Attention(config, layer)
        self.attn_norm = make_norm(config)
        self.mlp = MLP(config)
        self.mlp_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, None, mask, None)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class MaskedLMTransform(nn.Module):
    """BERT's ``cls.predictions.transform``: dense -> activation -> LayerNorm, before the vocabulary projection."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.act = ACTIVATIONS[config.activation]
        self.norm = make_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class Encoder(Network):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.embed_norm = make_norm(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config, i) for i in range(config.n_layer))
        self.mlm: MaskedLMTransform | None = None
        self.lm_head: nn.Linear | None = None
        if config.masked_lm:
            self.mlm = MaskedLMTransform(config)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
            self.lm_head.weight = self.wte.weight  # BERT ties the decoder to the word embeddings
        self.pooler: nn.Linear | None = None
        self.score: nn.Linear | None = None
        if config.labels:
            self.pooler = nn.Linear(config.n_embd, config.n_embd) if config.pooling == "cls" else None
            self.score = nn.Linear(config.n_embd, len(config.labels))
        if self.wte.weight.device.type != "meta":
            self.apply(self._init_weights)

    def hidden_states(self, idx: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> the last block's hidden states (B, T, C); ``attention_mask`` (B, T) marks real tokens."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.block_size}")
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T), left padding does not shift
        # Segment 0 for every token: one text at a time, never a sentence pair.
        x = self.wte(idx) + self.wpe(positions) + self.wtt.weight[0]  # (B, T, C)
        x = self.drop(self.embed_norm(x))
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees every real token
        for block in self.blocks:
            x = block(x, mask)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: object = None,
        last_logits_only: bool = False,
        classify: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Masked-LM logits (B, T, V) at every position and, with ``targets`` (B, T: the original id where a
        token was masked, IGNORE_INDEX elsewhere), the mean cross-entropy over the masked positions.
        ``cache`` / ``last_logits_only`` are a decoder's (generation): an encoder refuses them.
        ``classify=True``: the classification head's outputs (B, num_labels) instead, no loss (as
        ``Transformer.forward``: what a DDP or FSDP wrapper is called with)."""
        if classify:
            return self.classify(idx, attention_mask), None
        if cache is not None or last_logits_only:
            self.new_cache()
        if self.mlm is None or self.lm_head is None:
            raise UnsupportedError(
                "this model is a sentence encoder without a masked-language-model head: it embeds and "
                "classifies, it does not predict tokens",
                hint="pretrain it with `lmforge pretrain --objective mlm` to give it one",
            )
        logits = self.lm_head(self.mlm(self.hidden_states(idx, attention_mask=attention_mask)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def classify(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T), left-padded -> head outputs (B, num_labels) from the pooled text vector."""
        if self.score is None:
            raise ValueError("this model has no classification head (its config has no labels)")
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        x = self.hidden_states(idx, attention_mask=attention_mask)  # (B, T, C)
        if (
            self.pooler is not None
        ):  # [CLS]: the first real token of each left-padded row, through BERT's pooler
            first = attention_mask.long().argmax(-1)  # (B,)
            pooled = torch.tanh(self.pooler(x[torch.arange(x.shape[0], device=x.device), first]))
        else:
            weights = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.score(self.drop(pooled))  # (B, L)

    def new_cache(self, *args: object, **kwargs: object) -> NoReturn:
        raise UnsupportedError(
            "this model is a sentence encoder: it embeds text (and classifies or fills masks when trained "
            "to), but has no causal language-model head to generate or chat with",
            hint="use embed / similarity / classify with it, or load a language model (e.g. the default) for this",
        )
