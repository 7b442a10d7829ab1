"""Labelled data for fine-tuning: reading CSV/JSONL, and the Trainer objectives for classification and instructions.

Each objective draws micro-batch ``i`` as a pure function of ``i`` (an epoch-seeded permutation), like pretraining,
so fine-tuning resumes exactly too. Summarization is instruction tuning with a summarization prompt.

``split_validation`` holds a validation split out of the training rows (stratified by class for classification,
deterministic by seed); the objectives evaluate on it only, never on training rows.
"""

from __future__ import annotations

import csv
import json
import math
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.generate import left_pad
from lmforge.model import IGNORE_INDEX, loss_terms
from lmforge.prompts import summarization_prompt
from lmforge.tokenizer import Tokenizer

Batch = dict[str, torch.Tensor]


# ------------------------------------------------------------------- reading
def read_records(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a .jsonl or .csv file, each checked for the ``required`` fields (error names file and line)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file", hint="check the data path")
    rows: list[dict[str, Any]] = []
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            numbered = enumerate(csv.DictReader(f), start=2)
            rows_with_lines = list(numbered)
    else:
        rows_with_lines = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows_with_lines.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise LmforgeError(
                        f"{path}:{line_no}: not valid JSON ({e.msg})", hint="fix that line"
                    ) from None
    for line_no, row in rows_with_lines:
        missing = [k for k in required if not isinstance(row, dict) or row.get(k) in (None, "")]
        if missing:
            have = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise LmforgeError(
                f"{path}:{line_no}: missing field {', '.join(repr(m) for m in missing)} (the row has: {have})",
                hint="name the right fields with --text-field / --label-field (or fix the row)",
            )
        rows.append(row)
    if not rows:
        raise LmforgeError(f"{path}: no examples", hint="the file is empty")
    return rows


def split_validation(
    count: int, fraction: float, seed: int, *, classes: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """(training rows, validation rows) of ``count`` examples, sorted: about ``fraction`` of them held out,
    the same rows for the same ``seed``.

    With ``classes`` (each row's class) the split is stratified: each class gives round(its size x
    ``fraction``) rows, so every class's share of the validation rows is within one example of its ideal,
    and keeps at least one training row. Without, it is a plain random sample of round(count x fraction).
    """
    if not 0 < fraction < 1:
        raise LmforgeError(
            f"val_split={fraction} must be above 0 and below 1", hint="use e.g. 0.1, or 0 for no validation"
        )
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(classes if classes is not None else [0] * count):
        groups.setdefault(group, []).append(row)
    rng = random.Random(f"{seed}:validation")
    held: list[int] = []
    for group in sorted(groups):
        rows = groups[group]
        rng.shuffle(rows)
        # floor(x + 0.5), not round(): Python's round() takes 2.5 to 2 and 3.5 to 4
        held += rows[: min(math.floor(len(rows) * fraction + 0.5), len(rows) - 1)]
    if not held:
        raise LmforgeError(
            f"{count} examples are too few to hold out {fraction:.0%} for validation",
            hint="give more data, a --val-file, a larger --val-split, or --val-split 0 for no validation",
        )
    kept = set(held)
    return [row for row in range(count) if row not in kept], sorted(held)


class EpochSampler:
    """Deterministic example indices for global batch ``i`` (stateless, so resume is exact).

    With ``lengths``, each epoch's shuffled order is regrouped so a batch holds examples of similar length
    (sorted within windows of 50 batches, then the batches shuffled): far less padding, the same examples
    per epoch. Short texts (SMS, reviews) vary a lot in length; random batches waste ~2x compute on pads.
    """

    GROUP_WINDOW = 50  # batches per sorting window: wide enough to match lengths, narrow enough to mix

    def __init__(
        self,
        size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.size, self.seed, self.weights, self.lengths = size, seed, weights, lengths
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int, batch_size: int) -> list[int]:
        order = list(range(self.size))
        rng = random.Random(f"{self.seed}:{epoch}")
        rng.shuffle(order)
        if self.lengths is not None:
            window = batch_size * self.GROUP_WINDOW
            order = [
                i
                for start in range(0, self.size, window)
                for i in sorted(order[start : start + window], key=self.lengths.__getitem__)
            ]
            batches = [order[start : start + batch_size] for start in range(0, self.size, batch_size)]
            rng.shuffle(batches)
            order = [i for batch in batches for i in batch]
        return order

    def indices(self, batch_index: int, batch_size: int) -> list[int]:
        if self.weights is not None:  # balanced sampling: draw with replacement by class weight
            rng = random.Random(f"{self.seed}:weighted:{batch_index}")
            return rng.choices(range(self.size), weights=self.weights, k=batch_size)
        out = []
        for k in range(batch_index * batch_size, (batch_index + 1) * batch_size):
            epoch, position = divmod(k, self.size)
            if epoch not in self._orders:
                self._orders = {epoch: self._order(epoch, batch_size)}  # keep one epoch's order in memory
            out.append(self._orders[epoch][position])
        return out


class ExampleObjective:
    """Shared by the fine-tuning objectives: epoch-shuffled training rows; the validation rows, if any, for
    evaluation (never training rows: a figure measured on them would say nothing about unseen data)."""

    train: Any
    val: Any
    micro_batch_size: int
    sampler: EpochSampler

    def _batch(self, data: Any, rows: Sequence[int]) -> Batch:
        raise NotImplementedError

    def train_batch(self, index: int, rank: int, world_size: int) -> Batch:
        # Draw the global batch and take this rank's rows: N processes see exactly what one process would.
        b = self.micro_batch_size
        rows = self.sampler.indices(index, b * world_size)[rank * b : (rank + 1) * b]
        return self._batch(self.train, rows)

    def val_batches(self, count: int | None) -> Iterable[Batch]:
        """The validation rows (the first ``count`` batches' worth, or all), batched shortest first: each
        example counts the same wherever it lands, and similar lengths waste less on padding."""
        if self.val is None:
            return
        n = len(self.val) if count is None else min(len(self.val), count * self.micro_batch_size)
        ids = self._ids(self.val)
        rows = sorted(range(n), key=lambda i: len(ids[i]))
        for start in range(0, n, self.micro_batch_size):
            yield self._batch(self.val, rows[start : start + self.micro_batch_size])

    def _ids(self, data: Any) -> list[list[int]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss_terms(self, batch: Batch) -> int:
        """The target tokens (instruction and seq2seq objectives: a token-level loss)."""
        return loss_terms(batch["targets"])

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """The mean loss over the batches, the figure every task has."""
        losses = [self.loss(model, batch).float() for batch in batches]
        return {"val_loss": float(torch.stack(losses).mean())} if losses else {}


# ------------------------------------------------------------ classification
@dataclass
class ClassificationData:
    ids: list[list[int]]
    targets: list[float]  # label index, or the score for regression
    labels: list[str]
    regression: bool

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: Sequence[int]) -> ClassificationData:
        return ClassificationData(
            [self.ids[i] for i in rows], [self.targets[i] for i in rows], self.labels, self.regression
        )


def load_classification(
    path: str | Path,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    regression: bool = False,
) -> ClassificationData:
    """Tokenized examples; labels come from the data (sorted) unless given (then unknown labels are an error)."""
    rows = read_records(path, [text_field, label_field])
    if regression:
        try:
            targets = [float(r[label_field]) for r in rows]
        except ValueError as e:
            raise LmforgeError(
                f"{path}: a regression label is not a number ({e})", hint="use numeric scores"
            ) from None
        names = [label_field]
    else:
        found = sorted({str(r[label_field]) for r in rows})
        names = list(labels) if labels else found
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise LmforgeError(
                f"{path}: labels {unknown} are not among the model's labels {names}",
                hint="use data with the labels the model was trained on",
            )
        if len(names) < 2:
            raise LmforgeError(
                f"{path}: only one class ({names[0]!r}) in the data",
                hint="a classifier needs at least two labels",
            )
        targets = [float(names.index(str(r[label_field]))) for r in rows]
    full = [tokenizer.encode(str(r[text_field])) for r in rows]
    ids = [i[:block_size] for i in full]
    truncated = sum(len(i) > block_size for i in full)
    if truncated:
        warnings.warn(
            f"{path}: {truncated} of {len(rows)} texts were longer than {block_size} tokens and were truncated",
            stacklevel=2,
        )
    return ClassificationData(ids, targets, names, regression)


def check_label_smoothing(value: float) -> float:
    """``value`` if it is a label-smoothing weight (0 <= e < 1), else the error naming it."""
    if not 0 <= value < 1:
        raise LmforgeError(
            f"label smoothing {value} must be at least 0 and below 1", hint="use e.g. 0.1, or 0"
        )
    return value


class ClassificationObjective(ExampleObjective):
    """Cross-entropy (optionally class-weighted) or MSE on the head at the last real token."""

    def __init__(
        self,
        train: ClassificationData,
        val: ClassificationData | None,
        micro_batch_size: int,
        seed: int = 1337,
        balance: str = "none",  # none | weights (class-weighted loss) | sample (balanced sampling)
        group_by_length: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        self.train, self.val, self.micro_batch_size, self.seed = train, val, micro_batch_size, seed
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.class_weights = None
        sample_weights = None
        if not train.regression and balance != "none":
            counts = torch.bincount(
                torch.tensor(train.targets, dtype=torch.long), minlength=len(train.labels)
            ).float()
            inverse = counts.sum() / (len(counts) * counts.clamp(min=1))
            if balance == "weights":
                self.class_weights = inverse
            elif balance == "sample":
                sample_weights = [float(inverse[int(t)]) for t in train.targets]
            else:
                raise LmforgeError(f"unknown balance mode {balance!r}", hint="use none, weights or sample")
        lengths = [len(ids) for ids in train.ids] if group_by_length else None
        self.sampler = EpochSampler(len(train.ids), seed, sample_weights, lengths)

    def _ids(self, data: ClassificationData) -> list[list[int]]:
        return data.ids

    def _batch(self, data: ClassificationData, rows: Sequence[int]) -> Batch:
        ids, mask = left_pad([data.ids[i] for i in rows], pad_id=0)
        batch = {"input_ids": ids, "targets": torch.tensor([data.targets[i] for i in rows])}
        if mask is not None:
            batch["attention_mask"] = mask
        return batch

    def _scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        # Through forward, and so through a DDP / FSDP wrapper (which a method of the model inside would skip).
        scores, _ = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), classify=True)
        return scores.float()

    def _loss(self, scores: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        if self.train.regression:
            return F.mse_loss(scores[:, 0], targets.float())
        weight = self.class_weights.to(scores.device) if self.class_weights is not None else None
        return F.cross_entropy(scores, targets.long(), weight=weight, label_smoothing=smoothing)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self._loss(self._scores(model, batch), batch["targets"], self.label_smoothing)

    def loss_terms(self, batch: Batch) -> int:
        return len(batch["targets"])  # rows (a regression target may be any number)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
        """Mean loss, and for labels accuracy and macro-F1 (sklearn's: classes absent from both the truth
        and the predictions count as F1 0), from one forward pass per batch. The loss is plain cross-entropy
        even with label smoothing, so validation losses of runs with and without it compare."""
        losses, predicted, truth = [], [], []
        for batch in batches:
            scores = self._scores(model, batch)
            losses.append(self._loss(scores, batch["targets"]))
            predicted.append(scores.argmax(-1).cpu())
            truth.append(batch["targets"].long().cpu())
        if not losses:
            return {}
        values = {"val_loss": float(torch.stack(losses).mean())}
        if not self.train.regression:
            values |= classification_scores(torch.cat(truth), torch.cat(predicted), len(self.train.labels))
        return values

    def describe(self) -> dict[str, Any]:
        return {"task": "classify", "labels": self.train.labels, "train_examples": len(self.train.ids)}


def classification_scores(truth: torch.Tensor, predicted: torch.Tensor, classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 of class indices (the validation figures the best checkpoint is chosen by)."""
    pairs = torch.bincount(truth * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    right = pairs.diag().double()
    # F1 of a class = 2 TP / (2 TP + FP + FN) = 2 TP / (its true count + its predicted count); 0 when both are 0
    f1 = torch.where(right > 0, 2 * right / (pairs.sum(1) + pairs.sum(0)).clamp(min=1), 0.0)
    return {"accuracy": float(right.sum() / len(truth)), "macro_f1": float(f1.mean())}


# ------------------------------------------------------ instructions, summaries
def format_instruction(row: dict[str, Any]) -> list[dict[str, str]]:
    """An Alpaca-style row or a chat-messages row -> chat messages ending with the assistant's answer."""
    if "messages" in row:
        return list(row["messages"])
    user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def summary_messages(text: str, summary: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": summarization_prompt(text)},
        {"role": "assistant", "content": summary},
    ]


@dataclass
class SequenceData:
    input_ids: list[list[int]]
    targets: list[list[int]]  # already shifted; IGNORE_INDEX where no loss is taken

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: Sequence[int]) -> SequenceData:
        return SequenceData([self.input_ids[i] for i in rows], [self.targets[i] for i in rows])


def encode_conversation(
    tokenizer: Tokenizer, messages: list[dict[str, str]], include_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and the mask of answer tokens (1 = train on it), EOS-terminated.

    The prompt is rendered with the model's chat template (or a ChatML default); the answer is the last
    message, followed by EOS so the tuned model learns to stop.
    """
    prompt_ids, answer_ids = _prompt_and_answer(tokenizer, messages)
    weights = [1 if include_prompt else 0] * len(prompt_ids) + [1] * len(answer_ids)
    return prompt_ids + answer_ids, weights


def _prompt_and_answer(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    eos = tokenizer.eos_id
    return prompt_ids, answer_ids + ([eos] if eos is not None else [])


def _fit_to_length(prompt_ids: list[int], answer_ids: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Shorten an example to ``limit`` tokens without losing its answer.

    Cutting the end, as plain truncation does, would drop the answer: the one part that is trained on (a
    batch of such examples has no target at all and a NaN loss). So the prompt gives up its middle instead;
    its start and its last tokens (the end of the user's text and the template's cue to answer) stay. Only
    an answer longer than half of ``limit`` is cut, at its end.
    """
    answer = answer_ids[: max(limit // 2, limit - len(prompt_ids))]
    room = limit - len(answer)
    tail = min(32, room // 4)
    prompt = prompt_ids[: room - tail] + (prompt_ids[len(prompt_ids) - tail :] if tail else [])
    return prompt, answer


def read_task_records(
    path: str | Path, kind: str, text_field: str = "text", summary_field: str = "summary"
) -> list[dict[str, Any]]:
    """The rows of a ``summarize`` file (text and summary fields) or an ``instruct`` file (chat ``messages``,
    or Alpaca ``instruction``/``output``, whichever its first row has)."""
    if kind == "summarize":
        return read_records(path, [text_field, summary_field])
    first = read_records(path, [])[0]
    return read_records(path, ["messages"] if "messages" in first else ["instruction", "output"])


def load_sequences(
    path: str | Path,
    tokenizer: Tokenizer,
    block_size: int,
    *,
    kind: str = "instruct",
    text_field: str = "text",
    summary_field: str = "summary",
    include_prompt: bool = False,
) -> SequenceData:
    rows = read_task_records(path, kind, text_field, summary_field)
    if kind == "summarize":
        conversations = [summary_messages(str(r[text_field]), str(r[summary_field])) for r in rows]
    else:
        conversations = [format_instruction(r) for r in rows]
    inputs, targets, shortened = [], [], 0
    for messages in conversations:
        prompt, answer = _prompt_and_answer(tokenizer, messages)
        if len(prompt) + len(answer) > block_size + 1:
            shortened += 1
            prompt, answer = _fit_to_length(prompt, answer, block_size + 1)
        ids = prompt + answer
        weights = [1 if include_prompt else 0] * len(prompt) + [1] * len(answer)
        inputs.append(ids[:-1])
        targets.append([t if w else IGNORE_INDEX for t, w in zip(ids[1:], weights[1:], strict=True)])
    if shortened:
        warnings.warn(
            f"{path}: {shortened} of {len(rows)} examples were longer than {block_size} tokens and were "
            "truncated (the middle of the prompt was cut; answers are kept)",
            stacklevel=2,
        )
    return SequenceData(inputs, targets)


def pack(data: SequenceData, block_size: int) -> SequenceData:
    """Concatenate examples into full blocks (less padding, faster; examples may then see their neighbours)."""
    flat_in = [t for seq in data.input_ids for t in seq]
    flat_tg = [t for seq in data.targets for t in seq]
    inputs = [flat_in[i : i + block_size] for i in range(0, len(flat_in), block_size)]
    targets = [flat_tg[i : i + block_size] for i in range(0, len(flat_tg), block_size)]
    return SequenceData(inputs, targets)


class SequenceObjective(ExampleObjective):
    """Next-token loss on answer tokens only (prompt positions carry IGNORE_INDEX); right-padded batches."""

    def __init__(
        self,
        train: SequenceData,
        val: SequenceData | None,
        micro_batch_size: int,
        seed: int = 1337,
        group_by_length: bool = False,
    ) -> None:
        self.train, self.val, self.micro_batch_size, self.seed = train, val, micro_batch_size, seed
        lengths = [len(ids) for ids in train.input_ids] if group_by_length else None
        self.sampler = EpochSampler(len(train.input_ids), seed, lengths=lengths)

    def _ids(self, data: SequenceData) -> list[list[int]]:
        return data.input_ids

    def _batch(self, data: SequenceData, rows: Sequence[int]) -> Batch:
        longest = max(len(data.input_ids[i]) for i in rows)
        ids = torch.zeros((len(rows), longest), dtype=torch.long)
        targets = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(data.input_ids[i])
            ids[r, :n] = torch.tensor(data.input_ids[i])
            targets[r, :n] = torch.tensor(data.targets[i])
        # Right padding needs no attention mask: causal attention never lets a real token see a later pad.
        return {"input_ids": ids, "targets": targets}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["input_ids"], targets=batch["targets"])[1]

    def describe(self) -> dict[str, Any]:
        return {"task": "sequence", "train_examples": len(self.train.input_ids)}
