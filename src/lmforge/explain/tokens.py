"""Token probabilities: how sure the model was of every token it wrote (or of every token of a given text).

Per token: its probability, its rank among all tokens, the distribution's entropy and the top-k alternatives.
The numbers are the model's own distribution (softmax of its logits at temperature 1): sampling settings
change which token is picked, not how likely the model found it.

Byte-level tokenizers split a Chinese character or an emoji into several tokens that are not text on their
own (each decodes to U+FFFD). ``group_tokens`` joins such runs into the character they make, with the joint
probability, so an explanation never shows a broken character; an alternative that is a lone byte is shown
as its bytes (``\\xe4``), never as U+FFFD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.generate import (
    CompletionBuilder,
    SamplingParams,
    generation_budget,
    next_tokens,
    sampling_generator,
)
from lmforge.loading import LoadedModel
from lmforge.model import Transformer
from lmforge.tokenizer import Message, Tokenizer

MAX_ALTERNATIVES = 50  # alternatives per token: enough to read, bounded so a response stays small
UTF8_MAX_BYTES = 4  # a character never needs more tokens than this in any byte-level vocabulary
WINDOW = 16  # tokens of left context a piece is decoded after: decoding is local, this is ample


@dataclass
class Alternative:
    token_id: int
    text: str
    probability: float


@dataclass
class TokenStep:
    """One model token: its id, text, probability, 1-based rank, entropy (nats) and the top alternatives."""

    token_id: int
    text: str
    probability: float
    rank: int
    entropy: float
    alternatives: list[Alternative]


@dataclass
class ExplainedToken:
    """A piece of text as a reader sees it: one token, or the tokens of one character (``len(steps) > 1``).

    ``probability`` is the joint probability of its tokens; ``rank`` the worst of their ranks; ``entropy`` and
    ``alternatives`` are the first token's (where the choice between characters was made)."""

    text: str
    probability: float
    rank: int
    entropy: float
    alternatives: list[Alternative]
    steps: list[TokenStep] = field(default_factory=list)


@dataclass
class TokenExplanation:
    """The prompt, the text explained (generated or given) and its tokens, grouped into readable pieces."""

    prompt: str
    text: str
    tokens: list[ExplainedToken]
    finish_reason: str | None = None  # for a generation: "stop" or "length"

    @property
    def steps(self) -> list[TokenStep]:
        """Every model token, in order (several per piece where a character took several tokens)."""
        return [step for token in self.tokens for step in token.steps]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ token text
def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for, also when it is part of a character (where decoding gives U+FFFD)."""
    text = tokenizer.decode([token_id])
    return text.encode("utf-8") if "\ufffd" not in text else tokenizer.token_bytes(token_id)


def show_bytes(data: bytes) -> str:
    """Text for bytes: the characters where they decode, ``\\xNN`` for the bytes of a partial character."""
    return data.decode("utf-8", errors="backslashreplace")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A single token as text, a partial character shown as its bytes (never U+FFFD)."""
    text = tokenizer.decode([token_id])
    return text if "\ufffd" not in text else show_bytes(token_bytes(tokenizer, token_id))


def piece_spans(
    tokenizer: Tokenizer, ids: Sequence[int], context: Sequence[int] = ()
) -> list[tuple[int, int, str]]:
    """Split ``ids`` into readable pieces: ``(start, end, text)`` per run of tokens that makes whole characters.

    A piece's text is the difference of decoding it after the ``WINDOW`` tokens before it (from ``context``
    first) and decoding those alone: decoders that treat the first token specially (SentencePiece's leading
    space) give the text as it reads in place, and the cost grows with the length, not its square. A run still
    incomplete after ``UTF8_MAX_BYTES`` tokens (or at the end) is shown as its bytes.
    """
    ids, context = list(ids), list(context)[-WINDOW:]
    full, offset = context + ids, len(context)
    spans: list[tuple[int, int, str]] = []
    start = 0
    while start < len(ids):
        prefix = full[max(0, offset + start - WINDOW) : offset + start]
        before = tokenizer.decode(prefix)
        end = start + 1
        while True:
            text = tokenizer.decode(prefix + ids[start:end])
            complete = text.startswith(before) and not text.endswith("\ufffd")
            if complete or end == len(ids) or end - start >= UTF8_MAX_BYTES:
                break
            end += 1
        piece = text[len(before) :] if text.startswith(before) else ""
        if not complete or "\ufffd" in piece:
            piece = show_bytes(b"".join(token_bytes(tokenizer, i) for i in ids[start:end]))
        spans.append((start, end, piece))
        start = end
    return spans


def group_tokens(
    tokenizer: Tokenizer, steps: Sequence[TokenStep], context: Sequence[int] = ()
) -> list[ExplainedToken]:
    """Join the steps of one character into one piece (see ``piece_spans``)."""
    pieces = []
    for start, end, text in piece_spans(tokenizer, [s.token_id for s in steps], context):
        members = list(steps[start:end])
        first = members[0]
        pieces.append(
            ExplainedToken(
                text=text,
                probability=math.prod(s.probability for s in members),
                rank=max(s.rank for s in members),
                entropy=first.entropy,
                alternatives=first.alternatives,
                steps=members,
            )
        )
    return pieces


# ------------------------------------------------------------------ the numbers
def describe_step(tokenizer: Tokenizer, logits: torch.Tensor, chosen: int, top_k: int) -> TokenStep:
    """One position: ``logits`` (V,) of the model, the token that came next, and its top ``top_k`` rivals."""
    logprobs = logits.float().log_softmax(-1)
    probs = logprobs.exp()
    entropy = float(-(probs * logprobs.nan_to_num(neginf=0.0)).sum())  # 0 * log 0 counts as 0
    top = torch.topk(probs, min(top_k, probs.shape[-1]))
    chosen_p = probs[chosen]
    rank = int((probs > chosen_p).sum()) + 1
    alternatives = [
        Alternative(int(i), token_text(tokenizer, int(i)), float(p))
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
    return TokenStep(chosen, token_text(tokenizer, chosen), float(chosen_p), rank, entropy, alternatives)


def check_alternatives(alternatives: int) -> None:
    if not 1 <= alternatives <= MAX_ALTERNATIVES:
        raise LmforgeError(
            f"alternatives={alternatives} is out of range", hint=f"use 1 to {MAX_ALTERNATIVES}"
        )


def _language_model(llm: LoadedModel) -> Transformer:
    if not isinstance(llm.model, Transformer):
        raise LmforgeError(
            "token probabilities need a language model; this one is a sentence encoder",
            hint="load a language model (e.g. the default) to explain generations",
        )
    return llm.model


@torch.inference_mode()
def explain_generation(
    llm: LoadedModel, prompt: str | Sequence[Message], *, alternatives: int = 5, **options: Any
) -> TokenExplanation:
    """Generate from ``prompt`` (``SamplingParams`` options; greedy by default) and explain every token, with
    its ``alternatives`` likeliest rivals.

    Decodes one sequence eagerly through a plain KV cache, keeping the distribution each token was drawn
    from: the tokens are those ``LLM.generate_text`` picks with the same options (same model, same picks).
    """
    check_alternatives(alternatives)
    model = _language_model(llm)
    params = SamplingParams.from_kwargs(**options)
    ids = llm.prompt_ids(prompt)
    if not ids:
        raise LmforgeError("empty prompt", hint="give some text to continue")
    steps_left = generation_budget(len(ids), params, model.config.block_size)
    builder = CompletionBuilder(llm.tokenizer, len(ids), params, llm.eos_ids, params.max_new_tokens)
    cache = model.new_cache(1, len(ids) + steps_left)
    generator = sampling_generator(params, model.device)
    tokens = torch.tensor([ids], device=model.device)
    seen = tokens if params.repetition_penalty != 1.0 else None
    logits, _ = model(tokens, cache=cache, last_logits_only=True)
    described: list[TokenStep] = []
    for step in range(steps_left):
        last = logits[:, -1]  # (1, V)
        token = next_tokens(last, params, generator, seen)  # (1,)
        chosen = int(token[0])
        builder.push(chosen)
        if chosen in builder.eos and builder.done:
            break
        described.append(describe_step(llm.tokenizer, last[0], chosen, alternatives))
        if builder.done or step == steps_left - 1:
            break
        if seen is not None:
            seen = torch.cat([seen, token[:, None]], dim=1)
        logits, _ = model(token[:, None], cache=cache, last_logits_only=True)
    if not builder.done:
        builder.end("length")
    completion = builder.completion
    assert completion is not None
    described = described[: len(completion.token_ids)]
    prompt_text = prompt if isinstance(prompt, str) else llm.tokenizer.decode(ids)
    pieces = group_tokens(llm.tokenizer, described, context=ids)
    return TokenExplanation(
        prompt=prompt_text,
        text="".join(p.text for p in pieces),  # the completion's text, a byte that is no character as \xNN
        tokens=pieces,
        finish_reason=completion.finish_reason,
    )


@torch.inference_mode()
def explain_text(llm: LoadedModel, text: str, *, alternatives: int = 5) -> TokenExplanation:
    """Score a given text: how likely the model found each of its tokens, after the ones before it."""
    check_alternatives(alternatives)
    model = _language_model(llm)
    ids = llm.tokenizer.encode(text)
    if len(ids) < 2:
        raise LmforgeError("the text needs at least two tokens to score", hint="give a longer text")
    if len(ids) > model.config.block_size:
        raise LmforgeError(
            f"text of {len(ids)} tokens exceeds the model's context of {model.config.block_size}",
            hint="shorten the text",
        )
    logits, _ = model(torch.tensor([ids], device=model.device))
    steps = [describe_step(llm.tokenizer, logits[0, t - 1], ids[t], alternatives) for t in range(1, len(ids))]
    return TokenExplanation(
        prompt=llm.tokenizer.decode(ids[:1]), text=text, tokens=group_tokens(llm.tokenizer, steps, ids[:1])
    )
