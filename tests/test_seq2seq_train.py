"""Encoder–decoders that train: the teacher-forced loss against transformers' ``labels=`` loss (T5 v1.0 / v1.1,
BART, loaded from our folders), T5's span corruption and BART's text infilling (en and zh), pretraining and
fine-tuning (full / freeze / LoRA) through the one Trainer, and the CLI end to end on a tiny T5."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM

from lmforge import LLM, LmforgeError
from lmforge.cli import main
from lmforge.data.seq2seq import (
    CorruptionObjective,
    load_pairs,
    pad_batch,
    seq2seq_loss,
    span_corrupt,
    span_counts,
    text_infill,
)
from lmforge.data.text import TokenShards, prepare_corpus
from lmforge.formats.hf import hf_module_name
from lmforge.formats.peft import load_adapter, save_adapter
from lmforge.lora import LoRAConfig, lora_layers
from lmforge.model import IGNORE_INDEX
from lmforge.recipes.finetune import finetune
from lmforge.recipes.pretrain import pretrain
from lmforge.tokenizer import train_tokenizer
from lmforge.train.methods import choose_trainable

from .conftest import data_lines
from .test_seq2seq import INPUTS, tiny_seq2seq

EN = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends."
ZH = "床前明月光，疑是地上霜。举头望明月，低头思故乡。今天天气很好，我们一起去公园散步，然后回家吃饭。"
SPECIALS = ["<|endoftext|>", "<mask>", *(f"<extra_id_{k}>" for k in range(16))]
PAIRS = [
    {"text": "今天天气很好，我们一起去公园散步，然后回家吃饭。", "summary": "公园散步"},
    {"text": "The meeting moved to Friday because the room was booked.", "summary": "Meeting on Friday"},
    {"text": "本文研究了深度学习在图像识别中的应用，提出了一种新的网络结构。", "summary": "深度学习图像识别"},
    {
        "text": "Prices rose by three percent in March, the fastest rise this year.",
        "summary": "Prices rise 3%",
    },
]


@pytest.fixture(scope="module")
def char_tokenizer():
    """One token per character of the en + zh texts, with <mask> and 16 sentinels."""
    texts = [EN, ZH, *INPUTS, *(p["text"] + p["summary"] for p in PAIRS)] + data_lines(
        "text/luxun.txt", limit=40
    )
    return train_tokenizer(iter(texts), kind="char", special_tokens=SPECIALS, show_progress=False)


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-t5-v1.1", "tiny-bart"])
def test_training_loss_equals_transformers_labels_loss(preset, tiny_tokenizer, tmp_path, one_thread):
    llm = tiny_seq2seq(preset, tiny_tokenizer)
    hf = AutoModelForSeq2SeqLM.from_pretrained(llm.save(tmp_path / "model"), dtype=torch.float32).eval()
    tok = llm.tokenizer
    inputs = [tok.encode(t) for t in INPUTS[:6]]
    outputs = [tok.encode(t, add_special_tokens=False)[:12] + [tok.eos_id] for t in reversed(INPUTS[:6])]
    batch = pad_batch(
        inputs, outputs, pad_id=llm.config.pad_token_id, start_id=llm.config.decoder_start_token_id
    )
    assert (batch["targets"] == IGNORE_INDEX).any() and (batch["attention_mask"] == 0).any()  # both padded
    with torch.no_grad():
        ours = seq2seq_loss(llm.model, batch)
        theirs = hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["targets"]
        ).loss
    assert abs(float(ours) - float(theirs)) <= 1e-5, (float(ours), float(theirs))


@pytest.mark.parametrize("text", [EN, ZH])
def test_span_corruption_hides_15_percent_in_ordered_sentinels_and_reconstructs(char_tokenizer, text):
    tok = char_tokenizer
    sentinels = [tok.token_to_id(f"<extra_id_{k}>") for k in range(16)]
    ids = tok.encode(text, add_special_tokens=False)
    generator = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(20):
        inputs, target = span_corrupt(ids, sentinels, tok.eos_id, generator)
        noise, spans = span_counts(len(ids))
        assert noise == round(0.15 * len(ids)) and spans == round(noise / 3)
        assert inputs[-1] == target[-1] == tok.eos_id
        used = [t for t in inputs if t in sentinels]
        assert used == sentinels[:spans] == [t for t in target if t in sentinels]  # in order, once each
        assert len(target) - 1 - spans == noise  # the target spells out exactly the hidden tokens
        lengths.append(noise / spans)
        # each sentinel in the input stands for the target's span after the same sentinel
        spelled = {}
        for t in target[:-1]:
            if t in sentinels:
                current = spelled.setdefault(t, [])
            else:
                current.append(t)
        rebuilt = [piece for t in inputs[:-1] for piece in (spelled[t] if t in sentinels else [t])]
        assert tok.decode(rebuilt) == text
    assert 2.5 <= sum(lengths) / len(lengths) <= 3.5  # spans of 3 tokens on average (rounded counts)


def test_text_infilling_hides_30_percent_in_poisson_spans_and_targets_the_original(char_tokenizer):
    tok = char_tokenizer
    mask = tok.token_to_id("<mask>")
    generator = torch.Generator().manual_seed(0)
    ids = list(range(1000, 1200))  # distinct ids: each span's length can be read back from the gaps
    span_lengths = []
    for _ in range(100):
        out = text_infill(ids, mask, generator)
        visible = [t for t in out if t != mask]
        assert len(visible) == len(ids) - 60 and visible == sorted(visible)  # 30 % hidden, order kept
        assert all(not (a == b == mask) for a, b in zip(out, out[1:], strict=False))  # one <mask> per span
        previous = 999
        for i, t in enumerate(out):
            if t == mask:
                following = next((u for u in out[i + 1 :] if u != mask), 1200)
                span_lengths.append(following - previous - 1)
            else:
                previous = t
    mean = sum(span_lengths) / len(span_lengths)
    assert 2.6 < mean < 3.4, mean  # Poisson(3)
    assert 0 in span_lengths  # a length-0 span inserts a <mask>, as BART's does
    # the objective's target is the original text (zh), its input the infilled one
    zh = tok.encode(ZH, add_special_tokens=False)
    inputs = text_infill(zh, mask, generator)
    assert mask in inputs and len([t for t in inputs if t != mask]) == len(zh) - round(0.3 * len(zh))


@pytest.fixture(scope="module")
def shards(char_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("s2s-shards")
    docs = [EN, ZH] * 30  # repeated: a few steps learn it
    prepare_corpus(iter(docs), char_tokenizer, folder, val_fraction=0.1, show_progress=False)
    return folder


@pytest.mark.parametrize(("arch", "objective"), [("tiny-t5", "span"), ("tiny-bart", "denoise")])
def test_pretraining_from_scratch_lowers_the_loss(
    shards, char_tokenizer, arch, objective, tmp_path, one_thread
):
    train = {"max_steps": 20, "micro_batch_size": 4, "block_size": 48, "lr": 1e-2, "warmup_steps": 2,
             "eval_every": 20, "eval_batches": 1, "progress": False, "out_dir": str(tmp_path / "run")}  # fmt: skip
    result = pretrain(shards, arch=arch, objective=objective, train=train)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    llm = LLM.load(result.model_dir)
    # the model's ids follow the trained tokenizer (T5 starts the decoder from pad, BART from eos)
    assert llm.config.vocab_size == char_tokenizer.vocab_size
    assert llm.config.decoder_start_token_id == char_tokenizer.pad_id
    assert isinstance(llm.generate_text("今天天气", max_length=4), str)
    task = CorruptionObjective(TokenShards(shards), char_tokenizer, llm.model, objective, 2, 48)
    batch = task.train_batch(3, 0, 1)
    assert torch.equal(task.train_batch(3, 0, 1)["input_ids"], batch["input_ids"])  # a pure function of step
    assert batch["input_ids"].shape[1] <= 48 and batch["decoder_ids"].shape[1] <= 48


def test_pretraining_objectives_refuse_the_wrong_model_shape(shards, tmp_path):
    train = {"max_steps": 1, "out_dir": str(tmp_path / "run"), "progress": False}
    with pytest.raises(LmforgeError, match="trains encoder–decoders"):
        pretrain(shards, arch="tiny-llama", objective="span", train=train)
    with pytest.raises(LmforgeError, match="--objective span"):
        pretrain(shards, arch="tiny-t5", objective="lm", train=train)


@pytest.fixture(scope="module")
def t5_folder(tiny_tokenizer, tmp_path_factory):
    return tiny_seq2seq("tiny-t5", tiny_tokenizer).save(tmp_path_factory.mktemp("t5") / "model")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "train.jsonl"
    path.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in PAIRS * 4) + "\n", encoding="utf-8")
    return path


def test_lora_wraps_encoder_decoder_and_cross_attention(t5_folder, tmp_path):
    llm = LLM.load(t5_folder, dtype="float32", device="cpu")
    choose_trainable(llm.model, "lora", 1, LoRAConfig(rank=2, targets=["q_proj", "v_proj"]))
    wrapped = set(lora_layers(llm.model))
    for stack, kinds in (("encoder", ["attn"]), ("decoder", ["attn", "cross"])):
        for i in range(2):
            assert {f"{stack}.blocks.{i}.{k}.{p}" for k in kinds for p in ("q_proj", "v_proj")} <= wrapped
    trainable = [n for n, p in llm.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    # the adapters' PEFT names are transformers' T5 modules
    hf = AutoModelForSeq2SeqLM.from_pretrained(t5_folder, dtype=torch.float32)
    modules = dict(hf.named_modules())
    assert all(hf_module_name(name, llm.config) in modules for name in wrapped)
    assert (
        hf_module_name("decoder.blocks.1.cross.q_proj", llm.config)
        == "decoder.block.1.layer.1.EncDecAttention.q"
    )
    with torch.no_grad():  # adapters that change something, saved in PEFT's layout and read back
        for layer in lora_layers(llm.model).values():
            layer.lora_B.weight.normal_()
    reloaded = LLM.load(t5_folder, dtype="float32", device="cpu").model
    load_adapter(reloaded, save_adapter(llm.model, tmp_path / "adapter"))
    ours, theirs = llm.model.state_dict(), reloaded.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # PEFT itself puts the adapters on transformers' T5 (its seq2seq wrapper) and computes our logits
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert type(peft_model).__name__ == "PeftModelForSeq2SeqLM"
    ids = torch.tensor([llm.tokenizer.encode("今天天气很好 and the sun")])
    decoder = torch.tensor([[llm.config.decoder_start_token_id, 5, 9, 3]])
    with torch.no_grad():
        adapted, _ = llm.model(ids, decoder_ids=decoder)
        theirs_logits = peft_model(input_ids=ids, decoder_input_ids=decoder).logits
    assert (adapted - theirs_logits).abs().max().item() <= 1e-4
    frozen = LLM.load(t5_folder, dtype="float32", device="cpu")
    choose_trainable(frozen.model, "freeze", 1, None)
    trainable = {n for n, p in frozen.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("decoder.blocks.1.", "decoder.norm.")) for n in trainable)


def test_finetune_summarize_teacher_forces_the_output(t5_folder, pairs_file, tmp_path, one_thread):
    llm = LLM.load(t5_folder, dtype="float32", device="cpu")
    data = load_pairs(pairs_file, llm.tokenizer, 64)
    tok = llm.tokenizer
    assert data.input_ids[0] == tok.encode(PAIRS[0]["text"])  # encoded as generation encodes it
    assert data.targets[0] == tok.encode("公园散步", add_special_tokens=False) + [tok.eos_id]
    for method in ("full", "freeze"):
        result = finetune(
            llm if method == "full" else str(t5_folder), pairs_file, task="summarize", method=method,
            val_split=0.25, train={"max_steps": 12, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                                   "eval_every": 6, "progress": False, "out_dir": str(tmp_path / method)},
        )  # fmt: skip
        assert result.losses[-1] < result.losses[0]
        tuned = LLM.load(result.model_dir)
        assert all(isinstance(s, str) for s in tuned.summarize([PAIRS[0]["text"], PAIRS[1]["text"]]))
    with pytest.raises(LmforgeError, match="encoder–decoder"):
        finetune(str(t5_folder), pairs_file, task="classify", train={"out_dir": str(tmp_path / "c")})


def test_finetune_summarize_cli_on_a_tiny_t5_with_chinese(
    t5_folder, pairs_file, tmp_path, capsys, one_thread
):
    out = tmp_path / "run"
    argv = ["finetune", str(t5_folder), "--data", str(pairs_file), "--task", "summarize", "--method", "lora",
            "--lora-rank", "4", "--max-steps", "6", "--micro-batch-size", "4", "--lr", "0.003",
            "--warmup-steps", "1", "--eval-every", "3", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "adapter" / "adapter_config.json").exists()
    tuned = LLM.load(out / "model")
    assert isinstance(tuned.summarize(["今天天气很好，我们一起去公园散步。"], max_length=8)[0], str)
    assert isinstance(tuned.generate_text("本文研究了深度学习", max_length=6), str)
    report = tmp_path / "report"
    argv = ["eval", str(out / "model"), "--task", "summarize", "--data", str(pairs_file), "--out", str(report),
            "--no-compile", "--limit", "4"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "rougeL" in (report / "report.json").read_text(encoding="utf-8")
    argv = ["finetune", str(t5_folder), "--data", str(pairs_file), "--task", "summarize", "--packing",
            "--out", str(tmp_path / "p")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--packing" in lines[0], lines


def test_summarize_cuts_an_input_longer_than_the_encoder_with_a_warning(t5_folder, one_thread):
    llm = LLM.load(t5_folder, dtype="float32", device="cpu")
    long = ZH * 12
    assert len(llm.tokenizer.encode(long)) > llm.config.block_size
    with pytest.warns(UserWarning, match="1 of 2 texts were longer than the encoder's 128 tokens"):
        summaries = llm.summarize([long, PAIRS[0]["text"]], max_length=4)
    assert len(summaries) == 2 and all(isinstance(t, str) for t in summaries)
