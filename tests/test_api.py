"""The LLM facade and the CLI as users meet them: loading from every kind of source, saving, the commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge import LLM, LmforgeError
from lmforge.formats import folder as folder_module

from .conftest import tiny_llm


def test_sharded_hf_folder_loads(tmp_path, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    ours = llm.save(tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(ours)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    llm.tokenizer.save(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    reloaded = LLM.load(sharded, dtype="float32")
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids)[0], llm.model(ids)[0])


def test_hub_id_goes_through_huggingface_hub(tmp_path, tiny_tokenizer, monkeypatch):
    """An `org/name` id resolves through huggingface_hub's cache (offline here, as the tests must be)."""
    llm = tiny_llm("tiny-qwen2", tiny_tokenizer)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--lmforge-test--tiny-qwen2"
    llm.save(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    loaded = LLM.load("lmforge-test/tiny-qwen2", dtype="float32")
    assert loaded.source == "lmforge-test/tiny-qwen2"
    assert loaded.generate_text("hi", max_length=8) == llm.generate_text("hi", max_length=8)
    with pytest.raises(LmforgeError, match="could not download 'lmforge-test/missing'"):
        LLM.load("lmforge-test/missing")


def test_failed_save_keeps_the_previous_folder(tmp_path, tiny_tokenizer, monkeypatch):
    llm = tiny_llm("tiny-gpt2", tiny_tokenizer)
    target = llm.save(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder_module, "save_file", full_disk)
    with pytest.raises(LmforgeError, match="could not save to .*model.*disk space"):
        tiny_llm("tiny-gpt2", tiny_tokenizer, seed=5).save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind


def test_bf16_load_generates(smollm2_gguf):
    llm = LLM.load(smollm2_gguf, dtype="bfloat16")
    assert llm.model.dtype == torch.bfloat16
    assert len(llm.generate_text("The capital of France is", max_length=5)) > 0


def test_generate_text_list_and_chat_string(smollm2):
    texts = smollm2.generate_text(["1, 2, 3,", "一二三，"], max_length=6)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts[0].startswith(" 4")
    assert "Paris" in smollm2.chat("What is the capital of France? One word.", max_length=10)


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_info_generate_and_chat():
    info = _cli("info")
    assert info.returncode == 0, info.stderr
    for needle in ("llama (30 layers, 576 hidden)", "134,515,008", "Q4_1", "8192", "<|im_start|>"):
        assert needle in info.stdout
    gen = _cli("generate", "-p", "The capital of France is", "--max-tokens", "8")
    assert gen.returncode == 0 and "Paris" in gen.stdout
    chat = _cli("chat", "--max-tokens", "16", stdin="你好！\nWhat is the capital of France?\n\n")
    assert chat.returncode == 0, chat.stderr
    answers = chat.stdout.split("> ")[1:3]  # two turns, each streamed after its prompt
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert "\ufffd" not in chat.stdout
