"""Text generation: sampling, stopping, batched prompts and UTF-8-safe streaming.

``generate_tokens`` is the one decoding loop: it prefills a left-padded batch once, then feeds one token per
sequence per step through the KV cache. Everything else (batched text, streaming, stop strings) is built on it.
The server's continuous-batching scheduler (serve/scheduler.py) runs its own loop over slots, with the same
decode step (``decode_step_function``), ``next_tokens`` and ``CompletionBuilder``.

Why one module of ~620 lines: the loop, the compiled step it calls (``CompiledStep``: when dynamo's guards run),
sampling and the text it builds change together; the scheduler imports each of them from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge import cpu_kernel
from lmforge.errors import LmforgeError
from lmforge.model import KVCache, StaticKVCache, Transformer
from lmforge.prefix_cache import PrefixCache
from lmforge.structured import ConstraintState, mask_logits
from lmforge.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 100
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        # Written as "not (in range)" so that NaN, which fails every comparison, is out of range too.
        if not self.temperature >= 0 or self.temperature == math.inf:
            problems.append(f"temperature={self.temperature} must be a finite number >= 0")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:  # NaN included
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p < 1:
            problems.append(f"min_p={self.min_p} must be in [0, 1)")
        if not 0 < self.repetition_penalty < math.inf:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be a finite number > 0")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            problems.append(f"seed={self.seed} must fit in 64 bits: [-2**63, 2**63)")
        if problems:
            raise LmforgeError(
                "invalid sampling settings: " + "; ".join(problems), hint="fix the values named"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> SamplingParams:
        """Accept the common spellings users bring from other tools (max_length, max_tokens, stop_strings)."""
        known = {f.name for f in dataclasses.fields(cls)}
        aliases = {"max_length": "max_new_tokens", "max_tokens": "max_new_tokens", "stop_strings": "stop"}
        args: dict[str, object] = {}
        for key, value in kwargs.items():
            name = aliases.get(key, key)
            if name not in known:
                raise LmforgeError(
                    f"unknown generation option {key!r}",
                    hint=f"use one of: {', '.join(sorted(known | set(aliases)))}",
                )
            if value is not None:
                args[name] = value
        return cls(**args)  # type: ignore[arg-type]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


# ------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers applies it): seen tokens' logits shrink towards 'less likely'."""
    picked = logits.gather(1, seen)  # (B, L)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (B, V) scaled by temperature, with tokens outside top-k / top-p / min-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p is not None and params.min_p > 0:
        probs = logits.softmax(-1)
        floor = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens ranked above it already cover top_p; the first token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[:, 0] = False  # a top_p below float32's range (1e-300) compares as 0, dropping it too
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) the index of each row's largest value, the first of ties (NaN counts as largest), as
    ``torch.argmax``. On a CPU through numpy's: torch's took ~106 us for one 49k-token row on 2 threads,
    numpy's vectorised one ~10 us, 1 % of a SmolLM2 decode step (and of each row of a server's batch)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.argmax(logits.detach().numpy(), axis=-1))
    return logits.argmax(dim=-1)


FLOAT32_TINIEST = 2.0**-149  # the smallest positive float32 (a subnormal); anything below rounds to 0


def is_greedy(params: SamplingParams) -> bool:
    """Whether ``next_tokens`` picks the largest (penalised) logit: a temperature of 0, or one float32 holds as 0
    (dividing by it: NaN)."""
    return params.temperature < FLOAT32_TINIEST


def takes_argmax(params: SamplingParams) -> bool:
    """Whether ``next_tokens`` picks each row's largest logit as it is (greedy, no repetition penalty)."""
    return is_greedy(params) and params.repetition_penalty == 1.0


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,); ``seen`` (B, L) are the ids the repetition penalty applies to."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if is_greedy(params):
        return argmax_rows(logits)
    # Shifted so the largest is 0 before scaling: a tiny temperature (1e-45) then sends the others to -inf
    # (greedy) instead of sending every logit to +-inf (NaN probabilities). No filter or softmax sees a shift.
    probs = filter_logits(logits - logits.amax(dim=-1, keepdim=True), params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sampling_generator(
    params: SamplingParams, device: torch.device, offset: int = 0
) -> torch.Generator | None:
    """A private generator when a seed makes sampling reproducible (``offset`` tells sequences apart)."""
    if params.temperature == 0 or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed((params.seed + offset) % 2**64)  # torch takes 64 bits


def generation_budget(prompt_tokens: int, params: SamplingParams, context: int) -> int:
    """How many tokens a prompt may grow by: ``max_new_tokens``, cut by the model's context."""
    if prompt_tokens == 0:
        raise LmforgeError(
            "empty prompt", hint="give at least one token of prompt (or let the tokenizer add BOS)"
        )
    if prompt_tokens >= context:
        raise LmforgeError(
            f"prompt of {prompt_tokens} tokens does not fit the model's context of {context} tokens",
            hint="shorten the prompt",
        )
    return min(params.max_new_tokens, context - prompt_tokens)


# -------------------------------------------------------------- decoding loop
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists -> ids (B, T) left-padded and attention mask (B, T), or None when no row needs padding."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
    if bool(mask.all()):
        return ids, None
    return ids, mask


PREFILL_CHUNK = 512  # prompt tokens per prefill forward pass: bounds its activations, lets others interleave
CACHE_BUCKET = 256  # static caches are sized in multiples of this (the server's slot cache grows by them)


def cache_length(tokens: int, context: int, bucket: int = CACHE_BUCKET) -> int:
    """The static cache size for ``tokens``: rounded up to a ``bucket`` (1: exactly), within the context."""
    return min(context, -(-tokens // bucket) * bucket)


COMPILED_SHAPES = 64  # compiled variants dynamo keeps of the decode step before it refuses more
COMPILE_NOTICE_S = 2.0  # a first call slower than this was a compile (not a cache hit): say so, once


# Inductor computes a cheap expression again inside each consumer rather than storing it, up to 50 ops on a CPU:
# the attention scores' reduction over a key's 64 values then recomputed the query's RoPE for every key column
# (~390 us a layer for 8 rows, ~260 us stored). Stored from 8 ops on, SmolLM2's decode step took 13.8 against
# 14.2 ms at batch 1 and 51.0 against 53.9 ms at batch 8 (medians of 8 alternating rounds in one process,
# 2 threads): a small gain, largest where batches are (docs/architecture.md).
# Inductor also checks every input's sizes and strides on each call (~640 tensors a SmolLM2 step: 0.56 ms of ~11,
# paired medians of 20 alternating rounds). Dynamo's guards check the same on the first step of a generation, and
# the steps after it reuse the very tensors (``CompiledStep``), so the step's code does not check them again.
STEP_COMPILE_OPTIONS = {"realize_opcount_threshold": 8, "size_asserts": False}


class CompiledStep:
    """``model.decode_step`` through ``torch.compile``, telling the user once per shape what the wait was.

    Inductor fuses each block's small ops; packed layers call their own kernels. Compiled code is cached on
    disk (``TORCHINDUCTOR_CACHE_DIR``, under ``$LMFORGE_HOME`` — see ``lmforge.runtime``), so a later run with
    the same shapes starts in seconds. Shapes are fixed except the cache's columns (dynamic, see
    ``StaticKVCache``): each batch size compiles once, and the server keeps its batch sizes to a few buckets.
    """

    # The last call of any compiled step whose guards ran: (step, cache, the cache's first keys; idx's shape, grad
    # and inference modes), the objects held weakly. ``__call__`` skips the guards of a call that repeats it.
    _last_checked: tuple[tuple[weakref.ref, ...], tuple[object, ...]] | None = None
    _lock = threading.Lock()

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.step: Callable[..., torch.Tensor] = torch.compile(
            model.decode_step, dynamic=False, fullgraph=True, options=STEP_COMPILE_OPTIONS
        )
        self.batch_sizes: set[int] = set()
        self.guard_free: Callable[..., torch.Tensor] | None = None  # the code the last checked call ran
        # Every model shares decode_step's code object, and each (model shape, batch size) is one entry.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)

    def __call__(self, idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """The next step's logits. Dynamo looks the compiled code up and checks its guards (~450 tensors' and
        modules' properties) on the first step of a run of steps only, ~1.5-2 ms of a ~12 ms SmolLM2 step: a
        step that follows this same step on the same cache, with the same tensors in it, idx of the same shape
        and the same grad mode, with no other compiled step between (another model's, another cache's), has
        every guarded input the previous one had, so it calls the code the previous one ran directly
        (``guard_free``: what dynamo's cache holds for it, found at the front, where dynamo moves the entry it
        runs). What could differ is a model changed between two steps of one generation, which nothing does.
        Compiled steps take turns (``_lock``), so one thread's steps never interleave with another's."""
        with CompiledStep._lock:
            objects = (self, cache, cache.keys[0])
            state = (idx.shape, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
            last = CompiledStep._last_checked
            repeated = last is not None and last[1] == state
            if repeated and all(r() is o for r, o in zip(last[0], objects, strict=True)):
                if self.guard_free is not None:
                    return self.guard_free(self.model, idx, cache)
            CompiledStep._last_checked = None  # until this call's guards have passed
            logits = self._checked_step(idx, cache)
            self.guard_free = self._code_that_ran()
            CompiledStep._last_checked = (tuple(weakref.ref(o) for o in objects), state)
            return logits

    def _code_that_ran(self) -> Callable[..., torch.Tensor] | None:
        """The compiled code of the step just run, without dynamo's lookup (None: the step runs eagerly)."""
        if self.step == self.model.decode_step:  # a failed compile fell back to eager
            return None
        function = self.model.decode_step.__func__
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(function.__code__)
        if not entries or entries[0].code.co_freevars:
            return None
        return types.FunctionType(entries[0].code, function.__globals__)

    def _checked_step(self, idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        batch = idx.shape[0]
        if batch in self.batch_sizes:
            return self.step(idx, cache)
        start = time.perf_counter()
        try:
            logits = self.step(idx, cache)
        except _compile_errors() as e:
            # No C++ compiler, an unsupported op: decoding still works, eagerly (the same numbers, slower).
            print(f"warning: decoding eagerly, torch.compile failed ({type(e).__name__})", file=sys.stderr)
            self.step = self.model.decode_step
            return self.step(idx, cache)
        self.batch_sizes.add(batch)
        seconds = time.perf_counter() - start
        if seconds > COMPILE_NOTICE_S:
            folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "inductor's default folder")
            print(
                f"compiled the decode step for batch {batch} in {seconds:.0f} s "
                f"(once: cached in {folder}; --no-compile skips it)",
                file=sys.stderr,
            )
        return logits


def _compile_errors() -> tuple[type[Exception], ...]:
    import torch._dynamo.exc
    import torch._inductor.exc

    return torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError


_compiled_steps: weakref.WeakKeyDictionary[Transformer, CompiledStep] = weakref.WeakKeyDictionary()


def decode_step_function(model: Transformer) -> Callable[[torch.Tensor, StaticKVCache], torch.Tensor]:
    """The one-token step generation uses: ``CompiledStep`` when ``model.compile_decode`` (the loader's
    default), else ``model.decode_step`` as it is (eager). On a CPU, lmforge's kernels are built (or found) first:
    the step's attention runs through ``cpu_kernel.decode_attention`` where they are."""
    if model.device.type == "cpu":
        cpu_kernel.available()
    if not model.compile_decode:
        return model.decode_step
    step = _compiled_steps.get(model)
    if step is None:
        step = _compiled_steps[model] = CompiledStep(model)
    return step


def prefill(
    model: Transformer,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVCache,
    chunk: int = PREFILL_CHUNK,
    start: int = 0,
) -> torch.Tensor:
    """Run a left-padded prompt batch ids (B, T) into ``cache``, ``chunk`` tokens at a time; last logits (B, V).

    ``start`` > 0: the cache already holds columns [0, start) (a ``PrefixCache`` hit); prefill goes on from there.
    """
    logits = None
    for begin in range(start, ids.shape[1], chunk):
        end = min(begin + chunk, ids.shape[1])
        part_mask = mask[:, :end] if mask is not None else None
        logits, _ = model(ids[:, begin:end], attention_mask=part_mask, cache=cache, last_logits_only=True)
    assert logits is not None
    return logits[:, -1]


def prefill_rows(
    model: Transformer, caches: Sequence[KVCache], pieces: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Continue one-row caches, each by its own next prompt tokens, in one forward pass; last logits (B, V).

    ``caches[i]`` (batch 1) holds the first ``caches[i].length`` tokens of a prompt and ``pieces[i]`` (at least
    one token) are its next ones. A lone row runs in its own cache: what ``prefill`` computes. Several rows run
    side by side in a batch cache made for the pass: each row's past right-aligned at a common column P, its new
    tokens right-aligned at the end, the columns between masked (they take no position: positions count real
    tokens). Each row's new keys and values are then copied back into its own cache. The server prefills the
    prompts that arrive together this way: a short prompt's pass costs about what reading the weights does, so
    8 chat prompts read them once instead of 8 times (docs/architecture.md).
    """
    if len(caches) == 1:
        ids = torch.tensor([list(pieces[0])], device=model.device)
        logits, _ = model(ids, cache=caches[0], last_logits_only=True)
        return logits[:, -1]
    past = max(cache.length for cache in caches)
    new = max(len(piece) for piece in pieces)
    batch = model.new_cache(len(caches), past + new)
    ids = torch.zeros(len(caches), new, dtype=torch.long)
    mask = torch.zeros(len(caches), past + new, dtype=torch.long)
    for row, (cache, piece) in enumerate(zip(caches, pieces, strict=True)):
        had, n = cache.length, len(piece)
        ids[row, new - n :] = torch.tensor(list(piece), dtype=torch.long)
        mask[row, past - had : past] = 1
        mask[row, past + new - n :] = 1
        for mine, theirs in zip(cache.keys + cache.values, batch.keys + batch.values, strict=True):
            theirs[row, :, past - had : past] = mine[0, :, :had]
    batch.length = past
    logits, _ = model(
        ids.to(model.device), attention_mask=mask.to(model.device), cache=batch, last_logits_only=True
    )
    for row, (cache, piece) in enumerate(zip(caches, pieces, strict=True)):
        had, n = cache.length, len(piece)
        cache.reserve(had + n)
        for mine, theirs in zip(cache.keys + cache.values, batch.keys + batch.values, strict=True):
            mine[0, :, had : had + n] = theirs[row, :, past + new - n :]
        cache.advance(n)
    return logits[:, -1]


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    constraints: Sequence[ConstraintState | None] | None = None,
    prefix_cache: PrefixCache | None = None,
) -> Iterator[torch.Tensor]:
    """Yield one (B,) tensor of next-token ids per step, for a batch of prompts of any lengths.

    ``constraints`` (one per prompt, None for a free row) mask each row's logits before sampling and advance
    by the token picked (``lmforge.structured``); free rows compute exactly what they compute alone.

    The caller decides when a sequence is done (EOS, stop strings) and stops iterating when all are; this loop
    stops by itself after ``max_new_tokens`` or when the context is full. The prompt is prefilled in chunks;
    every further token goes through ``decode_step_function`` (compiled or eager) over a ``StaticKVCache``.
    A ``prefix_cache`` fills the cache's first columns from earlier prompts and keeps this batch's blocks.
    """
    if not prompts:
        raise LmforgeError("no prompts to generate for", hint="pass at least one prompt")
    steps = min(generation_budget(len(p), params, model.config.block_size) for p in prompts)
    if steps == 0:
        return
    device = model.device
    ids, mask = left_pad(prompts, pad_id=0)
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    size = ids.shape[1] + steps - 1  # the last token is sampled, never fed back
    cache = StaticKVCache(
        model.config,
        len(prompts),
        # buckets keep a compiled step's guards few; eager decoding sizes the cache to the request
        cache_length(size, model.config.block_size, CACHE_BUCKET if model.compile_decode else 1),
        device,
        model.dtype,
        compiled=model.compile_decode,
    )
    generator = sampling_generator(params, device)
    seen = None
    if params.repetition_penalty != 1.0:
        # Only real tokens count as seen: a pad position repeats its row's last prompt token (never a pad with
        # left padding), which the penalty then touches once, as alone. The scheduler penalises prompt + output.
        seen = ids if mask is None else torch.where(mask.bool(), ids, ids[:, -1:])
    start = 0
    if prefix_cache is not None:
        prefix_cache.reuse(cache, prompts, ids.shape[1])
        start = cache.length
    logits = prefill(model, ids, mask, cache, PREFILL_CHUNK, start)
    if prefix_cache is not None:
        prefix_cache.store(cache, prompts, ids.shape[1])
    cache.start_decoding(mask)
    step_function = decode_step_function(model)
    for step in range(steps):
        if constraints is not None:
            logits = mask_logits(logits, constraints)
        token = next_tokens(logits, params, generator, seen)  # (B,)
        if constraints is not None:
            for state, picked in zip(constraints, token.tolist(), strict=True):
                if state is not None:
                    state.advance(picked)
        yield token
        if step == steps - 1:
            break
        if seen is not None:
            seen = torch.cat([seen, token[:, None]], dim=1)
        logits = step_function(token[:, None], cache)


# ------------------------------------------------------------ text assembly
class TextStream:
    """Turns one sequence's token ids into text pieces that never split a UTF-8 character or a stop string.

    Byte-level tokens can end in the middle of a multi-byte character (Chinese, emoji): such a tail decodes
    to U+FFFD, so it is held back until the next token completes it. Text that could be the start of a stop
    string is held back too, until it is clear it is not one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.decode = tokenizer.decode_stream()
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decodable so far (before any stop string)
        self.emitted = 0  # how much of self.text has been handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show (maybe empty)."""
        added = self.decode(token_id)
        if added is None or self.stopped:
            return ""  # an incomplete character (the next ids complete it), or past a stop string
        self.text += added
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        safe = len(self.text) if self.stopped else len(self.text) - self._held_back()
        piece = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return piece

    def finish(self) -> str:
        """Everything not yet handed out (called once the sequence ends). A sequence cut off by the length limit
        can end inside a character: that partial tail, never decoded, is dropped."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string.

        Only prefixes that end in the text's last character can match: ``rfind`` jumps between those, so a
        token costs a scan of each stop string, not a comparison of every one of its prefixes."""
        if not self.text:
            return 0
        last, longest = self.text[-1], 0
        for s in self.stop:
            end = s.rfind(last, 0, min(len(s) - 1, len(self.text)))  # a prefix s[: end + 1] ending in it
            while end >= longest:
                if self.text.endswith(s[: end + 1]):
                    longest = end + 1
                    break
                end = s.rfind(last, 0, end)
        return longest


class CompletionBuilder:
    """One sequence's output: token ids in, text pieces out (via ``TextStream``), and its ``Completion``.

    The sequence ends at an end-of-sequence id (which is not part of the text), at a stop string, or after
    ``limit`` tokens; ``end`` closes it early (the decoding loop ran out of context).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_tokens: int,
        params: SamplingParams,
        eos_ids: Sequence[int],
        limit: int,
    ) -> None:
        self.stream = TextStream(tokenizer, params.stop)
        self.eos = set(eos_ids) if params.stop_on_eos else set()
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.tokens: list[int] = []
        self.completion: Completion | None = None  # set once the sequence has ended

    @property
    def done(self) -> bool:
        return self.completion is not None

    def push(self, token: int) -> str:
        """Add the next token; return the new text that is safe to show (maybe empty)."""
        if token in self.eos:
            return self.end("stop")
        self.tokens.append(token)
        piece = self.stream.push(token)
        if self.stream.stopped:
            return piece + self.end("stop")
        if len(self.tokens) >= self.limit:
            return piece + self.end("length")
        return piece

    def end(self, reason: str) -> str:
        """Close the sequence; return the text still held back."""
        piece = self.stream.finish()
        self.completion = Completion(
            text=self.stream.text,
            token_ids=list(self.tokens),
            prompt_tokens=self.prompt_tokens,
            finish_reason=reason,
        )
        return piece


def stream_completions(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_ids: Sequence[int] = (),
    *,
    constraints: Sequence[ConstraintState | None] | None = None,
    prefix_cache: PrefixCache | None = None,
) -> Iterator[tuple[int, str, Completion | None]]:
    """Yield ``(row, text_piece, completion_or_None)`` as each sequence of the batch grows.

    A row's final event carries its ``Completion``; rows end independently (EOS, stop string, length, or its
    constraint's grammar complete: finish_reason "stop").
    """
    outputs = [CompletionBuilder(tokenizer, len(p), params, eos_ids, params.max_new_tokens) for p in prompts]
    for step_tokens in generate_tokens(
        model, prompts, params, constraints=constraints, prefix_cache=prefix_cache
    ):
        for row, token in enumerate(step_tokens.tolist()):
            out = outputs[row]
            if out.done:
                continue
            piece = out.push(token)
            if constraints is not None and not out.done and (state := constraints[row]) and state.finished:
                piece += out.end("stop")
            if piece or out.done:
                yield row, piece, out.completion
        if all(out.done for out in outputs):
            return
    for row, out in enumerate(outputs):
        if not out.done:  # the loop stopped first: the context is full (or max_new_tokens=0)
            yield row, out.end("length"), out.completion


def complete(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_ids: Sequence[int] = (),
    *,
    constraints: Sequence[ConstraintState | None] | None = None,
    prefix_cache: PrefixCache | None = None,
) -> list[Completion]:
    """Generate for a batch of prompts at once; one Completion per prompt, in order."""
    results: list[Completion | None] = [None] * len(prompts)
    for row, _, completion in stream_completions(
        model, tokenizer, prompts, params, eos_ids, constraints=constraints, prefix_cache=prefix_cache
    ):
        if completion is not None:
            results[row] = completion
    return [r for r in results if r is not None]
