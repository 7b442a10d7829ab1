"""Beam search: the ``num_beams`` likeliest continuations kept at every step, batched over prompts.

The search is transformers' (``GenerationMixin._beam_search``, the vectorised one) step for step, so that the
same model gives the same tokens: each step scores every beam's next token by the beam's summed
log-probabilities, keeps the ``2 * num_beams`` best candidates (more with several end ids), moves the best
``num_beams`` of those that did not end into the running beams and offers the ones that ended, scored by
``sum / generated_length ** length_penalty``, to the finished hypotheses. A batch item stops once no running
beam can beat its worst finished one (``early_stopping``: True stops as soon as ``num_beams`` finished,
"never" waits out the length limit when ``length_penalty`` > 0).

::

    step t          running beams (B, N)                 candidates (B, 2N)           next running (B, N)
    ┌──────────┐    score[b, n] + log p(token | beam)    top 2N over N x V ──┬──▶ not ended: best N ──▶ cache rows
    │ cache    │ ──▶ (B, N, V) ─────────────────────────▶ (beam, token) pairs  │    reordered by their beam
    │ B*N rows │                                                             └──▶ ended in the top N: finished
    └──────────┘                                                                  (best N kept per item)

The network is behind ``BeamSource``: a decoder-only model (``DecoderBeams``, its KV cache's rows reordered by
beam) or an encoder–decoder (``lmforge.seq2seq``), so one search serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil
import torch

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.generate import (
    CACHE_BUCKET,
    Completion,
    SamplingParams,
    apply_repetition_penalty,
    cache_length,
    decode_step_function,
    generation_budget,
    left_pad,
    prefill,
)
from lmforge.model import StaticKVCache, Transformer
from lmforge.tokenizer import Tokenizer

MAX_BEAMS = 64  # beams per prompt: past this the search costs far more than it finds
NEG = -1.0e9  # transformers' "never pick this" score (finite, so sums and comparisons stay ordered)
# Working memory of a step besides the cache: log-probabilities, their sums and the top-k, per candidate row.
LOGITS_COPIES = 4


@dataclass
class BeamParams:
    """How beam search runs (transformers' names and defaults)."""

    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.num_beams <= MAX_BEAMS:
            problems.append(f"num_beams={self.num_beams} must be in [1, {MAX_BEAMS}]")
        if not -1e3 <= self.length_penalty <= 1e3:  # NaN included
            problems.append(f"length_penalty={self.length_penalty} must be a number in [-1000, 1000]")
        if (
            not any(self.early_stopping is choice for choice in (True, False))
            and self.early_stopping != "never"
        ):
            problems.append(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0")
        if 1 <= self.num_beams <= MAX_BEAMS and not 1 <= self.num_return_sequences <= self.num_beams:
            problems.append(
                f"num_return_sequences={self.num_return_sequences} must be in [1, num_beams={self.num_beams}]"
            )
        if problems:
            raise LmforgeError(
                "invalid beam search settings: " + "; ".join(problems), hint="fix the values named"
            )


BEAM_OPTIONS = (
    "num_beams",
    "length_penalty",
    "early_stopping",
    "no_repeat_ngram_size",
    "num_return_sequences",
)


def split_beam_options(options: dict[str, object]) -> tuple[dict[str, object], BeamParams]:
    """Generation options -> (the ``SamplingParams`` ones, ``BeamParams`` from the beam ones)."""
    rest = {k: v for k, v in options.items() if k not in BEAM_OPTIONS}
    beam = {k: v for k, v in options.items() if k in BEAM_OPTIONS and v is not None}
    return rest, BeamParams(**beam)  # type: ignore[arg-type]


def check_beam_sampling(params: SamplingParams, beams: BeamParams) -> None:
    """Beam search here is deterministic: a sampling temperature with beams is one clear error."""
    if beams.num_beams > 1 and params.temperature > 0:
        raise LmforgeError(
            f"num_beams={beams.num_beams} with temperature={params.temperature}: beam search does not sample",
            hint="use temperature 0 with beams, or num_beams 1 to sample",
        )


# ------------------------------------------------------------------ memory
def beam_memory_bytes(config: Config, *, rows: int, length: int, width: int) -> int:
    """What ``rows`` beams of ``length`` tokens hold while searching: the KV cache (twice: a reorder copies it)
    and the step's float32 scores over the vocabulary (as sizing/memory.py counts a generation's)."""
    kv = rows * length * config.n_layer * config.n_kv_head * config.head_dim * 2 * width
    return 2 * kv + LOGITS_COPIES * rows * config.vocab_size * 4


def available_bytes(device: torch.device) -> int:
    """Memory free for the search: the accelerator's, or the machine's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_beam_memory(config: Config, device: torch.device, *, rows: int, length: int, width: int) -> None:
    """One clear error when prompts x beams would not fit, before any work."""
    need = beam_memory_bytes(config, rows=rows, length=length, width=width)
    free = available_bytes(device)
    if need > free:
        raise LmforgeError(
            f"beam search over {rows} rows (prompts x beams) of {length} tokens needs about {need / 2**20:,.0f} "
            f"MiB, {free / 2**20:,.0f} MiB is free",
            hint="use fewer beams, fewer prompts at once, or fewer new tokens",
        )


# ------------------------------------------------------------------ sources
class BeamSource(Protocol):
    """A network as beam search sees it: rows are (batch item, beam), flattened as item * num_beams + beam."""

    def first_logits(self) -> torch.Tensor:
        """Next-token logits (B * N, V) after the prompt (or the decoder's start)."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (B * N,) -> the next logits (B * N, V)."""
        ...

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from old row ``rows[i]``."""
        ...


class DecoderBeams:
    """A decoder-only Transformer's rows: the prompts prefilled once, their cache rows repeated per beam."""

    def __init__(
        self, model: Transformer, prompts: Sequence[Sequence[int]], num_beams: int, steps: int
    ) -> None:
        device = model.device
        ids, mask = left_pad(prompts, pad_id=0)
        ids, mask = ids.to(device), mask.to(device) if mask is not None else None
        size = ids.shape[1] + steps - 1  # the last token is chosen, never fed back
        bucket = CACHE_BUCKET if model.compile_decode else 1
        self.cache = StaticKVCache(
            model.config,
            len(prompts),
            cache_length(size, model.config.block_size, bucket),
            device,
            model.dtype,
            compiled=model.compile_decode,
        )
        logits = prefill(model, ids, mask, self.cache)  # (B, V)
        self.cache.start_decoding(mask)
        repeat = torch.arange(len(prompts), device=device).repeat_interleave(num_beams)
        self.cache.reorder(repeat)  # B -> B * N rows
        self.logits = logits.index_select(0, repeat)
        self.step_function = decode_step_function(model)

    def first_logits(self) -> torch.Tensor:
        return self.logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.step_function(tokens[:, None], self.cache)

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)


# ------------------------------------------------------------------ search
@dataclass
class Hypothesis:
    tokens: list[int]  # the new tokens, the end id included when it ended on one
    score: float  # summed log-probabilities / length ** length_penalty
    ended: bool  # on an end id (else the length limit)


def banned_ngram_tokens(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in ``history`` (transformers' NoRepeatNGramLogitsProcessor)."""
    if len(history) + 1 < n:
        return []
    prefix = tuple(history[len(history) - n + 1 :])
    return [
        history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i : i + n - 1]) == prefix
    ]


@torch.inference_mode()
def beam_search(
    source: BeamSource,
    *,
    prefixes: Sequence[Sequence[int]],
    steps: int,
    beams: BeamParams,
    params: SamplingParams,
    eos_ids: Sequence[int],
) -> list[list[Hypothesis]]:
    """The best ``num_return_sequences`` hypotheses per batch item, best first.

    ``prefixes`` are the tokens before the new ones (the prompt, or the decoder's start), for the repetition
    penalty and ``no_repeat_ngram_size``; ``steps`` bounds the new tokens.
    """
    B, N = len(prefixes), beams.num_beams
    logits = source.first_logits()
    device = logits.device
    V = logits.shape[-1]
    eos = torch.tensor(sorted(set(eos_ids)) if params.stop_on_eos else [], dtype=torch.long, device=device)
    K = max(2, 1 + len(eos)) * N  # candidates kept per item: enough for N to go on if the best N all end
    top_n = torch.arange(K, device=device) < N
    offsets = torch.arange(B, device=device)[:, None] * N  # (B, 1) first row of each item
    running = torch.zeros(B, N, steps, dtype=torch.long, device=device)  # the new tokens of each beam
    running_scores = torch.full((B, N), NEG, device=device)
    running_scores[:, 0] = 0.0  # the beams start equal: only the first one's tokens count at step 0
    finished = torch.zeros(B, N, steps, dtype=torch.long, device=device)
    finished_len = torch.zeros(B, N, dtype=torch.long, device=device)
    finished_scores = torch.full((B, N), NEG, device=device)
    is_finished = torch.zeros(B, N, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    for t in range(steps):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B * N, V)
        log_probs = _process(log_probs, prefixes, running[:, :, :t], beams, params)
        totals = (log_probs.view(B, N, V) + running_scores[:, :, None]).view(B, N * V)
        top_scores, top_index = torch.topk(totals, K)  # (B, K)
        from_beam = top_index // V  # (B, K)
        token = top_index % V
        candidates = running.gather(1, from_beam[:, :, None].expand(B, K, steps)).clone()  # (B, K, steps)
        candidates[:, :, t] = token
        ends = torch.isin(token, eos) | (t + 1 >= steps)  # (B, K) ended on an end id or at the limit
        # The best N candidates that go on become the running beams.
        going_on = top_scores + ends.float() * NEG
        keep = torch.topk(going_on, N).indices  # (B, N)
        running = candidates.gather(1, keep[:, :, None].expand(B, N, steps))
        running_scores = going_on.gather(1, keep)
        parent = from_beam.gather(1, keep) + offsets  # (B, N) rows the new beams continue
        # Ended candidates among the top N compete with the finished hypotheses.
        just_ended = ends & top_n[None, :]
        scores = top_scores / ((t + 1) ** beams.length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (beams.early_stopping is True)
        scores = scores + full.float() * NEG + (~improvable).float() * NEG + (~just_ended).float() * NEG
        merged_scores = torch.cat([finished_scores, scores], dim=1)  # (B, N + K)
        best = torch.topk(merged_scores, N).indices
        finished_scores = merged_scores.gather(1, best)
        finished = torch.cat([finished, candidates], dim=1).gather(1, best[:, :, None].expand(B, N, steps))
        lengths = torch.cat([finished_len, torch.full((B, K), t + 1, device=device)], dim=1)
        finished_len = lengths.gather(1, best)
        is_finished = torch.cat([is_finished, just_ended], dim=1).gather(1, best)
        improvable = _improvable(
            improvable, running_scores, finished_scores, is_finished, t + 1, steps, beams
        )
        going = bool(improvable.any()) and not (bool(is_finished.all()) and beams.early_stopping is True)
        if not going or bool(ends.all()):
            break
        source.reorder(parent.flatten())
        logits = source.step(running[:, :, t].flatten())
    eos_set = set(eos.tolist())
    out = []
    for b in range(B):
        hypotheses = []
        for n in range(beams.num_return_sequences):
            tokens = finished[b, n, : int(finished_len[b, n])].tolist()
            ended = bool(tokens) and tokens[-1] in eos_set
            hypotheses.append(Hypothesis(tokens, float(finished_scores[b, n]), ended))
        out.append(hypotheses)
    return out


def _process(
    log_probs: torch.Tensor,
    prefixes: Sequence[Sequence[int]],
    new: torch.Tensor,
    beams: BeamParams,
    params: SamplingParams,
) -> torch.Tensor:
    """The logits processors transformers applies to beam search's log-probabilities, in its order."""
    if params.repetition_penalty == 1.0 and beams.no_repeat_ngram_size == 0:
        return log_probs
    B, N, _ = new.shape
    histories = [list(prefixes[b]) + new[b, n].tolist() for b in range(B) for n in range(N)]
    if params.repetition_penalty != 1.0:
        longest = max(len(h) for h in histories)
        # A short history repeats its last token as padding: the penalty touches a token once either way.
        seen = torch.tensor([h + [h[-1]] * (longest - len(h)) for h in histories], device=log_probs.device)
        log_probs = apply_repetition_penalty(log_probs, seen, params.repetition_penalty)
    if beams.no_repeat_ngram_size > 0:
        for row, history in enumerate(histories):
            banned = banned_ngram_tokens(history, beams.no_repeat_ngram_size)
            if banned:
                log_probs[row, banned] = float("-inf")
    return log_probs


def _improvable(
    improvable: torch.Tensor,
    running_scores: torch.Tensor,
    finished_scores: torch.Tensor,
    is_finished: torch.Tensor,
    length: int,
    steps: int,
    beams: BeamParams,
) -> torch.Tensor:
    """(B, 1): whether the best running beam could still beat the worst finished hypothesis."""
    if beams.early_stopping == "never" and beams.length_penalty > 0:
        length = steps  # a positive penalty favours the longest: score it at the limit
    best_possible = running_scores[:, :1] / (length**beams.length_penalty)
    worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
    return improvable & (best_possible > worst).any(dim=-1, keepdim=True)


# ------------------------------------------------------------------ text
def hypothesis_completion(
    tokenizer: Tokenizer, hypothesis: Hypothesis, prompt_tokens: int, stop: Sequence[str]
) -> Completion:
    """A finished hypothesis as a ``Completion``: its text (without the end id), cut at the first stop string."""
    tokens = hypothesis.tokens[:-1] if hypothesis.ended else hypothesis.tokens
    text = tokenizer.decode(tokens).rstrip("\ufffd")  # a cut-off tail inside a character is dropped
    reason = "stop" if hypothesis.ended else "length"
    cuts = [at for at in (text.find(s) for s in stop if s) if at != -1]
    if cuts:
        text, reason = text[: min(cuts)], "stop"
    return Completion(text=text, token_ids=list(tokens), prompt_tokens=prompt_tokens, finish_reason=reason)


def beam_complete(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    beams: BeamParams,
    eos_ids: Sequence[int] = (),
) -> list[list[Completion]]:
    """Beam search for a batch of prompts: ``num_return_sequences`` completions per prompt, best first."""
    if not prompts:
        raise LmforgeError("no prompts to generate for", hint="pass at least one prompt")
    check_beam_sampling(params, beams)
    steps = min(generation_budget(len(p), params, model.config.block_size) for p in prompts)
    if steps == 0:
        return [[Completion("", [], len(p), "length")] * beams.num_return_sequences for p in prompts]
    width = torch.empty((), dtype=model.dtype).element_size()
    rows = len(prompts) * beams.num_beams
    check_beam_memory(
        model.config, model.device, rows=rows, length=max(map(len, prompts)) + steps, width=width
    )
    source = DecoderBeams(model, prompts, beams.num_beams, steps)
    found = beam_search(source, prefixes=prompts, steps=steps, beams=beams, params=params, eos_ids=eos_ids)
    return [
        [hypothesis_completion(tokenizer, h, len(p), params.stop) for h in hypotheses]
        for p, hypotheses in zip(prompts, found, strict=True)
    ]
