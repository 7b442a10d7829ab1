"""The OpenAI-compatible server against the official `openai` client: formats, greedy parity with the library,
continuous batching, limits and faults. SmolLM2 where real text matters, a tiny random model for load."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import psutil
import pytest
import torch
from torch._dynamo.utils import counters

from lmforge import LLM, SamplingParams
from lmforge.cli import build_parser
from lmforge.generate import generate_tokens
from lmforge.model import SlotKVCache
from lmforge.prefix_cache import PrefixCache
from lmforge.serve import ServerLimits, create_app
from lmforge.serve import scheduler as scheduling
from lmforge.serve.scheduler import Scheduler

from .conftest import tiny_llm
from .serving import serving, wait_until

ENGLISH = ["The capital of France is", "Once upon a time, in a small village by the sea,"]
CHINESE = ["床前明月光，", "今天天气很好，我们一起去"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "用一句话介绍北京。"},
    ],
]


def _client(base: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=120)


def _splits_characters(llm: LLM, token_ids: list[int]) -> bool:
    """Whether some token of the output is only part of a UTF-8 character (what streaming must not cut)."""
    return any("\ufffd" in llm.tokenizer.decode([t]) for t in token_ids)


@pytest.fixture(scope="module")
def smol(smollm2):
    # packed: float32 batches, each stream equal to its solo run (auto's bf16 batch steps: test_quant.py's
    # test_smollm2_batch_step_in_bf16_stays_within_rounding_of_the_float32_step)
    app = create_app(smollm2, max_batch=8, batch_weights="packed")
    with serving(app) as base:
        yield smollm2, _client(base), base, app


# --------------------------------------------------------------------- formats and parity (SmolLM2)
@pytest.mark.parametrize("prompt", [ENGLISH[0], CHINESE[0]])
def test_completion_greedy_equals_generate_text_and_counts_usage(smol, prompt):
    llm, client, _, _ = smol
    result = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0)
    expected = llm.complete([prompt], max_new_tokens=16)[0]  # generate_text's text, with the token ids
    assert result.choices[0].text == expected.text
    assert result.choices[0].finish_reason == expected.finish_reason
    assert result.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert result.usage.completion_tokens == len(expected.token_ids)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_server_and_batched_complete_apply_the_repetition_penalty_alike(smol):
    """Two paths, one job: the scheduler (prompt + output as seen tokens) and a left-padded ``complete`` batch."""
    llm, client, _, _ = smol
    prompts = [ENGLISH[0], CHINESE[0]]  # different lengths: the shorter one is padded in the batch
    expected = llm.complete(prompts, max_new_tokens=16, repetition_penalty=1.3)
    for prompt, want in zip(prompts, expected, strict=True):
        result = client.completions.create(
            model="smollm2",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            extra_body={"repetition_penalty": 1.3},
        )
        assert result.choices[0].text == want.text


@pytest.mark.parametrize("messages", CHATS, ids=["en", "zh"])
def test_chat_stream_concatenates_to_the_non_stream_answer(smol, messages):
    llm, client, _, _ = smol
    answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    expected = llm.complete([messages], max_new_tokens=16)[0]
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(llm.prompt_ids(messages))
    assert answer.usage.completion_tokens == len(expected.token_ids)
    if messages is CHATS[1]:
        assert _splits_characters(llm, expected.token_ids)  # the stream really has characters to keep whole
    stream = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, roles, reasons, usages = [], [], [], []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            pieces += [choice.delta.content] if choice.delta.content else []
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 3
    assert "".join(pieces) == answer.choices[0].message.content
    assert roles == ["assistant"]
    assert reasons == [answer.choices[0].finish_reason]
    # The same counts, but for the prompt tokens the prefix cache supplied the second time (test_prefix_cache.py).
    assert [u.model_copy(update={"prompt_tokens_details": None}) for u in usages] == [
        answer.usage.model_copy(update={"prompt_tokens_details": None})
    ]


def test_n_sequences_are_seeded_like_generate_text(smol):
    llm, client, _, _ = smol
    options = dict(model="smollm2", prompt=ENGLISH[1], n=2, max_tokens=10, temperature=0.9, seed=7)
    first = client.completions.create(**options, extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1]
    assert texts[0] != texts[1]
    # Sequence i samples with seed + i, so the first equals the library's seeded sampling (reproducible).
    assert texts[0] == llm.generate_text(
        ENGLISH[1], max_length=10, temperature=0.9, seed=7, stop_on_eos=False
    )
    assert first.usage.completion_tokens == 20
    assert first.usage.prompt_tokens == len(llm.tokenizer.encode(ENGLISH[1]))


def test_stop_string_cuts_the_text(smol):
    llm, client, _, _ = smol
    full = llm.generate_text(ENGLISH[0], max_length=20)
    stop = full.split()[2]
    result = client.completions.create(
        model="smollm2", prompt=ENGLISH[0], max_tokens=20, temperature=0, stop=[stop]
    )
    assert result.choices[0].text == full[: full.index(stop)]
    assert result.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("messages", CHATS, ids=["en", "zh"])
def test_chat_logprobs_come_from_the_step_that_picked_the_token(smol, messages):
    llm, client, _, _ = smol
    result = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    # The tokens' bytes rebuild the text, even where a token is half a Chinese character (a character cut
    # by max_tokens is dropped from the text, so its bytes may be left over at the end).
    rebuilt = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert rebuilt.rstrip("\ufffd") == result.choices[0].message.content
    with torch.no_grad():
        logits, _ = llm.model(torch.tensor([llm.prompt_ids(messages)]))
    assert abs(content[0].logprob - logits[0, -1].float().log_softmax(-1).max().item()) < 1e-4


def test_completion_logprobs_in_the_legacy_format(smol):
    _, client, _, _ = smol
    result = client.completions.create(
        model="smollm2", prompt=ENGLISH[0], max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == result.usage.completion_tokens
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == result.choices[0].text


def test_embeddings_match_llm_embed(smol):
    llm, client, _, _ = smol
    texts = ["hello world", "你好，世界"]
    expected = llm.embed(texts)
    # Left alone, the openai client asks for base64 and decodes it; "float" gets plain lists.
    for options in ({}, {"encoding_format": "float"}):
        result = client.embeddings.create(model="smollm2", input=texts, **options)
        vectors = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
        assert np.allclose(vectors, expected, atol=1e-5)
    assert result.usage.prompt_tokens == sum(len(llm.tokenizer.encode(t)) for t in texts)


def test_eight_concurrent_streams_each_equal_their_solo_greedy_output(smol):
    llm, client, _, app = smol
    prompts = [
        *ENGLISH,
        *CHINESE,
        "The three primary colors are",
        "中国的首都是",
        "def fibonacci(n):",
        "人工智能是",
    ]
    scheduler = app.state.scheduler
    most_running = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most_running
        while not done.is_set():
            most_running = max(most_running, scheduler.running)
            time.sleep(0.002)

    def stream(prompt: str) -> str:
        chunks = client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(stream, prompts))
    finally:
        done.set()
        watcher.join()
    assert most_running >= 4  # they really were decoded together
    for prompt, text in zip(prompts, results, strict=True):
        assert text == llm.generate_text(prompt, max_length=8), prompt


def test_classify_and_summarize_endpoints_call_the_tasks_api(smol):
    llm, _, base, _ = smol
    texts, labels = (
        ["I love this film, it is wonderful!", "这部电影太糟糕了，浪费时间。"],
        ["positive", "negative"],
    )
    r = httpx.post(base + "/v1/classify", json={"input": texts, "labels": labels}, timeout=120)
    assert r.status_code == 200
    expected = llm.classify_text(texts, labels=labels)
    assert [d["label"] for d in r.json()["data"]] == [e["label"] for e in expected]
    text = "The city council approved a new park near the river on Monday."
    r = httpx.post(base + "/v1/summarize", json={"input": text, "max_tokens": 8}, timeout=120)
    assert r.status_code == 200
    assert r.json()["summary"] == llm.summarize(text, max_length=8)


def test_models_health_and_metrics(smol):
    llm, client, base, _ = smol
    models = client.models.list().data
    assert len(models) == 1 and models[0].model_extra["max_model_len"] == llm.config.block_size
    assert httpx.get(base + "/health").json()["status"] == "ok"
    metrics = httpx.get(base + "/metrics").text
    values = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")
    }
    assert values["lmforge_generated_tokens_total"] > 0
    assert values["lmforge_running_sequences"] == 0 and values["lmforge_queue_depth"] == 0
    assert values["lmforge_time_to_first_token_seconds_count"] > 0
    assert (
        values['lmforge_request_latency_seconds_bucket{le="+Inf"}']
        == values["lmforge_request_latency_seconds_count"]
    )
    assert "lmforge_tokens_per_second" in values


# ------------------------------------------------------------------------------ scheduling (tiny model)
TEXTS = [
    "The quick brown fox",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "a",
    "def hello():\n    return",
    "To be, or not to be",
]


def _iterate(
    scheduler: Scheduler, arrivals: dict[int, list[tuple[list[int], SamplingParams]]], watch=None
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Run the scheduler's rounds in this thread, submitting ``arrivals[i]`` before round i: deterministic joins.

    Returns each job's tokens (in submission order) and the slot cache's (slots, columns) after every round;
    ``watch(round)`` runs after each round.
    """
    tokens: list[list[int] | None] = []
    errors: list[Exception] = []
    shapes: list[tuple[int, int]] = []

    def listener(key: int):
        def on_event(event) -> None:
            if event.error is not None:
                errors.append(event.error)
            elif event.completion is not None:
                tokens[key] = event.completion.token_ids

        return on_event

    with torch.inference_mode():
        for i in range(1000):
            for prompt, params in arrivals.get(i, []):
                tokens.append(None)
                scheduler.submit(prompt, params, on_event=listener(len(tokens) - 1))
            busy = scheduler.queue_depth or scheduler.running or scheduler._prefilling
            if not busy and i > max(arrivals):
                break
            if busy:
                assert scheduler._iteration()
            if scheduler._cache is not None:
                shapes.append((scheduler._cache.slots, scheduler._cache.max_len))
            if watch is not None:
                watch(i)
    assert not errors, errors
    assert all(t is not None for t in tokens)
    return tokens, shapes  # type: ignore[return-value]


def _solo(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    return [int(t) for t in generate_tokens(llm.model, [prompt], params)]


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [("tiny-gpt2", {}), ("tiny-qwen2", {}), ("tiny-llama", {"sliding_window": 12})],
    ids=["learned-positions", "qwen2", "sliding-window"],
)
def test_slot_rows_joining_at_different_steps_decode_as_if_alone(
    one_thread, tiny_tokenizer, preset, overrides, monkeypatch
):
    """Sequences that join and leave the slot cache at different steps, prefilled in chunks, while the cache
    grows and shrinks in slots and columns, get exactly their solo tokens (eager steps)."""
    monkeypatch.setattr(scheduling, "COLUMN_BUCKET", 16)  # columns grow (and shrink) within the tiny context
    llm = tiny_llm(preset, tiny_tokenizer, **overrides)
    prompts = [tiny_tokenizer.encode(t) for t in TEXTS]
    budgets = [30, 12, 40, 25, 18]
    params = [SamplingParams(max_new_tokens=b, stop_on_eos=False) for b in budgets]
    scheduler = Scheduler(llm, max_batch=4, prefill_chunk=8)  # the 2nd prompt takes 3 chunks
    arrivals = {0: [(prompts[0], params[0])], 3: [(prompts[1], params[1])], 5: [(prompts[2], params[2])]}
    arrivals |= {6: [(prompts[3], params[3])], 20: [(prompts[4], params[4])]}
    tokens, shapes = _iterate(scheduler, arrivals)
    assert tokens == [_solo(llm, p, sp) for p, sp in zip(prompts, params, strict=True)]
    slots, columns = {s for s, _ in shapes}, {c for _, c in shapes}
    assert slots == {1, 2, 4} and {16, 48} <= columns  # rows and columns grew and shrank by buckets


def test_rows_picking_tokens_differently_in_one_step_each_get_their_solo_tokens(one_thread, tiny_tokenizer):
    """Greedy rows take their tokens from one argmax over the step's logits; a greedy row with a repetition
    penalty and a seeded sampled row pick their own. In one batch (en and zh prompts), each gets its solo
    tokens."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    prompts = [tiny_tokenizer.encode(t) for t in TEXTS[:4]]
    params = [
        SamplingParams(max_new_tokens=14, stop_on_eos=False),
        SamplingParams(max_new_tokens=14, stop_on_eos=False, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=14, stop_on_eos=False, temperature=0.9, seed=3),
        SamplingParams(max_new_tokens=9, stop_on_eos=False),
    ]
    jobs = list(zip(prompts, params, strict=True))
    tokens, _ = _iterate(Scheduler(llm, max_batch=4), {0: jobs})
    assert tokens == [_solo(llm, p, sp) for p, sp in jobs]
    assert tokens[1] != _solo(llm, prompts[1], params[0])  # the penalty changed that row's tokens


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_prompts_arriving_together_prefill_in_one_pass_and_decode_as_if_alone(
    one_thread, tiny_tokenizer, preset
):
    """Five prompts (en, zh) arrive in one round while another decodes, two of them sharing a start a prefix cache
    holds (so their caches begin at different lengths): one forward pass prefills all five, and every sequence
    gets its solo tokens."""
    llm = tiny_llm(preset, tiny_tokenizer)
    prompts = [tiny_tokenizer.encode(t) for t in TEXTS]
    shared = tiny_tokenizer.encode("To be, or not to be, that is the question: 床前明月光，")
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    scheduler = Scheduler(llm, max_batch=8, prefix_cache=PrefixCache(llm.model, 1 << 24, 4))
    passes: list[int] = []  # rows of each prefill pass
    llm.model.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    burst = [(p, params) for p in [shared + prompts[0], *prompts[1:4], shared + prompts[1]]]
    arrivals = {0: [(shared + prompts[2], params)], 2: burst}
    tokens, _ = _iterate(scheduler, arrivals)
    assert passes == [1, 5]
    assert scheduler.prefix_cache.stats.hits >= 2
    expected = [_solo(llm, p, sp) for p, sp in arrivals[0] + burst]
    assert tokens == expected


def test_compiled_slot_steps_equal_eager_tokens_and_compile_once_per_bucket(
    one_thread, tiny_tokenizer, monkeypatch
):
    """1, then 3, then 5 sequences through the compiled step: their solo (eager ``generate_tokens``) tokens,
    one graph per slot bucket, none for a new number of columns."""
    monkeypatch.setattr(scheduling, "COLUMN_BUCKET", 16)
    llm = tiny_llm("tiny-llama", tiny_tokenizer, sliding_window=12)
    prompts = [tiny_tokenizer.encode(t) for t in TEXTS]
    params = [SamplingParams(max_new_tokens=10 + 4 * i, stop_on_eos=False) for i in range(5)]
    jobs = list(zip(prompts, params, strict=True))
    five = [(p, SamplingParams(max_new_tokens=40, stop_on_eos=False)) for p in prompts]  # past 3 buckets
    arrivals = {0: jobs[:1], 30: jobs[:3], 80: five}
    expected = [_solo(llm, p, sp) for p, sp in arrivals[0] + arrivals[30] + arrivals[80]]  # eager
    llm.model.compile_decode = True
    scheduler = Scheduler(llm, max_batch=8, prefill_chunk=8)
    graphs = counters["stats"]["unique_graphs"]
    compiled_at: dict[int, list[int]] = {}  # slots -> rounds whose step compiled a graph

    def watch(round: int) -> None:
        nonlocal graphs
        now = counters["stats"]["unique_graphs"]
        if now > graphs and scheduler._cache is not None:
            compiled_at.setdefault(scheduler._cache.slots, []).append(round)
        graphs = now

    tokens, shapes = _iterate(scheduler, arrivals, watch)
    assert tokens == expected
    slots = {s for s, _ in shapes}
    assert {1, 4, 8} <= slots <= {1, 2, 4, 8}
    assert all(len(rounds) == 1 for rounds in compiled_at.values()), compiled_at  # never recompiled
    assert set(compiled_at) <= slots
    assert len({c for s, c in shapes if s == 8}) > 1  # the 8-slot graph ran at several column counts


def test_a_long_prompt_is_prefilled_between_decode_steps(one_thread, tiny_tokenizer):
    """While a prompt of 7 chunks prefills, the running sequence gets a token every round; the newcomer's
    answer equals its one-shot prefill's (``generate_tokens`` prefills 100 tokens in one pass)."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    short = tiny_tokenizer.encode(TEXTS[0])
    long = (tiny_tokenizer.encode(" ".join(TEXTS)) * 4)[:100]
    params = SamplingParams(max_new_tokens=20, stop_on_eos=False)
    scheduler = Scheduler(llm, max_batch=4, prefill_chunk=16, prefill_pause_s=None)
    seen: list[tuple[int, int]] = []  # (tokens of the running sequence, prompt tokens prefilled) per round

    def watch(round: int) -> None:
        if scheduler._prefilling:
            running = scheduler._running[0].builder.tokens
            seen.append((len(running), scheduler._prefilling[0].done))

    tokens, _ = _iterate(scheduler, {0: [(short, params)], 3: [(long, params)]}, watch)
    assert [done for _, done in seen] == [16, 32, 48, 64, 80, 96]  # then the last 4 tokens, and it joins
    produced = [n for n, _ in seen]
    assert produced == list(range(produced[0], produced[0] + 6))  # one token per round, no stall
    assert tokens == [_solo(llm, short, params), _solo(llm, long, params)]


def test_prefill_rounds_take_about_the_pause_while_sequences_decode(one_thread, tiny_tokenizer):
    """Prompt tokens cost 2 ms each here (at most 500/s): with a 0.1 s pause a round prefills 32 (the least)
    to 50 tokens while a sequence decodes, and the whole chunk when none does."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    llm.model.register_forward_pre_hook(lambda module, args: time.sleep(0.002 * args[0].shape[1]))
    long = (tiny_tokenizer.encode(" ".join(TEXTS)) * 4)[:100]
    params = SamplingParams(max_new_tokens=25, stop_on_eos=False)
    scheduler = Scheduler(llm, max_batch=4, prefill_chunk=64, prefill_pause_s=0.1)
    chunks: list[tuple[int, int]] = []  # (running sequences, prompt tokens prefilled) per round
    done = 0

    def watch(round: int) -> None:
        nonlocal done
        now = scheduler._prefilling[0].done if scheduler._prefilling else 0
        if now > done:
            chunks.append((scheduler.running, now - done))
        done = now

    short = tiny_tokenizer.encode(TEXTS[0])
    tokens, _ = _iterate(scheduler, {0: [(long, params)], 10: [(short, params)], 12: [(long, params)]}, watch)
    assert chunks[0] == (0, 64)  # alone: a whole chunk (the other 36 tokens join in the next round)
    assert len(chunks) >= 3 and all(running == 2 and 32 <= n <= 50 for running, n in chunks[1:]), chunks
    assert tokens == [_solo(llm, p, params) for p in (long, short, long)]


def test_a_round_that_grows_the_cache_prefills_less(one_thread, tiny_tokenizer, monkeypatch):
    """Room for a prompt is made in the first round that can finish it, before that round's prefill, and the
    time it took comes off the round's pause: with prompt tokens at 2 ms each and a 0.12 s pause, rounds
    prefill about 58 tokens, but the round whose resize took 0.06 s only the least (32); the prompt joins
    without a resize of its own."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    llm.model.register_forward_pre_hook(lambda module, args: time.sleep(0.002 * args[0].shape[1]))
    resize = SlotKVCache.resize
    now = 0  # the round running
    resized: list[int] = []  # the rounds that resized the cache

    def slow_resize(cache: SlotKVCache, slots: int, columns: int) -> dict[int, int]:
        time.sleep(0.06)
        resized.append(now)
        return resize(cache, slots, columns)

    monkeypatch.setattr(SlotKVCache, "resize", slow_resize)
    long = (tiny_tokenizer.encode(" ".join(TEXTS)) * 4)[:100]
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    scheduler = Scheduler(llm, max_batch=4, prefill_chunk=128, prefill_pause_s=0.12)
    chunks: dict[int, int] = {}  # round -> tokens of the second prompt it prefilled
    joined_at = -1
    done = 0

    def watch(round: int) -> None:
        nonlocal now, done, joined_at
        prefilled = scheduler._prefilling[0].done if scheduler._prefilling else len(long) if done else 0
        if round >= 3 and prefilled > done:
            chunks[round] = prefilled - done
        done = prefilled if scheduler._prefilling else 0
        if joined_at < 0 and scheduler.running == 2:
            joined_at = round
        now = round + 1

    tokens, _ = _iterate(scheduler, {0: [(long, params)], 3: [(long, params)]}, watch)
    assert tokens == [_solo(llm, long, params)] * 2
    grew = [r for r in resized if 3 <= r <= joined_at]  # (the first prompt's end shrinks it later)
    assert len(grew) == 1 and joined_at == max(chunks), (resized, chunks)  # 1 -> 2 slots
    assert chunks[grew[0]] == min(32, chunks[grew[0]] + sum(n for r, n in chunks.items() if r > grew[0])), (
        chunks
    )
    assert all(n > 40 for r, n in chunks.items() if r < grew[0]), chunks


def _slow_tiny(tiny_tokenizer, seconds_per_step: float) -> LLM:
    """A tiny model whose every forward pass (prefill) and decode step takes at least ``seconds_per_step``:
    timing made predictable."""
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    model = llm.model
    model.register_forward_pre_hook(lambda module, args: time.sleep(seconds_per_step))
    step = model.decode_step

    def slow_step(idx: torch.Tensor, cache) -> torch.Tensor:
        time.sleep(seconds_per_step)
        return step(idx, cache)

    model.decode_step = slow_step  # what decode_step_function hands out for an eager model
    return llm


def test_a_short_request_finishes_while_a_long_one_runs(one_thread, tiny_tokenizer):
    llm = _slow_tiny(tiny_tokenizer, 0.01)
    with serving(create_app(llm, max_batch=4)) as base:
        client = _client(base)
        finished: dict[str, float] = {}
        texts: dict[str, str] = {}
        started = threading.Event()

        def run(name: str, max_tokens: int) -> None:
            chunks = client.completions.create(
                model="tiny",
                prompt="To be, or not to be",
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            pieces = []
            for chunk in chunks:
                started.set()
                pieces += [c.text for c in chunk.choices]
            texts[name], finished[name] = "".join(pieces), time.monotonic()

        long = threading.Thread(target=run, args=("long", 100))
        long.start()
        assert started.wait(30)
        run("short", 5)
        long.join()
    assert finished["short"] < finished["long"]
    expected = llm.generate_text("To be, or not to be", max_length=100, stop_on_eos=False)
    assert texts["long"] == expected
    assert texts["short"] == llm.generate_text("To be, or not to be", max_length=5, stop_on_eos=False)


# ------------------------------------------------------------------------------------ limits (tiny model)
def test_api_key_body_size_context_and_field_errors(one_thread, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    origin = "http://localhost:5173"
    app = create_app(
        llm,
        api_key="sekret",
        limits=ServerLimits(max_body_bytes=20_000),
        max_context=64,
        max_batch=4,
        cors_origins=[origin],
    )
    with serving(app) as base:
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        r = httpx.options(base + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        with pytest.raises(openai.AuthenticationError):
            _client(base, api_key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(base + "/health").status_code == 200  # only /v1 needs the key

        client = _client(base, api_key="sekret")
        auth = {"Authorization": "Bearer sekret", "Content-Type": "application/json"}
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None

        big = json.dumps({"prompt": "x" * 30_000}).encode()
        r = httpx.post(base + "/v1/completions", content=big, headers=auth)
        assert r.status_code == 413 and "20000 bytes" in r.json()["error"]["message"]
        # Without a Content-Length header (chunked), the body is measured as it arrives.
        r = httpx.post(base + "/v1/completions", content=iter([big[:15_000], big[15_000:]]), headers=auth)
        assert r.status_code == 413

        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model="tiny", prompt=[7] * 60, max_tokens=10)
        message = error.value.body["message"]
        assert "60 tokens" in message and "max_tokens=10" in message and "64 tokens" in message
        assert error.value.body["code"] == "context_length_exceeded"

        r = httpx.post(base + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": ', headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": "many"}, headers=auth)
        assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
        r = httpx.post(base + "/v1/chat/completions", json={"messages": []}, headers=auth)
        assert r.status_code == 422
        for bad in ({"n": 9}, {"top_p": 1.5}, {"presence_penalty": 0.5}, {"min_p": 2.0}):
            r = httpx.post(base + "/v1/completions", json={"prompt": "hi", **bad}, headers=auth)
            assert r.status_code in (400, 422), bad
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(base + "/v1/nothing", headers=auth).status_code == 404


def test_full_queue_gets_429_and_a_cancelled_stream_frees_its_slot(one_thread, tiny_tokenizer):
    llm = _slow_tiny(tiny_tokenizer, 0.05)  # the long request holds its slot for 6 s
    app = create_app(llm, max_batch=1, max_queue=1)
    scheduler = app.state.scheduler
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 120, "stream": True}) as long:
            lines = long.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)  # the long request holds the only slot
            queued = ThreadPoolExecutor(1).submit(http.post, "/v1/completions", json=body)
            wait_until(lambda: scheduler.queue_depth == 1, what="the second request to queue")
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        # Leaving the stream frees the slot; the queued request then runs and answers correctly.
        answer = queued.result(timeout=60)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["text"] == llm.generate_text(
            "hello", max_length=3, stop_on_eos=False
        )
        wait_until(lambda: scheduler.running == 0, what="the slots to be free")


def test_timeouts_give_504_or_an_error_event_and_free_the_slot(one_thread, tiny_tokenizer):
    llm = _slow_tiny(tiny_tokenizer, 0.02)
    app = create_app(llm, request_timeout_s=0.5)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100, "ignore_eos": True}
    with serving(app) as base:
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        stream = _client(base).completions.create(
            model="tiny", prompt="hello", max_tokens=100, stream=True, extra_body={"ignore_eos": True}
        )
        with pytest.raises(openai.APIError, match="timeout"):
            for _ in stream:
                pass
        wait_until(lambda: app.state.scheduler.running == 0, what="the timed-out slots to be freed")


# ------------------------------------------------------------------------------ faults (a real process)
def test_cli_serves_this_machine_only_by_default():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.max_batch) == ("127.0.0.1", 8000, None, 8)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _fault_client(
    http: httpx.AsyncClient, i: int, prompts: list[str], expected: dict[str, str]
) -> None:
    """Client ``i`` of the mix: valid (plain or streamed), malformed JSON, oversize, or gone mid-stream."""
    prompt = prompts[i % len(prompts)]
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    kind = i % 5
    if kind == 0:
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[prompt]
    elif kind == 1:
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]) == expected[prompt]
    elif kind == 2:
        r = await http.post(
            "/v1/completions", content=b'{"prompt": [1, 2,', headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    elif kind == 3:
        r = await http.post("/v1/completions", json={**body, "prompt": "hello world " * 100})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    else:
        long = {**body, "max_tokens": 100, "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/completions", json=long) as r:
            async for _ in r.aiter_lines():
                break  # hang up after the first piece


# Idle connections are dropped before the server's 5 s keep-alive ends, so a request never goes out on a
# connection the server is closing at that moment.
KEEPALIVE_S = 2.0


async def _mixed_load(base: str, n: int, prompts: list[str], expected: dict[str, str]) -> None:
    limits = httpx.Limits(max_connections=n, keepalive_expiry=KEEPALIVE_S)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        await asyncio.gather(*(_fault_client(http, i, prompts, expected) for i in range(n)))


async def _valid_requests(base: str, count: int, prompts: list[str]) -> None:
    gate = asyncio.Semaphore(16)
    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_S)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:

        async def one(i: int) -> None:
            async with gate:
                r = await http.post(
                    "/v1/completions", json={"prompt": prompts[i % len(prompts)], "max_tokens": 2}
                )
                assert r.status_code == 200

        await asyncio.gather(*(one(i) for i in range(count)))


def test_faults_never_harm_valid_requests_and_memory_stays_flat(one_thread, tiny_tokenizer, tmp_path):
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "tiny")
    llm = LLM.load(folder)
    prompts = [
        "The quick brown fox",
        "床前明月光，疑是地上霜。",
        "To be, or not to be",
        "我们今天去北京",
        "def hello():",
    ]
    expected = {p: llm.generate_text(p, max_length=8) for p in prompts}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "serve", str(folder), "--port", str(port), "--max-batch", "8"],
            stdout=log,
            stderr=subprocess.STDOUT,
            # One intra-op thread: a tiny model's matrices are too small to share, and on a busy machine
            # the threads' hand-offs make each step several times slower.
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        wait_until(lambda: _healthy(base), timeout=120, what="the server process to start")
        asyncio.run(_mixed_load(base, 64, prompts, expected))
        # The clients that hung up left no sequence behind.
        wait_until(
            lambda: "lmforge_running_sequences 0" in httpx.get(base + "/metrics").text, what="idle slots"
        )
        assert "lmforge_queue_depth 0" in httpx.get(base + "/metrics").text

        process = psutil.Process(server.pid)
        asyncio.run(_valid_requests(base, 100, prompts))
        after_100 = process.memory_info().rss
        asyncio.run(_valid_requests(base, 900, prompts))
        after_1000 = process.memory_info().rss
        assert after_1000 <= 1.10 * after_100, (after_100, after_1000)
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
