"""Evaluation: honest numbers on the user's data, with a classic baseline beside every classification score.

- ``perplexity``: sliding windows with a stride (each token scored once, with up to ``window`` tokens of
  context, the transformers recipe), plus bits per byte so models with different tokenizers (and zh vs en) compare.
- ``classification_report``: accuracy, macro-F1, confusion matrix (PNG too), next to a TF-IDF / character n-gram
  linear baseline (scikit-learn) trained on the same training file.
- ``rouge``: ROUGE-1/2/L, word-level for English (rouge-score, stemmed) and character-level for Chinese.
- ``multiple_choice``: accuracy by length-normalised log-likelihood of each choice.

Every score comes with its 95 % bootstrap interval (``stats``), under ``<metric>_ci95``: accuracy and ROUGE
resample the examples, macro-F1 recomputes the confusion matrix per resample, perplexity resamples the windows'
summed NLL and token counts. ``compare_classifiers`` and ``compare_rouge`` test two models scored on the same
examples against each other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.inference import sequence_logprobs
from lmforge.loading import LoadedModel
from lmforge.model import perplexity_from_loss
from lmforge.progress import tracked
from lmforge.prompts import choice_prompt, is_chinese
from lmforge.stats import Comparison, interval, macro_f1_of, mcnemar, mean_of, paired_bootstrap, ratio_of

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


# ---------------------------------------------------------------- perplexity
@torch.inference_mode()
def perplexity(
    llm: LoadedModel, text: str, window: int | None = None, stride: int | None = None
) -> dict[str, float]:
    """Perplexity of ``text`` with a sliding window; every token after the first is predicted exactly once."""
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise LmforgeError("the text has fewer than two tokens", hint="evaluate a longer text")
    window = min(window or llm.config.block_size, llm.config.block_size)
    stride = stride or window // 2
    if not 0 < stride <= window:
        raise LmforgeError(f"stride {stride} must be in 1..{window}", hint="e.g. half the window")
    model = llm.model
    window_nll: list[float] = []  # each window's summed NLL of the tokens it scores, and their count
    window_tokens: list[int] = []
    previous_end = 0
    last_begin = max(0, math.ceil((len(ids) - window) / stride)) * stride  # the first window to reach the end
    for begin in tracked(range(0, last_begin + 1, stride), "perplexity"):
        end = min(begin + window, len(ids))
        new = end - previous_end  # tokens not scored by an earlier window
        chunk = torch.tensor([ids[begin:end]], device=model.device)
        logits, _ = model(chunk)
        logprobs = logits[0, :-1].float().log_softmax(-1)
        targets = chunk[0, 1:]
        token_nll = -logprobs.gather(1, targets[:, None])[:, 0]
        scored = token_nll[-new:] if begin > 0 else token_nll
        window_nll.append(float(scored.sum()))
        window_tokens.append(scored.numel())
        previous_end = end
    total_nll, counted = sum(window_nll), sum(window_tokens)
    nll = total_nll / counted
    n_bytes = len(llm.tokenizer.decode(ids[1:]).encode("utf-8"))
    # The windows score disjoint tokens, so they are the units resampled. One window has no spread to measure.
    ppl = ratio_of(window_nll, window_tokens, np.exp)
    ci = list(interval(ppl, len(window_nll))) if len(window_nll) > 1 else None
    return {
        "perplexity": perplexity_from_loss(nll),
        "perplexity_ci95": ci,
        "nll_per_token": nll,
        "bits_per_byte": total_nll / math.log(2) / max(1, n_bytes),
        "tokens": counted,
        "windows": len(window_nll),
    }


# ------------------------------------------------------------ classification
def classification_metrics(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and macro-F1 over ``labels`` with their 95 % bootstrap intervals, and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    correct = [t == p for t, p in zip(truth, predicted, strict=True)]
    n = len(correct)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "accuracy_ci95": list(interval(mean_of(correct), n)),
        "macro_f1": float(f1_score(truth, predicted, labels=list(labels), average="macro", zero_division=0)),
        "macro_f1_ci95": list(interval(macro_f1_of(truth, predicted, labels), n)),
        "confusion_matrix": confusion_matrix(truth, predicted, labels=list(labels)).tolist(),
        "labels": list(labels),
    }


def compare_classifiers(
    truth: Sequence[str], a: Sequence[str], b: Sequence[str], labels: Sequence[str]
) -> list[Comparison]:
    """Two classifiers' predictions on the same examples: McNemar's exact test on accuracy, the paired
    bootstrap on macro-F1."""
    right_a = [t == p for t, p in zip(truth, a, strict=True)]
    right_b = [t == p for t, p in zip(truth, b, strict=True)]
    f1_a, f1_b = macro_f1_of(truth, a, labels), macro_f1_of(truth, b, labels)
    return [mcnemar(right_a, right_b), paired_bootstrap(f1_a, f1_b, len(truth), metric="macro_f1")]


def baseline_pipeline(c: float = 10.0) -> Any:
    """The classic baseline, unfitted: character 1-3-gram TF-IDF + logistic regression with inverse
    regularisation ``c`` (works for zh and en alike; a scikit-learn pipeline, so it cross-validates)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=1),
        LogisticRegression(max_iter=2000, C=c),
    )


def baseline_predictions(
    train_texts: Sequence[str], train_labels: Sequence[str], test_texts: Sequence[str], c: float = 10.0
) -> list[str]:
    """``baseline_pipeline(c)`` fitted on the training texts, predicting the test texts."""
    pipeline = baseline_pipeline(c)
    pipeline.fit(list(train_texts), list(train_labels))
    return [str(p) for p in pipeline.predict(list(test_texts))]


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(metrics["confusion_matrix"])
    labels = metrics["labels"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j, i, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black"
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------- ROUGE
def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 of each pair. Chinese pairs are compared character by character, English word by word."""
    from rouge_score import rouge_scorer

    words = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    chars = rouge_scorer.RougeScorer(list(ROUGE_KEYS), tokenizer=_CharTokenizer())
    scores: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for prediction, reference in zip(predictions, references, strict=True):
        scorer = chars if is_chinese(reference) else words
        for key, score in scorer.score(reference, prediction).items():
            scores[key].append(score.fmeasure)
    return scores


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Mean ROUGE-1/2/L F1, each with its 95 % bootstrap interval (``rouge1_ci95``...)."""
    return rouge_means(rouge_per_example(predictions, references))


def rouge_means(per_example: dict[str, list[float]]) -> dict[str, Any]:
    """``rouge``'s scores from ``rouge_per_example``'s."""
    out: dict[str, Any] = {}
    for key, values in per_example.items():
        out[key] = sum(values) / max(1, len(values))
        out[f"{key}_ci95"] = list(interval(mean_of(values), len(values))) if values else None
    return out


def compare_rouge(
    per_example_a: dict[str, list[float]], per_example_b: dict[str, list[float]]
) -> list[Comparison]:
    """The paired bootstrap on each ROUGE score of two models' summaries of the same texts."""
    return [
        paired_bootstrap(
            mean_of(per_example_a[key]), mean_of(per_example_b[key]), len(per_example_a[key]), metric=key
        )
        for key in ROUGE_KEYS
    ]


class _CharTokenizer:
    """rouge-score's tokenizer interface, one token per non-space character (the usual Chinese ROUGE)."""

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in text if not ch.isspace()]


# ----------------------------------------------------------- multiple choice
def multiple_choice(llm: LoadedModel, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy when the predicted choice is the one with the highest mean log-probability per token."""
    tok = llm.tokenizer
    prompts, conts, owners = [], [], []
    for i, item in enumerate(items):
        prompt = tok.encode(choice_prompt(item["question"], item["choices"]), add_special_tokens=False)
        for choice in item["choices"]:
            prompts.append(prompt)
            conts.append(tok.encode(" " + str(choice), add_special_tokens=False))
            owners.append(i)
    scores = sequence_logprobs(llm, prompts, conts)
    normalised = [s / max(1, len(c)) for s, c in zip(scores, conts, strict=True)]
    predicted: list[int] = []
    offset = 0
    for item in items:
        n = len(item["choices"])
        predicted.append(int(np.argmax(normalised[offset : offset + n])))
        offset += n
    correct = [p == int(item["answer"]) for p, item in zip(predicted, items, strict=True)]
    return {
        "accuracy": sum(correct) / max(1, len(items)),
        "accuracy_ci95": list(interval(mean_of(correct), len(items))) if items else None,
        "correct": correct,
        "predicted": predicted,
        "items": len(items),
    }


# ------------------------------------------------------------------- reports
def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table; a score with an interval (``<column>_ci95``) is written ``0.9821 [0.9725, 0.9904]``."""

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column, "")
        if not isinstance(value, float):
            return str(value)
        ci = row.get(f"{column}_ci95")
        return f"{value:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def comparison_lines(comparisons: Sequence[dict[str, Any]]) -> list[str]:
    """One line per paired test: ``a vs b: accuracy 0.9821 vs 0.9797 (McNemar exact, 2 vs 0 discordant):
    within noise (p=0.5): a tie, not significant``."""
    return [
        f"{c['a_model']} vs {c['b_model']}: {c['metric']} {c['a']:.4f} vs {c['b']:.4f} "
        f"({c['test']}{', ' + c['detail'] if c.get('detail') else ''}): {c['verdict']}"
        for c in comparisons
    ]


def write_report(report: dict[str, Any], folder: str | Path, columns: Sequence[str]) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "report.json", folder / "report.md"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    text = markdown_table(report["rows"], columns) + "\n"
    if report.get("comparisons"):
        text += (
            "\nPaired tests on the same examples (95 % intervals in brackets; p < 0.05 is significant):\n\n"
        )
        text += "".join(f"- {line}\n" for line in comparison_lines(report["comparisons"]))
    md_path.write_text(text, encoding="utf-8")
    return json_path, md_path
