"""Sentence encoders: the packaged all-MiniLM-L6-v2 (a real BERT-style model) against sentence-transformers and
transformers, English and Chinese; its folder round trip; and clear errors wherever a decoder is needed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmforge import LLM, LmforgeError
from lmforge.loading import EMBEDDING_MODEL, bundled_model_path
from lmforge.serve import create_app
from lmforge.sizing import estimate
from lmforge.store import Store

from .conftest import one_intra_op_thread
from .serving import serving
from .test_errors import assert_one_line_error, run_cli

TEXTS = [
    "A man is eating food.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们今天去北京吃烤鸭 🦆, then fly home ✈️.",
    "a",
    "深度学习模型可以把句子变成向量，用来检索相似的文档。",
    # ~200 tokens: beyond the 128 that the packaged tokenizer.json would truncate to if its stored settings
    # were applied, within sentence-transformers' 256.
    "The quick brown fox jumps over the lazy dog near the bank of the river. " * 12,
]


@pytest.fixture(scope="module")
def minilm() -> LLM:
    with one_intra_op_thread():
        yield LLM.load(EMBEDDING_MODEL, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_model_path(EMBEDDING_MODEL)), device="cpu")


def test_embeddings_match_sentence_transformers_in_english_and_chinese(minilm, reference, one_thread):
    assert 150 < len(minilm.tokenizer.encode(TEXTS[-1])) < 256
    ours = minilm.embed(TEXTS)  # one call: mixed lengths share left-padded batches
    theirs = reference.encode(TEXTS, normalize_embeddings=True, batch_size=4)
    assert ours.shape == (len(TEXTS), 384)
    assert np.abs(ours - theirs).max() < 1e-5
    for text, row in zip(TEXTS, ours, strict=True):  # alone = in a batch
        assert np.abs(minilm.embed(text) - row).max() < 1e-5


def test_hidden_states_match_transformers_bert(minilm, one_thread):
    from transformers import AutoModel, AutoTokenizer

    folder = bundled_model_path(EMBEDDING_MODEL)
    bert = AutoModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    batch = AutoTokenizer.from_pretrained(folder)(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        theirs = bert(**batch).last_hidden_state  # right-padded
        ours = minilm.model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


def test_similarity_ranks_paraphrases_first(minilm, one_thread):
    assert minilm.similarity("A cat sits on the mat.", "A kitten is resting on a rug.") > minilm.similarity(
        "A cat sits on the mat.", "Stock markets fell sharply today."
    )
    assert minilm.similarity("我喜欢吃苹果。", "我爱吃苹果。") > minilm.similarity(
        "我喜欢吃苹果。", "明天会下雨。"
    )


def test_saved_folder_loads_in_sentence_transformers_and_back(minilm, tmp_path, one_thread):
    from sentence_transformers import SentenceTransformer

    folder = minilm.save(tmp_path / "minilm")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert not (folder / "generation_config.json").exists()
    assert "sentence encoder" in (folder / "README.md").read_text()
    expected = minilm.embed(TEXTS[:3])
    again = LLM.load(folder, dtype="float32", device="cpu")
    assert np.abs(again.embed(TEXTS[:3]) - expected).max() < 1e-6
    theirs = SentenceTransformer(str(folder), device="cpu").encode(TEXTS[:3], normalize_embeddings=True)
    assert np.abs(theirs - expected).max() < 1e-5


def test_cls_pooling_reads_the_first_token_and_survives_the_store(minilm, tmp_path, monkeypatch, one_thread):
    folder = minilm.save(tmp_path / "cls")
    pooling = folder / "1_Pooling" / "config.json"
    settings = json.loads(pooling.read_text())
    settings.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True, include_prompt=True)
    pooling.write_text(json.dumps(settings))
    cls = LLM.load(folder, dtype="float32", device="cpu")
    assert cls.config.pooling == "cls"
    ids = torch.tensor([cls.tokenizer.encode(TEXTS[0])])
    first = torch.nn.functional.normalize(cls.model.hidden_states(ids)[0, 0], dim=-1)
    together = cls.embed(TEXTS[:2])  # the short text is left-padded: [CLS] is not at column 0
    assert np.abs(together[0] - first.detach().numpy()).max() < 1e-5

    # The store keeps subfolders, so the pooling that sentence-transformers' 1_Pooling/ declares survives.
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    manifest = Store().put(folder, "encoder:cls")
    assert "1_Pooling/config.json" in manifest["files"]
    stored = LLM.load("encoder:cls", dtype="float32", device="cpu")
    assert stored.config.pooling == "cls"
    assert np.abs(stored.embed(TEXTS[:2]) - together).max() < 1e-6

    settings.update(pooling_mode_max_tokens=True)
    pooling.write_text(json.dumps(settings))
    with pytest.raises(LmforgeError, match="pooling .* is not supported"):
        LLM.load(folder)


def test_decoder_only_work_is_a_clear_error(minilm, tmp_path):
    for attempt in (
        lambda: minilm.generate_text("Hello"),
        lambda: minilm.chat("你好"),
        lambda: minilm.classify_text("great film", labels=["positive", "negative"]),
        lambda: minilm.summarize("A long text. " * 20),
        lambda: minilm.export(tmp_path / "minilm.gguf", format="gguf"),
        lambda: estimate(EMBEDDING_MODEL, task="generate", measure=False),
        lambda: estimate(EMBEDDING_MODEL, mode="lora", task="classify", measure=False),
    ):
        with pytest.raises(LmforgeError, match="sentence encoder"):
            attempt()
    sized = estimate(EMBEDDING_MODEL, context=128, batch=16, measure=False)  # an encoder's workload: embed
    assert sized.task == "embed"
    assert sized.parameters == minilm.model.num_parameters() == minilm.config.num_parameters()


def test_cli_embeds_with_the_encoder_and_refuses_to_generate():
    result = run_cli("embed", "--model", EMBEDDING_MODEL, "你好，世界", "hello world")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["你好，世界", "hello world"]
    assert all(abs(np.linalg.norm(r["embedding"]) - 1) < 1e-4 for r in rows)
    assert_one_line_error(run_cli("generate", EMBEDDING_MODEL, "-p", "hi"), "sentence encoder", "embed")


def test_server_embeds_with_the_encoder_and_refuses_completions(minilm, one_thread):
    import openai

    with serving(create_app(minilm)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        result = client.embeddings.create(model="minilm", input=TEXTS[:2], encoding_format="float")
        vectors = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
        assert np.abs(vectors - minilm.embed(TEXTS[:2])).max() < 1e-5
        with pytest.raises(openai.BadRequestError, match="sentence encoder"):
            client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "你好"}])


def test_cli_output_into_a_closed_pipe_stops_quietly():
    # `lmforge embed ... | head -1`: 60 vectors (~250 KB) outgrow the pipe, so the writer meets the closed end.
    command = [sys.executable, "-m", "lmforge", "embed", "-m", EMBEDDING_MODEL, *["床前明月光 hello"] * 60]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(reader.stdout.readline())["text"] == "床前明月光 hello"
    reader.stdout.close()
    _, stderr = reader.communicate(timeout=120)
    assert reader.returncode == 141, stderr
    assert stderr.decode().strip() == ""
