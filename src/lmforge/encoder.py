"""BERT-style sentence encoders (all-MiniLM-L6-v2 and its kin), in one small file.

They reuse the decoder's attention and MLP (``model.py``); three things differ and live here: the embeddings
add a segment ("token type") vector and are normalised, every token attends to every real token (no causal
mask), and each block normalises after its residual sum (post-norm) rather than before. An encoder embeds
text; it has no language-model head, so generating, scoring or classifying with it is a clear error.

Shapes: B batch, T tokens, C n_embd. Batches are left-padded like the decoder's, and positions are counted
over real tokens only, so a padded text gets exactly the vector it gets alone.
"""

from __future__ import annotations

from typing import NoReturn

import torch
import torch.nn as nn

from lmforge.config import Config
from lmforge.errors import UnsupportedError
from lmforge.model import MLP, Attention, Network, make_norm


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

    def forward(self, *args: object, **kwargs: object) -> NoReturn:
        self._no_language_model_head()

    def new_cache(self, *args: object, **kwargs: object) -> NoReturn:
        self._no_language_model_head()

    def classify(self, *args: object, **kwargs: object) -> NoReturn:
        self._no_language_model_head()

    def _no_language_model_head(self) -> NoReturn:
        raise UnsupportedError(
            "this model is a sentence encoder: it embeds text but has no language-model head to generate, "
            "score, classify or train with",
            hint="use embed / similarity with it, or load a language model (e.g. the default) for this",
        )
