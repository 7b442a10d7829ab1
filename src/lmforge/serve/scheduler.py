"""Continuous batching: one thread owns the model and decodes every running sequence in one batch.

Requests (``Job``: prompt ids, ``SamplingParams``, ``n`` sequences) wait in a queue bounded in sequences
(``max_queue``). Between decode steps the scheduler admits waiting jobs into free slots, taking turns between
requests (``Job.group``: the job of the request holding the fewest slots goes first, oldest first among
equals, so one request's many prompts cannot keep others out), and prefills their prompts a chunk between two
decode steps, so a long prompt does not stall the running sequences: at most ``prefill_chunk`` tokens, and while
sequences are decoding, no more than the measured prefill rate gets through in ``prefill_pause_s`` seconds.
Prompts waiting together are prefilled in one forward pass (``generate.prefill_rows``: a lone prompt computes
what ``LLM.generate_text`` does), so that a burst of short prompts reads the weights once. A prompt once
prefilled gives each sequence its first token, and its keys and values are copied into a row of a
``SlotKVCache``, where the newcomer joins the running batch at its own position. With a ``PrefixCache``, a prompt's start already cached (a shared system
prompt, few-shot examples, the earlier turns of a chat) is copied into its prefill cache instead of computed
(``Job.cached_tokens`` says how much), and its full blocks are kept once it is in. A sequence gives its slot
back the step it ends (EOS, stop string, length limit) or its job is cancelled (the client went away or timed
out), so a long request never holds up short ones.

Every decode step is ``Transformer.decode_step`` over the slot cache, ``torch.compile``d when the model
asks (``generate.decode_step_function``, the step ``generate_tokens`` uses). Its shapes stay in buckets:
the slots are 1, 2, 4, 8... rows (free ones idle, their outputs ignored) and the columns a multiple of
``COLUMN_BUCKET`` (dynamic to the compiled step), grown and shrunk by copying, so each slot count compiles
once (``warm_up``: all at start, before the first request) and no step waits for a compile of a new length.

Tokens are picked with ``generate.next_tokens`` and text is assembled with ``generate.CompletionBuilder`` (a
``TextStream``: no character is ever cut, stop strings are held back) — the pieces ``LLM.generate_text`` uses.
A job with a ``Constraint`` (``response_format``) gives each of its sequences a ``ConstraintState`` that masks
that row's logits before sampling; rows with and without one decode in the same batch.
Output goes to each job's ``on_event`` callback, from the scheduler thread.

Why one module of ~630 lines: admission, prefill and decode are one state machine that one thread owns, and
its invariants span them (a prompt holds its slots from admission on; room for it is made before the round
that can finish it; a resize moves the running rows' slots), so they are read together.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmforge.errors import LmforgeError
from lmforge.generate import (
    PREFILL_CHUNK,
    Completion,
    CompletionBuilder,
    SamplingParams,
    argmax_rows,
    decode_step_function,
    generation_budget,
    next_tokens,
    prefill_rows,
    sampling_generator,
    takes_argmax,
)
from lmforge.model import KVCache, SlotKVCache
from lmforge.prefix_cache import PrefixCache
from lmforge.runtime import release_openmp_threads
from lmforge.structured import Constraint, ConstraintState, mask_logits

if TYPE_CHECKING:
    from lmforge.api import LLM

MAX_TOP_LOGPROBS = 20
PREFILL_PAUSE_S = 0.3  # while sequences decode, a round prefills about this long (so their tokens wait)
MIN_PREFILL_TOKENS = 32  # ... but at least this many prompt tokens, so a long prompt still moves on
COLUMN_BUCKET = 64  # the slot cache's columns are a multiple of this
RATE_WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds


class QueueFullError(LmforgeError):
    """All slots are busy and the waiting queue is full: the client should retry shortly."""


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature and filters), with the
    ``top`` most likely tokens of the same step as ``(token_id, logprob)``, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """Output of sequence ``index`` of a job.

    ``text`` is new text that is safe to show (maybe empty); ``logprobs`` covers the tokens consumed since the
    sequence's previous event (a token held back as half a character arrives with the text it completes). The
    sequence's last event carries its ``completion``. An ``error`` ends the whole job; nothing follows it.
    """

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion: Completion | None = None
    error: Exception | None = None


@dataclass(eq=False)
class Job:
    """One request: ``n`` sequences continuing the same prompt. ``on_event`` runs in the scheduler thread."""

    prompt: list[int]
    params: SamplingParams
    n: int
    logprobs: int | None  # None: none; k >= 0: the chosen token's and the k most likely
    on_event: Callable[[Event], None]
    budget: int  # new tokens each sequence may produce (max_tokens, cut by the context)
    cancelled: bool = False  # set from any thread; the scheduler frees the job's slots before its next step
    group: object = None  # the request the job belongs to (None: itself); admission takes turns between them
    constraint: Constraint | None = None  # each sequence's tokens masked to this grammar (lmforge.structured)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (set before the job's first event)


class _Running:
    """A sequence that holds a slot: row ``slot`` of the cache."""

    def __init__(
        self, job: Job, index: int, builder: CompletionBuilder, generator: torch.Generator | None
    ) -> None:
        self.job = job
        self.index = index
        self.builder = builder
        self.generator = generator
        self.slot = -1  # its row in the slot cache, once it has one
        self.next_input = -1  # the token sampled last; the next step feeds it
        self.unreported: list[TokenLogprob] = []
        self.state: ConstraintState | None = job.constraint.start() if job.constraint is not None else None
        # its next token is its row's largest logit: a step picks those of all such rows at once (``_step``)
        self.argmax = self.state is None and takes_argmax(job.params)


@dataclass(eq=False)
class _Prefill:
    """An admitted job whose prompt is going into ``cache``, a chunk at a time; it holds ``job.n`` slots."""

    job: Job
    builders: list[CompletionBuilder]
    cache: KVCache
    done: int = 0  # prompt tokens in the cache so far
    rate: float | None = None  # prompt tokens per second of its last chunk (alone): sizes its next one
    room: bool = False  # the slot cache holds its slots and columns (from the round that can finish it)


def _group(job: Job) -> object:
    return job if job.group is None else job.group


def column_bucket(tokens: int, context: int) -> int:
    """Slot-cache columns for ``tokens``: a multiple of ``COLUMN_BUCKET``, within the context. The columns are
    dynamic to the compiled step, and every row attends over all of them: the cache stays near the longest row."""
    return min(context, -(-tokens // COLUMN_BUCKET) * COLUMN_BUCKET)


def slot_bucket(rows: int, most: int) -> int:
    """Slots for ``rows`` sequences: the next power of two, at most ``most`` (few shapes to compile)."""
    return min(most, 1 << max(0, rows - 1).bit_length())


class Scheduler:
    """Serves generation requests from any thread with continuous batching over ``max_batch`` slots."""

    def __init__(
        self,
        llm: LLM,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = PREFILL_CHUNK,
        prefill_pause_s: float | None = PREFILL_PAUSE_S,
        warm_up: bool = False,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise LmforgeError(
                f"max_batch={max_batch}, max_queue={max_queue} and prefill_chunk={prefill_chunk} are invalid",
                hint="use max_batch >= 1, max_queue >= 0 and prefill_chunk >= 1",
            )
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.eos_ids = llm.eos_ids
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled between two decode steps, at most
        self.prefill_pause_s = (
            prefill_pause_s  # ... and for about this long while sequences decode (None: no cap)
        )
        self._prefill_rate: float | None = None  # prompt tokens per second, measured
        self.warm_up = warm_up  # compile the step for every slot bucket when the thread starts
        self.prefix_cache = prefix_cache  # prompt blocks seen before (None: every prompt is prefilled whole)
        self.generated_tokens = 0
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()  # guards _waiting, _closing and _recent; wakes the idle thread
        self._closing = False
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, for tokens/s
        self._running: list[_Running] = []  # only the scheduler thread touches these three
        self._prefilling: deque[_Prefill] = deque()
        self._cache: SlotKVCache | None = None
        self._step_function: Callable[[torch.Tensor, SlotKVCache], torch.Tensor] | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        on_event: Callable[[Event], None],
        n: int = 1,
        logprobs: int | None = None,
        group: object = None,
        constraint: Constraint | None = None,
    ) -> Job:
        """Queue a request (``group``: the jobs of one client request share it; ``constraint``: a grammar each
        of its sequences follows); raises ``QueueFullError`` when its ``n`` sequences do not fit the queue's
        ``max_queue``, ``LmforgeError`` when invalid."""
        if not 1 <= n <= self.max_batch:
            raise LmforgeError(
                f"n={n} sequences do not fit the server's batch of {self.max_batch}",
                hint=f"ask for 1 to {self.max_batch} sequences per request",
            )
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise LmforgeError(
                f"top logprobs={logprobs} is out of range", hint=f"ask for 0 to {MAX_TOP_LOGPROBS}"
            )
        budget = generation_budget(len(prompt), params, self.model.config.block_size)
        job = Job(list(prompt), params, n, logprobs, on_event, budget, group=group, constraint=constraint)
        with self._lock:
            if self._closing:
                raise LmforgeError("the server is shutting down", hint="retry once it is back")
            waiting = self._waiting_rows()
            if waiting + n > self.max_queue:
                raise QueueFullError(
                    f"the server is busy: its {self.max_batch} slots are taken and {waiting} sequences are "
                    f"waiting (at most {self.max_queue})",
                    hint="retry in a moment",
                )
            self._waiting.append(job)
            self._lock.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop working for ``job``: a waiting job leaves the queue, a running one frees its slots."""
        job.cancelled = True
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)

    def _waiting_rows(self) -> int:
        return sum(job.n for job in self._waiting)

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        with self._lock:
            return self._waiting_rows()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``RATE_WINDOW_S`` seconds."""
        now = time.monotonic()
        with self._lock:
            tokens = sum(n for t, n in self._recent if now - t <= RATE_WINDOW_S)
        return tokens / RATE_WINDOW_S

    def start(self) -> None:
        """Start the scheduler thread. The calling thread's OpenMP workers stop first: the scheduler's team is
        fast only while it is the process's one (``runtime.release_openmp_threads``)."""
        release_openmp_threads()
        self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; jobs still waiting, prefilling or running get an error event."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            left = {*self._waiting, *(p.job for p in self._prefilling), *(seq.job for seq in self._running)}
            self._waiting.clear()
        error = LmforgeError("the server is shutting down", hint="retry once it is back")
        for job in left:
            self._fail(job, error)
        self._running, self._prefilling, self._cache = [], deque(), None

    # ----------------------------------------------------------- scheduler thread
    @torch.inference_mode()
    def _loop(self) -> None:
        self._warm_up()
        while self._iteration():
            pass

    def _warm_up(self) -> None:
        """With ``warm_up``, compile the decode step for every slot bucket before the first request needs it:
        a compile holds up every stream (a minute for SmolLM2 on a small CPU, seconds from the disk cache).
        Requests wait in the queue meanwhile. The graphs are traced at the first column bucket, so they match
        the compile cache of earlier runs."""
        if not self.warm_up or not getattr(self.model, "compile_decode", False):
            return
        config = self.model.config
        columns = column_bucket(1, config.block_size)
        for slots in sorted({slot_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)}):
            if self._closing:
                return
            try:
                cache = SlotKVCache(
                    config,
                    slots,
                    columns,
                    self.model.device,
                    self.model.dtype,
                    compiled=self.model.compile_decode,
                )
                step = self._step_function or decode_step_function(self.model)
                self._step_function = step
                step(torch.zeros(slots, 1, dtype=torch.long, device=self.model.device), cache)
            except Exception:  # noqa: BLE001 - a step that cannot compile fails the requests, and says why
                return

    def _iteration(self) -> bool:
        """Drop cancelled work, admit jobs, prefill one chunk, decode one step; False once closing."""
        for seq in [seq for seq in self._running if seq.job.cancelled]:  # the client went away, timed out
            self._release(seq)  # or failed
        self._prefilling = deque(p for p in self._prefilling if not p.job.cancelled)
        admitted = self._admissions()
        if admitted is None:
            return False
        for job in admitted:
            self._admit(job)
        self._plan_joins(self._prefill_budget())
        start = time.perf_counter()
        if not self._make_room():
            return True
        self._prefill_chunk(spent=time.perf_counter() - start)
        if self._running:
            self._step()
        elif not self._prefilling:
            self._cache = None  # idle: give back what the batch made the cache grow to
        return True

    def _admissions(self) -> list[Job] | None:
        """Waiting jobs that fit the free slots (blocks while idle); None once closing. The next job is the
        oldest of the request holding the fewest slots; when it does not fit, nothing overtakes it."""
        with self._lock:
            while not self._closing and not self._waiting and not self._running and not self._prefilling:
                self._lock.wait()
            if self._closing:
                return None
            held: dict[object, int] = {}  # slots per request
            for seq in self._running:
                held[_group(seq.job)] = held.get(_group(seq.job), 0) + 1
            for p in self._prefilling:
                held[_group(p.job)] = held.get(_group(p.job), 0) + p.job.n
            free = self.max_batch - sum(held.values())
            admitted = []
            while self._waiting:
                job = min(self._waiting, key=lambda j: held.get(_group(j), 0))  # min keeps arrival order
                if job.n > free:
                    break
                self._waiting.remove(job)
                admitted.append(job)
                free -= job.n
                held[_group(job)] = held.get(_group(job), 0) + job.n
            return admitted

    def _admit(self, job: Job) -> None:
        """Queue the job's prompt for prefilling (it holds its slots from now on)."""
        if job.cancelled:
            return
        try:
            builders = [
                CompletionBuilder(self.tokenizer, len(job.prompt), job.params, self.eos_ids, job.budget)
                for _ in range(job.n)
            ]
            if job.budget == 0:
                for index, builder in enumerate(builders):
                    self._emit(job, Event(index, builder.end("length"), completion=builder.completion))
                return
            work = _Prefill(job, builders, self.model.new_cache(1, len(job.prompt)))
            if self.prefix_cache is not None:
                self.prefix_cache.reuse(work.cache, [job.prompt], len(job.prompt))
                work.done = job.cached_tokens = work.cache.length
            self._prefilling.append(work)
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
            self._fail(job, e)

    def _prefill_budget(self, spent: float = 0.0) -> int:
        """Prompt tokens to prefill this round: ``prefill_chunk``; while sequences are decoding, no more than
        the measured rate gets through in what is left of ``prefill_pause_s`` once the round has ``spent`` that
        many seconds growing the cache (at least ``MIN_PREFILL_TOKENS``). The rate is the
        oldest prompt's own last chunk's, once it has one: a token costs more the more of the prompt is already
        in the cache (attention), and a rate averaged over short prompts let a long prompt's late chunks run
        longer than the pause. With it, a 2,000-token prompt went in chunks of 77-229 tokens, 0.24-0.35 s each,
        while 4 streams decoded (SmolLM2 Q4_1, ``benchmarks/serve.py``)."""
        if not self._running or self.prefill_pause_s is None:
            return self.prefill_chunk
        own = self._prefilling[0].rate if self._prefilling else None
        rate = own if own is not None else self._prefill_rate
        if rate is None:
            return min(self.prefill_chunk, MIN_PREFILL_TOKENS)
        timed = int(rate * max(0.0, self.prefill_pause_s - spent))
        return min(self.prefill_chunk, max(MIN_PREFILL_TOKENS, timed))

    def _prefill_chunk(self, spent: float = 0.0) -> None:
        """Prefill a round's budget of prompt tokens, oldest job first; finished prompts join the batch."""
        budget = self._prefill_budget(spent)
        while self._prefilling and budget > 0:
            works, pieces = self._prefill_group(budget)
            try:
                start = time.perf_counter()
                logits = prefill_rows(self.model, [work.cache for work in works], pieces)  # (rows, V)
                seconds = max(time.perf_counter() - start, 1e-6)
            except Exception as e:  # noqa: BLE001
                for work in works:
                    self._fail(work.job, e)
                self._prefilling = deque(p for p in self._prefilling if p not in works)
                continue
            # The rate of one prompt alone (the slowest way in): it sizes the rounds of a long prompt.
            if len(works) == 1 and len(pieces[0]) >= MIN_PREFILL_TOKENS:  # short ones say little
                rate = works[0].rate = len(pieces[0]) / seconds
                old = self._prefill_rate
                self._prefill_rate = rate if old is None else (old + rate) / 2
            budget -= sum(len(piece) for piece in pieces)
            for row, (work, piece) in enumerate(zip(works, pieces, strict=True)):
                work.done += len(piece)
                if work.done == len(work.job.prompt):
                    self._prefilling.remove(work)
                    try:
                        if self.prefix_cache is not None:
                            self.prefix_cache.store(work.cache, [work.job.prompt], work.done)
                    except Exception as e:  # noqa: BLE001
                        self._fail(work.job, e)
                        continue
                    self._join(work, logits[row])

    def _prefill_group(self, budget: int) -> tuple[list[_Prefill], list[list[int]]]:
        """The prompts to prefill in one pass and the tokens each takes in it: the oldest, and the ones queued
        behind it while the pass's rows x new tokens stay within ``prefill_chunk`` (its activations) and the
        tokens within ``budget``. A prompt with more than a chunk already in its cache goes alone
        (``prefill_rows`` copies a row's past into the pass)."""
        works: list[_Prefill] = []
        pieces: list[list[int]] = []
        width = 0  # the longest piece
        for work in self._prefilling:
            piece = work.job.prompt[work.done : work.done + budget]
            if works and (
                not piece
                or max(work.done, works[0].done) > self.prefill_chunk
                or (len(works) + 1) * max(width, len(piece)) > self.prefill_chunk
            ):
                break
            works.append(work)
            pieces.append(piece)
            width = max(width, len(piece))
            budget -= len(piece)
        return works, pieces

    def _join(self, work: _Prefill, logits: torch.Tensor) -> None:
        """Pick each sequence's first token from the prompt's last logits (V,); the survivors take the slots
        ``_make_room`` kept for them (the copy of the prompt's keys and values is the round's only cache work)."""
        job = work.job
        device = self.model.device
        try:
            for index, builder in enumerate(work.builders):
                seq = _Running(job, index, builder, sampling_generator(job.params, device, offset=index))
                if self._advance(seq, logits):
                    assert self._cache is not None
                    seq.slot = self._cache.add(work.cache, row=0)
                    self._running.append(seq)
            self._count_tokens(job.n)
        except Exception as e:  # noqa: BLE001
            self._fail(job, e)

    def _plan_joins(self, budget: int) -> None:
        """Mark the prompts a round of ``budget`` tokens finishes (they are prefilled oldest first): ``_fit``
        makes room for them before the round's prefill. A mark stays when the round ends up shorter."""
        for work in self._prefilling:
            budget -= len(work.job.prompt) - work.done
            if budget < 0:
                return
            work.room = True

    def _make_room(self) -> bool:
        """Size the slot cache at the start of a round (``_fit``); False when that failed, and every job with
        it (the cache may be half-copied)."""
        if not self._running and not any(p.room for p in self._prefilling):
            return True
        try:
            self._fit()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the jobs fail, the server goes on
            for job in {*(seq.job for seq in self._running), *(p.job for p in self._prefilling)}:
                self._fail(job, e)
            self._running, self._prefilling, self._cache = [], deque(), None
            return False
        return True

    def _fit(self) -> None:
        """Size the slot cache, in buckets (few shapes), for the running sequences' next step and for the
        prompts about to join (``_Prefill.room``): ``job.n`` slots each, at the prompt's length.

        Room is made at the start of a round, before its prefill, and the time it took comes off the round's
        prefill (``_prefill_budget``): growing copies and zero-fills the whole cache (8 slots x 2,048 columns
        of SmolLM2 are ~755 MB, ~0.2 s), and on top of a prompt's last chunk it made the running sequences wait
        0.6-0.7 s. Not earlier than the round that can finish the prompt: a bigger cache slows every step (8
        slots compute 8 rows). It shrinks to fewer slots when fewer are held, and to fewer columns when half of
        them would do (a long sequence left), so short sequences stop paying for them.
        """
        cache = self._cache
        lengths = list(cache.lengths().values()) if cache is not None else []
        joining = [p for p in self._prefilling if p.room]
        prompts = [len(p.job.prompt) for p in joining]
        rows = len(lengths) + sum(p.job.n for p in joining)
        slots = slot_bucket(rows, self.max_batch)
        context = self.model.config.block_size
        width = column_bucket(max([*lengths, *prompts]) + 1, context)
        if cache is None:
            self._cache = SlotKVCache(
                self.model.config,
                slots,
                width,
                self.model.device,
                self.model.dtype,
                compiled=self.model.compile_decode,
            )
            return
        if width > cache.max_len:  # grow by a quarter at least, so that copies stay rare
            width = max(width, column_bucket(cache.max_len * 5 // 4, context))
        elif 2 * width > cache.max_len:  # shrink to half or less only
            width = cache.max_len
        if (slots, width) != (cache.slots, cache.max_len):
            moves = cache.resize(slots, width)
            for seq in self._running:
                seq.slot = moves.get(seq.slot, seq.slot)

    def _step(self) -> None:
        """Feed every running sequence its last token, pick the next ones, free the slots of those that end."""
        rows = list(self._running)
        try:
            cache = self._cache
            assert cache is not None
            ids = [0] * cache.slots  # free slots decode token 0; their outputs are ignored
            for seq in rows:
                ids[seq.slot] = seq.next_input
            if (
                self._step_function is None
            ):  # compiled when the model asks (not for encoders: they never step)
                self._step_function = decode_step_function(self.model)
            ids_tensor = torch.tensor(ids, device=self.model.device)[:, None]  # (B, 1)
            logits = self._step_function(ids_tensor, cache)  # (B, V)
        except Exception as e:  # noqa: BLE001
            # The cache may be half-written: fail this batch and start the next one from a fresh cache.
            for job in {seq.job for seq in rows}:
                self._fail(job, e)
            self._running, self._cache = [], None
            return
        # One argmax for the rows that take their largest logit: a row at a time, numpy's took ~64 us a row of
        # SmolLM2's 49k logits in a busy server (2 threads), 0.5 ms of an 8-row step; all at once ~0.1 ms.
        best = argmax_rows(logits).tolist() if any(seq.argmax for seq in rows) else []
        for seq in rows:
            try:
                if not self._advance(seq, logits[seq.slot], best[seq.slot] if seq.argmax else None):
                    self._release(seq)
            except Exception as e:  # noqa: BLE001 - e.g. sampling settings that break on these logits
                self._fail(seq.job, e)
                self._release(seq)
        self._count_tokens(len(rows))

    def _advance(self, seq: _Running, logits: torch.Tensor, token: int | None = None) -> bool:
        """Pick ``seq``'s next token from its logits (V,) (``token``: picked already, its largest), report it;
        return whether the sequence goes on."""
        job, builder = seq.job, seq.builder
        if token is None:
            row = logits[None].float()  # (1, V)
            seen = None
            if job.params.repetition_penalty != 1.0:
                seen = torch.tensor([job.prompt + builder.tokens], device=row.device)
            # A constrained row samples among the tokens its grammar allows; logprobs stay the model's own.
            allowed = row if seq.state is None else mask_logits(row, [seq.state])
            token = int(next_tokens(allowed, job.params, seq.generator, seen))
        if seq.state is not None:
            seq.state.advance(token)
        produced = len(builder.tokens)
        piece = builder.push(token)
        if seq.state is not None and seq.state.finished and not builder.done:
            piece += builder.end("stop")  # the grammar is complete: only end-of-sequence could follow
        if job.logprobs is not None and len(builder.tokens) > produced:  # an EOS token is not output
            seq.unreported.append(self._logprob(logits.float(), token, job.logprobs))
        if piece or builder.done:
            self._emit(job, Event(seq.index, piece, seq.unreported, builder.completion))
            seq.unreported = []
        seq.next_input = token
        return not builder.done

    @staticmethod
    def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logprobs = logits.log_softmax(-1)
        best = logprobs.topk(top) if top > 0 else None
        pairs = (
            list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
        )
        return TokenLogprob(token, float(logprobs[token]), pairs)

    def _release(self, seq: _Running) -> None:
        """Give ``seq``'s slot back."""
        assert self._cache is not None
        self._cache.remove(seq.slot)
        self._running.remove(seq)

    def _emit(self, job: Job, event: Event) -> None:
        if job.cancelled:
            return
        try:
            job.on_event(event)
        except Exception:  # noqa: BLE001 - the listener is gone (e.g. its event loop closed)
            job.cancelled = True

    def _fail(self, job: Job, error: Exception) -> None:
        """Report ``error`` to the job and stop it; its slots are freed before the next step."""
        self._emit(job, Event(0, error=error))
        job.cancelled = True

    def _count_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += n
            self._recent.append((now, n))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
