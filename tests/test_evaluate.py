"""Evaluation: classification metrics and the TF-IDF baseline, ROUGE against rouge-score, intervals and paired tests,
and `lmforge eval` (the transformers parity of perplexity and multiple choice: test_evaluate_transformers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

from lmforge.evaluate import (
    baseline_predictions,
    classification_metrics,
    compare_rouge,
    plot_confusion,
    rouge,
    rouge_per_example,
)

from .conftest import TEST_DATA, songci_next_verse_items


def test_classification_metrics_and_baseline_on_chinese_and_english():
    texts = ["免费中奖，快回复", "明天见", "WIN cash now!!!", "see you soon", "领取大奖", "晚饭吃什么"]
    labels = ["spam", "ham", "spam", "ham", "spam", "ham"]
    predicted = baseline_predictions(texts * 3, labels * 3, texts)
    metrics = classification_metrics(labels, predicted, ["ham", "spam"])
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert metrics["confusion_matrix"] == [[3, 0], [0, 3]]
    wrong = classification_metrics(labels, ["ham"] * 6, ["ham", "spam"])
    assert wrong["accuracy"] == 0.5 and wrong["confusion_matrix"] == [[3, 0], [3, 0]]


def test_confusion_png(tmp_path):
    metrics = classification_metrics(["a", "b", "b"], ["a", "b", "a"], ["a", "b"])
    path = plot_confusion(metrics, tmp_path / "confusion.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rouge_word_level_english_char_level_chinese():
    en = rouge(["the cat sat on the mat"], ["a cat was sitting on the mat"])
    reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(
        "a cat was sitting on the mat", "the cat sat on the mat"
    )
    assert abs(en["rougeL"] - reference["rougeL"].fmeasure) < 1e-9
    zh = rouge(["基于深度学习的图像识别"], ["深度学习图像识别方法研究"])
    # LCS of the two character sequences is 深度学习图像识别 (8 chars): P = 8/11, R = 8/12
    assert abs(zh["rougeL"] - 2 * (8 / 11) * (8 / 12) / (8 / 11 + 8 / 12)) < 1e-9


def test_rouge_intervals_and_paired_test_on_chinese_and_english():
    references = [
        json.loads(x)["summary"] for x in (TEST_DATA / "summarize_zh" / "test.jsonl").open(encoding="utf-8")
    ][:30]
    references += ["a cat was sitting on the mat", "the weather is fine today"]
    good = [r[: max(2, len(r) * 3 // 4)] for r in references]  # most of each reference
    poor = [r[:2] for r in references]
    scores = rouge(good, references)
    per_example = rouge_per_example(good, references)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert abs(scores[key] - float(np.mean(per_example[key]))) < 1e-12
        low, high = scores[f"{key}_ci95"]
        assert low < scores[key] < high
    same = compare_rouge(per_example, per_example)
    assert [c.metric for c in same] == ["rouge1", "rouge2", "rougeL"] and all(c.p_value == 1.0 for c in same)
    apart = compare_rouge(per_example, rouge_per_example(poor, references))
    assert all(c.significant and c.difference > 0 for c in apart)
    assert apart[2].verdict().startswith("significant (p")


def test_eval_command_compares_models_and_the_baseline(tmp_path, tiny_tokenizer, capsys):
    """Two real tiny models and the baseline through `lmforge eval`: each score has its interval, each pair its
    tests, and the McNemar p-value of the two models equals scipy's binomial test on the discordant pairs of
    their own predictions."""
    from scipy.stats import binomtest

    from lmforge import LLM
    from lmforge.cli import main
    from lmforge.inference import classify

    from .conftest import tiny_llm

    model_a = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "a")
    model_b = tiny_llm("tiny-gpt2", tiny_tokenizer).save(tmp_path / "b")
    texts = [
        "免费领奖",
        "see you",
        "恭喜中奖，点击链接",
        "ok lor",
        "WIN cash now",
        "明天见",
        "Free entry! Txt",
        "晚饭吃什么",
    ]
    labels = ["spam", "ham", "spam", "ham", "spam", "ham", "spam", "ham"]
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "report"
    args = ["eval", str(model_a), str(model_b), "--task", "classify", "--data", str(data)]
    assert main([*args, "--train-file", str(data), "--labels", "ham,spam", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    names = [r["model"] for r in report["rows"]]
    assert names == [
        "baseline: tf-idf + logistic regression",
        f"{model_a} (zero-shot)",
        f"{model_b} (zero-shot)",
    ]
    assert report["rows"][0]["accuracy"] == 1.0
    for row in report["rows"]:
        low, high = row["accuracy_ci95"]
        assert low <= row["accuracy"] <= high and f"{row['accuracy']:.4f} [{low:.4f}, {high:.4f}]" in printed
        assert row["macro_f1_ci95"][0] <= row["macro_f1"] <= row["macro_f1_ci95"][1]
    pairs = [(c["a_model"], c["b_model"], c["metric"]) for c in report["comparisons"]]
    assert pairs == [
        (names[1], names[0], "accuracy"), (names[1], names[0], "macro_f1"),
        (names[2], names[0], "accuracy"), (names[2], names[0], "macro_f1"),
        (names[1], names[2], "accuracy"), (names[1], names[2], "macro_f1"),
    ]  # fmt: skip
    predicted = [
        [r["label"] for r in classify(LLM.load(m, device="cpu"), texts, ["ham", "spam"])]
        for m in (model_a, model_b)
    ]
    right_a, right_b = ([p == y for p, y in zip(ps, labels, strict=True)] for ps in predicted)
    only_a = sum(a and not b for a, b in zip(right_a, right_b, strict=True))
    only_b = sum(b and not a for a, b in zip(right_a, right_b, strict=True))
    expected = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    mcnemar_ab = report["comparisons"][4]
    assert mcnemar_ab["test"] == "McNemar exact" and abs(mcnemar_ab["p_value"] - expected) < 1e-9
    assert mcnemar_ab["detail"] == f"{only_a} vs {only_b} discordant"
    assert f"{names[1]} vs {names[2]}: accuracy" in printed and mcnemar_ab["verdict"] in printed
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("| model | accuracy |") and "Paired tests" in markdown
    assert len(list(out.glob("confusion-*.png"))) == 3
    text = tmp_path / "text.txt"
    text.write_text("床前明月光，疑是地上霜。" * 20, encoding="utf-8")
    argv = ["eval", str(model_a), "--task", "perplexity", "--data", str(text), "--window", "16"]
    assert main([*argv, "--out", str(out)]) == 0  # windows of 16 tokens, 8 apart: several windows
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["perplexity"] > 1 and row["windows"] > 1
    assert row["perplexity_ci95"][0] <= row["perplexity"] <= row["perplexity_ci95"][1]
    capsys.readouterr()
    text.write_bytes("床前明月光".encode("gb18030"))  # not UTF-8: one line naming the file, exit 2
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {text}: not UTF-8 text") and "\n" not in err


def _spam_836(tmp_path) -> tuple[Path, list[str]]:
    """836 messages as in the issue: the 200 SMS of tests/data, and Chinese ones (verses of 宋词 as ham, spam
    built from a few phrases), labelled."""
    from .conftest import data_lines

    texts = data_lines("sms_spam/test.jsonl", "text", limit=200)
    labels = data_lines("sms_spam/test.jsonl", "label", limit=200)
    verses = [
        line
        for block in (TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8").split("\n\n")
        for line in block.split("\n")[1:]
        if line
    ]
    offers = ["恭喜您中奖", "免费领取话费", "点击链接领红包", "回复1抽取大奖", "限时贷款秒到账"]
    for i in range(636):
        if i % 4:
            texts.append(verses[i])
            labels.append("ham")
        else:
            texts.append(f"{offers[i % 5]}，编号{i}，速回")
            labels.append("spam")
    path = tmp_path / "spam_836.jsonl"
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, labels


def test_eval_says_within_noise_for_two_models_two_examples_apart(
    tmp_path, tiny_tokenizer, monkeypatch, capsys
):
    """`lmforge eval` on 836 messages, two models at 98.21 % and 97.97 % (the second wrong on the first's 15
    errors and 2 more): the pair is within noise, McNemar p = 0.5. The models are real tiny ones, the first a
    store entry (which records the verdict); their answers are set (the recipe's classify stands in), so the
    gap is exactly the issue's."""
    import lmforge.recipes.evaluate as recipe
    from lmforge.cli import main
    from lmforge.store import Store

    from .conftest import tiny_llm

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    data, labels = _spam_836(tmp_path)
    folders = [tiny_llm("tiny-llama", tiny_tokenizer, seed=s).save(tmp_path / f"m{s}") for s in (1, 2)]
    Store().put(folders[0], "spam:v1")
    models = ["spam:v1", str(folders[1])]
    flip = {"ham": "spam", "spam": "ham"}
    wrong = {models[0]: set(range(0, 836, 56)), models[1]: set(range(0, 836, 56)) | {3, 5}}
    assert [len(w) for w in wrong.values()] == [15, 17]

    def answers(llm, texts, labels_=None, *args, **kwargs):
        errors = wrong[str(llm.source)]
        return [{"label": flip[y] if i in errors else y} for i, y in enumerate(labels)]

    monkeypatch.setattr(recipe, "classify", answers)
    out = tmp_path / "report"
    argv = ["eval", *models, "--task", "classify", "--data", str(data), "--labels", "ham,spam"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [round(r["accuracy"] * 100, 2) for r in report["rows"]] == [98.21, 97.97]
    mcnemar_ab, f1_ab = report["comparisons"]
    assert mcnemar_ab["detail"] == "2 vs 0 discordant" and mcnemar_ab["p_value"] == 0.5
    assert not mcnemar_ab["significant"] and not f1_ab["significant"] and f1_ab["p_value"] > 0.1
    line = next(x for x in printed.splitlines() if "accuracy 0.9821 vs 0.9797" in x)
    assert line.endswith("within noise (p=0.5): a tie, not significant")
    assert "McNemar exact, 2 vs 0 discordant" in line
    # the store keeps the interval and the verdict against the other model, in the manifest and the card
    scores = Store().get("spam:v1")["metrics"]["classify:spam_836.jsonl"]
    assert scores["accuracy_ci95"] == report["rows"][0]["accuracy_ci95"]
    paired = scores["paired"][f"{folders[1]} (zero-shot)"]["accuracy"]
    assert paired["p_value"] == 0.5 and abs(paired["difference"] - 2 / 836) < 1e-12
    card = (Store().open("spam:v1") / "README.md").read_text(encoding="utf-8")
    assert "within noise (p=0.5)" in card


def test_eval_choice_tests_the_pair_with_mcnemar(tmp_path, tiny_tokenizer, capsys):
    from lmforge.cli import main

    from .conftest import tiny_llm

    folders = [
        tiny_llm("tiny-llama", tiny_tokenizer, seed=s, block_size=1024).save(tmp_path / f"m{s}")
        for s in (1, 2)
    ]
    items = songci_next_verse_items(4)
    data = tmp_path / "songci_mc.jsonl"
    data.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    out = tmp_path / "report"
    assert main(["eval", *map(str, folders), "--task", "choice", "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    a, b = report["rows"]
    (test,) = report["comparisons"]
    assert test["test"] == "McNemar exact" and (test["a"], test["b"]) == (a["accuracy"], b["accuracy"])
    assert a["accuracy_ci95"][0] <= a["accuracy"] <= a["accuracy_ci95"][1]
    assert test["verdict"] in capsys.readouterr().out
