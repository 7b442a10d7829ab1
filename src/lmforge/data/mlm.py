"""Masked-language-model pretraining (BERT): the masking and the Trainer objective that draws masked windows.

BERT's recipe (Devlin et al. 2019, as transformers' ``DataCollatorForLanguageModeling`` does it): 15 % of the
tokens that are not special are chosen; of those, 80 % become ``[MASK]``, 10 % a random token and 10 % stay as
they were; the loss is the cross-entropy of predicting the original token at the chosen positions only.

Windows come from the same prepared token shards as causal pretraining (``TokenShards.batch``), framed as
``[CLS] window [SEP]`` when the tokenizer has those tokens. The masking of batch ``i`` is a pure function of
(seed, split, i), like the windows, so a resumed run masks exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from lmforge.data.text import Batch, WindowObjective
from lmforge.encoder import Encoder, MaskedLMTransform
from lmforge.errors import LmforgeError
from lmforge.model import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer

MASK_TOKENS = ("[MASK]", "<mask>", "<|mask|>")  # BERT's, RoBERTa's, and a spelling train_tokenizer users pick


def mask_token_id(
    tokenizer: Tokenizer,
    purpose: str = "masked-language-model pretraining",
    hint: str = "train one with special_tokens=['<|endoftext|>', '[MASK]'], or use a BERT model's tokenizer",
) -> int:
    """The tokenizer's mask token, or a clear error naming what needs it (MLM, BART's infilling)."""
    for token in MASK_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return found
    raise LmforgeError(f"the tokenizer has no mask token ([MASK] or <mask>) for {purpose}", hint=hint)


def mask_tokens(
    ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) -> (inputs, targets): BERT's 80/10/10 corruption of ``probability`` of the ordinary tokens;
    targets hold the original id where a token was chosen and IGNORE_INDEX elsewhere. At least one token per
    batch is chosen (a batch with none would have no loss to learn from)."""
    special = torch.tensor(sorted(set(special_ids)), dtype=ids.dtype)
    ordinary = ~torch.isin(ids, special)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ordinary
    if not chosen.any() and ordinary.any():
        chosen.view(-1)[ordinary.view(-1).nonzero()[0]] = True
    targets = torch.where(chosen, ids, IGNORE_INDEX)
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    inputs = torch.where(chosen & (action < 0.8), mask_id, ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, targets


class MaskedLanguageModelingObjective(WindowObjective):
    """BERT's masked-token prediction on prepared token shards, for the one Trainer (an encoder with
    ``config.masked_lm``: ``Encoder.forward`` gives the loss over the masked positions)."""

    TASK = "masked-language-modeling"

    def __init__(
        self,
        shards: Any,
        tokenizer: Tokenizer,
        micro_batch_size: int,
        block_size: int,
        seed: int = 1337,
        probability: float = 0.15,
    ) -> None:
        if not 0 < probability < 1:
            raise LmforgeError(
                f"mask probability {probability} must be between 0 and 1", hint="BERT uses 0.15"
            )
        super().__init__(shards, micro_batch_size, seed)
        self.probability = probability
        self.mask_id = mask_token_id(tokenizer)
        self.vocab_size = tokenizer.vocab_size
        self.special_ids = set(tokenizer.special_ids) | {self.mask_id}
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        self.frame = (cls_id, sep_id) if cls_id is not None and sep_id is not None else None
        self.special_ids |= set(self.frame or ())
        self.window = block_size - (2 if self.frame else 0)
        if self.window < 1:
            raise LmforgeError(f"block_size {block_size} leaves no room for text", hint="use e.g. 128")

    def batch(self, split: str, batch_size: int, seed: int, index: int) -> Batch:
        x, _ = self.shards.batch(split, batch_size, self.window, seed, index)
        if self.frame:
            cls_id, sep_id = self.frame
            x = torch.cat([torch.full((batch_size, 1), cls_id), x, torch.full((batch_size, 1), sep_id)], 1)
        key = hashlib.shake_128(f"lmforge-mlm:{seed}:{split}:{index}".encode()).digest(8)
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        inputs, targets = mask_tokens(
            x,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            special_ids=self.special_ids,
            generator=generator,
            probability=self.probability,
        )
        return {"input_ids": inputs, "targets": targets}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mask_probability": self.probability}


def prepare_for_mlm(model: nn.Module, seed: int) -> None:
    """Check that ``model`` is an encoder and give it BERT's MLM head if it has none (all-MiniLM-L6-v2 ships
    without one), initialised as BERT initialises it: normal(0, 0.02) dense, unit LayerNorm, zero bias, the
    decoder tied to the word embeddings."""
    if not isinstance(model, Encoder):
        raise LmforgeError(
            f"--objective mlm trains encoders (BERT-style), and {model.config.name} is a decoder",
            hint="use --objective lm for it, or an encoder: --arch bert-mini or --init all-minilm-l6-v2",
        )
    if model.lm_head is not None:
        return
    model.config.masked_lm, model.config.tie_embeddings = True, True
    torch.manual_seed(seed)
    kind = {"device": model.device, "dtype": model.dtype}
    model.mlm = MaskedLMTransform(model.config).to(**kind)
    model.lm_head = nn.Linear(model.config.n_embd, model.config.vocab_size, **kind)
    model.lm_head.weight = model.wte.weight
    nn.init.normal_(model.mlm.dense.weight, std=0.02)
    nn.init.zeros_(model.mlm.dense.bias)
    nn.init.zeros_(model.lm_head.bias)
