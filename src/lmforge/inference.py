"""Inference on top of a loaded model: classify, summarize, embed, similarity — one line each for users.

    llm.classify_text("WINNER!! Claim your prize", labels=["ham", "spam"])   # zero-/few-shot, any chat model
    llm.classify_text("...")                                                 # a fine-tuned classification head
    llm.summarize(long_text, max_length=60)                                  # chunked and merged beyond the context
    llm.embed(["你好", "hello"]); llm.similarity("cat", "kitten")

Zero-shot classification scores each label's log-likelihood as the answer to a prompt (the model's own chat
template when it has one), so it needs no training and works for any label set.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.generate import left_pad
from lmforge.loading import LoadedModel
from lmforge.progress import tracked
from lmforge.prompts import Example, chat_or_plain, classification_prompt, summarization_prompt
from lmforge.tokenizer import Tokenizer


def _padded(llm: LoadedModel, rows: Sequence[list[int]], hint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask on the model's device; an error (never a silent cut) beyond the context."""
    longest = max(len(r) for r in rows)
    if longest > llm.config.block_size:
        raise LmforgeError(
            f"input of {longest} tokens exceeds the model's context of {llm.config.block_size}", hint=hint
        )
    ids, mask = left_pad(rows, pad_id=0)
    mask = torch.ones_like(ids) if mask is None else mask
    return ids.to(llm.model.device), mask.to(llm.model.device)


# ------------------------------------------------------------------ classify
@torch.inference_mode()
def sequence_logprobs(
    llm: LoadedModel, prompts: Sequence[list[int]], continuations: Sequence[list[int]]
) -> list[float]:
    """Sum of log p(continuation | prompt) for each pair, computed in left-padded batches.

    With ``llm.prefix_cache``, prompt blocks seen before (few-shot examples, the instructions every text
    shares) are taken from it, and the batch is computed from the first column not every row has cached."""
    model, prefix_cache = llm.model, llm.prefix_cache
    rows = [p + c for p, c in zip(prompts, continuations, strict=True)]
    out = [0.0] * len(rows)
    for chunk in tracked(_length_batches([len(r) for r in rows], 8), "scoring"):
        batch = [rows[i] for i in chunk]
        ids, mask = _padded(llm, batch, hint="shorten the text (classification never truncates silently)")
        width, start, cache = ids.shape[1], 0, None
        heads = [len(prompts[i]) for i in chunk]  # only prompt tokens are reused: their logits are not read
        if prefix_cache is not None:
            cache = model.new_cache(len(chunk), width)
            prefix_cache.reuse(cache, batch, width, heads)
            start = cache.length
        logits, _ = model(ids[:, start:], attention_mask=mask, cache=cache)
        if prefix_cache is not None:
            prefix_cache.store(cache, batch, width, heads)
        logprobs = logits.float().log_softmax(-1)  # (B, T - start, V)
        for r, i in enumerate(chunk):
            n = len(continuations[i])
            positions = torch.arange(width - n - 1, width - 1) - start
            out[i] = float(logprobs[r, positions, torch.tensor(continuations[i])].sum())
    return out


@torch.inference_mode()
def prompt_logprobs(
    llm: LoadedModel, rows: Sequence[list[int]], top: int = 0
) -> list[list[tuple[float, list[tuple[int, float]]]]]:
    """For each row, each token after the first: log p(row[t] | row[:t]) and the ``top`` most likely tokens
    there as (token_id, logprob), best first. What OpenAI's legacy ``echo`` with ``logprobs`` returns for a
    prompt: the server's /v1/completions scores prompts with it, so a hosted client scores labels as
    ``classify`` does (rows in left-padded batches, as ``sequence_logprobs``)."""
    out: list[list[tuple[float, list[tuple[int, float]]]]] = [[] for _ in rows]
    for chunk in _length_batches([len(r) for r in rows], 8):
        ids, mask = _padded(llm, [rows[i] for i in chunk], hint="shorten the prompt (nothing is truncated)")
        logits, _ = llm.model(ids, attention_mask=mask)
        for r, i in enumerate(chunk):
            n = len(rows[i])
            logprobs = logits[r, ids.shape[1] - n : -1].float().log_softmax(-1)  # position t predicts t+1
            chosen = logprobs.gather(1, ids[r, ids.shape[1] - n + 1 :].unsqueeze(1)).squeeze(1).tolist()
            tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
            if top:
                values, indices = logprobs.topk(top, dim=-1)
                tops = [
                    list(zip(a.tolist(), b.tolist(), strict=True))
                    for a, b in zip(indices, values, strict=True)
                ]
            out[i] = list(zip(chosen, tops, strict=True))
    return out


def _length_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices into ``lengths`` in batches of similar length: left padding then wastes little compute."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + size] for start in range(0, len(order), size)]


def classify(
    llm: LoadedModel,
    texts: Sequence[str],
    labels: Sequence[str] | None = None,
    examples: Sequence[Example] = (),
    zero_shot: bool = False,
) -> list[dict[str, Any]]:
    """A model with a fine-tuned head classifies with it; ``labels``, when given, must then be the head's own
    (a different set would be silently ignored otherwise). ``zero_shot=True``, or a model without a head, scores
    ``labels`` (with few-shot ``examples``) by likelihood instead."""
    config = llm.config
    if config.labels and not zero_shot:
        if labels is not None and sorted(labels) != sorted(config.labels):
            raise LmforgeError(
                f"labels {list(labels)} are not this model's fine-tuned labels {config.labels}",
                hint="leave the labels out to use its classification head, or ask for zero-shot scoring "
                "(zero_shot=True; the command line's --zero-shot)",
            )
        if examples:
            raise LmforgeError(
                "few-shot examples are for zero-shot scoring, and this model has a classification head",
                hint="leave the examples out to use the head, or pass zero_shot=True",
            )
        return _classify_with_head(llm, texts)
    if labels is None:
        raise LmforgeError(
            "this model has no classification head, so it needs candidate labels"
            if not config.labels
            else "zero-shot classification needs candidate labels",
            hint="pass labels=[...] (the command line's --labels a,b), or fine-tune with --task classify",
        )
    if len(set(labels)) < 2:
        raise LmforgeError(
            f"need at least two distinct labels, got {list(labels)}", hint="pass labels=['a', 'b']"
        )
    tok = llm.tokenizer
    prompts, conts, owners = [], [], []
    for i, text in enumerate(texts):
        prompt = tok.encode(
            chat_or_plain(tok, classification_prompt(text, labels, examples)), add_special_tokens=False
        )
        for label in labels:
            prompts.append(prompt)
            conts.append(
                tok.encode(label if llm.tokenizer.chat_template else " " + label, add_special_tokens=False)
            )
            owners.append(i)
    scores = np.array(sequence_logprobs(llm, prompts, conts)).reshape(len(texts), len(labels))
    results = []
    for row in scores:
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        results.append(
            {
                "label": labels[int(row.argmax())],
                "probabilities": dict(zip(labels, probs.tolist(), strict=True)),
            }
        )
    return results


@torch.inference_mode()
def _classify_with_head(llm: LoadedModel, texts: Sequence[str]) -> list[dict[str, Any]]:
    config, model = llm.config, llm.model
    encoded = [llm.tokenizer.encode(t) for t in texts]
    results: list[dict[str, Any]] = [{} for _ in texts]
    for chunk in tracked(_length_batches([len(e) for e in encoded], 16), "classifying"):
        batch, mask = _padded(
            llm,
            [encoded[i] for i in chunk],
            hint="shorten the text (classification never truncates silently)",
        )
        scores = model.classify(batch, mask).float()
        for i, row in zip(chunk, scores, strict=True):
            if config.regression:
                results[i] = {"label": config.labels[0], "score": float(row[0])}
            else:
                probs = row.softmax(-1).tolist()
                results[i] = {
                    "label": config.labels[int(row.argmax())],
                    "probabilities": dict(zip(config.labels, probs, strict=True)),
                }
    return results


# ----------------------------------------------------------------- summarize
def _fit_encoder(llm: LoadedModel, texts: Sequence[str]) -> list[str]:
    """Texts for an encoder–decoder, each cut to the encoder's context (as transformers' ``truncation=True``:
    a summary of the start beats an error), with one warning saying how many were cut."""
    limit, tok, out = llm.config.block_size, llm.tokenizer, []
    for text in texts:
        ids = tok.encode(text)
        # one token spare: the tokenizer may add its end token again to the shortened text
        out.append(tok.decode(ids[: limit - 1], skip_special_tokens=True) if len(ids) > limit else text)
    if cut := sum(a is not b for a, b in zip(out, texts, strict=True)):
        warnings.warn(
            f"{cut} of {len(texts)} texts were longer than the encoder's {limit} tokens: each was cut to its "
            "first tokens",
            stacklevel=3,
        )
    return out


def summarize(
    llm: LoadedModel,
    texts: Sequence[str],
    max_length: int = 80,
    examples: Sequence[Example] = (),
    batch_size: int = 8,
    **options: Any,
) -> list[str]:
    """One summary per text. Texts that fit the context are summarized together, ``batch_size`` at a time and
    grouped by length (little padding); a longer text is summarized in chunks whose summaries are then merged,
    with a warning — never silently truncated."""
    if llm.config.is_seq2seq:  # an encoder–decoder maps the text itself to its summary: no prompt around it
        if examples:
            raise LmforgeError(
                "examples are for a decoder's prompt; an encoder–decoder summarizes the text alone",
                hint="drop the examples (or fine-tune the model on them)",
            )
        return [
            c.text.strip()
            for c in llm.complete(_fit_encoder(llm, texts), max_new_tokens=max_length, **options)
        ]
    tok = llm.tokenizer
    # The prompt's own tokens, in the longer of its two languages ("中" picks the Chinese prompt).
    overhead = max(
        len(tok.encode(chat_or_plain(tok, summarization_prompt(probe, examples)), add_special_tokens=False))
        for probe in ("", "中")
    )
    budget = llm.config.block_size - overhead - max_length - 8
    if budget < 32:
        raise LmforgeError(
            f"the model's context of {llm.config.block_size} tokens leaves no room to summarize",
            hint="use fewer examples or a smaller max_length",
        )
    summaries: list[str] = [""] * len(texts)
    fitting: list[int] = []  # indices of the texts that fit the context
    lengths: list[int] = []  # and their tokens
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) <= budget:
            fitting.append(i)
            lengths.append(len(ids))
            continue
        chunks = _chunks(tok, text, budget * 9 // 10)  # re-encoding a piece can take a few more tokens
        warnings.warn(
            f"text of {len(ids)} tokens exceeds the {budget} that fit the context; summarizing it in "
            f"{len(chunks)} chunks and merging the summaries",
            stacklevel=3,
        )
        merged = "\n".join(summarize(llm, chunks, max_length, examples, batch_size, **options))
        if len(tok.encode(merged, add_special_tokens=False)) >= len(ids):
            raise LmforgeError(
                f"the summaries of the {len(chunks)} chunks of a {len(ids)}-token text are together no shorter "
                "than the text, so merging them would never end",
                hint=f"use a max_length well below the {budget} tokens of a chunk",
            )
        summaries[i] = summarize(llm, [merged], max_length, examples, batch_size, **options)[0]
    options.setdefault("stop", ["\n\n"])
    for batch in tracked(_length_batches(lengths, batch_size), "summarizing"):
        rows = [fitting[j] for j in batch]
        prompts = [chat_or_plain(tok, summarization_prompt(texts[i], examples)) for i in rows]
        for i, completion in zip(
            rows, llm.complete(prompts, max_new_tokens=max_length, **options), strict=True
        ):
            summaries[i] = completion.text.strip()
    return summaries


def _chunks(tok: Tokenizer, text: str, size: int) -> list[str]:
    """``text`` in pieces of about ``size`` tokens, cut in the text at token boundaries: decoding a slice of
    the ids could cut through the bytes of a character (Chinese, emoji) and leave U+FFFD behind."""
    offsets = tok.backend.encode(text, add_special_tokens=False).offsets
    cuts = sorted({offsets[j][0] for j in range(size, len(offsets), size)} - {0})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


# --------------------------------------------------------------------- embed
@torch.inference_mode()
def embed(llm: LoadedModel, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """Each text's final hidden states pooled (the mean over its tokens, or [CLS] where the model says so) and
    L2-normalised: (len(texts), n_embd) float32. Sentence encoders match sentence-transformers' vectors."""
    model = llm.model
    rows = [llm.tokenizer.encode(t) or [llm.tokenizer.eos_id or 0] for t in texts]
    vectors = np.zeros((len(rows), llm.config.n_embd), dtype=np.float32)
    for chunk in tracked(_length_batches([len(r) for r in rows], batch_size), "embedding"):
        batch, mask = _padded(
            llm, [rows[i] for i in chunk], hint="split the text into passages before embedding"
        )
        hidden = model.hidden_states(batch, attention_mask=mask).float()  # (B, T, C)
        if llm.config.pooling == "cls":
            first = mask.argmax(-1)  # (B,) each left-padded row's first real token: [CLS]
            pooled = hidden[torch.arange(len(chunk), device=hidden.device), first]
        else:
            weights = mask.unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
        vectors[chunk] = F.normalize(pooled, dim=-1).cpu().numpy()
    return vectors


def similarity(llm: LoadedModel, a: str, b: str) -> float:
    va, vb = embed(llm, [a, b])
    return float(np.dot(va, vb))
