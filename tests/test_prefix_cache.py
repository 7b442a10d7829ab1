"""Prefix caching: outputs equal uncached ones (padded batches, rows joining a running batch, packed weights,
SmolLM2 in English and Chinese through the server), ``cached_tokens`` counts the shared full blocks, the
memory stays under the budget, and eviction is least recently used, leaves first."""

from __future__ import annotations

import random

import httpx
import openai
import pytest
import torch

from lmforge import SamplingParams
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.generate import complete, generate_tokens
from lmforge.prefix_cache import PrefixCache
from lmforge.quant import quantize_model
from lmforge.serve import create_app
from lmforge.serve.scheduler import Scheduler

from .conftest import tiny_llm
from .serving import serving

BLOCK = 16
GREEDY = SamplingParams(max_new_tokens=12, stop_on_eos=False)
NEW = 8  # SmolLM2's new tokens per answer


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(5, 500) for _ in range(n)]


def _tokens(llm, prompts, params=GREEDY, cache=None) -> list[list[int]]:
    return [c.token_ids for c in _completions(llm, prompts, params, cache)]


def _completions(llm, prompts, params, cache):
    return complete(llm.model, llm.tokenizer, prompts, params, llm.eos_ids, prefix_cache=cache)


def _held_bytes(cache: PrefixCache) -> int:
    return sum(t.nbytes for t in cache._blocks.values())


@pytest.fixture
def tiny(one_thread, tiny_tokenizer):
    return tiny_llm("tiny-llama", tiny_tokenizer)


# ------------------------------------------------------------------ generate: exact reuse
def test_padded_batches_reuse_blocks_and_decode_as_uncached(tiny):
    """Rows of different lengths (left-padded) share a 40-token head: the second batch starts from a column
    inside the rows' cached blocks, the third from more of them; every output equals the uncached one."""
    rng = random.Random(0)
    head = _random_tokens(rng, 40)
    prompts = [head + _random_tokens(rng, k) for k in (3, 20, 7)]
    expected = _tokens(tiny, prompts)
    cache = PrefixCache(tiny.model, 1 << 24, BLOCK)
    assert _tokens(tiny, prompts[:1], cache=cache) == expected[:1]
    assert (
        cache.stats.hits == 0 and cache.stats.blocks == 2
    )  # 43 tokens: 2 full blocks (not the last token's)
    assert _tokens(tiny, prompts, cache=cache) == expected
    # Padding (17, 0, 13) + cached (32, 32, 32): the batch goes on from column 32 = the longest row's reach.
    assert cache.stats.hits == 3 and cache.stats.hit_tokens == 15 + 32 + 19
    assert _tokens(tiny, prompts, cache=cache) == expected
    assert cache.stats.hit_tokens == 66 + 28 + 45 + 32  # the longest row now has 3 blocks, reaching 45


def test_packed_int8_prompts_reuse_blocks_exactly(tiny):
    """Packed layers (bf16 kernel below ``GEMM_ROWS`` rows): prompts prefilled alone give their uncached
    tokens whether their head came from the cache or not. (A padded batch of more rows would take the GEMM
    path uncached and the kernel cached: two roundings, so only solo prompts are compared bit for bit.)"""
    quantize_model(tiny.model, "int8")
    rng = random.Random(6)
    head = _random_tokens(rng, 48)
    prompts = [head + _random_tokens(rng, k) for k in (5, 11, 2)]
    expected = [_tokens(tiny, [p])[0] for p in prompts]
    cache = PrefixCache(tiny.model, 1 << 24, BLOCK)
    assert [_tokens(tiny, [p], cache=cache)[0] for p in prompts] == expected
    assert cache.stats.hit_tokens == 2 * 48


def test_the_last_prompt_token_is_always_computed(tiny):
    """A prompt of exactly two blocks reuses one: the block holding its last token is never taken."""
    prompt = _random_tokens(random.Random(1), 2 * BLOCK)
    expected = _tokens(tiny, [prompt])
    cache = PrefixCache(tiny.model, 1 << 24, BLOCK)
    for _ in range(2):
        assert _tokens(tiny, [prompt], cache=cache) == expected
    assert cache.stats.blocks == 1 and cache.stats.hit_tokens == BLOCK


def _scale_in_place(attn: torch.nn.Module) -> None:
    attn.k_proj.weight.mul_(1.5)


def _new_storage(attn: torch.nn.Module) -> None:
    attn.k_proj.weight.data = attn.k_proj.weight.data * 1.5  # no registration: only its storage tells


def _new_module(attn: torch.nn.Module) -> None:
    old = attn.k_proj
    attn.k_proj = torch.nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)


@pytest.mark.parametrize("change", [_scale_in_place, _new_storage, _new_module], ids=lambda f: f.__name__[1:])
def test_changed_weights_empty_the_cache(tiny, change):
    """Training or a merged adapter writes weights in place, ``.data`` swaps their storage, an adapter replaces a
    module: stale keys and values are never reused."""
    prompt = _random_tokens(random.Random(2), 40)
    cache = PrefixCache(tiny.model, 1 << 24, BLOCK)
    _tokens(tiny, [prompt], cache=cache)
    assert _tokens(tiny, [prompt], cache=cache) == _tokens(tiny, [prompt]) and cache.stats.hits == 1
    with torch.no_grad():
        change(tiny.model.blocks[0].attn)
    assert _tokens(tiny, [prompt], cache=cache) == _tokens(tiny, [prompt])
    assert cache.stats.hits == 1


def test_rows_sharing_a_prefix_join_a_running_batch_as_if_alone(tiny):
    """A's prompt is prefilled, A decodes; B (A's first 40 tokens, then its own) arrives and takes A's two
    blocks from the cache while A runs: both decode in one batch to their solo, uncached tokens."""
    rng = random.Random(3)
    a = _random_tokens(rng, 45)
    b = a[:40] + _random_tokens(rng, 9)
    expected = [[int(t) for t in generate_tokens(tiny.model, [p], GREEDY)] for p in (a, b)]
    cache = PrefixCache(tiny.model, 1 << 24, BLOCK)
    scheduler = Scheduler(tiny, max_batch=4, prefill_chunk=64, prefill_pause_s=None, prefix_cache=cache)
    out: dict[int, list[int]] = {}

    def on_event(key):
        def record(event):
            assert event.error is None, event.error
            if event.completion is not None:
                out[key] = event.completion.token_ids

        return record

    together = 0
    with torch.inference_mode():
        job_a = scheduler.submit(a, GREEDY, on_event=on_event(0))
        for _ in range(3):
            scheduler._iteration()
        job_b = scheduler.submit(b, GREEDY, on_event=on_event(1))
        while scheduler.running or scheduler._prefilling or scheduler.queue_depth:
            scheduler._iteration()
            together = max(together, scheduler.running)
    assert together == 2
    assert (job_a.cached_tokens, job_b.cached_tokens) == (0, 2 * BLOCK)
    assert [out[0], out[1]] == expected


# ------------------------------------------------------------------ memory bound and LRU
def test_memory_stays_under_the_budget_across_500_distinct_prefixes(tiny):
    block_bytes = 2 * tiny.config.n_layer * tiny.config.n_kv_head * BLOCK * tiny.config.head_dim * 4
    budget = 10 * block_bytes + block_bytes // 2
    cache = PrefixCache(tiny.model, budget, BLOCK)
    rng = random.Random(4)
    params = SamplingParams(max_new_tokens=1)
    for _ in range(500):
        _tokens(tiny, [_random_tokens(rng, rng.randrange(17, 70))], params, cache)
        assert cache.bytes_in_use == _held_bytes(cache) <= budget
    assert cache.stats.evictions > 0 and cache.stats.blocks == 10


def test_eviction_takes_the_least_recently_used_block_leaves_first(tiny):
    tok = random.Random(5)
    a, b, c, d = (_random_tokens(tok, BLOCK + 1) for _ in range(4))  # one cacheable block each
    block_bytes = 2 * tiny.config.n_layer * tiny.config.n_kv_head * BLOCK * tiny.config.head_dim * 4
    cache = PrefixCache(tiny.model, 3 * block_bytes, BLOCK)

    def cached(prompt: list[int]) -> int:
        kv = tiny.model.new_cache(1, len(prompt))
        return cache.reuse(kv, [prompt], len(prompt))[0]

    for prompt in (a, b, c):
        _tokens(tiny, [prompt], GREEDY, cache)
    assert cached(a) == BLOCK  # a is now the most recently used: b is the least
    _tokens(tiny, [d], GREEDY, cache)
    assert [cached(p) for p in (a, b, c, d)] == [BLOCK, 0, BLOCK, BLOCK]
    assert cache.stats.evictions == 1
    # A chain of two blocks: its root is used more recently than its leaf, so the leaf goes first.
    two = _random_tokens(tok, 2 * BLOCK + 1)
    _tokens(tiny, [two], GREEDY, cache)  # evicts the two least recently used (a, c) for its 2 blocks
    assert [cached(p) for p in (a, c, d)] == [0, 0, BLOCK]
    _tokens(tiny, [a], GREEDY, cache)  # room for a: the chain's leaf is evicted, not its root
    assert cached(two) == BLOCK


def test_budgets_out_of_range_are_one_line(tiny, capsys):
    with pytest.raises(LmforgeError, match="out of range"):
        PrefixCache.megabytes(tiny.model, -1)
    assert PrefixCache.megabytes(tiny.model, 0) is None  # 0: off
    assert main(["serve", "--prefix-cache-mb", "nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "prefix cache budget" in err[0]


# ------------------------------------------------------------------ SmolLM2 through LLM and the server
SYSTEM = {
    "en": "You are a careful assistant for a small bookshop. Answer politely, in one short sentence, and never "
    "invent prices or opening hours you were not told.",
    "zh": "你是一家小书店的细心助手。请礼貌地用一句简短的话回答，不要编造没有告诉你的价格或营业时间。",
}
QUESTIONS = {"en": ["Do you sell maps?", "Can I order a book?"], "zh": ["你们卖地图吗？", "我可以订书吗？"]}


@pytest.fixture(scope="module")
def smol_server(smollm2):
    app = create_app(smollm2, max_batch=4, batch_weights="packed")  # float32 batches: answers as solo
    with serving(app) as base:
        yield smollm2, base


def _expected_cached(first: list[int], second: list[int]) -> int:
    pairs = zip(first, second, strict=False)
    common = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(first), len(second)))
    return BLOCK * min((len(first) - 1) // BLOCK, (len(second) - 1) // BLOCK, common // BLOCK)


def _answer(client, chat, stream: bool) -> tuple[str, int]:
    """The greedy answer's text and its ``cached_tokens`` (from the final usage chunk when streamed)."""
    if not stream:
        answer = client.chat.completions.create(model="m", messages=chat, max_tokens=NEW, temperature=0)
        return answer.choices[0].message.content, answer.usage.prompt_tokens_details.cached_tokens
    chunks = client.chat.completions.create(
        model="m",
        messages=chat,
        max_tokens=NEW,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, cached = "", []
    for chunk in chunks:
        text += "".join(c.delta.content or "" for c in chunk.choices)
        cached += [chunk.usage.prompt_tokens_details.cached_tokens] if chunk.usage is not None else []
    assert len(cached) == 1
    return text, cached[0]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_smollm2_chats_sharing_a_system_prompt_report_cached_tokens(one_thread, smol_server, lang):
    """Two chats with one system prompt: the second takes its shared full blocks from the cache, says so in
    ``usage`` (streamed in one language, not in the other), and both answers equal their uncached ones."""
    llm, base = smol_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    chats = [
        [{"role": "system", "content": SYSTEM[lang]}, {"role": "user", "content": q}] for q in QUESTIONS[lang]
    ]
    ids = [llm.prompt_ids(chat) for chat in chats]
    expected = [c.text for c in _completions(llm, ids, SamplingParams(max_new_tokens=NEW), None)]  # uncached
    before = llm.prefix_cache.stats.hit_tokens
    answers = [_answer(client, chat, stream=(i == 1) == (lang == "en")) for i, chat in enumerate(chats)]
    assert [text for text, _ in answers] == expected
    cached = [n for _, n in answers]
    assert cached == [0, _expected_cached(*ids)] and cached[1] >= 2 * BLOCK
    assert llm.prefix_cache.stats.hit_tokens - before == cached[1]
    metrics = httpx.get(base + "/metrics").text
    assert f"lmforge_prefix_cache_hit_tokens_total {llm.prefix_cache.stats.hit_tokens}" in metrics
    assert "lmforge_prefix_cache_evictions_total" in metrics and "lmforge_prefix_cache_bytes " in metrics
    if lang == "en":  # the library's own calls share the server's cache (LLM keeps one across calls)
        assert llm.chat(chats[0], max_new_tokens=NEW) == expected[0]
        assert llm.prefix_cache.stats.hit_tokens - before == cached[1] + (len(ids[0]) - 1) // BLOCK * BLOCK


def test_few_shot_scoring_of_many_texts_reuses_the_shared_head(one_thread, tiny_tokenizer):
    """classify_text builds one prompt per text around the same instructions and examples: after the first
    batch, the head comes from the cache, and the probabilities equal uncached scoring's."""
    tiny = tiny_llm(
        "tiny-llama", tiny_tokenizer, block_size=512
    )  # the prompt's instructions take ~150 tokens
    texts = ["good fox", "bad dog", "to be", "床前明月光", "举头望明月"]  # Chinese texts get a Chinese prompt
    examples = [("a fine day", "yes"), ("a sad day", "no")]
    tiny.set_prefix_cache(0)
    expected = tiny.classify_text(texts, labels=["yes", "no"], examples=examples, zero_shot=True)
    tiny.set_prefix_cache(1)
    for text, want in zip(texts, expected, strict=True):  # one text per call: each call after the first hits
        got = tiny.classify_text(text, labels=["yes", "no"], examples=examples, zero_shot=True)
        assert got["label"] == want["label"]
        for label, p in want["probabilities"].items():
            assert got["probabilities"][label] == pytest.approx(p, abs=1e-5)
    assert tiny.prefix_cache.stats.hits == 2 * (2 + 1)  # both labels' rows of every later text of a language
