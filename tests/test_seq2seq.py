"""Encoder–decoders (T5 v1.0 / v1.1, BART) against transformers' ``AutoModelForSeq2SeqLM`` (fp32, random weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from lmforge import LLM, Config, beam
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model import shell_device
from lmforge.seq2seq import Seq2SeqTransformer, padding_mask, right_pad
from lmforge.serve import create_app
from lmforge.store import Store

from .conftest import SAMPLE_TEXT

INPUTS = SAMPLE_TEXT + [
    "Summarize: the meeting moved to Friday because the room was booked.",
    "Translate to French: good morning",
    "今天天气很好，我们一起去公园散步。",
    "人工智能正在改变世界。",
    "学习编程的第一步是什么？",
]
PRESETS = ["tiny-bart", "tiny-t5", "tiny-t5-v1.1"]


def tiny_seq2seq(preset: str, tokenizer, seed: int = 0) -> LLM:
    torch.manual_seed(seed)
    config = Config.from_name(
        preset,
        eos_token_id=tokenizer.eos_id,
        bos_token_id=tokenizer.bos_id,
        pad_token_id=tokenizer.pad_id,
        decoder_start_token_id=tokenizer.pad_id,
    )
    model = Seq2SeqTransformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:  # wider than the init: peaked attention, outputs that vary with the input
                p.normal_(0.0, 0.2 if p.dim() == 2 else 0.05)
        if config.logits_bias:
            model.logits_bias.normal_(0.0, 0.1)
    return LLM(model, tokenizer, source=preset)


def end_on_a_common_token(llm: LLM) -> None:
    """Make a token that about half the greedy outputs hold a second end id: random weights rarely pick the
    tokenizer's, and the comparison should see outputs that end as well as ones that run to the limit."""
    outputs = [set(c.token_ids[1:]) for c in llm.complete(INPUTS, max_new_tokens=10)]
    counts = {t: sum(t in out for out in outputs) for out in outputs for t in out}
    common = min(sorted(counts), key=lambda t: abs(counts[t] - len(INPUTS) / 2))
    llm.config.eos_token_id = [llm.tokenizer.eos_id, common]


@pytest.fixture(scope="module", params=PRESETS)
def pair(request, tiny_tokenizer, tmp_path_factory):
    llm = tiny_seq2seq(request.param, tiny_tokenizer)
    end_on_a_common_token(llm)
    folder = llm.save(tmp_path_factory.mktemp(request.param) / "model")
    hf = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    return llm, hf, folder


def _batch(llm, texts):
    return right_pad([llm.tokenizer.encode(t) for t in texts], llm.config.pad_token_id)


def test_logits_match_transformers(pair, one_thread):
    llm, hf, _ = pair
    ids, mask = _batch(llm, INPUTS[:4])
    decoder = torch.randint(0, llm.config.vocab_size, (4, 9))
    decoder[:, 0] = llm.config.decoder_start_token_id
    with torch.no_grad():
        ours, loss = llm.model(ids, decoder[:, 1:], attention_mask=mask, decoder_ids=decoder[:, :-1])
        theirs = hf(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=decoder[:, :-1],
            labels=decoder[:, 1:].contiguous(),
        )
    assert (ours - theirs.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - theirs.loss.item()) <= 1e-5


def test_mbart_logits_match_transformers(tiny_tokenizer, tmp_path, one_thread):
    """mBART: BART's parts, pre-norm, a norm after each stack, scaled embeddings."""
    llm = tiny_seq2seq("tiny-mbart", tiny_tokenizer)
    hf = AutoModelForSeq2SeqLM.from_pretrained(llm.save(tmp_path / "mbart"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "MBartForConditionalGeneration"
    ids, mask = _batch(llm, INPUTS[6:9])
    decoder = torch.randint(0, llm.config.vocab_size, (3, 7))
    with torch.no_grad():
        ours, _ = llm.model(ids, attention_mask=mask, decoder_ids=decoder)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    assert ours.std() > 0.5 and (ours - theirs).abs().max().item() <= 1e-4


def test_cached_decoding_matches_transformers(pair, one_thread):
    """The decoder fed in pieces through its KV cache (cross-attention keys and values computed once) gives
    the logits of our full forward and of transformers' forward."""
    llm, hf, _ = pair
    model = llm.model
    ids, mask = _batch(llm, INPUTS[5:8])
    decoder = torch.randint(0, llm.config.vocab_size, (3, 10))
    with torch.no_grad():
        full, _ = model(ids, attention_mask=mask, decoder_ids=decoder)
        memory = model.memory(model.encode(ids, mask))
        cache = model.new_cache(3, 10)
        first = model.decode(decoder[:, :4], memory, padding_mask(mask, model.dtype), cache)
        steps = [
            model.decode(decoder[:, t : t + 1], memory, padding_mask(mask, model.dtype), cache)
            for t in range(4, 10)
        ]
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    cached = torch.cat([first, *steps], dim=1)
    assert (cached - full).abs().max().item() <= 1e-4
    assert (cached - theirs).abs().max().item() <= 1e-4


def _theirs(hf, llm, text, new, **options):
    ids = torch.tensor([llm.tokenizer.encode(text)])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=llm.eos_ids,
            pad_token_id=llm.config.pad_token_id,
            decoder_start_token_id=llm.config.decoder_start_token_id,
            **options,
        )
    return out[0, 1:].tolist()


@pytest.mark.parametrize("beams", [1, 4])
def test_generation_identical_to_transformers(pair, beams, one_thread):
    llm, hf, _ = pair
    ours = llm.complete(INPUTS, max_new_tokens=10, num_beams=beams)  # one batch, right-padded inputs
    ended = 0
    for text, completion in zip(INPUTS, ours, strict=True):
        theirs = _theirs(hf, llm, text, 10, num_beams=beams)
        theirs_end = theirs[len(completion.token_ids) : len(completion.token_ids) + 1]
        ended_on = theirs_end if completion.finish_reason == "stop" and theirs_end[0] in llm.eos_ids else []
        tokens = completion.token_ids + ended_on
        assert tokens + [llm.config.pad_token_id] * (len(theirs) - len(tokens)) == theirs, text
        ended += completion.finish_reason == "stop"
    assert 0 < ended < len(INPUTS)  # both ways of ending were compared


def test_folder_round_trip_keeps_outputs(pair, one_thread):
    llm, _, folder = pair
    again = LLM.load(folder, dtype="float32", device="cpu")
    assert again.config == llm.config.replace(name="model")  # a folder names its model
    texts = ["床前明月光，", "Hello there"]
    assert again.generate_text(texts, 8, num_beams=2) == llm.generate_text(texts, 8, num_beams=2)


@pytest.mark.parametrize("preset", [*PRESETS, "tiny-mbart", "t5-small", "bart-base"])
def test_config_round_trip_and_parameter_count(preset):
    config = Config.from_name(preset)
    assert Config.from_hf(config.to_hf(), name=preset) == config
    with shell_device():  # shapes only: the full-size presets would take seconds to initialise
        assert Seq2SeqTransformer(config).num_parameters() == config.num_parameters()


@pytest.fixture(scope="module")
def t5(tiny_tokenizer):
    return tiny_seq2seq("tiny-t5", tiny_tokenizer, seed=1)


def test_summarize_and_stream_give_the_output_itself(t5, one_thread):
    text = "今天天气很好，我们一起去公园散步。"
    output = t5.generate_text(text, 12)
    assert t5.summarize(text, max_length=12) == output.strip()
    assert "".join(t5.stream(text, 12)) == output
    with pytest.raises(LmforgeError, match="an encoder–decoder summarizes the text alone"):
        t5.summarize(text, examples=[("a", "b")])


def test_the_store_holds_an_encoder_decoder(t5, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    Store().put(t5.save(tmp_path / "t5"), "tiny-t5:v1")
    stored = LLM.load("tiny-t5:v1", dtype="float32", device="cpu")
    assert stored.config.is_seq2seq
    assert stored.generate_text("人工智能是", 8, num_beams=3) == t5.generate_text(
        "人工智能是", 8, num_beams=3
    )


def test_cli_generate_prints_the_output_alone(t5, tmp_path, capsys):
    folder = t5.save(tmp_path / "t5")
    argv = ["--threads", "1", "generate", str(folder), "-p", "床前明月光，", "--max-tokens", "6", "--quiet"]
    assert main([*argv, "--no-compile"]) == 0
    assert capsys.readouterr().out == t5.generate_text("床前明月光，", 6) + "\n"
    assert main([*argv, "--no-compile", "--chat"]) == 2
    err = capsys.readouterr().err
    assert "encoder–decoder without a chat template" in err and err.count("\n") == 1
    assert main(["estimate", str(folder)]) == 2
    assert "t5 is an encoder–decoder" in capsys.readouterr().err
    assert main(["info", str(folder), "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "t5 encoder–decoder (2 + 2 layers" in out and "relative (32 buckets" in out


def test_bad_input_is_one_line(t5, monkeypatch):
    with pytest.raises(LmforgeError, match="without a chat template") as caught:
        t5.chat("你好")
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(beam, "available_bytes", lambda device: 1 << 16)
    with pytest.raises(LmforgeError, match=r"beam search over 24 rows \(prompts x beams\)") as caught:
        t5.generate_text(["a"] * 6, 32, num_beams=4)
    assert "fewer beams" in caught.value.hint
    with pytest.raises(LmforgeError, match="an encoder–decoder: lmforge serve runs decoder-only"):
        create_app(t5)


def test_export_hf_loads_in_transformers(t5, tmp_path, one_thread):
    folder = t5.export(tmp_path / "hf", dtype="f32")
    hf = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = _batch(t5, INPUTS[:2])
    decoder = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        ours, _ = t5.model(ids, attention_mask=mask, decoder_ids=decoder)
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    assert (ours - theirs).abs().max().item() <= 1e-4  # GGUF: tests/test_gguf_t5.py
