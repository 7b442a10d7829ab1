"""The real SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader (fp32): logits and greedy text."""

from __future__ import annotations

import pytest
import torch

ENGLISH = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To make a good cup of tea, you should",
    "def fibonacci(n):",
    "The three primary colors are",
]
CHINESE = [
    "中国的首都是",
    "床前明月光，",
    "今天天气很好，我们一起去",
    "人工智能是",
    "学习编程的第一步是",
]


def test_logits_match_transformers(smollm2, hf_smollm2):
    hf_model, _ = hf_smollm2
    texts = [
        "The capital of France is Paris, and 北京是中国的首都。",
        "床前明月光，疑是地上霜。 Moonlight 🌙",
    ]
    for text in texts:
        ids = torch.tensor([smollm2.tokenizer.encode(text)])
        with torch.no_grad():
            ours, _ = smollm2.model(ids)
            theirs = hf_model(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-3


@pytest.mark.parametrize("prompt", ENGLISH + CHINESE)
def test_greedy_32_tokens_identical_to_transformers_generate(prompt, smollm2, hf_smollm2):
    hf_model, hf_tokenizer = hf_smollm2
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == smollm2.tokenizer.encode(prompt)
    with torch.no_grad():
        theirs = hf_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
    ours = smollm2.complete([prompt], max_new_tokens=32)[0]
    expected = ours.token_ids + ([smollm2.tokenizer.eos_id] if ours.finish_reason == "stop" else [])
    assert expected == theirs


def test_chat_template_matches_transformers(smollm2, hf_smollm2):
    _, hf_tokenizer = hf_smollm2
    conversations = [
        [{"role": "user", "content": "Hi there!"}],
        [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "再加一呢？"},
        ],
    ]
    for messages in conversations:
        theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert smollm2.tokenizer.apply_chat_template(messages) == theirs


def test_batched_generation_equals_single_on_smollm2(smollm2):
    prompts = ["The capital of France is", "床前明月光，", "Hello"]
    batched = smollm2.complete(prompts, max_new_tokens=12)
    for prompt, result in zip(prompts, batched, strict=True):
        assert smollm2.complete([prompt], max_new_tokens=12)[0].token_ids == result.token_ids


def test_streamed_chinese_chat_is_clean_and_complete(smollm2):
    messages = [{"role": "user", "content": "请用中文介绍一下熊猫，可以用表情符号。"}]
    pieces = list(smollm2.stream(messages, max_length=48))
    full = smollm2.chat(messages, max_length=48)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == full
    assert any("\u4e00" <= ch <= "\u9fff" for ch in full)


def test_save_and_reload_folder_keeps_logits(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge import LLM

    folder = smollm2.save(tmp_path / "smollm2")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    reloaded = LLM.load(folder, dtype="float32")
    text = "Save me 保存我"
    ids = torch.tensor([smollm2.tokenizer.encode(text)])
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert hf_tokenizer(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        ours = smollm2.model(ids)[0]
        assert torch.equal(reloaded.model(ids)[0], ours)
        assert (hf_model(ids).logits - ours).abs().max().item() <= 1e-4
