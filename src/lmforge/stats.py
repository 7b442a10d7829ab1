"""How sure a score is: percentile bootstrap intervals and paired significance tests, in numpy alone.

A score on a test set is one draw: another 836 messages from the same collection give another accuracy. Every
score lmforge reports carries a 95 % interval, and two models scored on the same examples are compared by a
paired test, so that a gap of a few examples does not read as a win.

- A **statistic** is a function of resampled example indices: ``stat(idx)`` with ``idx`` of shape (r, n) gives
  r values, and ``stat(arange(n)[None])`` is the score itself. ``mean_of`` (accuracy, ROUGE), ``ratio_of``
  (perplexity: summed NLL over summed tokens, per window) and ``macro_f1_of`` build them.
- ``interval``: the percentile bootstrap (resample the examples with replacement, seeded; 2,000 resamples).
- ``mcnemar``: McNemar's exact test for paired accuracy, a two-sided binomial test on the discordant pairs
  (examples one model gets right and the other wrong).
- ``paired_bootstrap``: both models' statistic on the same resamples; the p-value is the share of resampled
  differences at least as far from the observed one as the observed one is from zero (the null distribution
  by shifting the bootstrap distribution to 0, Efron & Tibshirani 1993, §16.4).

Each test is one pair: p-values of several pairs are not corrected for multiplicity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lmforge.errors import LmforgeError

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
ALPHA = 0.05  # a difference with p below this is called significant
# Index matrices are built this many elements at a time: 2,000 resamples of a million examples would be 16 GB.
_CHUNK_ELEMENTS = 1 << 22

Statistic = Callable[[np.ndarray], np.ndarray]


def mean_of(values: Sequence[float] | np.ndarray) -> Statistic:
    """The mean of per-example values (1/0 correctness for accuracy, per-example ROUGE)."""
    v = np.asarray(values, dtype=np.float64)
    return lambda idx: v[idx].mean(axis=1)


def ratio_of(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Statistic:
    """``transform(sum(numerators) / sum(denominators))`` over the resampled units: perplexity is ``exp`` of
    the summed NLL of the resampled windows over their summed tokens (windows of unequal length weigh by it)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)

    def stat(idx: np.ndarray) -> np.ndarray:
        ratio = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-300)
        return transform(ratio) if transform else ratio

    return stat


def macro_f1_of(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> Statistic:
    """Macro-F1 over ``labels`` as scikit-learn's ``f1_score(average="macro", zero_division=0)``: a class
    no example has nor is predicted as scores 0; labels outside ``labels`` count only as errors."""
    k = len(labels)
    index = {label: i for i, label in enumerate(labels)}
    t = np.array([index.get(x, k) for x in truth], dtype=np.int64)  # k: a label outside ``labels``
    p = np.array([index.get(x, k) for x in predicted], dtype=np.int64)
    cells = (k + 1) ** 2
    pair = t * (k + 1) + p  # the example's cell in the confusion matrix

    def stat(idx: np.ndarray) -> np.ndarray:
        r = idx.shape[0]
        flat = pair[idx] + cells * np.arange(r)[:, None]  # one confusion matrix per resample
        confusion = np.bincount(flat.ravel(), minlength=r * cells).reshape(r, k + 1, k + 1)
        tp = np.diagonal(confusion, axis1=1, axis2=2)[:, :k]
        fp = confusion.sum(axis=1)[:, :k] - tp
        fn = confusion.sum(axis=2)[:, :k] - tp
        denominator = 2 * tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        return f1.mean(axis=1)

    return stat


def point(stat: Statistic, n: int) -> float:
    """The statistic on the examples as they are."""
    return float(stat(np.arange(n)[None])[0])


def _resampled(stats: Sequence[Statistic], n: int, resamples: int, seed: int) -> np.ndarray:
    """(len(stats), resamples) values of each statistic on the same seeded resamples of n examples."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty((len(stats), resamples))
    for start in range(0, resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, resamples - start), n))
        for i, stat in enumerate(stats):
            out[i, start : start + idx.shape[0]] = stat(idx)
    return out


def _check(n: int, resamples: int) -> None:
    if n < 1:
        raise LmforgeError("no examples to compute an interval on", hint="evaluate on at least one example")
    if not 1 <= resamples <= 100_000:
        raise LmforgeError(f"resamples={resamples} must be in 1..100000", hint=f"the default is {RESAMPLES}")


def interval(
    stat: Statistic, n: int, *, resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``stat`` over ``n`` examples (or windows)."""
    _check(n, resamples)
    values = _resampled([stat], n, resamples, seed)[0]
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """A paired test of two models' scores on the same examples (``a`` minus ``b``)."""

    metric: str
    test: str  # "McNemar exact" or "paired bootstrap"
    a: float
    b: float
    p_value: float
    detail: str = ""  # what the test counted, e.g. "3 vs 1 discordant"
    difference_interval: tuple[float, float] | None = None  # bootstrap only

    @property
    def difference(self) -> float:
        return self.a - self.b

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def verdict(self) -> str:
        """In words: "significant (p=0.003)" or "within noise (p=0.48): a tie"."""
        p = format_p(self.p_value)
        return f"significant ({p})" if self.significant else f"within noise ({p}): a tie, not significant"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "metric": self.metric,
            "test": self.test,
            "a": self.a,
            "b": self.b,
            "difference": self.difference,
            "p_value": self.p_value,
            "significant": self.significant,
            "verdict": self.verdict(),
        }
        if self.detail:
            out["detail"] = self.detail
        if self.difference_interval is not None:
            out["difference_ci95"] = list(self.difference_interval)
        return out


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def binomial_two_sided(k: int, n: int) -> float:
    """P-value of k successes in n fair coin flips, two-sided (as ``scipy.stats.binomtest(k, n, 0.5)``: the
    distribution is symmetric, so it is twice the smaller tail, at most 1). n = 0 gives 1."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    # log-space: 2**-n underflows beyond ~1,000 pairs
    logs = np.array(
        [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(low + 1)]
    )
    top = logs.max()
    tail = math.exp(top + math.log(np.exp(logs - top).sum()) - n * math.log(2))
    return min(1.0, 2 * tail)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool], *, metric: str = "accuracy") -> Comparison:
    """McNemar's exact test of two models' paired correctness (each example right or wrong for each model)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.size == 0:
        raise LmforgeError(
            f"McNemar's test needs the same examples for both models (got {a.size} and {b.size})",
            hint="score both models on one data file",
        )
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return Comparison(
        metric,
        "McNemar exact",
        float(a.mean()),
        float(b.mean()),
        binomial_two_sided(only_a, only_a + only_b),
        f"{only_a} vs {only_b} discordant",
    )


def paired_bootstrap(
    stat_a: Statistic,
    stat_b: Statistic,
    n: int,
    *,
    metric: str,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """The paired bootstrap test of ``stat_a - stat_b`` on the same ``n`` examples, with the difference's
    percentile interval."""
    _check(n, resamples)
    a, b = point(stat_a, n), point(stat_b, n)
    values = _resampled([stat_a, stat_b], n, resamples, seed)
    differences = values[0] - values[1]
    observed = a - b
    # The bootstrap distribution shifted to 0 is the null's; +1 counts the observed difference itself, so a
    # p-value is never 0 from a finite number of resamples. Identical models give 1.
    beyond = int((np.abs(differences - observed) >= abs(observed) - 1e-12).sum())
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    return Comparison(
        metric,
        "paired bootstrap",
        a,
        b,
        (beyond + 1) / (resamples + 1),
        f"{resamples} resamples",
        (float(low), float(high)),
    )
