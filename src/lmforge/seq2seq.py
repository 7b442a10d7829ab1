"""Encoder–decoder Transformers (T5, BART, mBART) from model.py's parts, and their generation.

The encoder reads the input once, bidirectionally; the decoder writes the output token by token, each block
attending to what it wrote (causal self-attention, through a ``KVCache``) and then to the encoder's output
(cross-attention: the same ``Attention`` weights, its keys and values projected from the encoder's states).
Which family it is comes from ``Config`` fields, never from its name: ``position`` "relative" (T5's bucketed
key - query distances, one bias per head, added to the scores; unscaled attention via ``attention_scale``) or
"learned" with ``position_offset`` (BART's positions start at row 2), ``post_norm`` (BART) or pre-norm (T5,
mBART), ``embedding_norm``, ``final_norm``, ``scale_embeddings``, ``scale_head_input`` (T5's tied head) and
``logits_bias``. Shapes: B batch, S input tokens, T output tokens this call, C n_embd, H heads, D head_dim.

::

    input ids (B, S) ──wte──▶ encoder blocks: x + attn(norm(x)), x + mlp(norm(x)) ──▶ memory (B, S, C)
                                                                                      │ k_proj, v_proj of
                                                                                      ▼ each decoder block, once
    output ids (B, T) ─wte─▶ decoder blocks: self-attn (KV cache) ─▶ cross-attn (q: decoder, k/v: memory)
                                           ─▶ mlp ─▶ lm_head ─▶ logits (B, T, V)

The encoder's input is right-padded (as transformers pads it): BART's learned positions count from the first
row whatever the mask says, so left padding would move them. Every mask here is additive (0 or -inf) and
float, so T5's position bias adds into it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.beam import (
    BeamParams,
    beam_search,
    check_beam_memory,
    check_beam_sampling,
    hypothesis_completion,
)
from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.generate import Completion, CompletionBuilder, SamplingParams, next_tokens, sampling_generator
from lmforge.model import IGNORE_INDEX, MLP, Attention, KVCache, Network, make_norm
from lmforge.tokenizer import Tokenizer

Memory = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder block: the encoder's keys and values


def relative_buckets(
    relative: torch.Tensor, *, bidirectional: bool, buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key - query distance: exact below buckets / 4 (or / 2 one-way), then logarithmic up
    to ``max_distance``; in both directions (the encoder) half the buckets are for keys after the query."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket += (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)  # only the past: distance back
    exact = buckets // 2
    far = (
        exact
        + (torch.log(relative.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    )
    far = far.clamp(max=buckets - 1)
    return bucket + torch.where(relative < exact, relative, far)


class CrossAttention(Attention):
    """``Attention`` whose keys and values come from the encoder: ``memory`` projects them once per input."""

    def memory(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = states.shape
        k = self.k_proj(states).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, S, D)
        v = self.v_proj(states).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        return k, v

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = memory
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
            scale=self.scale,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class Seq2SeqBlock(nn.Module):
    """Self-attention, cross-attention (decoder blocks only) and the MLP, each a residual branch: pre-norm
    ``x + f(norm(x))``, or post-norm ``norm(x + f(x))`` with ``config.post_norm``."""

    def __init__(self, config: Config, layer: int, *, cross: bool) -> None:
        super().__init__()
        self.post_norm = config.post_norm
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.cross_norm = make_norm(config) if cross else None
        self.cross = CrossAttention(config, layer) if cross else None
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, None, mask, cache))
        if self.cross is not None and self.cross_norm is not None:
            assert memory is not None and memory_mask is not None
            x = self._residual(x, self.cross_norm, lambda h: self.cross(h, memory, memory_mask))
        return self._residual(x, self.mlp_norm, self.mlp)

    def _residual(self, x: torch.Tensor, norm: nn.Module, f: nn.Module | object) -> torch.Tensor:
        if self.post_norm:
            return norm(x + f(x))  # type: ignore[operator]
        return x + f(norm(x))  # type: ignore[operator]


class Stack(nn.Module):
    """The encoder's or the decoder's blocks, with their positions and norms."""

    def __init__(self, config: Config, layers: int, *, decoder: bool) -> None:
        super().__init__()
        self.config, self.decoder = config, decoder
        C = config.n_embd
        learned = config.position == "learned"
        self.wpe = nn.Embedding(config.block_size + config.position_offset, C) if learned else None
        relative = config.position == "relative"
        self.relative_bias = nn.Embedding(config.relative_buckets, config.n_head) if relative else None
        self.embedding_norm = make_norm(config) if config.embedding_norm else None
        self.blocks = nn.ModuleList(Seq2SeqBlock(config, i, cross=decoder) for i in range(layers))
        self.norm = make_norm(config) if config.final_norm else None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        past: int,
        cache: KVCache | None = None,
        memory: Memory | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embedded tokens x (B, T, C) after ``past`` cached ones; ``mask`` (B or 1, 1, T, S) additive."""
        T = x.shape[1]
        if self.wpe is not None:
            positions = torch.arange(past, past + T, device=x.device) + self.config.position_offset
            x = x + self.wpe(positions)[None]
        if self.relative_bias is not None:
            mask = mask + self.position_bias(T, past + T, past, x.device)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, memory[i] if memory else None, memory_mask)
        if cache is not None:
            cache.advance(T)
        return self.norm(x) if self.norm is not None else x

    def position_bias(self, T: int, S: int, past: int, device: torch.device) -> torch.Tensor:
        """T5's bias (1, H, T, S) for queries at past..past+T-1 over keys 0..S-1."""
        assert self.relative_bias is not None
        queries = torch.arange(past, past + T, device=device)[:, None]
        keys = torch.arange(S, device=device)[None, :]
        buckets = relative_buckets(
            keys - queries,
            bidirectional=not self.decoder,
            buckets=self.config.relative_buckets,
            max_distance=self.config.relative_max_distance,
        )  # (T, S)
        return self.relative_bias(buckets).permute(2, 0, 1)[None]


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, S) 1 = real -> additive (B, 1, 1, S): 0 for real keys, -inf for padding."""
    if attention_mask is None:
        return None
    keep = attention_mask[:, None, None, :] != 0
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


class Seq2SeqTransformer(Network):
    """T5 / BART / mBART: one shared token embedding, an encoder ``Stack``, a decoder ``Stack``, the head."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.encoder = Stack(config, config.n_layer, decoder=False)
        self.decoder = Stack(config, config.n_decoder_layer, decoder=True)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.logits_bias:  # a buffer, as transformers keeps it: saved, never trained
            self.register_buffer("logits_bias", torch.zeros(config.vocab_size))
        self.embed_scale = math.sqrt(config.n_embd) if config.scale_embeddings else 1.0
        if self.wte.weight.device.type != "meta":
            self.apply(self._init_weights)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """The decoder's self-attention cache."""
        layers = self.config.replace(n_layer=self.config.n_decoder_layer)
        return KVCache(layers, batch_size, max_len, self.device, self.dtype)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) * self.embed_scale if self.embed_scale != 1.0 else self.wte(idx)

    def encode(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input ids (B, S), right-padded, and their mask (B, S) -> the encoder's states (B, S, C)."""
        S = idx.shape[1]
        if S > self.config.block_size:
            raise ValueError(f"input of {S} tokens exceeds the context length {self.config.block_size}")
        mask = padding_mask(attention_mask, self.dtype)
        if mask is None:
            mask = torch.zeros(1, 1, 1, S, dtype=self.dtype, device=idx.device)
        return self.encoder(self.embed(idx), mask, 0)

    def memory(self, states: torch.Tensor) -> Memory:
        """Each decoder block's cross-attention keys and values of the encoder's states, computed once."""
        return [block.cross.memory(states) for block in self.decoder.blocks]  # type: ignore[union-attr]

    def decode(
        self,
        idx: torch.Tensor,
        memory: Memory,
        memory_mask: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Output ids (B, T) -> logits (B, T, V), attending to ``memory`` (``memory_mask`` additive (B, 1, 1, S))."""
        T = idx.shape[1]
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"output of {past + T} tokens exceeds the context length {self.config.block_size}"
            )
        if cache is not None:
            cache.reserve(past + T)
        causal = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(past)
        mask = torch.zeros(causal.shape, dtype=self.dtype, device=idx.device).masked_fill(
            ~causal, float("-inf")
        )
        x = self.decoder(self.embed(idx), mask[None, None], past, cache, memory, memory_mask)
        if self.config.scale_head_input:
            x = x * self.config.n_embd**-0.5
        logits = self.lm_head(x)
        return logits + self.logits_bias if self.config.logits_bias else logits

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        decoder_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input ids (B, S) and the decoder's ids (B, T) -> logits (B, T, V) and, with ``targets``, the loss."""
        memory = self.memory(self.encode(idx, attention_mask))
        memory_mask = padding_mask(attention_mask, self.dtype)
        if memory_mask is None:
            memory_mask = torch.zeros(1, 1, 1, idx.shape[1], dtype=self.dtype, device=idx.device)
        logits = self.decode(decoder_ids, memory, memory_mask)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss


# ------------------------------------------------------------------ generation
def right_pad(inputs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, S) right-padded and their mask (B, S)."""
    longest = max(len(p) for p in inputs)
    ids = torch.full((len(inputs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), longest), dtype=torch.long)
    for row, tokens in enumerate(inputs):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


class Seq2SeqBeams:
    """An encoder–decoder as beam search (and the greedy loop) sees it: the inputs encoded once, each row's
    cross-attention keys and values repeated per beam, the decoder's cache reordered by beam.

    Beams only ever continue beams of their own input, so the memory needs no reordering: only the cache does.
    """

    def __init__(
        self, model: Seq2SeqTransformer, inputs: Sequence[Sequence[int]], num_beams: int, steps: int
    ):
        self.model = model
        device = model.device
        ids, mask = right_pad(inputs, model.config.pad_token_id or 0)
        ids, mask = ids.to(device), mask.to(device)
        repeat = torch.arange(len(inputs), device=device).repeat_interleave(num_beams)
        memory = model.memory(model.encode(ids, mask))
        self.memory = [(k.index_select(0, repeat), v.index_select(0, repeat)) for k, v in memory]
        self.memory_mask = padding_mask(mask, model.dtype).index_select(0, repeat)  # type: ignore[union-attr]
        rows = len(inputs) * num_beams
        self.cache = model.new_cache(rows, steps)
        start = torch.full((rows, 1), start_token(model.config), dtype=torch.long, device=device)
        self.logits = model.decode(start, self.memory, self.memory_mask, self.cache)[:, -1]

    def first_logits(self) -> torch.Tensor:
        return self.logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens[:, None], self.memory, self.memory_mask, self.cache)[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)


def start_token(config: Config) -> int:
    if config.decoder_start_token_id is None:
        raise LmforgeError(
            f"{config.name}: the config names no decoder_start_token_id",
            hint="set decoder_start_token_id in config.json (T5: the pad id, BART: the eos id)",
        )
    return config.decoder_start_token_id


@torch.inference_mode()
def seq2seq_complete(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    inputs: Sequence[Sequence[int]],
    params: SamplingParams,
    beams: BeamParams,
    eos_ids: Sequence[int] = (),
) -> list[list[Completion]]:
    """Input ids -> outputs: greedy or sampled (``num_beams`` 1), else beam search; ``num_return_sequences``
    completions per input (one without beams), best first. ``prompt_tokens`` counts the input."""
    if not inputs or any(not tokens for tokens in inputs):
        raise LmforgeError("an empty input", hint="give every input at least one token")
    check_beam_sampling(params, beams)
    longest = max(len(tokens) for tokens in inputs)
    if longest > model.config.block_size:
        raise LmforgeError(
            f"input of {longest} tokens does not fit the model's context of {model.config.block_size} tokens",
            hint="shorten the input",
        )
    steps = min(params.max_new_tokens, model.config.block_size - 1)  # the start token takes a position
    if steps == 0:
        return [[Completion("", [], len(tokens), "length")] for tokens in inputs]
    width = torch.empty((), dtype=model.dtype).element_size()
    rows = len(inputs) * beams.num_beams
    decoder = model.config.replace(n_layer=model.config.n_decoder_layer)
    check_beam_memory(decoder, model.device, rows=rows, length=steps + longest, width=width)
    source = Seq2SeqBeams(model, inputs, beams.num_beams, steps)
    if beams.num_beams > 1:
        prefixes = [[start_token(model.config)]] * len(inputs)
        found = beam_search(
            source, prefixes=prefixes, steps=steps, beams=beams, params=params, eos_ids=eos_ids
        )
        return [
            [hypothesis_completion(tokenizer, h, len(tokens), params.stop) for h in hypotheses]
            for tokens, hypotheses in zip(inputs, found, strict=True)
        ]
    return [[c] for c in _sample(source, tokenizer, inputs, params, eos_ids, steps)]


def _sample(
    source: Seq2SeqBeams,
    tokenizer: Tokenizer,
    inputs: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_ids: Sequence[int],
    steps: int,
) -> list[Completion]:
    """Greedy or sampled decoding, one token per row per step, each row ending on its own."""
    outputs = [CompletionBuilder(tokenizer, len(tokens), params, eos_ids, steps) for tokens in inputs]
    logits = source.first_logits()
    generator = sampling_generator(params, logits.device)
    seen = torch.full((len(inputs), 1), start_token(source.model.config), device=logits.device)
    for step in range(steps):
        use_seen = seen if params.repetition_penalty != 1.0 else None
        token = next_tokens(logits, params, generator, use_seen)
        for row, value in enumerate(token.tolist()):
            if not outputs[row].done:
                outputs[row].push(value)
        if all(out.done for out in outputs) or step == steps - 1:
            break
        seen = torch.cat([seen, token[:, None]], dim=1)
        logits = source.step(token)
    for out in outputs:
        if not out.done:
            out.end("length")
    return [out.completion for out in outputs if out.completion is not None]
