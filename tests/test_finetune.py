"""Fine-tuning on top of the one Trainer: data reading, prompt masking, methods, heads, bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lmforge import LLM, LmforgeError
from lmforge.cli import build_parser, main
from lmforge.data.labelled import (
    EpochSampler,
    encode_conversation,
    load_classification,
    load_sequences,
    read_records,
    summary_messages,
)
from lmforge.model import IGNORE_INDEX
from lmforge.recipes.finetune import add_classifier, choose_trainable, finetune

from .conftest import tiny_llm
from .test_train import child_env, free_port


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


SPAMMY = ["WINNER! claim your free prize now", "免费领取大奖，立即回复", "URGENT cash prize, call 0800 now"]
HAMMY = ["see you at lunch tomorrow", "明天一起吃午饭吧", "can you send me the notes?"]


@pytest.fixture()
def spam_files(tmp_path):
    rows = [{"text": t, "label": "spam"} for t in SPAMMY] + [{"text": t, "label": "ham"} for t in HAMMY]
    return write_jsonl(tmp_path / "train.jsonl", rows * 4), write_jsonl(tmp_path / "val.jsonl", rows)


def test_prompt_positions_carry_the_ignore_index(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "把这句话翻译成英文：你好"},
        {"role": "assistant", "content": "Hello"},
    ]
    ids, weights = encode_conversation(tiny_tokenizer, messages)
    prompt = tiny_tokenizer.encode(
        tiny_tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True), add_special_tokens=False
    )
    assert ids[: len(prompt)] == prompt
    assert weights == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert ids[-1] == tiny_tokenizer.eos_id  # the tuned model learns to stop


def test_instruction_targets_mask_prompt_and_keep_answer(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Translate to Chinese", "input": "cat", "output": "猫"},
            {"instruction": "说你好", "output": "你好"},
        ],
    )
    data = load_sequences(path, tiny_tokenizer, 128)
    for inputs, targets in zip(data.input_ids, data.targets, strict=True):
        assert len(inputs) == len(targets)
        answer = [t for t in targets if t != IGNORE_INDEX]
        assert answer[-1] == tiny_tokenizer.eos_id
        first = targets.index(answer[0])
        assert all(t == IGNORE_INDEX for t in targets[:first])
    with_prompt = load_sequences(path, tiny_tokenizer, 128, include_prompt=True)
    assert all(IGNORE_INDEX not in t for t in with_prompt.targets)


@pytest.mark.parametrize("method", ["full", "freeze", "lora"])
def test_classification_fine_tune_learns_and_reloads(method, spam_files, tiny_tokenizer, tmp_path):
    train, val = spam_files
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    result = finetune(
        llm,
        train,
        val_file=val,
        task="classify",
        method=method,
        train_last_blocks=1,
        lora={"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        train={
            "out_dir": str(tmp_path / "run"),
            "max_steps": 40,
            "micro_batch_size": 6,
            "lr": 3e-3,
            "warmup_steps": 0,
            "eval_every": 20,
            "eval_batches": 1,
            "progress": False,
        },
    )
    assert result.losses[-1] < result.losses[0]
    reloaded = LLM.load(result.model_dir)
    assert reloaded.config.labels == ["ham", "spam"]
    predictions = reloaded.classify_text(SPAMMY + HAMMY)
    accuracy = (
        sum(p["label"] == want for p, want in zip(predictions, ["spam"] * 3 + ["ham"] * 3, strict=True)) / 6
    )
    assert accuracy >= 5 / 6
    if method == "lora":
        assert (result.model_dir.parent / "adapter" / "adapter_config.json").is_file()


def test_freeze_trains_only_the_last_blocks(tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    choose_trainable(llm.model, "freeze", 1, None)
    trainable = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
        for n, p in llm.model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"blocks.1", "norm", "lm_head"}


def test_bad_classification_data_names_file_line_and_fix(tmp_path, tiny_tokenizer):
    missing = write_jsonl(
        tmp_path / "missing.jsonl", [{"text": "a", "label": "x"}, {"txt": "b", "label": "y"}]
    )
    with pytest.raises(LmforgeError, match=r"missing\.jsonl:2: missing field 'text'.*--text-field"):
        read_records(missing, ["text", "label"])
    one_class = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}] * 3)
    with pytest.raises(LmforgeError, match="only one class"):
        load_classification(one_class, tiny_tokenizer, 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LmforgeError, match="no examples"):
        load_classification(empty, tiny_tokenizer, 64)
    unknown = write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": "maybe"}])
    with pytest.raises(LmforgeError, match=r"labels \['maybe'\] are not among the model's labels"):
        load_classification(unknown, tiny_tokenizer, 64, labels=["ham", "spam"])
    long = write_jsonl(
        tmp_path / "long.jsonl", [{"text": "很长的文本 " * 50, "label": "a"}, {"text": "b", "label": "b"}]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_classification(long, tiny_tokenizer, 16)
    assert any("1 of 2 texts were longer than 16 tokens" in str(w.message) for w in caught)


def test_too_long_examples_lose_the_middle_of_their_prompt_not_their_answer(tmp_path, tiny_tokenizer):
    # Cutting the end would drop the answer, the only trained tokens: a batch of such examples has no
    # target at all and its loss is NaN (found on CSL abstracts, which SmolLM2 splits into many tokens).
    rows = [
        {"text": "本文提出一种新的图像分割方法，" * 30, "summary": "一种新的图像分割方法"},
        {
            "text": "We propose a new way to segment images. " * 30,
            "summary": "A new image segmentation method",
        },
        {"text": "短文本", "summary": "短"},
    ]
    path = write_jsonl(tmp_path / "summaries.jsonl", rows)
    with pytest.warns(UserWarning, match="2 of 3 examples were longer than 96 tokens.*answers are kept"):
        data = load_sequences(path, tiny_tokenizer, 96, kind="summarize")
    for row, inputs, targets in zip(rows, data.input_ids, data.targets, strict=True):
        assert len(inputs) == len(targets) <= 96
        answer = [t for t in targets if t != IGNORE_INDEX]
        assert answer[-1] == tiny_tokenizer.eos_id
        assert tiny_tokenizer.decode(answer[:-1]) == row["summary"]
        full = encode_conversation(tiny_tokenizer, summary_messages(row["text"], row["summary"]))[0]
        prompt_length = len(inputs) + 1 - len(answer)
        full_prompt = full[: len(full) - len(answer)]
        assert inputs[:8] == full_prompt[:8]  # the instruction and the start of the text
        assert inputs[prompt_length - 8 : prompt_length] == full_prompt[-8:]  # the cue to answer


def test_inference_beyond_context_is_an_error_not_a_truncation(tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    with pytest.raises(LmforgeError, match="exceeds the model's context of 128"):
        llm.classify_text("太长了 " * 200, labels=["a", "b"])
    with pytest.raises(LmforgeError, match="exceeds the model's context of 128"):
        llm.embed("太长了 " * 200)


def test_summaries_of_a_list_are_batched_and_equal_one_by_one(tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    texts = [
        "今天天气很好，我们去公园散步。",
        "The council approved a new park by the river.",
        "短",
        "A much longer " * 6,
    ]
    together = llm.summarize(texts, max_length=6)
    assert together == [llm.summarize(t, max_length=6) for t in texts]
    assert len(together) == 4 and all(isinstance(s, str) for s in together)


def test_summarizing_beyond_the_context_merges_chunks_with_a_warning(tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)  # a context of 128 tokens
    long_text = (
        "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 12
    )  # ~680 tokens, split inside characters
    warning = (
        r"text of 684 tokens exceeds the \d+ that fit the context; summarizing it in 1\d chunks and merging"
    )
    with pytest.warns(UserWarning, match=warning):
        summaries = llm.summarize([long_text, "短文本"], max_length=3)
    assert len(summaries) == 2  # (cutting the ids, not the text, recursed forever on this text)
    assert summaries[1] == llm.summarize("短文本", max_length=3)
    # Summaries as long as the chunks would merge forever: a clear error instead.
    with pytest.raises(LmforgeError, match="no shorter than the text, so merging them would never end"):
        llm.summarize(long_text, max_length=20)


def test_embeddings_are_normalised_and_batch_independent(tiny_tokenizer):
    llm = tiny_llm("tiny-qwen2", tiny_tokenizer)
    texts = ["床前明月光", "The quick brown fox jumps", "a"]
    together = llm.embed(texts)
    assert together.shape == (3, 64)
    assert torch.allclose(torch.from_numpy(together).norm(dim=-1), torch.ones(3), atol=1e-5)
    for text, row in zip(texts, together, strict=True):
        assert torch.allclose(torch.from_numpy(llm.embed(text)), torch.from_numpy(row), atol=1e-5)


def test_length_grouping_sees_every_example_once_per_epoch_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(400)]

    def epoch(sampler: EpochSampler) -> list[list[int]]:
        return [sampler.indices(i, 8) for i in range(50)]  # 50 batches of 8 = one epoch

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped, plain = epoch(EpochSampler(400, 3, lengths=lengths)), epoch(EpochSampler(400, 3))
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert padding(grouped) < 0.2 * padding(plain)
    assert epoch(EpochSampler(400, 3, lengths=lengths)) == grouped  # stateless: resume draws the same
    assert epoch(EpochSampler(400, 4, lengths=lengths)) != grouped  # the seed matters


# Two optimizer steps on the tiny model: enough to run the whole recipe, CLI to saved folder, in about a second.
QUICK = {"max_steps": 2, "micro_batch_size": 4, "warmup_steps": 0, "eval_every": 0, "progress": False}
QUICK_FLAGS = ["--max-steps", "2", "--micro-batch-size", "4", "--warmup-steps", "0", "--eval-every", "0"]
QUICK_FLAGS += ["--no-progress"]


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_tokenizer):
    return tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "base")


def lineage_of(run):
    return json.loads((run / "model" / "config.json").read_text())["lmforge"]["lineage"]


def test_cli_finetune_yaml_takes_the_keys_its_help_lists(spam_files, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    help_text = capsys.readouterr().out
    assert "--task" in help_text and "--method" in help_text and "--val-file" in help_text
    train, val = spam_files
    config = tmp_path / "spam.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndata: {train}\nval_file: {val}\ntask: classify\nmethod: freeze\n"
        f"train: {json.dumps(QUICK)}\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    assert main(["finetune", "--config", str(config), "--out", str(run)]) == 0, capsys.readouterr().err
    assert lineage_of(run)["method"] == "freeze"
    assert LLM.load(run / "model").config.labels == ["ham", "spam"]


def test_an_unknown_finetune_setting_is_one_error_naming_it(spam_files, tmp_path, capsys, tiny_tokenizer):
    config = tmp_path / "typo.yaml"
    config.write_text("tsak: classify\nmethod: lora\n", encoding="utf-8")
    assert main(["finetune", "--config", str(config), "--data", str(spam_files[0])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: unknown keys tsak — known keys: ")
    assert "task" in lines[0].split("known keys: ")[1].split(", ")
    with pytest.raises(LmforgeError, match=r"unknown keys tsak — known keys: .*\btask\b"):
        finetune(tiny_llm("tiny-llama", tiny_tokenizer), spam_files[0], tsak="classify")


def test_freeze_last_still_trains_the_last_blocks_with_a_deprecation(
    spam_files, tiny_model_dir, tiny_tokenizer, tmp_path, capsys
):
    reference = tiny_llm("tiny-llama", tiny_tokenizer)
    add_classifier(reference.model, ["ham", "spam"], False, 0)
    one_block = choose_trainable(reference.model, "freeze", 1, None)
    train = str(spam_files[0])
    args = ["finetune", str(tiny_model_dir), "--data", train, "--method", "freeze", *QUICK_FLAGS]
    assert main([*args, "--out", str(tmp_path / "old"), "--freeze-last", "1"]) == 0
    err = capsys.readouterr().err
    warning = "warning: --freeze-last is deprecated, use --train-last-blocks (it trains the last N blocks)"
    assert err.splitlines().count(warning) == 1, err
    assert lineage_of(tmp_path / "old")["trainable_parameters"] == one_block
    assert main([*args, "--out", str(tmp_path / "new"), "--train-last-blocks", "1"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert lineage_of(tmp_path / "new")["trainable_parameters"] == one_block
    assert build_parser().parse_args(["estimate", "--freeze-last", "3"]).train_last_blocks == 3
    assert capsys.readouterr().err.splitlines() == [warning]  # `lmforge estimate` has the same old flag

    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    with pytest.warns(DeprecationWarning, match=r"freeze_last is deprecated, use train_last_blocks"):
        result = finetune(
            llm, train, method="freeze", freeze_last=1, train={**QUICK, "out_dir": str(tmp_path / "py")}
        )
    assert lineage_of(result.model_dir.parent)["trainable_parameters"] == one_block


INSTRUCTIONS = [  # answers of very different lengths: micro-batches hold very different numbers of targets
    {"instruction": "Say yes.", "output": "Yes."},
    {
        "instruction": "把这句话翻译成英文：你好",
        "output": "Hello, it is very nice to meet you, and welcome to the town.",
    },
    {"instruction": "Name a colour.", "output": "Red"},
    {
        "instruction": "用一句话介绍北京。",
        "output": "北京是中国的首都，有三千多年的历史，故宫和长城都在这里。",
    },
]


@pytest.fixture()
def instruction_file(tmp_path):
    return write_jsonl(tmp_path / "instructions.jsonl", INSTRUCTIONS * 4)


def _trained_weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _assert_same_weights(trained: dict, expected: dict, base: dict) -> None:
    assert sorted(trained) == sorted(expected)
    assert any(not torch.equal(expected[name], base[name]) for name in base)  # the steps moved weights
    # 1e-4: Adam's update divides by the gradient's size, so where a gradient is tiny, the rounding of other
    # matmul shapes (2 rows, not 4) moves a weight by ~4e-5 at this learning rate. A step off by one token's
    # weighting, or with gradients not averaged, lands 2e-3 to 3e-2 away.
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-4, msg=name)


def test_gradient_accumulation_follows_the_mean_over_all_target_tokens(
    instruction_file, tiny_model_dir, tmp_path
):
    """Instruction tuning with 2 micro-batches of 2 per step ends where 1 micro-batch of 4 does, though the
    micro-batches hold very different numbers of answer tokens (en, zh): each step follows the mean over all
    its target tokens, not the mean of its micro-batches' means."""
    flags = [
        "--data",
        str(instruction_file),
        "--task",
        "instruct",
        "--method",
        "full",
        "--no-group-by-length",
    ]
    flags += [*QUICK_FLAGS, "--lr", "1e-2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert (
        main(["finetune", str(tiny_model_dir), *flags, "--micro-batch-size", "4", "--out", str(whole)]) == 0
    )
    args = ["finetune", str(tiny_model_dir), *flags, "--micro-batch-size", "2", "--grad-accum", "2"]
    assert main([*args, "--out", str(split)]) == 0
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    _assert_same_weights(_trained_weights(split), _trained_weights(whole), base)


@pytest.mark.parametrize(
    ("task", "fsdp"), [("classify", False), ("classify", True), ("instruct", False)], ids=str
)
def test_two_processes_fine_tune_as_one_does(
    task, fsdp, spam_files, instruction_file, tiny_model_dir, tmp_path
):
    """Two processes of 2 rows a micro-batch (DDP, or FSDP's shards) end a fine-tune (en and zh texts) with the
    weights one process of 4 rows reaches. A classifier's head runs through the wrapper's forward, so its
    gradients are averaged (called as a method of the model inside, DDP averaged nothing and FSDP read its 1-D
    shards: "'weight' must be 2-D"); instructions weigh every target token alike across processes."""
    data = spam_files[0] if task == "classify" else instruction_file
    flags = ["--data", str(data), "--task", task, "--method", "full", *QUICK_FLAGS, "--lr", "1e-2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["finetune", str(tiny_model_dir), *flags, "--micro-batch-size", "4", "--out", str(one)]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    command += [f"--master_port={free_port()}", "-m", "lmforge", "finetune", str(tiny_model_dir), *flags]
    command += ["--micro-batch-size", "2", "--out", str(two), *(["--fsdp"] if fsdp else [])]
    proc = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    _assert_same_weights(_trained_weights(two), _trained_weights(one), base)
