"""Issue 20's bad input, each one line on the command line (exit 2, before any banner or echo), in the API
(``LmforgeError``) and in the server (HTTP 400): a seq2seq model asked to chat without a chat template, beams x
prompts over the memory estimate, an encoder given a decoder-only recipe."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from lmforge import LLM, Config, beam
from lmforge.cli import main
from lmforge.data.text import prepare_corpus
from lmforge.encoder import Encoder
from lmforge.errors import LmforgeError
from lmforge.loading import EMBEDDING_MODEL, bundled_model_path
from lmforge.seq2seq import Seq2SeqTransformer
from lmforge.serve import create_app
from lmforge.tokenizer import Tokenizer

from .conftest import tiny_llm
from .serving import serving


def _one_line(err: str, *named: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(n in lines[0] for n in named), lines[0]


@pytest.fixture(scope="module")
def t5_folder(tiny_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    config = Config.from_name(
        "tiny-t5",
        eos_token_id=tiny_tokenizer.eos_id,
        pad_token_id=tiny_tokenizer.pad_id,
        decoder_start_token_id=tiny_tokenizer.pad_id,
    )
    return LLM(Seq2SeqTransformer(config), tiny_tokenizer, source="tiny-t5").save(
        tmp_path_factory.mktemp("t5") / "model"
    )


@pytest.fixture(scope="module")
def decoder(tiny_tokenizer):
    return tiny_llm("tiny-llama", tiny_tokenizer, seed=3)


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """A tiny BERT with MiniLM's vocabulary (mean pooled, no heads)."""
    tokenizer = Tokenizer.load(bundled_model_path(EMBEDDING_MODEL))
    config = Config.from_name(
        "bert-tiny", vocab_size=tokenizer.vocab_size, block_size=64, masked_lm=False, pooling="mean"
    )
    return LLM(Encoder(config), tokenizer, source="bert-tiny").save(tmp_path_factory.mktemp("enc") / "model")


def test_a_seq2seq_model_asked_to_chat(t5_folder, capsys):
    t5 = LLM.load(t5_folder, dtype="float32", device="cpu")
    with pytest.raises(LmforgeError, match="encoder–decoder without a chat template") as caught:
        t5.chat("你好")
    assert "\n" not in str(caught.value) and "generate_text" in caught.value.hint
    assert main(["chat", "-m", str(t5_folder), "--no-compile"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the banner and the first "> "
    _one_line(err, "without a chat template", "lmforge generate -p TEXT")


def test_beams_over_the_memory_estimate(decoder, t5_folder, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(beam, "available_bytes", lambda device: 1 << 10)
    folder = decoder.save(tmp_path / "decoder")
    for model, echoed in ((folder, "Once upon a time\n"), (t5_folder, "")):
        argv = ["generate", str(model), "-p", "Once upon a time", "--max-tokens", "16", "--num-beams", "4"]
        assert main([*argv, "--no-compile"]) == 2
        out, err = capsys.readouterr()
        assert out == echoed  # a decoder's echoed prompt ends its line; the error has its own
        _one_line(err, "beam search over 4 rows (prompts x beams)", "use fewer beams")
    with serving(create_app(decoder, max_batch=4)) as base:
        body = {
            "prompt": ["Once upon a time", "床前明月光，"],
            "max_tokens": 16,
            "temperature": 0,
            "best_of": 4,
        }
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("beam search over 8 rows (prompts x beams)")


def test_an_encoder_given_decoder_only_recipes(encoder_folder, tmp_path, capsys):
    assert main(["chat", "-m", str(encoder_folder), "--no-compile"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _one_line(err, "sentence encoder", "no causal language-model head")
    tokenizer = Tokenizer.load(encoder_folder)
    shards = tmp_path / "shards"
    docs = [f"Document {i}: the quick brown fox. 今天天气很好，我们去公园散步。" for i in range(20)]
    prepare_corpus(iter(docs), tokenizer, shards, val_fraction=0.2, show_progress=False)
    pretrain = ["pretrain", "--init", str(encoder_folder), "--data", str(shards), "--max-steps", "1"]
    assert main([*pretrain, "--warmup-steps", "0", "--out", str(tmp_path / "p")]) == 2
    _one_line(capsys.readouterr().err, "cannot learn next-token prediction", "--objective mlm")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "你好", "response": "你好！"}, ensure_ascii=False) + "\n")
    for task in ("instruct", "summarize"):
        argv = ["finetune", str(encoder_folder), "--data", str(data), "--task", task, "--method", "lora"]
        assert main([*argv, "--out", str(tmp_path / task)]) == 2
        _one_line(capsys.readouterr().err, "sentence encoder", f"--task {task}", "--task classify")
