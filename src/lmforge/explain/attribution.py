"""Token attributions: which input tokens moved a score, by integrated gradients, gradient x input and occlusion.

The score ``f`` is one number per text:
- a fine-tuned classification head: the label's log-odds, z_label - logsumexp(other labels' z) (the logit,
  which does not saturate as the probability does; for two labels, z_label - z_other);
- zero-shot label scoring: the same log-odds over the labels' log-likelihoods as answers to the
  classification prompt (``inference.classify``'s prompt); only the text's tokens are attributed;
- the next token: its log-probability after the text (the greedy next token unless one is given).

Integrated gradients (Sundararajan et al., 2017) integrate the gradient along the straight path from a
baseline embedding to the text's embeddings; ``completeness_error`` reports
|sum(a) - (f(x) - f(baseline))| / |f(x) - f(baseline)|, so a too coarse integral shows. Two choices, both
made by measurement (2026-12-01, one thread):

- **The baseline is the average token** (the mean row of the embedding matrix), not zeros. On SmolLM2 the
  zero baseline cannot be integrated at all: with no biases and RMSNorm, the network is homogeneous near a
  zero input, every norm works in its eps regime, and f(alpha * x) keeps swinging by several nats as alpha
  goes 1e-1, 1e-3, ..., 1e-39 ("The capital of France is", next token: -12.5, -12.0, -14.8, -17.1, -11.1, ...)
  while f(0) is log(1/vocab) = -10.8: f has no limit at the baseline, and 32 Gauss-Legendre nodes left 42-71 %
  completeness error on three texts (25-47 % on a fine-tuned SmolLM2 classifier). The average token has a
  typical norm, so the path never nears that point. Encoders (MiniLM) add position and segment vectors and
  normalise them, so either baseline integrates there (< 1 % at 32 nodes on every message tried).
- **The nodes adapt** (``steps=None``, the default). The path is cut into 8 pieces of 4 Gauss-Legendre nodes
  (32 gradient evaluations, the old fixed default). On a piece [a, b] the exact sum is known: the attributions
  must add up to f(b) - f(a), two forward passes. While the completeness error is above ``tolerance`` (1 %),
  the pieces with the largest errors are halved, so the nodes gather where the integrand is steep
  (SmolLM2's paths have narrow steep stretches, where a fixed rule of even 64 nodes left up to 300 %). It stops
  at MAX_STEPS gradient evaluations and reports the error it reached and ``steps`` used. A given ``steps`` is
  one piece of that many nodes, as before.

Measured with the defaults: SmolLM2's next token after five texts (two spam SMS, "The capital of France is",
床前明月光，疑是地上霜, 我们今天去北京吃烤鸭) 0.32 %, 0.83 %, 0.016 %, 0.87 % in 448, 384, 224 and 96 gradient
evaluations (15-80 s each on one loaded CPU thread) and 0.44 % in 528 for the last (5.8 % after 512, so
MAX_STEPS is 1024), where the zero baseline with 32 fixed nodes left 219 %, 42 % and 71 % on
three of them, and 56-1494 % when refined up to 512 evaluations; a MiniLM spam classifier (benchmarks/
explain_faithfulness.py) median 0.047 %, max 0.87 %, 200 of 200 messages within 1 %, in 32-48 evaluations.
Occlusion replaces one token's embedding by the baseline at a time.

The embeddings are swapped through a forward hook on the network's ``wte``: positions, masks and every block
run exactly as in the model's own forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmforge.encoder import Encoder
from lmforge.errors import LmforgeError
from lmforge.explain.attention import attention_maps_of_ids, encode_checked, this_thread_only
from lmforge.explain.tokens import piece_spans, token_text
from lmforge.loading import LoadedModel
from lmforge.model import Transformer
from lmforge.prompts import chat_or_plain, classification_prompt, is_chinese

METHODS = ("integrated_gradients", "gradient_x_input", "occlusion", "attention_rollout")
DEFAULT_STEPS: int | None = None  # integrated gradients adapt the path's nodes to the tolerance
TOLERANCE = 0.01  # the completeness error the adaptive rule aims for
MAX_STEPS = 1024  # gradient evaluations, adaptive or not (SmolLM2 needed up to 528: see above)
DEFAULT_BASELINE = "mean"
BASELINES = ("mean", "zeros", "pad")
NODES_PER_PIECE = 4  # Gauss-Legendre nodes on each piece of the path
FIRST_PIECES = 8  # the path's first split: 32 gradient evaluations before any refinement
BATCH_ROWS = 16  # rows of one forward/backward: bounds memory whatever the step count


@dataclass
class Attribution:
    """Per-token attributions of one score to one text; pieces group the tokens of a character."""

    text: str
    target: str  # what was explained: a label, or the next token
    method: str
    token_ids: list[int]
    pieces: list[str]  # readable text per piece
    scores: list[float]  # one per piece (sum over its tokens)
    score: float  # f(x)
    baseline_score: float | None = None  # f(baseline), integrated gradients only
    completeness_error: float | None = None  # relative, integrated gradients only
    steps: int | None = None  # gradient evaluations integrated gradients used
    extra: dict[str, Any] = field(default_factory=dict)

    def words(self) -> list[tuple[str, float]]:
        """Pieces joined into words (a new word at whitespace; every CJK character its own word)."""
        words: list[tuple[str, float]] = []
        for piece, value in zip(self.pieces, self.scores, strict=True):
            cjk = any(is_chinese(ch) for ch in piece.strip())
            starts = not words or piece[:1].isspace() or cjk or _is_cjk_word(words[-1][0])
            if starts or not piece.strip():
                words.append((piece, value))
            else:
                words[-1] = (words[-1][0] + piece, words[-1][1] + value)
        return [(w.strip(), v) for w, v in words if w.strip()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "target": self.target,
            "method": self.method,
            "pieces": [{"text": p, "attribution": s} for p, s in zip(self.pieces, self.scores, strict=True)],
            "score": self.score,
            "baseline_score": self.baseline_score,
            "completeness_error": self.completeness_error,
            "steps": self.steps,
        }


def _is_cjk_word(word: str) -> bool:
    return any(is_chinese(ch) for ch in word.strip())


@dataclass
class _Target:
    """A score as a function of the embeddings: ``ids`` (R, T) rows share the attributed ``span``."""

    ids: torch.Tensor  # (R, T)
    span: list[int]  # token positions attributed (into T)
    name: str
    reduce: Callable[[torch.Tensor], torch.Tensor]  # embeds (N * R, T, C) -> scores (N,)
    read_at: int | None  # the position whose output the score reads (rollout starts there); None: all, pooled


@contextlib.contextmanager
def _embeddings(model: torch.nn.Module, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the network's token embeddings are ``replace(its own embeddings)``."""
    hook = model.wte.register_forward_hook(this_thread_only(lambda _m, _i, out: replace(out)))
    try:
        yield
    finally:
        hook.remove()


def _log_odds(scores: torch.Tensor, index: int) -> torch.Tensor:
    """scores (N, L) -> (N,) log-odds of label ``index`` against the rest."""
    others = torch.cat([scores[:, :index], scores[:, index + 1 :]], dim=1)
    return scores[:, index] - others.logsumexp(-1)


def _head_target(llm: LoadedModel, text: str, label: str | None) -> _Target:
    model, labels = llm.model, llm.config.labels
    ids = encode_checked(llm, text)
    if llm.config.regression:
        raise LmforgeError("attributions of a regression head are not supported", hint="use a classifier")
    idx = torch.tensor([ids], device=model.device)
    if label is None:
        with torch.no_grad():
            label = labels[int(model.classify(idx)[0].argmax())]
    if label not in labels:
        raise LmforgeError(
            f"label {label!r} is not one of the head's labels {labels}", hint="pick one of them"
        )
    index = labels.index(label)

    def reduce(embeds: torch.Tensor) -> torch.Tensor:
        with _embeddings(model, lambda _: embeds):
            return _log_odds(model.classify(idx.expand(embeds.shape[0], -1)).float(), index)

    # Where the head reads: the last token (a decoder's default), the first ([CLS] of an encoder), or all.
    pooled = llm.config.pooling if isinstance(model, Encoder) else llm.config.head_pooling
    read_at = {"last": len(ids) - 1, "cls": 0}.get(pooled)
    return _Target(idx, _text_positions(llm, text), label, reduce, read_at)


def _text_positions(llm: LoadedModel, text: str) -> list[int]:
    """The positions of the text's own tokens: special tokens the tokenizer adds ([CLS], [SEP], a BOS) stay as
    they are, so every attributed piece is part of the text and deleting a word is a real edit."""
    mask = llm.tokenizer.backend.encode(text).special_tokens_mask
    positions = [i for i, special in enumerate(mask) if not special]
    if not positions:
        raise LmforgeError("the text has no tokens of its own to explain", hint="give some text")
    return positions


def _zero_shot_target(llm: LoadedModel, text: str, labels: Sequence[str], label: str | None) -> _Target:
    tok, model = llm.tokenizer, llm.model
    if len(set(labels)) < 2:
        raise LmforgeError(
            f"need at least two distinct labels, got {list(labels)}", hint="pass labels=['a', 'b']"
        )
    prompt = chat_or_plain(tok, classification_prompt(text, labels))
    encoding = tok.backend.encode(prompt, add_special_tokens=False)
    start = prompt.rfind(text)
    span = [i for i, (a, b) in enumerate(encoding.offsets) if a < start + len(text) and b > start]
    conts = [tok.encode(lab if tok.chat_template else " " + lab, add_special_tokens=False) for lab in labels]
    width = len(encoding.ids) + max(len(c) for c in conts)
    if width > llm.config.block_size:
        raise LmforgeError(
            f"prompt of {width} tokens exceeds the model's context of {llm.config.block_size}",
            hint="shorten the text",
        )
    # Right-padded rows (prompt + label): the prompt's positions are the same in every row.
    rows = [encoding.ids + c + [0] * (width - len(encoding.ids) - len(c)) for c in conts]
    ids = torch.tensor(rows, device=model.device)  # (L, W)
    n = len(encoding.ids)
    if label is None:
        with torch.no_grad():
            label = labels[int(_label_scores(model, ids, conts, n)[0].argmax())]
    if label not in labels:
        raise LmforgeError(f"label {label!r} is not one of {list(labels)}", hint="pick one of the labels")
    index = list(labels).index(label)
    R = len(labels)

    def reduce(embeds: torch.Tensor) -> torch.Tensor:  # embeds (N * R, W, C)
        N = embeds.shape[0] // R
        with _embeddings(model, lambda _: embeds):
            scores = _label_scores(model, ids.repeat(N, 1), conts, n)  # (N * R,)
        return _log_odds(scores.view(N, R), index)

    return _Target(ids, span, label, reduce, n - 1)


def _label_scores(model: Transformer, ids: torch.Tensor, conts: Sequence[list[int]], n: int) -> torch.Tensor:
    """ids (N * R, W), each row a prompt of ``n`` tokens + label r (row i is label i % R) -> log p(label)."""
    logprobs = model(ids)[0].float().log_softmax(-1)  # (N * R, W, V)
    out = []
    for row in range(ids.shape[0]):
        cont = conts[row % len(conts)]
        positions = torch.arange(n - 1, n - 1 + len(cont), device=ids.device)
        out.append(logprobs[row, positions, torch.tensor(cont, device=ids.device)].sum())
    return torch.stack(out)


def _next_token_target(llm: LoadedModel, text: str, token: int | None) -> _Target:
    model = llm.model
    ids = encode_checked(llm, text)
    idx = torch.tensor([ids], device=model.device)
    if token is None:
        with torch.no_grad():
            token = int(model(idx, last_logits_only=True)[0][0, -1].argmax())
    if not 0 <= token < llm.config.vocab_size:
        raise LmforgeError(f"token id {token} is outside the vocabulary", hint="give a valid token id")

    def reduce(embeds: torch.Tensor) -> torch.Tensor:
        with _embeddings(model, lambda _: embeds):
            logits = model(idx.expand(embeds.shape[0], -1), last_logits_only=True)[0][:, -1]
        return logits.float().log_softmax(-1)[:, token]

    return _Target(idx, _text_positions(llm, text), token_text(llm.tokenizer, token), reduce, len(ids) - 1)


def make_target(
    llm: LoadedModel,
    text: str,
    *,
    kind: str,
    labels: Sequence[str] | None = None,
    label: str | None = None,
    token: int | None = None,
) -> _Target:
    if kind == "head":
        if not llm.config.labels:
            hint = (
                "fine-tune it as a classifier: lmforge finetune MODEL --task classify"
                if isinstance(llm.model, Encoder)
                else "give labels for zero-shot scoring"
            )
            raise LmforgeError("this model has no classification head", hint=hint)
        return _head_target(llm, text, label)
    if not isinstance(llm.model, Transformer):  # zero-shot scoring and the next token need a language model
        raise LmforgeError(
            "these attributions need a language model or a classifier; this model is a sentence encoder",
            hint="fine-tune it as a classifier (lmforge finetune MODEL --task classify) or load a language model",
        )
    if kind == "zero_shot":
        if not labels:
            raise LmforgeError("zero-shot attributions need candidate labels", hint="pass labels=['a', 'b']")
        return _zero_shot_target(llm, text, labels, label)
    if kind == "next_token":
        return _next_token_target(llm, text, token)
    raise LmforgeError(f"unknown target {kind!r}", hint="use head, zero_shot or next_token")


# ------------------------------------------------------------------ the methods
def _baseline(llm: LoadedModel, embeds: torch.Tensor, baseline: str) -> torch.Tensor:
    if baseline == "mean":
        return llm.model.wte.weight.detach().mean(0).to(embeds.dtype).expand_as(embeds).clone()
    if baseline == "zeros":
        return torch.zeros_like(embeds)
    if baseline == "pad":
        pad = llm.tokenizer.pad_id if llm.tokenizer.pad_id is not None else llm.tokenizer.eos_id
        if pad is None:
            raise LmforgeError("the tokenizer has no pad or end-of-text token", hint="use baseline='zeros'")
        return llm.model.wte.weight[pad].detach().expand_as(embeds).clone()
    raise LmforgeError(f"unknown baseline {baseline!r}", hint=f"use one of: {', '.join(BASELINES)}")


def _scores_in_batches(target: _Target, batches: Iterator[torch.Tensor], grad: bool) -> tuple[list, list]:
    """Each batch of inputs (n, R, T, C) -> its scores (n,) and, with ``grad``, d score / d input."""
    values, grads = [], []
    for inputs in batches:
        n, R, T, C = inputs.shape
        if grad:
            inputs = inputs.detach().requires_grad_(True)
            with torch.enable_grad():
                out = target.reduce(inputs.reshape(n * R, T, C))
                (g,) = torch.autograd.grad(out.sum(), inputs)
            grads.append(g.detach())
        else:
            with torch.no_grad():
                out = target.reduce(inputs.reshape(n * R, T, C))
        values.append(out.detach())
    return values, grads


def _integrated_gradients(
    target: _Target, x: torch.Tensor, base: torch.Tensor, score: float, *, steps: int | None, tolerance: float
) -> tuple[torch.Tensor, float, int]:
    """Integrated gradients of ``target`` from ``base`` to ``x`` (R, T, C): per-token attributions (T,),
    f(base) and the gradient evaluations used.

    The path [0, 1] is cut into pieces, each integrated by Gauss-Legendre. On a piece [a, b] the exact answer
    is known: the attributions must sum to f(b) - f(a), which two forward passes give. While all pieces
    together miss f(x) - f(base) by more than ``tolerance`` of it, the pieces with the largest errors are
    halved: the nodes go where the integrand is steep. ``steps`` given: one piece of that many nodes, no refinement."""
    R, T, C = x.shape
    diff = x - base
    k = steps if steps is not None else NODES_PER_PIECE
    gl_nodes, gl_weights = np.polynomial.legendre.leggauss(k)

    def values(alphas: list[float]) -> list[float]:
        chunk = max(1, BATCH_ROWS // R)
        batches = (
            base[None]
            + torch.tensor(alphas[i : i + chunk], dtype=x.dtype, device=x.device)[:, None, None, None]
            * diff[None]
            for i in range(0, len(alphas), chunk)
        )
        out, _ = _scores_in_batches(target, batches, grad=False)
        return torch.cat(out).float().tolist()

    def integrals(pieces: list[tuple[float, float]]) -> list[torch.Tensor]:
        """Each piece's integral of the per-token integrand, (T,) each."""
        alphas = np.concatenate([a + (b - a) * (gl_nodes + 1) / 2 for a, b in pieces])
        weights = np.concatenate([(b - a) * gl_weights / 2 for a, b in pieces])
        chunk = max(1, BATCH_ROWS // R)
        grid = torch.tensor(alphas, dtype=x.dtype, device=x.device)
        batches = (
            base[None] + grid[i : i + chunk, None, None, None] * diff[None]
            for i in range(0, len(grid), chunk)
        )
        _, grads = _scores_in_batches(target, batches, grad=True)
        per_node = (diff[None] * torch.cat(grads)).sum(-1).sum(1).double()  # (nodes, T)
        weighted = per_node * torch.tensor(weights, dtype=torch.float64, device=x.device)[:, None]
        return list(weighted.view(len(pieces), k, T).sum(1))

    (base_score,) = values([0.0])
    if steps is not None:
        (per_token,) = integrals([(0.0, 1.0)])
        return per_token, base_score, steps
    goal = tolerance * max(abs(score - base_score), 1e-6)
    cuts = [i / FIRST_PIECES for i in range(FIRST_PIECES + 1)]
    f = dict(zip(cuts, [base_score, *values(cuts[1:-1]), score], strict=True))
    pieces = list(zip(cuts[:-1], cuts[1:], strict=True))
    found = dict(zip(pieces, integrals(pieces), strict=True))
    used = k * len(pieces)

    def error(piece: tuple[float, float]) -> float:
        return abs(float(found[piece].sum()) - (f[piece[1]] - f[piece[0]]))

    per_round = max(1, BATCH_ROWS // (2 * k * R))  # halve this many pieces per round: one full batch

    def completeness() -> float:  # what the caller is told: the whole path's error, signed errors summed
        return abs(sum(float(v.sum()) for v in found.values()) - (score - base_score))

    while used + 2 * k <= MAX_STEPS and completeness() > goal:
        worst = sorted(found, key=error, reverse=True)[: min(per_round, (MAX_STEPS - used) // (2 * k))]
        middles = [(a + b) / 2 for a, b in worst]
        f.update(zip(middles, values(middles), strict=True))
        halves = [half for (a, b), m in zip(worst, middles, strict=True) for half in ((a, m), (m, b))]
        for piece in worst:
            del found[piece]
        found.update(zip(halves, integrals(halves), strict=True))
        used += k * len(halves)
    return torch.stack(list(found.values())).sum(0).float(), base_score, used


def attribute(
    llm: LoadedModel,
    text: str,
    *,
    method: str = "integrated_gradients",
    kind: str = "head",
    labels: Sequence[str] | None = None,
    label: str | None = None,
    token: int | None = None,
    steps: int | None = DEFAULT_STEPS,
    baseline: str = DEFAULT_BASELINE,
    tolerance: float = TOLERANCE,
) -> Attribution:
    """Attribute one score (see the module's docstring for ``kind``) to the tokens of ``text``. Integrated
    gradients: ``steps=None`` refines the path until the completeness error is at most ``tolerance`` (or
    MAX_STEPS gradient evaluations are spent); a number is that many Gauss-Legendre nodes on the whole path."""
    if method not in METHODS:
        raise LmforgeError(f"unknown attribution method {method!r}", hint=f"use one of: {', '.join(METHODS)}")
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise LmforgeError(f"steps={steps} is out of range", hint=f"use 1 to {MAX_STEPS}, or None to adapt")
    if not 0 < tolerance < 1:
        raise LmforgeError(f"tolerance={tolerance} is out of range", hint="use a fraction such as 0.01")
    target = make_target(llm, text, kind=kind, labels=labels, label=label, token=token)
    model = llm.model
    with torch.no_grad():
        x = model.wte(target.ids).detach()  # (R, T, C)
    R, T, C = x.shape
    in_span = torch.zeros(T, dtype=x.dtype, device=x.device)
    in_span[target.span] = 1.0
    span_mask = in_span[None, :, None]  # (1, T, 1)
    base = x + span_mask * (
        _baseline(llm, x, baseline) - x
    )  # the baseline replaces the attributed tokens only
    (value,), _ = _scores_in_batches(target, iter([x[None]]), grad=False)
    result_extra: dict[str, Any] = {}
    baseline_score = completeness = used = None
    if method == "integrated_gradients":
        per_token, baseline_score, used = _integrated_gradients(
            target, x, base, float(value[0]), steps=steps, tolerance=tolerance
        )
        delta = float(value[0]) - baseline_score
        completeness = abs(float(per_token.sum()) - delta) / max(abs(delta), 1e-9)
    elif method == "gradient_x_input":
        _, (g,) = _scores_in_batches(target, iter([x[None]]), grad=True)
        per_token = (x * g[0]).sum(-1).sum(0)
    elif method == "occlusion":
        occluded = []
        for position in target.span:
            row = x.clone()
            row[:, position] = base[:, position]
            occluded.append(row)
        batches = (
            torch.stack(occluded[i : i + max(1, BATCH_ROWS // R)])
            for i in range(0, len(occluded), max(1, BATCH_ROWS // R))
        )
        values, _ = _scores_in_batches(target, batches, grad=False)
        per_token = torch.zeros(T, dtype=torch.float32, device=x.device)
        per_token[target.span] = float(value[0]) - torch.cat(values).float()
    else:  # attention rollout: how much the position read by the score draws on each token
        per_token = _rollout_scores(llm, target).to(x.device)
    ids = target.ids[0].tolist()
    span = target.span
    span_ids = [ids[i] for i in span]
    context = ids[: span[0]] if span else []
    values_span = per_token.detach().float().cpu()[span].tolist()
    pieces, scores = [], []
    for start, end, piece in piece_spans(llm.tokenizer, span_ids, context):
        pieces.append(piece)
        scores.append(float(sum(values_span[start:end])))
    if not all(math.isfinite(s) for s in scores):
        raise LmforgeError("the attributions are not finite numbers", hint="load the model as float32")
    return Attribution(
        text=text,
        target=target.name,
        method=method,
        token_ids=span_ids,
        pieces=pieces,
        scores=scores,
        score=float(value[0]),
        baseline_score=baseline_score,
        completeness_error=completeness,
        steps=used,
        extra=result_extra,
    )


def _rollout_scores(llm: LoadedModel, target: _Target) -> torch.Tensor:
    """Attention rollout at the position the score reads (T,): how much it draws on each token (the mean
    over positions when the score pools them all)."""
    causal = not isinstance(llm.model, Encoder)  # a decoder's row read_at sees nothing after it: cut there
    end = target.read_at + 1 if causal and target.read_at is not None else target.ids.shape[1]
    ids = target.ids[0, :end].tolist()
    rolled = attention_maps_of_ids(llm, ids).rollout()  # (T', T')
    per_token = torch.zeros(target.ids.shape[1])
    per_token[: len(ids)] = rolled.mean(0) if target.read_at is None else rolled[target.read_at]
    return per_token
