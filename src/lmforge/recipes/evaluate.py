"""Evaluation recipe: one or more models on one data file -> a JSON report and a markdown table, side by side.

Every score carries its 95 % bootstrap interval; models scored on the same examples (classify, summarize,
choice) are tested pairwise, each model against the baseline row and against each other (McNemar's exact test
on accuracy, the paired bootstrap on macro-F1 and ROUGE), under ``comparisons``, with the verdict in words.

lmforge eval runs/spam/model default --task classify --data test.jsonl --train-file train.jsonl
lmforge eval default --task perplexity --data book.txt
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from lmforge.corpus import read_text
from lmforge.data.labelled import read_records
from lmforge.errors import LmforgeError
from lmforge.evaluate import (
    baseline_predictions,
    classification_metrics,
    compare_classifiers,
    compare_rouge,
    multiple_choice,
    perplexity,
    plot_confusion,
    rouge_means,
    rouge_per_example,
    write_report,
)
from lmforge.explain import attribute
from lmforge.hosted import Endpoint, HostedLLM, Price, cost
from lmforge.inference import classify, summarize
from lmforge.loading import LoadedModel, add_metrics_if_stored, hosted_model
from lmforge.stats import Comparison, mcnemar

EvalTask = Literal["perplexity", "classify", "summarize", "choice"]
COLUMNS = {
    "perplexity": ["model", "perplexity", "bits_per_byte", "tokens", "seconds"],
    "classify": ["model", "accuracy", "macro_f1", "examples", "seconds"],
    "summarize": ["model", "rouge1", "rouge2", "rougeL", "examples", "seconds"],
    "choice": ["model", "accuracy", "examples", "seconds"],
}
HOSTED_COLUMNS = ["ms/example", "tokens", "cost"]  # added when a hosted model is in the report


def evaluate_models(
    models: list[str],
    data: str | Path,
    *,
    task: EvalTask,
    out_dir: str | Path = "reports/eval",
    train_file: str | Path | None = None,
    labels: list[str] | None = None,
    text_field: str = "text",
    label_field: str = "label",
    summary_field: str = "summary",
    limit: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    max_length: int = 60,
    quant: str = "auto",
    compile: bool | None = None,
    endpoint: Endpoint | None = None,
    prices: dict[str, Price] | None = None,
    explain: int = 0,
) -> dict[str, Any]:
    """Evaluate each of ``models`` (loaded with ``quant`` and ``compile``, as ``LoadedModel.load`` takes them)
    on ``data``. Models packed on request (``quant`` int8 / int4) are reported, and their scores stored, under
    the name with the kind added, ``spam:v1 (int4)``, beside the float model's. Hosted models
    (``openai:MODEL`` at ``endpoint``; classify and summarize) add latency per example, tokens, and their cost
    where ``prices`` names them (USD per 1k prompt and completion tokens); the report lists its ``columns``.
    ``explain`` (classify): each local model's that many most confident errors, with integrated-gradients
    attributions, go into the report."""
    if task not in COLUMNS:
        raise LmforgeError(f"unknown evaluation task {task!r}", hint=f"use one of {', '.join(COLUMNS)}")
    if not 0 <= explain <= MAX_EXPLAINED:
        raise LmforgeError(f"explain={explain} is out of range", hint=f"use 0 to {MAX_EXPLAINED}")
    if explain and task != "classify":
        raise LmforgeError("explaining errors is for --task classify", hint="drop --explain for this task")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    # What each row's model answered, example by example, for the paired tests: predicted labels (classify),
    # per-example ROUGE (summarize) or right/wrong (choice).
    answers: list[Any] = []
    stored: list[tuple[str, str, dict[str, Any]]] = []  # (store entry, metrics key, scores): written last
    truth: list[str] = []
    names: list[str] = []
    explained: dict[str, list[dict[str, Any]]] = {}  # model -> its most confident errors, explained
    if task == "classify":
        records = read_records(data, [text_field, label_field])[:limit]
        truth = [str(r[label_field]) for r in records]
        texts = [str(r[text_field]) for r in records]
        names = labels or sorted(set(truth))
        if train_file:  # the classic baseline the language models have to beat
            train = read_records(train_file, [text_field, label_field])
            start = time.perf_counter()
            predicted = baseline_predictions(
                [str(r[text_field]) for r in train], [str(r[label_field]) for r in train], texts
            )
            metrics = classification_metrics(truth, predicted, names)
            plot_confusion(
                metrics, out / "confusion-baseline.png", "TF-IDF char n-grams + logistic regression"
            )
            rows.append(_row("baseline: tf-idf + logistic regression", metrics, len(texts), start))
            answers.append(predicted)
    hosted: list[int] = []  # the rows of hosted models (nothing of theirs goes into the store)
    for name in models:
        start = time.perf_counter()
        if hosted_model(name) is not None:
            rows.append(
                _hosted_row(
                    name,
                    task,
                    data,
                    endpoint or Endpoint(),
                    (prices or {}).get(name),
                    texts=texts,
                    truth=truth,
                    labels=names,
                    text_field=text_field,
                    summary_field=summary_field,
                    limit=limit,
                    max_length=max_length,
                )
            )
            answers.append(rows[-1].pop("answers"))
            hosted.append(len(rows) - 1)
            continue
        llm = LoadedModel.load(name, quant=quant, compile=compile)
        label = f"{name} ({quant})" if quant in ("int8", "int4") else name
        if task == "perplexity":
            text = read_text(Path(data))
            rows.append(
                {
                    "model": label,
                    **perplexity(llm, text, window, stride),
                    "seconds": time.perf_counter() - start,
                }
            )
        elif task == "classify":
            zero_shot = None if llm.config.labels else names
            unknown = sorted(set(truth) - set(llm.config.labels or names))
            if unknown:
                raise LmforgeError(
                    f"{data}: labels {unknown} are unknown to model {name}",
                    hint="evaluate on data with its labels",
                )
            results = classify(llm, texts, zero_shot)
            predicted = [r["label"] for r in results]
            if explain:
                explained[label] = confident_errors(llm, texts, truth, results, explain, zero_shot)
            metrics = classification_metrics(truth, predicted, names)
            plot_confusion(metrics, out / f"confusion-{_slug(name)}.png", name)
            rows.append(_row(label + (" (zero-shot)" if zero_shot else ""), metrics, len(texts), start))
            answers.append(predicted)
        elif task == "summarize":
            records = read_records(data, [text_field, summary_field])[:limit]
            predictions = summarize(llm, [str(r[text_field]) for r in records], max_length)
            per_example = rouge_per_example(predictions, [str(r[summary_field]) for r in records])
            scores = rouge_means(per_example)
            rows.append(
                {"model": label, **scores, "examples": len(records), "seconds": time.perf_counter() - start}
            )
            answers.append(per_example)
        else:
            items = read_records(data, ["question", "choices", "answer"])[:limit]
            result = multiple_choice(llm, items)
            rows.append(
                {
                    "model": label,
                    "accuracy": result["accuracy"],
                    "accuracy_ci95": result["accuracy_ci95"],
                    "examples": len(items),
                    "seconds": time.perf_counter() - start,
                }
            )
            answers.append(result["correct"])
        scores = {k: v for k, v in rows[-1].items() if k not in ("model", "seconds")}
        scores["data"] = str(Path(data).resolve())
        suffix = label[len(name) :]  # packed scores are kept beside the float model's, not over them
        stored.append((llm.source, f"{task}:{Path(data).name}{suffix}", scores))
    baseline = bool(train_file) and task == "classify"  # the baseline row comes first
    comparisons = _paired_tests(task, rows, answers, truth=truth, labels=names, baseline=baseline)
    columns = COLUMNS[task] + (HOSTED_COLUMNS if hosted else [])
    report: dict[str, Any] = {
        "task": task,
        "data": str(data),
        "rows": rows,
        "comparisons": comparisons,
        "columns": columns,
    }
    if explain:
        report["explained_errors"] = explained
    # A model from the store keeps its scores, intervals and paired verdicts: `lmforge show` and its card list
    # them. Written once every model is scored, as the verdicts need them all.
    local_rows = [r for i, r in enumerate(rows) if i >= int(baseline) and i not in hosted]
    for row, (source, key, scores) in zip(local_rows, stored, strict=True):
        paired = _paired_with(row["model"], comparisons)
        add_metrics_if_stored(source, {key: {**scores, **({"paired": paired} if paired else {})}})
    json_path, md_path = write_report(report, out, columns)
    if explain:
        with md_path.open("a", encoding="utf-8") as f:
            f.write(errors_markdown(explained))
    report["files"] = [str(json_path), str(md_path)]
    return report


def _hosted_row(
    name: str,
    task: str,
    data: str | Path,
    endpoint: Endpoint,
    price: Price | None,
    *,
    texts: list[str],
    truth: list[str],
    labels: list[str],
    text_field: str,
    summary_field: str,
    limit: int | None,
    max_length: int,
) -> dict[str, Any]:
    """A hosted model's row (with its answers under ``answers``, for the paired tests): the local models'
    questions through its endpoint, with latency, tokens and cost."""
    if task not in ("classify", "summarize"):
        raise LmforgeError(
            f"eval --task {task} needs the model's own token probabilities, which {name} does not give here",
            hint="evaluate hosted models with --task classify or --task summarize",
        )
    start = time.perf_counter()
    llm: HostedLLM = endpoint.open(name)
    try:
        if task == "classify":
            found = llm.classify_text(texts, labels)
            predicted = [str(f["label"]) for f in found]
            metrics = classification_metrics(truth, predicted, labels)
            row = _row(llm.source + " (zero-shot)", metrics, len(texts), start)
            answers: Any = predicted
        else:
            records = read_records(data, [text_field, summary_field])[:limit]
            summaries = llm.summarize([str(r[text_field]) for r in records], max_length)
            answers = rouge_per_example(summaries, [str(r[summary_field]) for r in records])
            row = {"model": llm.source, **rouge_means(answers), "examples": len(records)}
            row["seconds"] = time.perf_counter() - start
    finally:
        llm.close()
    row["ms/example"] = f"{row['seconds'] * 1000 / max(1, row['examples']):.0f}"
    row["tokens"] = f"{llm.usage['prompt_tokens']}+{llm.usage['completion_tokens']}"
    row["cost"] = f"{cost(llm.usage, price):.4f}" if price is not None else "-"
    return {**row, "answers": answers}


MAX_EXPLAINED = 100  # errors explained per model: each costs an integrated-gradients run


def confident_errors(
    llm: LoadedModel,
    texts: list[str],
    truth: list[str],
    results: list[dict[str, Any]],
    n: int,
    zero_shot: list[str] | None,
) -> list[dict[str, Any]]:
    """The ``n`` wrong answers given with the highest probability, each with the words that pushed it."""
    wrong = [i for i, r in enumerate(results) if r["label"] != truth[i]]
    wrong.sort(key=lambda i: -results[i]["probabilities"][results[i]["label"]])
    out = []
    for i in wrong[:n]:
        predicted = results[i]["label"]
        attribution = attribute(
            llm,
            texts[i],
            kind="zero_shot" if zero_shot else "head",
            labels=zero_shot,
            label=predicted,
        )
        out.append(
            {
                "text": texts[i],
                "label": truth[i],
                "predicted": predicted,
                "probability": results[i]["probabilities"][predicted],
                "top_words": sorted(attribution.words(), key=lambda w: -w[1])[:5],
                "attribution": attribution.to_dict(),
            }
        )
    return out


def errors_markdown(explained: dict[str, list[dict[str, Any]]]) -> str:
    """The report's section: per model, its most confident errors and the words that pushed each answer."""
    lines = ["", "## Most confident errors, explained", ""]
    lines.append("Integrated gradients of the predicted label's log-odds; the words that pushed it most.")
    for model, errors in explained.items():
        lines += ["", f"### {model}", ""]
        if not errors:
            lines.append("No errors.")
        for e in errors:
            words = ", ".join(f"{w} ({v:+.2f})" for w, v in e["top_words"])
            text = e["text"].replace("\n", " ").replace("|", "\\|")
            lines.append(f"- **{e['predicted']}** (p={e['probability']:.3f}, truly {e['label']}): {text}")
            lines.append(f"  - pushed by: {words}")
    return "\n".join(lines) + "\n"


def _paired_tests(
    task: str,
    rows: list[dict[str, Any]],
    answers: list[Any],
    *,
    truth: list[str],
    labels: list[str],
    baseline: bool,
) -> list[dict[str, Any]]:
    """Every pair of rows scored on the same examples: each model against the baseline (the first row, if
    ``baseline``; written "model vs baseline"), then each model against the models after it."""
    if task == "perplexity" or len(answers) < 2:  # tokenizers differ: windows are not the same examples
        return []
    first = int(baseline)
    order = [(j, 0) for j in range(1, len(rows))] if baseline else []
    order += [(i, j) for i in range(first, len(rows)) for j in range(i + 1, len(rows))]
    out = []
    for i, j in order:
        tests: list[Comparison]
        if task == "classify":
            tests = compare_classifiers(truth, answers[i], answers[j], labels)
        elif task == "summarize":
            tests = compare_rouge(answers[i], answers[j])
        else:
            tests = [mcnemar(answers[i], answers[j])]
        out += [{"a_model": rows[i]["model"], "b_model": rows[j]["model"], **t.to_dict()} for t in tests]
    return out


def _paired_with(model: str, comparisons: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{other model: {metric: difference (this one minus the other), p-value, verdict}}`` for the store."""
    paired: dict[str, dict[str, Any]] = {}
    for c in comparisons:
        if model not in (c["a_model"], c["b_model"]):
            continue
        other, sign = (c["b_model"], 1) if c["a_model"] == model else (c["a_model"], -1)
        paired.setdefault(other, {})[c["metric"]] = {
            "difference": sign * c["difference"],
            "p_value": c["p_value"],
            "verdict": c["verdict"],
        }
    return paired


def _row(model: str, metrics: dict[str, Any], examples: int, start: float) -> dict[str, Any]:
    return {"model": model, **metrics, "examples": examples, "seconds": time.perf_counter() - start}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip("-")[-60:]
