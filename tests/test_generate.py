"""Sampling against transformers' logits processors; streaming, stop strings, batching and the KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge import LmforgeError, SamplingParams
from lmforge.generate import (
    TextStream,
    apply_repetition_penalty,
    argmax_rows,
    complete,
    decode_step_function,
    filter_logits,
    generate_tokens,
    left_pad,
    prefill,
    prefill_rows,
)

from .conftest import tiny_llm


def _hf_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    out = TemperatureLogitsWarper(params.temperature)(ids, logits)
    if params.top_k is not None:
        out = TopKLogitsWarper(params.top_k)(ids, out)
    if params.min_p is not None:
        out = MinPLogitsWarper(params.min_p)(ids, out)
    if params.top_p is not None:
        out = TopPLogitsWarper(params.top_p)(ids, out)
    return out


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.7, top_k=20),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=1.3, min_p=0.05),
        dict(temperature=0.8, top_k=50, top_p=0.5),
    ],
)
def test_filters_keep_the_same_tokens_as_transformers(options):
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 3
    params = SamplingParams(**options)
    ours, theirs = filter_logits(logits, params), _hf_filter(logits, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    assert torch.allclose(ours[kept], theirs[kept])


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(2, 100)
    seen = torch.randint(0, 100, (2, 15))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), theirs)


def test_invalid_sampling_settings_name_the_problem():
    with pytest.raises(LmforgeError, match="top_p=1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(LmforgeError, match="unknown generation option 'topk'"):
        SamplingParams.from_kwargs(topk=3)


def test_seed_makes_sampling_reproducible(tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    a = llm.generate_text("hello", max_length=20, temperature=1.0, seed=7)
    b = llm.generate_text("hello", max_length=20, temperature=1.0, seed=7)
    c = llm.generate_text("hello", max_length=20, temperature=1.0, seed=8)
    assert a == b
    assert a != c


def test_argmax_rows_is_torch_argmax():
    """Greedy picks (numpy's argmax on a CPU) agree with torch.argmax: the first of ties, NaN as the largest."""
    logits = torch.randn(6, 49152, generator=torch.Generator().manual_seed(0))
    logits[1, [7, 9000]] = 50.0  # a tie: the first wins
    logits[2, 123] = float("nan")
    logits[3] = float("-inf")
    logits[4, [5, 6]] = float("inf")
    picked = argmax_rows(logits)
    assert picked.dtype == torch.int64 and torch.equal(picked, logits.argmax(dim=-1))
    assert picked[1] == 7 and picked[2] == 123
    assert torch.equal(argmax_rows(logits[:, ::2]), logits[:, ::2].argmax(dim=-1))  # a strided view


def test_top_k_1_is_greedy(tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    greedy = llm.generate_text("床前明月光", max_length=15)
    assert llm.generate_text("床前明月光", max_length=15, temperature=1.0, top_k=1, seed=3) == greedy


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-qwen2"])
def test_batched_left_padded_equals_one_at_a_time(preset, tiny_tokenizer):
    llm = tiny_llm(preset, tiny_tokenizer)
    prompts = ["The quick brown fox", "床前明月光，疑是地上霜。举头", "a", "def hello():\n    return"]
    batched = llm.complete(prompts, max_new_tokens=16, stop_on_eos=False)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = llm.complete([prompt], max_new_tokens=16, stop_on_eos=False)[0]
        assert result.token_ids == alone.token_ids


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-qwen2"])
def test_cached_generation_equals_full_recompute(preset, tiny_tokenizer):
    llm = tiny_llm(preset, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("To be, or not to be")
    params = SamplingParams(max_new_tokens=20)
    cached = [int(t) for t in generate_tokens(llm.model, [prompt], params)]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits, _ = llm.model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert cached == ids[len(prompt) :]


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_compiled_decode_step_equals_eager_and_full_recompute(preset, tiny_tokenizer):
    """The torch.compile'd step over a StaticKVCache (the default for loaded models) picks the same tokens as
    eager decoding and as recomputing the whole sequence, for a left-padded batch with a Chinese prompt, with a
    sliding window shorter than the sequence, and with a prompt longer than one prefill chunk."""
    llm = tiny_llm(preset, tiny_tokenizer, sliding_window=12 if preset == "tiny-llama" else None)
    prompts = [tiny_tokenizer.encode(t) for t in ("To be, or not to be", "明月几时有？把酒问青天。")]
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    llm.model.compile_decode = False
    eager = torch.stack(list(generate_tokens(llm.model, prompts, params)), 1).tolist()
    llm.model.compile_decode = True
    compiled = torch.stack(list(generate_tokens(llm.model, prompts, params)), 1).tolist()
    assert compiled == eager
    for prompt, tokens in zip(prompts, compiled, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(llm.model(torch.tensor([ids]))[0][0, -1].argmax()))
        assert tokens == ids[len(prompt) :]
    long_prompt = prompts[0] * 8  # > the prefill chunk set below: prefilled in 3 pieces
    whole = [int(t) for t in generate_tokens(llm.model, [long_prompt], params)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lmforge.generate.PREFILL_CHUNK", 17)
        chunked = [int(t) for t in generate_tokens(llm.model, [long_prompt], params)]
    assert chunked == whole
    # Dynamo looks up and checks guards on the first step of a generation only (CompiledStep): twice for two
    # generations one after the other, on every step when two of them (two graphs: batch 2, 1) take turns.
    checked = []
    step = decode_step_function(llm.model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "_checked_step", lambda idx, cache: checked.append(1) or step.step(idx, cache))
        assert [int(t) for t in generate_tokens(llm.model, [long_prompt], params)] == whole
        assert torch.stack(list(generate_tokens(llm.model, prompts, params)), 1).tolist() == compiled
        assert len(checked) == 2
        pair, single = (
            generate_tokens(llm.model, prompts, params),
            generate_tokens(llm.model, [long_prompt], params),
        )
        turns = [(next(pair), next(single)) for _ in range(12)]
    assert torch.stack([p for p, _ in turns], 1).tolist() == compiled
    assert [int(s) for _, s in turns] == whole
    assert len(checked) == 2 + 2 * 11  # 12 tokens: the first from the prefill, 11 steps each


def test_context_limit_stops_generation(tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    prompt = (tiny_tokenizer.encode("hello world " * 60) * 2)[:120]
    assert len(prompt) == 120
    result = complete(
        llm.model, tiny_tokenizer, [prompt], SamplingParams(max_new_tokens=50, stop_on_eos=False)
    )[0]
    assert len(result.token_ids) == llm.config.block_size - 120
    assert result.finish_reason == "length"
    with pytest.raises(LmforgeError, match="does not fit the model's context of 128 tokens"):
        complete(llm.model, tiny_tokenizer, [[1] * 128], SamplingParams(max_new_tokens=5))


@pytest.mark.parametrize(
    "text", ["😀🦆 emoji ✈️ end", "中文流式输出，不能有乱码。", "mixed 混合 text 🙂 文本"]
)
def test_stream_never_splits_a_character(text, tiny_tokenizer):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    # Multi-byte characters really are split across tokens in this byte-level vocabulary.
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)
    stream = TextStream(tiny_tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stream_drops_partial_character_at_length_cut(tiny_tokenizer):
    ids = tiny_tokenizer.encode("好😀", add_special_tokens=False)
    stream = TextStream(tiny_tokenizer)
    pieces = [stream.push(i) for i in ids[:-1]] + [stream.finish()]
    assert "".join(pieces) == "好"


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello world. END and more", ["END"], "Hello world. "),
        ("第一句。\n\n第二句。", ["\n\n"], "第一句。"),
        ("no stop here", ["STOP"], "no stop here"),
        ("abcSTOsTOP", ["STOP", "sT"], "abcSTO"),
    ],
)
def test_stop_strings_cut_and_are_never_shown(text, stop, expected, tiny_tokenizer):
    stream = TextStream(tiny_tokenizer, stop)
    pieces = []
    for i in tiny_tokenizer.encode(text, add_special_tokens=False):
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    if not stream.stopped:
        pieces.append(stream.finish())
    assert "".join(pieces) == expected
    assert stream.text == expected


def _prefers_token_zero(tiny_tokenizer):
    """A tiny GPT-2 whose every position predicts token 0 (<|endoftext|>) first and token 1 a close second:
    the final LayerNorm outputs the same vector everywhere, so the logits are the head's column 0."""
    llm = tiny_llm("tiny-gpt2", tiny_tokenizer)
    model = llm.model
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()
        model.norm.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0  # tied with the embeddings: only column 0 is changed
        model.lm_head.weight[0, 0] = 1.0
        model.lm_head.weight[1, 0] = 0.9
    return llm


def test_repetition_penalty_ignores_left_padding(tiny_tokenizer):
    """A padded row must generate what its prompt generates alone: the pad ids (0) are not "seen" tokens.
    Penalised, token 0 (1.0 / 1.3 = 0.77) loses to token 1 (0.9), so penalising the padding changes the answer."""
    llm = _prefers_token_zero(tiny_tokenizer)
    short, long = [5, 6], [7, 8, 9, 10, 11, 12]
    params = SamplingParams(max_new_tokens=4, repetition_penalty=1.3)
    alone = [torch.stack(list(generate_tokens(llm.model, [p], params)))[:, 0].tolist() for p in (short, long)]
    assert alone[0][0] == 0  # the model's greedy choice, with no 0 in the prompt
    batch = torch.stack(list(generate_tokens(llm.model, [short, long], params)))  # (steps, B)
    assert batch.T.tolist() == alone


@pytest.mark.parametrize(
    ("preset", "overrides"), [("tiny-gpt2", {}), ("tiny-llama", {"sliding_window": 12})], ids=str
)
def test_chunked_prefill_equals_one_shot(preset, overrides, tiny_tokenizer):
    """A left-padded batch prefilled 16 tokens at a time leaves the keys, values and last logits of one pass."""
    llm = tiny_llm(preset, tiny_tokenizer, **overrides)
    model = llm.model
    long = (tiny_tokenizer.encode("To be, or not to be, that is the question. 床前明月光，") * 4)[:90]
    ids, mask = left_pad([long, long[:7]], pad_id=0)
    caches = [model.new_cache(2, ids.shape[1]) for _ in range(2)]
    with torch.inference_mode():
        whole = prefill(model, ids, mask, caches[0], chunk=ids.shape[1])
        chunked = prefill(model, ids, mask, caches[1], chunk=16)
    assert torch.allclose(chunked, whole, atol=1e-5)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert caches[1].length == ids.shape[1]


@pytest.mark.parametrize(
    ("preset", "overrides"), [("tiny-gpt2", {}), ("tiny-llama", {"sliding_window": 12})], ids=str
)
def test_rows_prefilled_together_equal_each_alone(preset, overrides, tiny_tokenizer):
    """Prompts of different lengths, each with a different number of tokens already cached (0 for a new one),
    continued in one pass (the server's burst of arrivals): every row's last logits and keys and values equal
    its own prefill's, in English and Chinese, and with a sliding window shorter than the rows."""
    llm = tiny_llm(preset, tiny_tokenizer, **overrides)
    model = llm.model
    texts = (
        "To be, or not to be, that is the question.",
        "床前明月光，疑是地上霜。举头望明月",
        "a b",
        "明月",
    )
    prompts = [tiny_tokenizer.encode(t) * 2 for t in texts]
    cached = [9, 0, 3, 0]  # tokens each row's cache holds before the pass
    with torch.inference_mode():
        alone, together = [], []
        for prompt, had in zip(prompts, cached, strict=True):
            cache = model.new_cache(1, len(prompt))
            alone.append((prefill(model, torch.tensor([prompt]), None, cache)[0], cache))
            cache = model.new_cache(1, len(prompt))
            if had:
                prefill(model, torch.tensor([prompt[:had]]), None, cache)
            together.append(cache)
        pieces = [prompt[had:] for prompt, had in zip(prompts, cached, strict=True)]
        logits = prefill_rows(model, together, pieces)
    for row, (expected, cache) in enumerate(alone):
        assert torch.allclose(logits[row], expected, atol=1e-5), row
        assert together[row].length == len(prompts[row])
        for a, b in zip(cache.keys + cache.values, together[row].keys + together[row].values, strict=True):
            assert torch.allclose(a, b, atol=1e-5), row
