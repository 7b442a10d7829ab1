"""Encoder–decoder training data: T5's span corruption and BART's text infilling on raw text, input → output
pairs for fine-tuning, and the Trainer objectives that turn them into a loss with teacher forcing.

Every batch is ``input_ids`` (B, S) right-padded with its ``attention_mask``, the decoder's ``decoder_ids``
(B, T) and ``targets`` (B, T): the output shifted right behind the decoder's start token, as transformers'
``shift_tokens_right`` makes it (T5: pad, BART: eos), so position t predicts output token t from tokens < t.
Padding in ``targets`` is IGNORE_INDEX; the loss is the mean over the output's tokens, the figure transformers'
``labels=`` gives.

Span corruption (Raffel et al. 2020, as t5's ``random_spans_noise_mask``)::

    text     a b c d e f g h i j            15 % of the tokens in spans of mean length 3
    input    a b <extra_id_0> e f g <extra_id_1> j </s>
    target   <extra_id_0> c d <extra_id_1> h i </s>

Text infilling (Lewis et al. 2020): 30 % of the tokens in spans whose lengths are drawn from Poisson(3), each
span (a length-0 span too: an insertion) replaced by one ``<mask>``; the target is the original text. Here the
spans never touch (one ``<mask>`` per span), so exactly round(0.3 n) tokens are hidden.

Windows come from the same token shards as causal pretraining; the corruption of batch ``i`` is a pure function
of (seed, split, i), so a resumed run sees exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn

from lmforge.data.labelled import EpochSampler, ExampleObjective, SequenceData, read_task_records
from lmforge.data.mlm import mask_token_id
from lmforge.data.text import Batch, WindowObjective
from lmforge.errors import LmforgeError
from lmforge.model import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer

Corruption = Literal["span", "denoise"]
SENTINEL = "<extra_id_{}>"


def sentinel_ids(tokenizer: Tokenizer, needed: int) -> list[int]:
    """The ids of ``<extra_id_0>`` .. ``<extra_id_{needed-1}>``, or one error naming how many are missing."""
    ids = [tokenizer.token_to_id(SENTINEL.format(k)) for k in range(needed)]
    if any(i is None for i in ids):
        have = next(k for k, i in enumerate(ids) if i is None)
        raise LmforgeError(
            f"span corruption of these windows needs {needed} sentinel tokens (<extra_id_0>..), and the "
            f"tokenizer has {have}",
            hint="train the tokenizer with special tokens <extra_id_0>..<extra_id_99> (as T5's), or use a smaller "
            "block_size",
        )
    return [i for i in ids if i is not None]


def _segments(items: int, parts: int, generator: torch.Generator) -> list[int]:
    """``items`` split at random into ``parts`` non-empty lengths (t5's ``_random_segmentation``)."""
    cuts = torch.randperm(items - 1, generator=generator)[: parts - 1].sort().values + 1
    edges = [0, *cuts.tolist(), items]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def span_counts(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) of a text of ``length`` tokens, as t5 counts them (at least one of each)."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def span_corrupt(
    ids: Sequence[int],
    sentinels: Sequence[int],
    eos_id: int,
    generator: torch.Generator,
    *,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """One text -> (input, target): noise spans become sentinels in the input and are spelled out after them
    in the target; both end with eos. The text starts with kept tokens and ends with a noise span (t5)."""
    n = len(ids)
    if n < 2:
        raise LmforgeError("span corruption needs a text of at least 2 tokens", hint="use longer windows")
    noise, spans = span_counts(n, noise_density, mean_span)
    noise_lengths = _segments(noise, spans, generator)
    kept_lengths = _segments(n - noise, spans, generator)
    inputs: list[int] = []
    target: list[int] = []
    at = 0
    for k, (kept, hidden) in enumerate(zip(kept_lengths, noise_lengths, strict=True)):
        inputs += [*ids[at : at + kept], sentinels[k]]
        target += [sentinels[k], *ids[at + kept : at + kept + hidden]]
        at += kept + hidden
    return inputs + [eos_id], target + [eos_id]


def text_infill(
    ids: Sequence[int],
    mask_id: int,
    generator: torch.Generator,
    *,
    ratio: float = 0.3,
    poisson_lambda: float = 3.0,
) -> list[int]:
    """BART's text infilling of one text: round(ratio x n) tokens in Poisson(λ)-long spans, each span one
    ``<mask>`` (a length-0 span inserts one). Spans are kept apart by at least one visible token."""
    n = len(ids)
    hidden = round(n * ratio)
    lengths: list[int] = []
    rate = torch.tensor(poisson_lambda)
    while sum(lengths) < hidden:
        lengths.append(int(torch.poisson(rate, generator=generator)))
    if lengths:
        lengths[-1] -= sum(lengths) - hidden
    visible = n - hidden
    # Too many spans to keep apart (a very short text): merge the last ones into the one before.
    while len(lengths) > 1 and len(lengths) - 1 > visible:
        lengths[-2] += lengths.pop()
    k = len(lengths)
    # The visible tokens go into k + 1 gaps, the k - 1 inner ones at least one token long: spread what is left
    # over the gaps (stars and bars: the bars' places among free + k slots, at random).
    free = visible - max(k - 1, 0)
    bars = torch.randperm(free + k, generator=generator)[:k].sort().values.tolist()
    gaps, previous = [], -1
    for bar in bars:
        gaps.append(bar - previous - 1)
        previous = bar
    gaps.append(free + k - previous - 1)
    gaps = [g + (1 if 0 < i < k else 0) for i, g in enumerate(gaps)]
    out: list[int] = []
    at = 0
    for gap, span in zip(gaps, lengths, strict=False):
        out += [*ids[at : at + gap], mask_id]
        at += gap + span
    return out + list(ids[at:])


def pad_batch(
    inputs: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], *, pad_id: int, start_id: int
) -> Batch:
    """Input and output token lists -> the right-padded batch the objectives train on (see the module's doc)."""
    longest_in, longest_out = max(len(x) for x in inputs), max(len(y) for y in outputs)
    ids = torch.full((len(inputs), longest_in), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), longest_in), dtype=torch.long)
    targets = torch.full((len(inputs), longest_out), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(zip(inputs, outputs, strict=True)):
        ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
        targets[row, : len(y)] = torch.tensor(y, dtype=torch.long)
    decoder = torch.cat([torch.full((len(inputs), 1), start_id), targets[:, :-1]], dim=1)
    decoder = decoder.masked_fill(decoder == IGNORE_INDEX, pad_id)  # after the output: never read by its loss
    return {"input_ids": ids, "attention_mask": mask, "decoder_ids": decoder, "targets": targets}


def seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(
        batch["input_ids"],
        targets=batch["targets"],
        attention_mask=batch["attention_mask"],
        decoder_ids=batch["decoder_ids"],
    )[1]


def _check_seq2seq(model: nn.Module, what: str) -> None:
    if not getattr(model.config, "is_seq2seq", False):
        raise LmforgeError(
            f"{what} trains encoder–decoders (T5, BART), and {model.config.name} is not one",
            hint="use --arch tiny-t5 / tiny-bart (or a loaded T5/BART model); decoders pretrain with "
            "--objective lm",
        )


def _ids_of(model_or_config: Any) -> tuple[int, int]:
    config = getattr(model_or_config, "config", model_or_config)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    if config.decoder_start_token_id is None:
        raise LmforgeError(
            f"{config.name}: the config names no decoder_start_token_id",
            hint="set decoder_start_token_id in config.json (T5: the pad id, BART: the eos id)",
        )
    return pad, config.decoder_start_token_id


class CorruptionObjective(WindowObjective):
    """Seq2seq pretraining on token shards for the one Trainer: ``span`` (T5) or ``denoise`` (BART)."""

    def __init__(
        self,
        shards: Any,
        tokenizer: Tokenizer,
        model: nn.Module,
        kind: Corruption,
        micro_batch_size: int,
        block_size: int,
        seed: int = 1337,
    ) -> None:
        _check_seq2seq(model, f"--objective {kind}")
        if kind not in ("span", "denoise"):
            raise LmforgeError(f"unknown corruption {kind!r}", hint="use span or denoise")
        if block_size < 8:
            raise LmforgeError(f"block_size {block_size} leaves no room for text", hint="use e.g. 128")
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else model.config.eos_token_id
        if eos is None:
            raise LmforgeError(
                "the tokenizer has no eos token", hint="use a tokenizer made by train_tokenizer"
            )
        super().__init__(shards, micro_batch_size, seed)
        self.kind, self.eos = kind, eos
        self.TASK = "span-corruption" if kind == "span" else "text-infilling"
        self.pad, self.start = _ids_of(model)
        # Window lengths such that input and target fit the context with their eos: span corruption shortens
        # the input (spans -> one sentinel each); infilling can lengthen it by its insertions (about 1.5 %).
        if kind == "span":
            self.window = block_size - 1
            self.sentinels = sentinel_ids(tokenizer, span_counts(self.window)[1])
        else:
            self.window = block_size - 1 - max(2, block_size // 16)
            self.mask_id = mask_token_id(
                tokenizer,
                "BART's text infilling (--objective denoise)",
                hint="train the tokenizer with the special token <mask>, or use --objective span",
            )

    def corrupt(self, window: Sequence[int], generator: torch.Generator) -> tuple[list[int], list[int]]:
        if self.kind == "span":
            return span_corrupt(window, self.sentinels, self.eos, generator)
        return text_infill(window, self.mask_id, generator) + [self.eos], [*window, self.eos]

    def batch(self, split: str, batch_size: int, seed: int, index: int) -> Batch:
        x, _ = self.shards.batch(split, batch_size, self.window, seed, index)
        key = hashlib.shake_128(f"lmforge-{self.kind}:{seed}:{split}:{index}".encode()).digest(8)
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        pairs = [self.corrupt(row, generator) for row in x.tolist()]
        return pad_batch([p[0] for p in pairs], [p[1] for p in pairs], pad_id=self.pad, start_id=self.start)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return seq2seq_loss(model, batch)


# ---------------------------------------------------------------- fine-tuning
def _pair(row: dict[str, Any], kind: str, text_field: str, summary_field: str) -> tuple[str, str]:
    if kind == "summarize":
        return str(row[text_field]), str(row[summary_field])
    if "messages" in row:  # the last message is the answer, the ones before it the input, one per line
        messages = list(row["messages"])
        return "\n".join(str(m["content"]) for m in messages[:-1]), str(messages[-1]["content"])
    source = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return str(source), str(row["output"])


def load_pairs(
    path: str | Any,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    kind: str = "summarize",
    text_field: str = "text",
    summary_field: str = "summary",
) -> SequenceData:
    """Input → output rows (summaries: text and summary fields; instructions: Alpaca or messages rows) ->
    encoder inputs (encoded as generation encodes them) and outputs ending with eos, each cut to
    ``block_size`` (the input's end, the output's end keeps its eos)."""
    rows = read_task_records(path, kind, text_field, summary_field)
    eos = tokenizer.eos_id
    inputs, outputs = [], []
    for row in rows:
        source, answer = _pair(row, kind, text_field, summary_field)
        inputs.append(tokenizer.encode(source)[:block_size] or ([eos] if eos is not None else [0]))
        out = tokenizer.encode(answer, add_special_tokens=False)[: block_size - 1]
        outputs.append(out + ([eos] if eos is not None else []))
    return SequenceData(inputs, outputs)


class PairObjective(ExampleObjective):
    """Fine-tuning an encoder–decoder on input → output pairs: teacher forcing, the loss on output tokens."""

    def __init__(
        self,
        model: nn.Module,
        train: SequenceData,
        val: SequenceData | None,
        micro_batch_size: int,
        seed: int = 1337,
        group_by_length: bool = False,
    ) -> None:
        _check_seq2seq(model, "seq2seq fine-tuning")
        self.train, self.val, self.micro_batch_size, self.seed = train, val, micro_batch_size, seed
        self.pad, self.start = _ids_of(model)
        lengths = [len(ids) for ids in train.input_ids] if group_by_length else None
        self.sampler = EpochSampler(len(train.input_ids), seed, lengths=lengths)

    def _ids(self, data: SequenceData) -> list[list[int]]:
        return data.input_ids

    def _batch(self, data: SequenceData, rows: Sequence[int]) -> Batch:
        return pad_batch(
            [data.input_ids[i] for i in rows],
            [data.targets[i] for i in rows],
            pad_id=self.pad,
            start_id=self.start,
        )

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return seq2seq_loss(model, batch)

    def describe(self) -> dict[str, Any]:
        return {"task": "seq2seq", "train_examples": len(self.train.input_ids)}
