"""Beam search against transformers' ``generate(num_beams=...)`` on random tiny decoders (fp32), and its bounds."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge import beam
from lmforge.beam import BeamParams, banned_ngram_tokens
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.serve import create_app

from .conftest import SAMPLE_TEXT, tiny_llm
from .serving import serving

PROMPTS = SAMPLE_TEXT + [
    "Beam search keeps the likeliest",
    "Once upon a time",
    "今天天气很好，我们一起去",
    "人工智能是",
    "学习编程的第一步是",
]


EOS_SCALE = {"tiny-gpt2": 20.0, "tiny-llama": 2.0}  # found by trying: some prompts end early, some do not


@pytest.fixture(scope="module", params=sorted(EOS_SCALE))
def pair(request, tiny_tokenizer, tmp_path_factory):
    """(lmforge LLM, transformers model) with the same random weights; the end id made likely enough that
    some beams end on it, so both the length limit and the end id are exercised."""
    llm = tiny_llm(request.param, tiny_tokenizer, seed=3)
    with torch.no_grad():
        llm.model.lm_head.weight[tiny_tokenizer.eos_id] *= EOS_SCALE[request.param]
    folder = llm.save(tmp_path_factory.mktemp(request.param) / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return llm, hf


def _theirs(hf, llm, prompt: str, new: int, **options) -> list[int]:
    ids = torch.tensor([llm.tokenizer.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=llm.tokenizer.pad_id,
            eos_token_id=llm.eos_ids,
            **options,
        )
    return out[0, ids.shape[1] :].tolist()


def _ours_as_theirs(completion, llm, length: int) -> list[int]:
    """Our tokens as transformers returns them: the end id kept, then padding to the batch's length."""
    tokens = completion.token_ids + ([llm.tokenizer.eos_id] if completion.finish_reason == "stop" else [])
    return tokens + [llm.tokenizer.pad_id] * (length - len(tokens))


@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 4},
        {"num_beams": 3, "length_penalty": 0.5, "no_repeat_ngram_size": 2, "early_stopping": True},
        {"num_beams": 2, "length_penalty": 2.0, "early_stopping": "never", "repetition_penalty": 1.3},
    ],
    ids=["4-beams", "3-beams-options", "2-beams-never"],
)
def test_beams_identical_to_transformers(pair, options, one_thread):
    llm, hf = pair
    # All ten prompts with transformers' defaults; five (en, zh, code) for each set of options, to save time.
    prompts = PROMPTS if options == {"num_beams": 4} else PROMPTS[::2]
    ours = llm.complete(prompts, max_new_tokens=10, **options)  # one batch, left-padded
    ended = 0
    for prompt, completion in zip(prompts, ours, strict=True):
        theirs = _theirs(hf, llm, prompt, 10, **options)
        assert _ours_as_theirs(completion, llm, len(theirs)) == theirs, prompt
        ended += completion.finish_reason == "stop"
    if options == {"num_beams": 4}:
        assert 0 < ended < len(prompts)  # both ways of ending were compared


def test_beams_return_sequences_best_first(pair, one_thread):
    llm, _ = pair
    found = llm.complete_beams(
        ["床前明月光，", "Hello"], max_new_tokens=6, num_beams=4, num_return_sequences=3
    )
    assert [len(f) for f in found] == [3, 3]
    greedy_beam = llm.complete(["床前明月光，"], max_new_tokens=6, num_beams=4)[0]
    assert found[0][0].token_ids == greedy_beam.token_ids
    assert len({tuple(c.token_ids) for c in found[0]}) == 3  # distinct hypotheses


def test_one_beam_is_greedy(pair, one_thread):
    llm, _ = pair
    assert llm.complete(PROMPTS[:3], max_new_tokens=8, num_beams=1) == llm.complete(
        PROMPTS[:3], max_new_tokens=8
    )


def test_banned_ngrams():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 1], 2) == [2]
    assert banned_ngram_tokens([1], 3) == []


@pytest.mark.parametrize(
    "options, named",
    [
        ({"num_beams": 0}, "num_beams=0"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences=3"),
        ({"num_beams": 2, "early_stopping": "soon"}, "early_stopping='soon'"),
        ({"num_beams": 2, "temperature": 0.7}, "beam search does not sample"),
    ],
)
def test_bad_beam_settings_are_one_line(pair, options, named):
    llm, _ = pair
    with pytest.raises(LmforgeError, match=named) as caught:
        llm.complete(["Hi"], max_new_tokens=4, **options)
    assert "\n" not in str(caught.value)


def test_beams_over_the_memory_estimate_are_one_line(pair, monkeypatch):
    llm, _ = pair
    monkeypatch.setattr(beam, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(LmforgeError, match=r"beam search over 32 rows \(prompts x beams\)") as caught:
        llm.complete(["Hi"] * 8, max_new_tokens=64, num_beams=4)
    assert "\n" not in str(caught.value) and "fewer beams" in caught.value.hint
    assert BeamParams(num_beams=4).num_beams == 4


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return tiny_llm("tiny-llama", tiny_tokenizer, seed=3)


def test_server_best_of_runs_beams_and_returns_the_best_n(tiny, one_thread):
    app = create_app(tiny, max_batch=4)
    prompts = ["Once upon a time", "床前明月光，"]
    with serving(app) as base:
        body = {"prompt": prompts, "max_tokens": 8, "temperature": 0, "best_of": 3, "n": 2}
        answer = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        refused = [
            httpx.post(f"{base}/v1/completions", json={**body, **change}, timeout=60)
            for change in ({"temperature": 1}, {"n": 4}, {"stream": True})
        ]
    expected = tiny.complete_beams(prompts, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert [c["text"] for c in answer["choices"]] == [c.text for found in expected for c in found]
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert answer["usage"]["completion_tokens"] == sum(len(c.token_ids) for found in expected for c in found)
    for response, named in zip(
        refused, ["temperature to 0", "n=4 must be at most best_of=3", "cannot stream"], strict=True
    ):
        assert response.status_code == 400
        assert named in response.json()["error"]["message"]


def test_cli_generate_num_beams_prints_the_best_beam(tiny, tmp_path, capsys):
    folder = tiny.save(tmp_path / "model")
    argv = ["--threads", "1", "generate", str(folder), "-p", "床前明月光，", "--max-tokens", "6", "--quiet"]
    assert main([*argv, "--num-beams", "3", "--no-compile"]) == 0
    expected = tiny.complete(["床前明月光，"], max_new_tokens=6, num_beams=3)[0].text
    assert capsys.readouterr().out == "床前明月光，" + expected + "\n"
    assert main([*argv, "--num-beams", "2", "--temperature", "0.5"]) == 2
    assert "beam search does not sample" in capsys.readouterr().err
