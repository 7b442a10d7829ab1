"""Evaluation against references: transformers' sliding-window perplexity recipe and log-likelihood scoring."""

from __future__ import annotations

import json

import numpy as np
import torch
from rouge_score import rouge_scorer

from lmforge.evaluate import (
    baseline_predictions,
    choice_prompt,
    classification_metrics,
    multiple_choice,
    perplexity,
    plot_confusion,
    rouge,
)

from .conftest import TEST_DATA


def _hf_sliding_window_nll(model, ids: list[int], window: int, stride: int) -> float:
    """transformers' documented perplexity recipe (docs: 'Perplexity of fixed-length models')."""
    seq = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + window, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == seq.size(1):
            break
    return nll_sum / n_tokens


def test_perplexity_matches_the_transformers_recipe(smollm2, hf_smollm2):
    hf_model, _ = hf_smollm2
    for name in ("tinyshakespeare.txt", "luxun.txt"):
        text = (TEST_DATA / "text" / name).read_text(encoding="utf-8")[:1500]
        ours = perplexity(smollm2, text, window=256, stride=128)
        ids = smollm2.tokenizer.encode(text, add_special_tokens=False)
        theirs = np.exp(_hf_sliding_window_nll(hf_model, ids, 256, 128))
        assert abs(ours["perplexity"] - theirs) / theirs < 0.005, (name, ours, theirs)
        assert 0 < ours["bits_per_byte"] < 8


def _mc_items(name: str, n: int) -> list[dict]:
    with (TEST_DATA / name / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def _songci_next_verse_items(n: int) -> list[dict]:
    """Chinese multiple choice built from 宋词 (public domain; CMMLU is non-commercial, so not in tests/data):
    which of four verses follows a ci's first verse. Ci i's second verse is the answer, at position i % 4,
    among the second verses of three later ci."""
    text = (TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8")
    ci = [block.split("\n") for block in text.split("\n\n")[: 4 * n]]  # title line, then one verse a line
    items = []
    for i in range(n):
        choices = [lines[2] for lines in ci[n + 3 * i : n + 3 * i + 3]]
        choices.insert(i % 4, ci[i][2])
        question = f"{ci[i][0]}\n{ci[i][1]}\n下一句是？"
        items.append({"question": question, "choices": choices, "answer": i % 4})
    return items


def test_multiple_choice_equals_transformers_log_likelihood(smollm2, hf_smollm2):
    hf_model, hf_tokenizer = hf_smollm2
    for name, items in (("mc_en", _mc_items("mc_en", 6)), ("songci_zh", _songci_next_verse_items(6))):
        ours = multiple_choice(smollm2, items)
        predicted = []
        for item in items:
            prompt = hf_tokenizer(choice_prompt(item["question"], item["choices"])).input_ids
            scores = []
            for choice in item["choices"]:
                cont = hf_tokenizer(" " + str(choice)).input_ids
                with torch.no_grad():
                    logits = hf_model(torch.tensor([prompt + cont])).logits[0].float()
                logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]
                scores.append(float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum()) / len(cont))
            predicted.append(int(np.argmax(scores)))
        assert ours["predicted"] == predicted, name


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


def test_eval_command_compares_models_and_the_baseline(tmp_path, tiny_tokenizer):
    from lmforge.cli import main

    from .conftest import tiny_llm

    model_a = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "a")
    model_b = tiny_llm("tiny-gpt2", tiny_tokenizer).save(tmp_path / "b")
    rows = [{"text": "免费领奖", "label": "spam"}, {"text": "see you", "label": "ham"}] * 4
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "report"
    args = ["eval", str(model_a), str(model_b), "--task", "classify", "--data", str(data)]
    assert main([*args, "--train-file", str(data), "--labels", "ham,spam", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == [
        "baseline: tf-idf + logistic regression",
        f"{model_a} (zero-shot)",
        f"{model_b} (zero-shot)",
    ]
    assert report["rows"][0]["accuracy"] == 1.0
    assert (out / "report.md").read_text().startswith("| model | accuracy |")
    assert len(list(out.glob("confusion-*.png"))) == 3
    text = tmp_path / "text.txt"
    text.write_text("床前明月光，疑是地上霜。" * 20, encoding="utf-8")
    assert main(["eval", str(model_a), "--task", "perplexity", "--data", str(text), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["rows"][0]["perplexity"] > 1
