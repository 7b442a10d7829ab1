"""Encoders that train: BERT's masked-LM pretraining and classification heads, against transformers' BertForMaskedLM
and BertForSequenceClassification loaded from our folders; the recipes end to end on tiny encoders (English and
Chinese); and one clear line when an encoder is given a decoder-only job."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from lmforge import LLM, LmforgeError
from lmforge.cli import main
from lmforge.config import Config
from lmforge.data.mlm import MaskedLanguageModelingObjective, mask_tokens
from lmforge.data.text import TokenShards, prepare_corpus
from lmforge.encoder import Encoder
from lmforge.formats.folder import save_model_folder
from lmforge.generate import left_pad
from lmforge.loading import EMBEDDING_MODEL, bundled_model_path
from lmforge.lora import LoRAConfig
from lmforge.model import IGNORE_INDEX
from lmforge.recipes.evaluate import evaluate_models
from lmforge.recipes.finetune import finetune
from lmforge.recipes.pretrain import pretrain
from lmforge.sizing import select
from lmforge.tokenizer import Tokenizer
from lmforge.train.methods import add_classifier, choose_trainable

TEXTS = [
    "WINNER!! Claim your free prize now",
    "明天一起吃饭吧，好吗？",
    "ok",
    "恭喜您中奖了，请回复领取 500 元",
]
TRAIN_ROWS = [
    {"text": "Free prize! Call now to claim your reward", "label": "spam"},
    {"text": "恭喜中奖，点击链接领取大礼", "label": "spam"},
    {"text": "Are we still meeting for lunch?", "label": "ham"},
    {"text": "我晚上八点到家", "label": "ham"},
] * 6


@pytest.fixture(scope="module")
def bert_tokenizer() -> Tokenizer:
    return Tokenizer.load(bundled_model_path(EMBEDDING_MODEL))


def tiny_bert(tokenizer: Tokenizer, seed: int = 0, **overrides) -> Encoder:
    """bert-tiny with MiniLM's vocabulary; norms and biases spread out so parity checks see real numbers."""
    torch.manual_seed(seed)
    model = Encoder(
        Config.from_name("bert-tiny", vocab_size=tokenizer.vocab_size, block_size=64, **overrides)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def right_padded(tokenizer: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, (ids != 0).long()


def test_mlm_loss_equals_bert_for_masked_lm(bert_tokenizer, tmp_path, one_thread):
    from transformers import AutoModelForMaskedLM

    model = tiny_bert(bert_tokenizer)
    ids, attention = right_padded(bert_tokenizer, TEXTS)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = mask_tokens(
        ids, mask_id=103, vocab_size=bert_tokenizer.vocab_size, special_ids={0, 100, 101, 102, 103},
        generator=generator, probability=0.3,
    )  # fmt: skip
    assert (targets != IGNORE_INDEX).sum() >= 4
    LLM(model, bert_tokenizer, source="bert-tiny").export(tmp_path / "mlm", format="hf")
    assert json.loads((tmp_path / "mlm" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm", dtype=torch.float32).eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    assert (
        hf.get_output_embeddings().weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    with torch.inference_mode():
        theirs = hf(input_ids=inputs, attention_mask=attention, labels=targets).loss
        ours = model(inputs, targets, attention_mask=attention)[1]
        back = LLM.load(tmp_path / "mlm", dtype="float32", device="cpu").model
        again = back(inputs, targets, attention_mask=attention)[1]
    assert abs(float(ours) - float(theirs)) <= 1e-5
    assert abs(float(again) - float(ours)) <= 1e-6
    assert back.lm_head.weight is back.wte.weight  # tied again after loading, not two copies


def test_classifier_export_gives_bert_for_sequence_classification_logits(
    bert_tokenizer, tmp_path, one_thread
):
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert(bert_tokenizer, seed=1)  # bert presets pool [CLS]
    add_classifier(model, ["ham", "spam", "other"], regression=False, seed=2)
    with torch.no_grad():
        model.score.bias.normal_(0, 0.5)
    assert model.lm_head is None and model.pooler is not None  # the classifier replaces the MLM head
    LLM(model, bert_tokenizer, source="bert-tiny").export(tmp_path / "clf", format="hf")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf", dtype=torch.float32).eval()
    assert hf.config.id2label == {0: "ham", 1: "spam", 2: "other"}
    ids, attention = right_padded(bert_tokenizer, TEXTS)
    left, left_mask = left_pad([bert_tokenizer.encode(t) for t in TEXTS], pad_id=0)
    with torch.inference_mode():
        theirs = hf(input_ids=ids, attention_mask=attention).logits
        ours = model.classify(left, left_mask)
    assert (ours - theirs).abs().max() <= 1e-4
    llm = LLM.load(tmp_path / "clf", dtype="float32", device="cpu")
    results = llm.classify_text(TEXTS)
    assert [r["label"] for r in results] == [["ham", "spam", "other"][i] for i in theirs.argmax(-1)]
    probs = torch.tensor([list(r["probabilities"].values()) for r in results])
    assert (probs - theirs.softmax(-1)).abs().max() <= 1e-4


def test_mean_pooled_classifier_round_trips_through_its_folder(bert_tokenizer, tmp_path, one_thread):
    model = tiny_bert(bert_tokenizer, seed=3, pooling="mean")
    add_classifier(model, ["负面", "正面"], regression=False, seed=4)
    assert model.pooler is None
    assert model.num_parameters() == model.config.num_parameters()
    save_model_folder(tmp_path / "mean", model.config, model.state_dict(), bert_tokenizer)
    saved = json.loads((tmp_path / "mean" / "config.json").read_text())
    assert (
        saved["architectures"] == ["BertForSequenceClassification"] and saved["lmforge"]["pooling"] == "mean"
    )
    left, mask = left_pad([bert_tokenizer.encode(t) for t in TEXTS], pad_id=0)
    llm = LLM.load(tmp_path / "mean", dtype="float32", device="cpu")
    with torch.inference_mode():
        assert torch.allclose(llm.model.classify(left, mask), model.classify(left, mask), atol=1e-6)


def test_masking_is_bert_80_10_10_and_spares_special_tokens():
    ids = torch.randint(1000, 30000, (64, 512))
    ids[:, 0], ids[:, -1] = 101, 102
    g = torch.Generator().manual_seed(7)
    inputs, targets = mask_tokens(
        ids, mask_id=103, vocab_size=30522, special_ids={0, 101, 102, 103}, generator=g
    )
    chosen = targets != IGNORE_INDEX
    assert abs(chosen.float().mean() - 0.15) < 0.005
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(targets[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs[chosen] == 103).float().mean()
    kept = (inputs[chosen] == ids[chosen]).float().mean()
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(1 - masked - kept - 0.1) < 0.01
    again = mask_tokens(
        ids,
        mask_id=103,
        vocab_size=30522,
        special_ids={0, 101, 102, 103},
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(again[0], inputs)  # the same seed masks the same way (resume is exact)


@pytest.fixture(scope="module")
def shards(bert_tokenizer, tmp_path_factory):
    """A small en + zh corpus in MiniLM's tokens; [SEP] separates the documents."""
    folder = tmp_path_factory.mktemp("mlm-shards")
    docs = [
        f"Document {i}: the quick brown fox jumps over the lazy dog. 今天天气很好，我们去公园散步。"
        for i in range(60)
    ]
    prepare_corpus(iter(docs), bert_tokenizer, folder, val_fraction=0.2, show_progress=False)
    return folder


def test_mlm_pretraining_continues_an_encoder_and_starts_bert_from_scratch(
    shards, encoder_folder, bert_tokenizer, tmp_path, one_thread
):
    train = {"max_steps": 2, "micro_batch_size": 2, "block_size": 32, "eval_every": 2, "eval_batches": 1,
             "warmup_steps": 0, "progress": False}  # fmt: skip
    # a sentence encoder without an MLM head (as all-minilm-l6-v2 ships) gets BERT's, then trains
    result = pretrain(
        shards, init=str(encoder_folder), objective="mlm", train={**train, "out_dir": str(tmp_path / "c")}
    )
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    continued = LLM.load(result.model_dir, dtype="float32", device="cpu")
    assert continued.config.masked_lm and continued.config.pooling == "mean"  # still embeds as it did
    assert continued.embed(["你好"]).shape == (1, 128)
    result = pretrain(
        shards, arch="bert-tiny", objective="mlm", model_config={"block_size": 64},
        tokenizer=bundled_model_path(EMBEDDING_MODEL), train={**train, "out_dir": str(tmp_path / "s")},
    )  # fmt: skip
    assert LLM.load(result.model_dir).config.masked_lm
    objective = MaskedLanguageModelingObjective(TokenShards(shards), bert_tokenizer, 2, 32)
    batch = objective.train_batch(5, 0, 1)
    assert batch["input_ids"][:, 0].eq(101).all() and batch["input_ids"][:, -1].eq(102).all()
    assert torch.equal(objective.train_batch(5, 0, 1)["targets"], batch["targets"])


@pytest.fixture(scope="module")
def spam_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spam")
    for name, rows in (("train", TRAIN_ROWS), ("test", TRAIN_ROWS[:8])):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    return folder


@pytest.fixture(scope="module")
def encoder_folder(bert_tokenizer, tmp_path_factory):
    """A plain sentence encoder (no head), mean pooled like all-MiniLM-L6-v2."""
    folder = tmp_path_factory.mktemp("enc") / "model"
    model = tiny_bert(bert_tokenizer, seed=5, masked_lm=False, tie_embeddings=False, pooling="mean")
    save_model_folder(folder, model.config, model.state_dict(), bert_tokenizer)
    return folder


@pytest.mark.parametrize("method,pooling", [("full", "cls"), ("lora", None)])
def test_finetune_classify_on_an_encoder(
    encoder_folder, spam_files, tmp_path, monkeypatch, method, pooling, one_thread
):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    train = {"max_steps": 4, "micro_batch_size": 4, "eval_every": 2, "lr": 1e-3, "warmup_steps": 0,
             "progress": False, "out_dir": str(tmp_path / "run")}  # fmt: skip
    result = finetune(
        str(encoder_folder), spam_files / "train.jsonl", task="classify", method=method, pooling=pooling,
        lora={"rank": 4}, train=train, save_as=f"spam-encoder:{method}",
    )  # fmt: skip
    assert (tmp_path / "run" / "validation.json").is_file() and result.best is not None
    tuned = LLM.load(result.model_dir, dtype="float32", device="cpu")
    assert tuned.config.labels == ["ham", "spam"] and tuned.config.pooling == (pooling or "mean")
    out = tuned.classify_text(["Claim your free prize", "我到家了"])
    assert all(set(r["probabilities"]) == {"ham", "spam"} for r in out)
    if (
        method == "lora"
    ):  # PEFT's layout: transformers' module names (BERT's query, value), a classifier's task
        peft_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
        assert peft_config["task_type"] == "SEQ_CLS"
        hf_leaves = {
            name.rsplit(".", 1)[-1] for name, _ in AutoModel.from_pretrained(encoder_folder).named_modules()
        }
        assert peft_config["target_modules"] and set(peft_config["target_modules"]) <= hf_leaves
        return
    # the store, eval and select take an encoder classifier as they take a decoder one
    stored = LLM.load("spam-encoder:full", dtype="float32", device="cpu")
    assert stored.classify_text(["我到家了"]) == tuned.classify_text(["我到家了"])
    test = spam_files / "test.jsonl"
    report = evaluate_models(["spam-encoder:full"], test, task="classify", out_dir=tmp_path / "eval")
    assert report["rows"][0]["examples"] == 8 and 0 <= report["rows"][0]["accuracy"] <= 1
    ranked = select("classify", test, candidates=["spam-encoder:full"], sample=8, compile=False)
    chosen = ranked.candidates[0]
    assert (
        chosen.status == "ok" and chosen.quality is not None and chosen.details["method"] == "fine-tuned head"
    )


def test_freeze_and_lora_train_only_the_last_blocks_and_the_head(bert_tokenizer):
    model = tiny_bert(bert_tokenizer, seed=6)
    add_classifier(model, ["a", "b"], regression=False, seed=0)
    choose_trainable(model, "freeze", 1, None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "pooler.", "score.")) for n in trainable)
    assert {"pooler.weight", "score.weight", "score.bias"} <= trainable
    model = tiny_bert(bert_tokenizer, seed=6)
    add_classifier(model, ["a", "b"], regression=False, seed=0)
    choose_trainable(model, "lora", 1, LoRAConfig(rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_" in n for n in trainable) and "score.weight" in trainable
    assert all(".lora_" in n or n.startswith(("pooler.", "score.")) for n in trainable)


def test_an_encoder_given_a_decoder_only_job_is_one_clear_line(
    encoder_folder, spam_files, shards, tmp_path, capsys
):
    llm = LLM.load(encoder_folder, dtype="float32", device="cpu")
    for attempt in (lambda: llm.generate_text("Hello"), lambda: llm.chat("你好")):
        with pytest.raises(LmforgeError, match="sentence encoder"):
            attempt()
    with pytest.raises(LmforgeError, match="cannot learn next-token prediction"):
        pretrain(shards, init=str(encoder_folder), train={"max_steps": 1, "out_dir": str(tmp_path / "p")})
    with pytest.raises(LmforgeError, match="trains encoders"):
        pretrain(
            shards, arch="tiny-llama", objective="mlm", train={"max_steps": 1, "out_dir": str(tmp_path / "q")}
        )
    argv = ["finetune", str(encoder_folder), "--data", str(spam_files / "train.jsonl"), "--task", "summarize"]
    assert main(argv) == 2  # the command line: exit 2 and one line, no traceback
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sentence encoder" in lines[0], lines
    assert "--task summarize" in lines[0] and "Traceback" not in lines[0]
