"""Ranking candidates (``select``): each is sized for the workload its scoring runs, checked against the
memory limit, and, if it fits, loaded and scored on a seeded sample of the user's data (quality, latency).

Quality comes with its 95 % bootstrap interval, and the recommended candidate is tested against each other
scored one on the same sample (McNemar's exact test for accuracies, the paired bootstrap for ROUGE-L and bits
per byte), so a recommendation that is within noise of the runner-up says so.

Named ``ranking`` rather than ``select`` so that the module does not shadow the ``lmforge.sizing.select``
function (``import lmforge.sizing.select as m`` would bind the function).
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from lmforge import runtime
from lmforge.config import Config
from lmforge.data.labelled import encode_conversation, format_instruction, read_records
from lmforge.errors import LmforgeError
from lmforge.evaluate import classification_metrics, markdown_table, rouge_means, rouge_per_example
from lmforge.hosted import Endpoint, HostedLLM, Price, cost
from lmforge.inference import classify, embed, sequence_logprobs, summarize
from lmforge.info import ModelHeader, read_header
from lmforge.loading import LoadedModel, hosted_model
from lmforge.prompts import chat_or_plain, classification_prompt, summarization_prompt
from lmforge.quant import QUANT_CHOICES
from lmforge.sizing.measure import decode_speed
from lmforge.sizing.memory import check_choice, model_shell, size_memory
from lmforge.sizing.units import format_size, parse_size
from lmforge.stats import Comparison, Statistic, interval, mcnemar, mean_of, paired_bootstrap, ratio_of

SELECT_TASKS = ("classify", "generate", "summarize", "embed")
SUMMARY_TOKENS = 64  # summary length when scoring summarization


@dataclass
class Candidate:
    name: str
    parameters: int | None = None
    memory: int | None = None  # estimated peak for this workload
    latency_ms: float | None = None
    quality: float | None = None
    status: str = "ok"  # ok, or why the candidate cannot be recommended
    details: dict[str, Any] = field(default_factory=dict)
    quality_ci95: tuple[float, float] | None = None
    tokens: tuple[int, int] | None = None  # a hosted candidate's prompt and completion tokens on the sample
    cost: float | None = None  # what they cost, when the user gave the model's prices
    # Per-example results on the sample, for the paired tests: right/wrong (accuracies), ROUGE-L, or
    # (bits, bytes) of each row (bits per byte).
    per_example: Any = field(default=None, repr=False)

    @property
    def eligible(self) -> bool:
        return self.status == "ok"


@dataclass
class Selection:
    task: str
    data: str
    sample: int
    metric: str  # what quality means here, e.g. "accuracy"
    higher_is_better: bool
    latency_unit: str  # "ms/example" or "ms/token"
    candidates: list[Candidate]  # ranked: recommendable ones first
    recommended: str | None
    reason: str
    max_ram: int
    max_latency_ms: float | None = None
    # The recommended candidate against each other scored one: {"a_model", "b_model", **Comparison.to_dict()}
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            {
                "rank": i + 1,
                "candidate": c.name,
                "params": f"{c.parameters / 1e6:.1f}M" if c.parameters else "-",
                "memory (est.)": format_size(c.memory) if c.memory else "-",
                self.latency_unit: f"{c.latency_ms:.1f}" if c.latency_ms is not None else "-",
                self.metric: _with_interval(c.quality, c.quality_ci95),
                "status": c.status,
            }
            for i, c in enumerate(self.candidates)
        ]
        columns = ["rank", "candidate", "params", "memory (est.)", self.latency_unit, self.metric, "status"]
        if any(c.tokens for c in self.candidates):  # hosted candidates: what they used (and cost)
            for row, c in zip(rows, self.candidates, strict=True):
                row["tokens (in+out)"] = f"{c.tokens[0]}+{c.tokens[1]}" if c.tokens else "-"
                row["cost (USD)"] = f"{c.cost:.4f}" if c.cost is not None else "-"
            columns[-1:-1] = ["tokens (in+out)", "cost (USD)"]
        limits = f"max RAM {format_size(self.max_ram)}" + (
            f", max latency {self.max_latency_ms:g} {self.latency_unit}" if self.max_latency_ms else ""
        )
        better = "higher" if self.higher_is_better else "lower"
        head = f"{self.task} on {self.sample} examples of {self.data} ({limits}; {self.metric}: {better} is better)\n\n"
        verdict = f"recommended: {self.recommended} — {self.reason}" if self.recommended else self.reason
        tests = [
            f"  {c['a_model']} vs {c['b_model']}: {c['metric']} {c['a']:.3f} vs {c['b']:.3f} "
            f"({c['test']}, {c['detail']}): {c['verdict']}"
            for c in self.comparisons
        ]
        if tests:
            tests.insert(0, "paired tests on the same examples (p < 0.05 is significant):")
        note = (
            "\n\n[low, high]: 95 % bootstrap interval" if any(c.quality_ci95 for c in self.candidates) else ""
        )
        return head + markdown_table(rows, columns) + note + "\n" + "\n".join([*tests, "", verdict]).rstrip()


def _with_interval(value: float | None, ci: tuple[float, float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def select(
    task: str,
    data: str | Path,
    *,
    candidates: Sequence[str] | str,
    max_ram: int | str | None = None,
    max_latency_ms: float | None = None,
    sample: int = 32,
    shots: int = 0,
    text_field: str = "text",
    label_field: str = "label",
    summary_field: str = "summary",
    seed: int = 0,
    quant: str = "auto",
    compile: bool | None = None,
    endpoint: Endpoint | None = None,
    prices: dict[str, Price] | None = None,
) -> Selection:
    """Rank ``candidates`` (any name ``LoadedModel.load`` takes) for ``task`` on a sample of ``data``.

    Each candidate is sized for the workload (``estimate``) and checked against ``max_ram`` (default: the RAM
    free now); those that fit are loaded and scored on ``sample`` examples: classify - accuracy (a fine-tuned
    head when its labels match, else zero/``shots``-shot), summarize - ROUGE-L, generate - bits per byte of
    the target text (lower is better; comparable across tokenizers), embed - nearest-neighbour label accuracy
    (skipped without labels). The best quality among those that fit and meet ``max_latency_ms`` is recommended;
    ties go to the faster, then the smaller model. Each quality has its 95 % bootstrap interval
    (``Candidate.quality_ci95``), and ``Selection.comparisons`` tests the recommended candidate against each
    other scored one on the same sample (``stats``). Candidates load on the CPU with ``quant`` and ``compile``
    (``LoadedModel.load``'s), so speed and quality are those of the model as the user will run it, and the
    memory check sizes them as loaded: packed layers at their packed size, a compiled decode step's memory
    where scoring decodes. Hosted candidates (``openai:MODEL`` at ``endpoint``) are scored on the same sample
    (classify, summarize, embed) with their tokens, and their cost where ``prices`` names them (USD per 1k
    prompt and completion tokens); they use no memory here.
    """
    compile = runtime.compile_by_default() if compile is None else compile  # as LLM.load decides
    check_choice("task", task, allowed=SELECT_TASKS)
    check_choice("quant", quant, allowed=QUANT_CHOICES)  # before any candidate is loaded
    names = [c.strip() for c in candidates.split(",")] if isinstance(candidates, str) else list(candidates)
    names = [n for n in names if n]
    if not names:
        raise LmforgeError(
            "no candidates given", hint="name models to compare, e.g. --candidates default,runs/x/model"
        )
    limit = parse_size(max_ram) if max_ram is not None else psutil.virtual_memory().available
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise LmforgeError(f"max_latency_ms={max_latency_ms} must be > 0", hint="e.g. --max-latency-ms 200")
    if sample < 1:
        raise LmforgeError(f"sample={sample} must be >= 1", hint="e.g. --sample 32")
    job = _read_job(
        task,
        data,
        size=sample,
        seed=seed,
        shots=shots,
        text_field=text_field,
        label_field=label_field,
        summary_field=summary_field,
    )
    prices = prices or {}
    results = [
        _evaluate_hosted(name, job, endpoint or Endpoint(), max_latency_ms, prices.get(name))
        if hosted_model(name) is not None
        else _evaluate_candidate(
            name, job, limit=limit, max_latency_ms=max_latency_ms, quant=quant, compile=compile
        )
        for name in names
    ]
    ranked = sorted(results, key=job.sort_key)
    best = next((c for c in ranked if c.eligible), None)
    comparisons = _against_best(best, ranked, job)
    return Selection(
        task,
        str(data),
        len(job.rows),
        job.metric,
        job.higher_is_better,
        job.latency_unit,
        ranked,
        best.name if best else None,
        _reason(ranked, best, job, limit, max_latency_ms, comparisons),
        limit,
        max_latency_ms,
        comparisons,
    )


def _against_best(best: Candidate | None, ranked: list[Candidate], job: _Job) -> list[dict[str, Any]]:
    """The recommended candidate tested against each other candidate scored on the sample."""
    if best is None or best.per_example is None:
        return []
    out = []
    for other in ranked:
        if other is best or other.per_example is None:
            continue
        test = job.compare(best.per_example, other.per_example)
        out.append({"a_model": best.name, "b_model": other.name, **test.to_dict()})
    return out


@dataclass
class _Job:
    """The task, the sampled rows and how a model is scored on them."""

    task: str
    rows: list[dict[str, Any]]
    labels: list[str] = field(default_factory=list)  # every label in the data file (classify, embed)
    examples: list[tuple[str, str]] = field(
        default_factory=list
    )  # few-shot examples, from outside the sample

    @property
    def metric(self) -> str:
        names = {
            "classify": "accuracy",
            "summarize": "ROUGE-L",
            "generate": "bits/byte",
            "embed": "1-NN accuracy",
        }
        return names[self.task]

    @property
    def higher_is_better(self) -> bool:
        return self.task != "generate"

    @property
    def decodes(self) -> bool:
        """Whether scoring runs the decode step (summaries, and the decode speed of generate)."""
        return self.task in ("generate", "summarize")

    @property
    def latency_unit(self) -> str:
        return "ms/token" if self.task == "generate" else "ms/example"

    def sort_key(self, c: Candidate) -> tuple[bool, float, float, float]:
        """Recommendable first, then better quality, then faster, then smaller."""
        if c.quality is None:
            quality = math.inf
        else:
            quality = -c.quality if self.higher_is_better else c.quality
        return (not c.eligible, round(quality, 6), c.latency_ms or math.inf, c.memory or math.inf)

    # --------------------------------------------------------- uncertainty
    def statistic(self, per_example: Any) -> tuple[Statistic, int]:
        """The quality as a function of resampled rows (``stats``), and the number of rows."""
        if self.task == "generate":
            bits, size = per_example
            return ratio_of(bits, size), len(bits)
        return mean_of(per_example), len(per_example)

    def compare(self, a: Any, b: Any) -> Comparison:
        """A paired test of two candidates' per-example results on the sample."""
        if self.task in ("classify", "embed"):
            return mcnemar(a, b, metric=self.metric)
        (stat_a, n), (stat_b, _) = self.statistic(a), self.statistic(b)
        return paired_bootstrap(stat_a, stat_b, n, metric=self.metric)

    # ------------------------------------------------------- sizing a model
    def uses_head(self, config: Config) -> bool:
        return self.task == "classify" and bool(config.labels) and set(self.labels) <= set(config.labels)

    def workload(self, header: ModelHeader) -> tuple[str, int, int]:
        """(estimate's task, batch, context) that scoring this model on the sample runs: the batch sizes are
        those of inference.py's batched loops, the context the longest example's tokens."""
        tok, config = header.tokenizer, header.config
        texts = [str(r.get("text", "")) for r in self.rows]
        if self.task == "classify" and self.uses_head(config):
            return "classify", 16, max(len(tok.encode(t)) for t in texts)
        if self.task == "classify":
            answer = max(len(tok.encode(" " + label, add_special_tokens=False)) for label in self.labels)
            prompts = [
                chat_or_plain(tok, classification_prompt(t, self.labels, self.examples)) for t in texts
            ]
            return "score", 8, max(len(tok.encode(p, add_special_tokens=False)) for p in prompts) + answer
        if self.task == "summarize":
            prompts = [chat_or_plain(tok, summarization_prompt(t)) for t in texts]
            longest = max(len(tok.encode(p, add_special_tokens=False)) for p in prompts) + SUMMARY_TOKENS
            return "generate", 1, min(longest, config.block_size)  # longer texts are summarized in chunks
        if self.task == "generate":
            lengths = [
                len(encode_conversation(tok, r["messages"])[0])
                if "messages" in r
                else len(tok.encode(r["text"]))
                for r in self.rows
            ]
            return "score", 8, min(max(lengths), config.block_size)
        return "embed", 16, max(len(tok.encode(t)) for t in texts)

    # ------------------------------------------------------------- scoring
    def score(self, llm: LoadedModel | HostedLLM) -> tuple[float | None, float, dict[str, Any], Any]:
        """(quality, latency in ms per example or per token, details, per-example results) of a loaded model
        (or a hosted one: classify, summarize and embed) on the sample."""
        start = time.perf_counter()
        if self.task == "classify":
            texts = [r["text"] for r in self.rows]
            head = not isinstance(llm, HostedLLM) and self.uses_head(llm.config)
            if isinstance(llm, HostedLLM):
                found = llm.classify_text(texts, self.labels, self.examples)
                assert isinstance(found, list)
            elif head:
                found = classify(llm, texts)
            else:  # zero-shot, also for a model whose head knows other labels
                found = classify(llm, texts, self.labels, self.examples, zero_shot=True)
            latency = (time.perf_counter() - start) * 1000 / len(texts)
            truth = [r["label"] for r in self.rows]
            predicted = [f["label"] for f in found]
            metrics = classification_metrics(truth, predicted, self.labels)
            method = "fine-tuned head" if head else f"{len(self.examples)}-shot"
            details = {
                "macro_f1": metrics["macro_f1"],
                "macro_f1_ci95": metrics["macro_f1_ci95"],
                "method": method,
            }
            return (
                metrics["accuracy"],
                latency,
                details,
                [t == p for t, p in zip(truth, predicted, strict=True)],
            )
        if self.task == "summarize":
            texts = [r["text"] for r in self.rows]
            if isinstance(llm, HostedLLM):
                summaries = llm.summarize(texts, max_length=SUMMARY_TOKENS)
            else:
                summaries = summarize(llm, texts, max_length=SUMMARY_TOKENS)
            latency = (time.perf_counter() - start) * 1000 / len(self.rows)
            per_example = rouge_per_example(summaries, [r["summary"] for r in self.rows])
            scores = rouge_means(per_example)
            return scores["rougeL"], latency, scores, per_example["rougeL"]
        if self.task == "generate":
            assert not isinstance(llm, HostedLLM)  # _evaluate_hosted does not score generate
            bits, size = _bits_and_bytes(llm, self.rows)
            tokens_per_s, how = decode_speed(llm)
            return sum(bits) / max(1, sum(size)), 1000 / tokens_per_s, {"speed": how}, (bits, size)
        texts = [r["text"] for r in self.rows]
        vectors = llm.embed(texts) if isinstance(llm, HostedLLM) else embed(llm, texts)
        latency = (time.perf_counter() - start) * 1000 / len(self.rows)
        if not self.labels:
            return None, latency, {"note": "the data has no labels, so quality is not scored"}, None
        similarity = vectors @ vectors.T
        similarity[range(len(vectors)), range(len(vectors))] = -math.inf  # leave each text out of its search
        truth = [r["label"] for r in self.rows]
        hits = [truth[int(j)] == truth[i] for i, j in enumerate(similarity.argmax(1))]
        return sum(hits) / len(hits), latency, {}, hits


def _bits_and_bytes(llm: LoadedModel, rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[int]]:
    """Negative log-likelihood in bits of each row's target text (an answer after its prompt, or a whole
    text), and its UTF-8 bytes: their sums' ratio, bits per byte, compares models with different tokenizers."""
    tok, context = llm.tokenizer, llm.config.block_size
    prompts, targets = [], []
    for row in rows:
        if "messages" in row:
            ids, weights = encode_conversation(tok, row["messages"])
            split = weights.index(1)
        else:
            ids, split = tok.encode(row["text"]), 1
        target = ids[split:][: context - 1]  # a target longer than the context is scored up to it
        prompts.append(ids[:split][-(context - len(target)) :])
        targets.append(target)
    bits = [-logprob / math.log(2) for logprob in sequence_logprobs(llm, prompts, targets)]
    size = [len(tok.decode(t, skip_special_tokens=True).encode("utf-8")) for t in targets]
    return bits, size


def _read_job(
    task: str,
    data: str | Path,
    *,
    size: int,
    seed: int,
    shots: int,
    text_field: str,
    label_field: str,
    summary_field: str,
) -> _Job:
    """A seeded random sample of the data file's rows, in the shape the task's scoring reads."""
    required = {
        "classify": [text_field, label_field],
        "summarize": [text_field, summary_field],
        "embed": [text_field],
        "generate": [],
    }[task]
    records = read_records(data, required)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen, rest = order[:size], order[size:]
    if task == "generate":
        first = records[0]
        if "messages" in first or ("instruction" in first and "output" in first):
            records = read_records(data, ["messages"] if "messages" in first else ["instruction", "output"])
            rows = [{"messages": format_instruction(records[i])} for i in chosen]
        else:
            records = read_records(data, [text_field])
            rows = [{"text": str(records[i][text_field])} for i in chosen]
        return _Job(task, rows)
    rows = [
        {
            "text": str(records[i][text_field]),
            **({"label": str(records[i][label_field])} if label_field in records[i] else {}),
            **({"summary": str(records[i][summary_field])} if task == "summarize" else {}),
        }
        for i in chosen
    ]
    job = _Job(task, rows)
    if task in ("classify", "embed") and all("label" in r for r in rows):
        job.labels = sorted({str(r[label_field]) for r in records if label_field in r})
    if task == "classify" and len(job.labels) < 2:
        raise LmforgeError(
            f"{data}: only one label ({job.labels[0]!r}) in the data", hint="classification needs two"
        )
    if shots and task == "classify":  # examples from outside the sample, taking the labels in turn
        pools = [[i for i in rest if str(records[i][label_field]) == label] for label in job.labels]
        picks = [pool[k] for k in range(shots) for pool in pools if k < len(pool)][:shots]
        job.examples = [(str(records[i][text_field]), str(records[i][label_field])) for i in picks]
    return job


def _evaluate_candidate(
    name: str, job: _Job, *, limit: int, max_latency_ms: float | None, quant: str, compile: bool
) -> Candidate:
    """Size the candidate for the job; if it fits, load it and score it. Its own errors mark only its row."""
    candidate = Candidate(name)
    try:
        header = read_header(name)
        candidate.parameters = header.config.num_parameters()
        workload, batch, context = job.workload(header)
        context = min(context, header.config.block_size)
        shell = model_shell(header.config, "infer", task=workload, num_labels=max(2, len(job.labels)))
        needed = size_memory(
            header,
            shell,
            mode="infer",
            task=workload,
            context=context,
            batch=batch,
            dtype=torch.float32,
            quant="none" if header.config.is_encoder else quant,  # the loader packs decoders only
            compile=compile and job.decodes,
        )
        candidate.memory = needed.peak_bytes
        if candidate.memory > limit:
            candidate.status = (
                f"does not fit: needs {format_size(candidate.memory)}, limit {format_size(limit)}"
            )
            return candidate
        # float32 on the CPU as sized above (dtype auto), its linear layers packed if ``quant`` asks
        llm = LoadedModel.load(name, device="cpu", quant=quant, compile=compile)
        candidate.quality, candidate.latency_ms, candidate.details, candidate.per_example = job.score(llm)
        if candidate.per_example is not None:
            candidate.quality_ci95 = interval(*job.statistic(candidate.per_example))
        del llm
        gc.collect()
    except LmforgeError as e:
        candidate.status = f"failed: {e.message}"
        return candidate
    if max_latency_ms is not None and candidate.latency_ms > max_latency_ms:
        candidate.status = f"too slow: {candidate.latency_ms:.0f} > {max_latency_ms:g} {job.latency_unit}"
    return candidate


def _evaluate_hosted(
    name: str, job: _Job, endpoint: Endpoint, max_latency_ms: float | None, price: Price | None
) -> Candidate:
    """Score a hosted candidate on the sample through its endpoint; its errors mark only its row."""
    candidate = Candidate(name)
    if job.task == "generate":
        candidate.status = (
            "failed: bits per byte needs the model's own tokens; hosted models are ranked on classify, "
            "summarize and embed"
        )
        return candidate
    try:
        llm = endpoint.open(name)
        try:
            candidate.quality, candidate.latency_ms, candidate.details, candidate.per_example = job.score(llm)
        finally:
            llm.close()
    except LmforgeError as e:
        candidate.status = f"failed: {e.message}"
        return candidate
    candidate.name = llm.source  # openai:default -> the model it means
    candidate.tokens = (llm.usage["prompt_tokens"], llm.usage["completion_tokens"])
    candidate.cost = cost(llm.usage, price) if price is not None else None
    if candidate.per_example is not None:
        candidate.quality_ci95 = interval(*job.statistic(candidate.per_example))
    if max_latency_ms is not None and candidate.latency_ms > max_latency_ms:
        candidate.status = f"too slow: {candidate.latency_ms:.0f} > {max_latency_ms:g} {job.latency_unit}"
    return candidate


def _reason(
    ranked: list[Candidate],
    best: Candidate | None,
    job: _Job,
    limit: int,
    max_latency: float | None,
    comparisons: list[dict[str, Any]],
) -> str:
    if best is None:
        why = "; ".join(f"{c.name}: {c.status}" for c in ranked)
        return f"no candidate can be recommended ({why})"
    eligible = [c for c in ranked if c.eligible]
    many = len(eligible) > 1
    where = f"{'fit' if many else 'fits'} in {format_size(limit)}"
    if max_latency:
        where += f" and {'answer' if many else 'answers'} within {max_latency:g} {job.latency_unit}"
    count = f"the {len(eligible)} candidates that {where}" if many else f"the only candidate that {where}"
    if best.quality is None:
        reason = f"fastest of {count} ({best.details.get('note', 'quality not scored')})"
    elif many:
        reason = f"best {job.metric} ({best.quality:.3f}) among {count}"
    else:
        reason = f"{job.metric} {best.quality:.3f}; {count}"
    if (
        len(eligible) > 1
        and best.quality is not None
        and round(best.quality, 6) == round(eligible[1].quality or 0, 6)
    ):
        other = eligible[1]
        if (best.latency_ms or 0) < (other.latency_ms or 0):
            reason += f"; tied with {other.name}, and faster ({best.latency_ms:.1f} vs {other.latency_ms:.1f} {job.latency_unit})"
        else:
            reason += f"; tied with {other.name}, and smaller ({format_size(best.memory or 0)})"
    elif len(eligible) > 1:  # better on the sample, but is it better beyond it?
        runner_up = next((c for c in comparisons if c["b_model"] == eligible[1].name), None)
        if runner_up and not runner_up["significant"]:
            reason += f"; ahead of {eligible[1].name} {runner_up['verdict']}"
    return reason
