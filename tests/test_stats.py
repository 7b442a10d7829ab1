"""Bootstrap intervals and paired tests against analytic and scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from sklearn.metrics import f1_score

from lmforge.errors import LmforgeError
from lmforge.stats import (
    binomial_two_sided,
    interval,
    macro_f1_of,
    mcnemar,
    mean_of,
    paired_bootstrap,
    point,
    ratio_of,
)


def _wald(k: int, n: int) -> tuple[float, float]:
    """The analytic normal-approximation binomial interval (what the percentile bootstrap estimates)."""
    p = k / n
    half = norm.ppf(0.975) * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


@pytest.mark.parametrize(("k", "n"), [(90, 100), (821, 836), (500, 1000)])
def test_bootstrap_interval_of_accuracy_matches_the_binomial_interval(k: int, n: int) -> None:
    correct = [1.0] * k + [0.0] * (n - k)
    low, high = interval(mean_of(correct), n)
    ref_low, ref_high = _wald(k, n)
    assert abs(low - ref_low) < 0.01 and abs(high - ref_high) < 0.01, (low, high, ref_low, ref_high)
    assert low < k / n < high
    # Wilson's interval too at a proportion of 0.5; near 0 or 1 Wilson's leans inwards (0.826-0.945 for 90/100,
    # against 0.84-0.96), which the percentile bootstrap does not.
    if k == 500:
        wilson = binomtest(k, n).proportion_ci(method="wilson")
        assert abs(low - wilson.low) < 0.01 and abs(high - wilson.high) < 0.01


def test_interval_is_seeded_and_narrows_with_more_examples() -> None:
    rng = np.random.default_rng(1)
    small = rng.random(50) < 0.8
    assert interval(mean_of(small), 50) == interval(mean_of(small), 50)
    scores = rng.random(50)  # continuous per-example scores (ROUGE): another seed moves the ends
    assert interval(mean_of(scores), 50, seed=1) != interval(mean_of(scores), 50, seed=2)
    large = np.tile(small, 20)
    lo_s, hi_s = interval(mean_of(small), 50)
    lo_l, hi_l = interval(mean_of(large), 1000)
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # width ~ 1/sqrt(n): 20x the examples, ~4.5x narrower


@pytest.mark.parametrize(
    ("only_a", "only_b", "agree"),
    [(0, 0, 10), (1, 0, 5), (5, 0, 0), (3, 1, 30), (10, 3, 100), (2, 0, 834), (40, 60, 700), (600, 560, 50)],
)
def test_mcnemar_equals_scipy_binomtest(only_a: int, only_b: int, agree: int) -> None:
    a = [True] * only_a + [False] * only_b + [True] * agree
    b = [False] * only_a + [True] * only_b + [True] * agree
    result = mcnemar(a, b)
    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert result.detail == f"{only_a} vs {only_b} discordant"
    assert result.a == pytest.approx(sum(a) / len(a)) and result.b == pytest.approx(sum(b) / len(b))


def test_mcnemar_words_for_a_two_message_gap_on_836() -> None:
    # Two models at 98.21 % and 97.97 % on 836 messages: 2 more right for a, on 2 discordant examples.
    a = [True] * 821 + [False] * 15
    b = [True] * 819 + [False] * 17
    result = mcnemar(a, b)
    assert result.p_value == pytest.approx(0.5) and not result.significant
    assert result.verdict() == "within noise (p=0.5): a tie, not significant"
    wide = mcnemar([True] * 30 + [False] * 70, [False] * 30 + [False] * 70)
    assert wide.significant and wide.verdict() == "significant (p<0.001)"


def test_binomial_tail_beyond_float_range() -> None:
    # 2**-3000 underflows; scipy's value is about 2e-16 here.
    assert binomial_two_sided(1230, 3000) == pytest.approx(binomtest(1230, 3000).pvalue, rel=1e-9)
    assert binomial_two_sided(0, 0) == 1.0 and binomial_two_sided(3, 6) == 1.0


def test_macro_f1_statistic_equals_scikit_learn_with_chinese_labels() -> None:
    rng = np.random.default_rng(0)
    labels = ["正面", "负面", "中性"]
    truth = [labels[i] for i in rng.integers(0, 3, 200)]
    predicted = [t if rng.random() < 0.7 else labels[rng.integers(0, 3)] for t in truth]
    predicted[:5] = ["其他"] * 5  # a label outside the list, as a zero-shot model's reply can be
    stat = macro_f1_of(truth, predicted, labels)
    expected = f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)
    assert point(stat, 200) == pytest.approx(expected, abs=1e-12)
    idx = rng.integers(0, 200, size=(5, 200))  # every resample equals scikit-learn on that resample
    for row, value in zip(idx, stat(idx), strict=True):
        resampled = f1_score(
            [truth[i] for i in row],
            [predicted[i] for i in row],
            labels=labels,
            average="macro",
            zero_division=0,
        )
        assert value == pytest.approx(resampled, abs=1e-12)
    # a class that is neither in the truth nor predicted scores 0, as scikit-learn's zero_division=0
    only_two = macro_f1_of(["a", "b"], ["a", "b"], ["a", "b", "c"])
    assert point(only_two, 2) == pytest.approx(2 / 3)


def test_paired_bootstrap_of_identical_predictions_gives_p_one() -> None:
    truth = ["spam", "ham", "ham", "spam", "ham"] * 40
    predicted = ["spam", "ham", "spam", "spam", "ham"] * 40
    stat = macro_f1_of(truth, predicted, ["ham", "spam"])
    result = paired_bootstrap(stat, stat, 200, metric="macro_f1")
    assert result.p_value == 1.0 and result.difference == 0 and result.difference_interval == (0.0, 0.0)
    assert "within noise" in result.verdict()


def test_paired_bootstrap_finds_a_real_difference_and_agrees_with_mcnemar_on_noise() -> None:
    truth = ["a", "b"] * 200
    good = list(truth)
    bad = [t if i % 4 else ("b" if t == "a" else "a") for i, t in enumerate(truth)]  # a quarter wrong
    strong = paired_bootstrap(macro_f1_of(truth, good, ["a", "b"]), macro_f1_of(truth, bad, ["a", "b"]), 400,
                              metric="macro_f1")  # fmt: skip
    assert strong.significant and strong.p_value < 0.001 and strong.difference > 0.2
    low, high = strong.difference_interval
    assert low < strong.difference < high and low > 0
    # one example apart: within noise
    near = list(good)
    near[0] = "b"
    weak = paired_bootstrap(macro_f1_of(truth, good, ["a", "b"]), macro_f1_of(truth, near, ["a", "b"]), 400,
                            metric="macro_f1")  # fmt: skip
    assert not weak.significant and weak.p_value > 0.3


def test_ratio_interval_is_the_window_weighted_perplexity() -> None:
    nll = np.array([300.0, 280.0, 310.0, 90.0])
    tokens = np.array([100, 100, 100, 30])
    stat = ratio_of(nll, tokens, np.exp)
    assert point(stat, 4) == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    low, high = interval(stat, 4)
    assert math.exp(2.8) <= low <= point(stat, 4) <= high <= math.exp(3.1)


def test_bad_input_is_one_error() -> None:
    with pytest.raises(LmforgeError, match="same examples"):
        mcnemar([True, False], [True])
    with pytest.raises(LmforgeError, match="no examples"):
        interval(mean_of([]), 0)
    with pytest.raises(LmforgeError, match="resamples=0"):
        interval(mean_of([1.0]), 1, resamples=0)
