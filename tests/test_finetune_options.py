"""The classification options fine-tuning offers beyond the defaults: a head on mean-pooled states, label
smoothing, class-balanced sampling and loss weights, and LoRA on every linear layer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge import LLM, LmforgeError
from lmforge.cli import main
from lmforge.data.labelled import ClassificationData, ClassificationObjective
from lmforge.lora import LINEAR_NAMES, LoRAConfig, LoRALinear
from lmforge.train.methods import add_classifier, choose_trainable

from .conftest import TEST_DATA, tiny_llm

pytestmark = pytest.mark.filterwarnings("ignore:.*were truncated:UserWarning")  # short blocks, on purpose


@pytest.fixture(scope="module")
def reviews_zh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small imbalanced Chinese two-class set from tests/data: 24 CSL abstracts and 8 宋词 verses."""
    abstracts = [json.loads(line)["text"][:60] for line in _lines("summarize_zh/test.jsonl")[:24]]
    ci = (TEST_DATA / "text" / "songci.txt").read_text(encoding="utf-8").split("\n\n")[:8]
    verses = ["".join(block.split("\n")[1:])[:60] for block in ci]
    rows = [{"text": t, "label": "摘要"} for t in abstracts] + [{"text": t, "label": "宋词"} for t in verses]
    path = tmp_path_factory.mktemp("zh") / "genre.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _lines(relative: str) -> list[str]:
    return (TEST_DATA / relative).read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------ mean pooling
def test_a_mean_pooled_head_reads_the_mean_of_the_real_tokens_only(tiny_tokenizer) -> None:
    net = tiny_llm("tiny-llama", tiny_tokenizer).model.eval()
    add_classifier(net, ["a", "b", "c"], regression=False, seed=0, pooling="mean")
    short, long = [5, 9, 11], [7, 3, 8, 2, 6, 4]
    batch = torch.tensor([[0, 0, 0, *short], long])  # left padding, as the objective and inference batch
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        pooled = net.classify(batch, mask)
        for row, ids in enumerate((short, long)):
            states = net.hidden_states(torch.tensor([ids]))[0]  # (T, C), this text alone
            expected = net.score(states.mean(0))
            torch.testing.assert_close(pooled[row], expected, atol=1e-5, rtol=1e-4)
        net.config.head_pooling = "last"
        last = net.classify(batch, mask)
    assert not torch.allclose(last, pooled, atol=1e-3)  # the option changes what the head reads


# ------------------------------------------------------------ label smoothing
def _data(targets: list[int], labels: int = 3) -> ClassificationData:
    ids = [[3, 4, 5][: 1 + i % 3] for i in range(len(targets))]
    return ClassificationData(ids, [float(t) for t in targets], ["x", "y", "z"][:labels], False)


def test_label_smoothing_is_the_smoothed_cross_entropy_in_training_and_plain_in_validation() -> None:
    torch.manual_seed(0)
    scores, targets = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    e = 0.2
    job = ClassificationObjective(_data(targets.tolist()), None, 6, label_smoothing=e)
    # (1 - e) on the label's log-probability and e spread evenly over all three (torch's definition)
    logp = scores.log_softmax(-1)
    expected = -((1 - e) * logp[torch.arange(6), targets] + e * logp.mean(-1)).mean()
    torch.testing.assert_close(job._loss(scores, targets.float(), job.label_smoothing), expected)
    # validation compares across runs with and without smoothing: plain cross-entropy
    assert float(job._loss(scores, targets.float())) == pytest.approx(float(F.cross_entropy(scores, targets)))
    assert abs(float(job._loss(scores, targets.float())) - float(expected)) > 1e-3  # smoothing changes it
    with pytest.raises(LmforgeError, match="label smoothing 1.0 must be at least 0 and below 1"):
        ClassificationObjective(_data([0, 1]), None, 2, label_smoothing=1.0)


# ------------------------------------------------------------ balance
def test_balanced_sampling_draws_each_class_about_equally_and_weights_invert_the_counts() -> None:
    targets = [0] * 90 + [1] * 10  # 9 : 1
    sample = ClassificationObjective(_data(targets, 2), None, 8, seed=3, balance="sample")
    drawn = Counter(int(targets[i]) for b in range(250) for i in sample.sampler.indices(b, 8))
    assert (
        sum(drawn.values()) == 2000 and abs(drawn[1] / 2000 - 0.5) < 0.04
    )  # 10 % of the data, half the draws
    plain = ClassificationObjective(_data(targets, 2), None, 8, seed=3)
    once = Counter(int(targets[i]) for b in range(25) for i in plain.sampler.indices(b, 4))
    assert once == {0: 90, 1: 10}  # without it: one epoch is each example once
    weighted = ClassificationObjective(_data(targets, 2), None, 8, balance="weights")
    assert weighted.class_weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])


# ------------------------------------------------------------ LoRA on every linear layer
def test_lora_targets_all_adapts_every_linear_layer_of_every_block(tiny_tokenizer) -> None:
    assert LoRAConfig(targets=["all"]).targets == list(LINEAR_NAMES)
    assert LoRAConfig(targets=["all-linear"]).targets == list(LINEAR_NAMES)
    net = tiny_llm("tiny-llama", tiny_tokenizer).model
    add_classifier(net, ["a", "b"], regression=False, seed=0)
    trainable = choose_trainable(net, "lora", 1, LoRAConfig(rank=2, targets=["all"]))
    adapted = {name.rsplit(".", 1)[-1] for name, m in net.named_modules() if isinstance(m, LoRALinear)}
    wrapped = sum(isinstance(m, LoRALinear) for m in net.modules())
    assert adapted == set(LINEAR_NAMES) and wrapped == len(LINEAR_NAMES) * net.config.n_layer
    adapters = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    assert trainable == adapters + net.score.weight.numel()
    with pytest.raises(LmforgeError, match="are not linear layers"):
        LoRAConfig(targets=["all", "q_proj"])


def test_the_options_as_command_line_flags(reviews_zh, tiny_tokenizer, tmp_path, capsys) -> None:
    model = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "base")
    args = ["finetune", str(model), "--data", str(reviews_zh), "--task", "classify", "--method", "lora"]
    args += ["--lora-targets", "all", "--lora-rank", "2", "--pooling", "mean", "--label-smoothing", "0.1"]
    args += ["--balance", "sample", "--max-steps", "2", "--eval-every", "2", "--micro-batch-size", "4"]
    args += ["--block-size", "32", "--warmup-steps", "0", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(LINEAR_NAMES)
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text(encoding="utf-8"))["lmforge"]
    assert saved["head_pooling"] == "mean"
    # the loaded model classifies by the mean of the text's states, as it trained
    tuned = LLM.load(tmp_path / "run" / "model")
    text = json.loads(_lines("summarize_zh/test.jsonl")[30])["text"][:40]
    ids = torch.tensor([tiny_tokenizer.encode(text)])
    with torch.no_grad():
        expected = tuned.model.score(tuned.model.hidden_states(ids)[0].mean(0)).softmax(-1)
    probabilities = tuned.classify_text(text)["probabilities"]
    assert [probabilities[k] for k in tuned.config.labels] == pytest.approx(expected.tolist(), abs=1e-5)
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "bad"), "--label-smoothing", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label smoothing 1.5" in err[0] and "Traceback" not in err[0]
