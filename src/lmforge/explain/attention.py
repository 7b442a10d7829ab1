"""Attention maps, attention rollout and the logit lens: where the heads look, and what each block predicts.

The weights come from the model itself: inside ``model.recording_attention`` each block computes
softmax(q k^T / sqrt(D)) explicitly for one forward pass in that thread and records it (the normal, fused path
never does).
The logit lens reads the residual stream after every block through forward hooks on the blocks and applies
the final norm and the language-model head to it (nostalgebraist, 2020).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.encoder import Encoder
from lmforge.errors import LmforgeError
from lmforge.explain.tokens import piece_spans, token_text
from lmforge.loading import LoadedModel
from lmforge.model import Transformer, recording_attention

MAX_LENS_TOP_K = 20
MAX_VIEW_TOKENS = 128  # one head's map in the playground: at most 128 x 128 cells, still a readable heatmap


@dataclass
class AttentionMaps:
    """``weights`` (layers, heads, T, T) of one text; ``labels`` the T tokens as text (a character split into
    several tokens is labelled ``char[i/n]``)."""

    token_ids: list[int]
    labels: list[str]
    weights: torch.Tensor

    def rollout(self) -> torch.Tensor:
        """Attention rollout (Abnar & Zuidema, 2020): (T, T), how much each position draws on each input token
        through all layers, the residual counted as half of every layer (heads averaged, rows renormalised)."""
        T = self.weights.shape[-1]
        eye = torch.eye(T, dtype=torch.float64)
        rolled = eye
        for layer in self.weights.double():
            mixed = 0.5 * layer.mean(0) + 0.5 * eye
            mixed = mixed / mixed.sum(-1, keepdim=True)
            rolled = mixed @ rolled
        return rolled.float()


def this_thread_only(hook: Callable[[torch.nn.Module, Any, Any], Any]) -> Callable[..., Any]:
    """A forward hook that acts only in the thread that made it: a model is shared with other threads (a
    server's scheduler decodes while a task thread explains), whose forwards must pass through untouched."""
    owner = threading.get_ident()
    return lambda module, args, out: hook(module, args, out) if threading.get_ident() == owner else None


def token_labels(llm: LoadedModel, ids: list[int]) -> list[str]:
    """One label per token; the tokens of one character share its text, numbered (``明[1/3]``)."""
    labels: list[str] = []
    for start, end, text in piece_spans(llm.tokenizer, ids):
        if end - start == 1:
            labels.append(text if text else token_text(llm.tokenizer, ids[start]))
        else:
            labels += [f"{text}[{i + 1}/{end - start}]" for i in range(end - start)]
    return labels


def encode_checked(llm: LoadedModel, text: str) -> list[int]:
    ids = llm.tokenizer.encode(text)
    if not ids:
        raise LmforgeError("no tokens to explain", hint="give some text")
    if len(ids) > llm.config.block_size:
        raise LmforgeError(
            f"text of {len(ids)} tokens exceeds the model's context of {llm.config.block_size}",
            hint="shorten the text",
        )
    return ids


@torch.inference_mode()
def attention_maps(llm: LoadedModel, text: str) -> AttentionMaps:
    """Every layer's and head's attention weights over ``text``: decoders (causal) and sentence encoders."""
    return attention_maps_of_ids(llm, encode_checked(llm, text))


@torch.inference_mode()
def attention_maps_of_ids(llm: LoadedModel, ids: list[int]) -> AttentionMaps:
    """``attention_maps`` of token ids as they are (a prompt built by a service, say)."""
    model = llm.model
    idx = torch.tensor([ids], device=model.device)
    with recording_attention() as records:
        model.hidden_states(idx)
    weights = torch.stack([layer[0].float().cpu() for layer in records.values()])  # (L, H, T, T)
    return AttentionMaps(ids, token_labels(llm, ids), weights)


def attention_head(llm: LoadedModel, text: str, *, layer: int, head: int) -> dict[str, Any]:
    """One layer's and head's weights over ``text`` (at most MAX_VIEW_TOKENS tokens) as plain lists, with the
    token labels and the model's layer and head counts: what the playground's attention view draws."""
    ids = encode_checked(llm, text)
    if len(ids) > MAX_VIEW_TOKENS:
        raise LmforgeError(
            f"text of {len(ids)} tokens is over the attention view's limit of {MAX_VIEW_TOKENS}",
            hint="shorten the text",
        )
    layers, heads = llm.config.n_layer, llm.config.n_head
    if not 0 <= layer < layers or not 0 <= head < heads:
        raise LmforgeError(
            f"layer {layer}, head {head} is not in this model",
            hint=f"use layer 0-{layers - 1}, head 0-{heads - 1}",
        )
    maps = attention_maps_of_ids(llm, ids)
    return {
        "layer": layer,
        "head": head,
        "layers": layers,
        "heads": heads,
        "tokens": maps.labels,
        "weights": maps.weights[layer, head].tolist(),  # (T, T): row = the token looking, column = looked at
    }


@dataclass
class LensRow:
    """After block ``layer`` (0 = the embeddings): the top tokens predicted at every position, with
    probabilities: ``top[t]`` is a list of (text, probability)."""

    layer: int
    top: list[list[tuple[str, float]]]


@dataclass
class LogitLens:
    labels: list[str]
    rows: list[LensRow]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "rows": [{"layer": r.layer, "top": r.top} for r in self.rows]}


@torch.inference_mode()
def logit_lens(llm: LoadedModel, text: str, *, top_k: int = 3) -> LogitLens:
    """The top ``top_k`` next tokens the residual stream predicts at every position, after every block."""
    if not 1 <= top_k <= MAX_LENS_TOP_K:
        raise LmforgeError(f"top_k={top_k} is out of range", hint=f"use 1 to {MAX_LENS_TOP_K}")
    model = llm.model
    if isinstance(model, Encoder) or not isinstance(model, Transformer):
        raise LmforgeError(
            "the logit lens needs a language-model head; this model is a sentence encoder",
            hint="load a language model (e.g. the default)",
        )
    ids = encode_checked(llm, text)
    residuals: list[torch.Tensor] = []
    keep = this_thread_only(lambda _m, _i, out: residuals.append(out))
    hooks = [model.wte.register_forward_hook(keep)] + [
        block.register_forward_hook(keep) for block in model.blocks
    ]
    try:
        model.hidden_states(torch.tensor([ids], device=model.device))
    finally:
        for hook in hooks:
            hook.remove()
    if model.wpe is not None:  # learned positions join the stream before the first block
        positions = torch.arange(len(ids), device=model.device)
        residuals[0] = residuals[0] + model.wpe(positions)
    rows = []
    for layer, residual in enumerate(residuals):
        probs = model.lm_head(model.norm(residual[0])).float().softmax(-1)  # (T, V)
        top = torch.topk(probs, top_k)
        rows.append(
            LensRow(
                layer,
                [
                    [(token_text(llm.tokenizer, int(i)), float(p)) for p, i in zip(ps, ix, strict=True)]
                    for ps, ix in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                ],
            )
        )
    return LogitLens(token_labels(llm, ids), rows)
