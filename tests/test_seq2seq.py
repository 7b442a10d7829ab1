"""Encoder–decoders (T5 v1.0 / v1.1, BART) against transformers' ``AutoModelForSeq2SeqLM`` (fp32, random weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from lmforge import LLM, Config
from lmforge.seq2seq import Seq2SeqTransformer

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
    from lmforge.seq2seq import right_pad

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


def test_cached_decoding_equals_the_full_forward(pair, one_thread):
    llm, _, _ = pair
    model = llm.model
    ids, mask = _batch(llm, INPUTS[5:8])
    decoder = torch.randint(0, llm.config.vocab_size, (3, 10))
    with torch.no_grad():
        full, _ = model(ids, attention_mask=mask, decoder_ids=decoder)
        memory = model.memory(model.encode(ids, mask))
        from lmforge.seq2seq import padding_mask

        cache = model.new_cache(3, 10)
        first = model.decode(decoder[:, :4], memory, padding_mask(mask, model.dtype), cache)
        steps = [
            model.decode(decoder[:, t : t + 1], memory, padding_mask(mask, model.dtype), cache)
            for t in range(4, 10)
        ]
    assert (torch.cat([first, *steps], dim=1) - full).abs().max().item() <= 1e-4


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


@pytest.mark.parametrize("preset", PRESETS)
def test_config_round_trip_and_parameter_count(preset):
    config = Config.from_name(preset)
    assert Config.from_hf(config.to_hf(), name=preset) == config
    assert Seq2SeqTransformer(config).num_parameters() == config.num_parameters()
