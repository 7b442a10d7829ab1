"""``create_app(llm)``: the OpenAI-compatible HTTP server (FastAPI) and the web playground at ``/``.

Routes only translate. Generation goes to the continuous-batching ``Scheduler`` (one thread owns decoding);
parsing and validating JSON bodies (``guard.ParsedOffLoop``), tokenizing and chat-template rendering,
embeddings, classify and summarize run in worker threads, so the event loop, which answers every client
(``/health`` included), never waits on one request's work.

Limits are checked before any work starts, cheapest first (README.md's serve section has the table):

- ``guard.Guard``, before a route: a Host header other than localhost / 127.0.0.1 / ::1 / ``allowed_hosts`` when
  there is no API key (421: DNS rebinding), the API key (401), the body size (``ServerLimits.max_body_bytes``,
  413, counted as it arrives), a POST body that is not ``application/json`` (415: a cross-site page can send
  text or forms without a CORS preflight, never JSON).
- ``guard.parse_body``, in a worker thread: at most ``MAX_JSON_CONTAINERS`` objects and arrays, counted before
  parsing (400), UTF-8 JSON (400), no lone surrogate in a string (400).
- The request models (``protocol.py``): at most ``MAX_MESSAGES`` chat messages, ``MAX_STOP`` stop strings of
  ``MAX_STOP_CHARS`` characters, ``MAX_INPUTS`` texts to embed or classify, ``MAX_LABELS`` labels and examples
  (422).
- Characters, before tokenizing: a prompt (all chat messages together) longer than ``max_context`` times
  the longest vocabulary entry's characters (``longest_token_chars``) cannot fit, since no token covers more;
  nor can a text to embed, classify or explain longer than the model's context times that, or a text to
  summarize longer than ``SUMMARY_CONTEXTS`` contexts' worth (400 ``context_length_exceeded``). The attention
  view then takes at most ``explain.attention.MAX_VIEW_TOKENS`` tokens and a layer and head the model has (400).
- ``response_format``: a schema of at most ``limits.MAX_CONSTRAINT_BYTES`` as JSON text, compiled in a worker
  thread; a malformed or unsatisfiable one is a 400 ``invalid_schema`` naming the problem (``structured.py``).
- Sequences: prompts x n at most ``ServerLimits.max_rows`` and at most the queue (400 ``too_many_sequences``);
  prompt + max_tokens beyond the context (400, naming both numbers: nothing is ever truncated silently); a
  full queue, counted in sequences (429 with Retry-After). Requests take turns for free slots (scheduler).

A request that runs past its timeout gets 504 (mid-stream: an error event) and frees its slots, as does a
client that goes away; a task (embeddings, classify, summarize) stops before its next batch in both cases.
Connections (half-sent requests, idle keep-alives, their number) are bounded in ``serve/limits.py``. Every
error is an OpenAI error object, ``{"error": {"message", "type", "param", "code"}}``.

Why one module: the routes are thin translations onto one ``_Service`` state (the scheduler, the limits, the
latency histograms), and the checks above run in one order for every generation route; split by route, each
file would import and thread that state again. What can stand alone already does: the wire shapes
(``protocol.py``), the guard (``guard.py``), connection limits (``limits.py``), decoding (``scheduler.py``),
constraints (``lmforge.structured``) and tool calling (``lmforge.tools``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from lmforge.beam import BeamParams, beam_complete
from lmforge.errors import LmforgeError
from lmforge.explain.attention import attention_head
from lmforge.generate import SamplingParams
from lmforge.inference import prompt_logprobs
from lmforge.progress import stop_when
from lmforge.quant import bf16_batches, dense_copy_bytes, packing_summary, set_batch_weights
from lmforge.runtime import release_openmp_threads
from lmforge.serve.access_log import TOKENS, AccessLog
from lmforge.serve.guard import LOCAL_HOSTS, Guard, ParsedOffLoop, answer_errors
from lmforge.serve.limits import ServerLimits
from lmforge.serve.metrics import LATENCY_BUCKETS, TTFT_BUCKETS, Histogram, prefix_cache_metrics, sample
from lmforge.serve.protocol import (
    ERROR_RESPONSES,
    STREAMED_RESPONSE,
    APIError,
    AttentionRequest,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
    ResponseFormat,
    SummarizeRequest,
    TemplateRequest,
    TokenText,
    usage,
)
from lmforge.serve.scheduler import Event, QueueFullError, Scheduler, TokenLogprob
from lmforge.structured import Constraint, response_format_constraint
from lmforge.tokenizer import Tokenizer
from lmforge.tools import ToolCalling, tool_calling

if TYPE_CHECKING:
    from lmforge.api import LLM

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 1.0  # how often a request waiting for tokens checks that its client is still there
TASK_THREADS = 2  # embeddings / classify / summarize running at once
PREPARE_THREADS = 2  # prompts being tokenized (or rendered with the chat template) at once
SUMMARY_CONTEXTS = 8  # /v1/summarize takes up to this many contexts' worth of characters (it chunks them)
T = TypeVar("T")


def create_app(
    llm: LLM,
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_context: int | None = None,
    limits: ServerLimits | None = None,
    request_timeout_s: float = 600.0,
    cors_origins: Sequence[str] | None = None,
    allowed_hosts: Sequence[str] | None = None,
    model_name: str | None = None,
    warm_up: bool = False,
    access_log: Callable[[str], None] | None = None,
    batch_weights: str = "auto",
) -> FastAPI:
    """The server for ``llm``: OpenAI's /v1 API, /health, /metrics and the playground at /.

    ``max_context`` caps prompt + max_tokens (default: the model's context); ``api_key`` guards /v1/*;
    ``limits`` bounds bodies, sequences and connections (``ServerLimits()``); ``cors_origins`` lets those
    browser origins call the API; ``allowed_hosts`` are Host names accepted besides localhost, 127.0.0.1 and
    ::1 ("*": any) — None accepts any Host when there is an API key and only those three when there is not;
    ``warm_up`` compiles the decode step for every batch size the scheduler uses when it starts (requests wait
    meanwhile) instead of when a batch first needs one (every stream waits then); ``access_log`` is given one
    line per request (``serve.access_log``); ``batch_weights`` says how packed weights multiply a step of several
    streams (``quant.set_batch_weights``: auto, packed, packed-bf16 or bf16). Run it with
    ``uvicorn.Server(lmforge.serve.uvicorn_config(app)).run()``, which also applies the connection limits.
    """
    limits = limits or ServerLimits()
    if llm.config.is_seq2seq:  # the scheduler's slots are a decoder's cache
        raise LmforgeError(
            f"{llm.config.model_type} is an encoder–decoder: lmforge serve runs decoder-only models and encoders",
            hint="use LLM.generate_text / summarize or `lmforge generate` with it",
        )
    context = llm.config.block_size
    if max_context is not None and not 1 <= max_context <= context:
        raise LmforgeError(
            f"max_context={max_context} is outside the model's context of {context} tokens",
            hint=f"use a value from 1 to {context}",
        )
    # before the scheduler compiles its steps, which read the setting
    set_batch_weights(llm.model, batch_weights, max_batch)
    scheduler = Scheduler(llm, max_batch=max_batch, max_queue=max_queue, warm_up=warm_up)
    scheduler.prefix_cache = (
        llm.prefix_cache
    )  # one cache for the API and llm's own calls (llm.set_prefix_cache)
    service = _Service(
        llm, scheduler, model_name or _model_id(llm.source), max_context or context, request_timeout_s, limits
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="lmforge", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.router.route_class = ParsedOffLoop  # JSON bodies are parsed in a worker thread (guard.py)
    app.state.scheduler = scheduler
    app.state.limits = limits
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    streams = {"response_model": None, "responses": STREAMED_RESPONSE}
    app.add_api_route("/v1/chat/completions", service.chat, methods=["POST"], **streams)
    app.add_api_route("/v1/completions", service.completions, methods=["POST"], **streams)
    app.add_api_route("/v1/apply-template", service.apply_template, methods=["POST"])
    app.add_api_route("/v1/embeddings", service.embeddings, methods=["POST"])
    app.add_api_route("/v1/classify", service.classify, methods=["POST"])
    app.add_api_route("/v1/summarize", service.summarize, methods=["POST"])
    app.add_api_route("/v1/explain/attention", service.attention, methods=["POST"])
    app.add_api_route("/health", service.health, methods=["GET"], response_model=None)
    app.add_api_route("/metrics", service.metrics, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route(
        "/", lambda: FileResponse(STATIC / "index.html"), methods=["GET"], include_in_schema=False
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    answer_errors(app)
    # Added last = outermost: CORS answers preflights and decorates every response, the guard runs next.
    hosts = None if allowed_hosts is None and api_key else [*LOCAL_HOSTS, *(allowed_hosts or ())]
    app.add_middleware(
        Guard,
        api_key=api_key,
        max_body_bytes=limits.max_body_bytes,
        allowed_hosts=None if hosts is None or "*" in hosts else frozenset(h.lower() for h in hosts),
    )
    if cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    if access_log is not None:  # outermost: refused requests are logged too
        app.add_middleware(AccessLog, write=access_log)
    return app


def _model_id(source: str) -> str:
    """A short model name, never a path: a file's stem, a folder's name (a training run's ``runs/NAME/model``
    folder: the run's NAME); store names, packaged names and hub ids stay as they are."""
    path = Path(source)
    if path.is_file():
        return path.stem
    if path.is_dir():
        path = path.resolve()
        return path.parent.name if path.name == "model" and path.parent.name else path.name
    return source


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """Characters the longest vocabulary entry can stand for (its spelling: byte-level entries spell each byte
    with one character, and a character is at least a byte), so a text of C characters needs at least
    C / this many tokens: beyond ``context`` times this, it cannot fit, and is refused before tokenizing."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return max((len(piece) for piece in vocab), default=1)


# ------------------------------------------------------------------ endpoints
class _Service:
    def __init__(
        self,
        llm: LLM,
        scheduler: Scheduler,
        model_id: str,
        max_context: int,
        request_timeout_s: float,
        limits: ServerLimits,
    ) -> None:
        self.llm = llm
        self.scheduler = scheduler
        self.model_id = model_id
        self.max_context = max_context
        self.request_timeout_s = request_timeout_s
        self.limits = limits
        token_chars = longest_token_chars(llm.tokenizer)
        self.max_prompt_chars = max_context * token_chars  # a generation prompt (all messages together)
        self.max_text_chars = llm.config.block_size * token_chars  # a text to embed or classify
        self.token_text = TokenText(llm.tokenizer)
        self.created = int(time.time())
        self.task_limiter = anyio.CapacityLimiter(TASK_THREADS)
        self.prepare_limiter = anyio.CapacityLimiter(PREPARE_THREADS)
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds", "Time from request to first generated text.", TTFT_BUCKETS
        )
        self.latency = Histogram(
            "lmforge_request_latency_seconds",
            "Time from request to the last generated token.",
            LATENCY_BUCKETS,
        )

    # ------------------------------------------------------------- generation
    async def chat(self, body: ChatRequest, request: Request) -> Response:
        messages = [m.as_dict() for m in body.messages]
        self._check_rows(1, body.n)
        self._check_chars([sum(m.chars for m in body.messages)], self.max_prompt_chars, "messages")
        calling, constraint = await self._tools(body, messages)
        if calling is None:
            prompt = await self._prepare(self.llm.prompt_ids, messages)
        else:
            prompt = await self._prepare(calling.prompt_ids, self.llm.tokenizer, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # OpenAI's chat default: whatever the context leaves
            max_tokens = max(1, self.max_context - len(prompt))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        tools = None if calling is None else (calling.functions, calling.choice)
        fmt = ResponseFormat(chat=True, model_id=self.model_id, token_text=self.token_text, tools=tools)
        return await self._generate(request, body, [prompt], max_tokens, logprobs, fmt, constraint)

    async def _tools(
        self, body: ChatRequest, messages: list[dict[str, Any]]
    ) -> tuple[ToolCalling | None, Constraint | None]:
        """The request's tool calling (``lmforge.tools``) and, for a forced call, its compiled call schema; a
        bad tool or tool_choice is a 400 naming the problem."""
        try:
            calling = tool_calling(body.tools, body.tool_choice, messages)
            if calling is None or calling.schema is None:
                return calling, None
            if body.response_format is not None:
                raise LmforgeError(
                    "response_format cannot be combined with tool_choice 'required' or a named function"
                )
            return calling, await self._prepare(calling.constraint, self.llm.tokenizer)
        except LmforgeError as e:
            param = "tool_choice" if e.message.startswith("tool_choice") else "tools"
            raise APIError(400, str(e), param=param, code="invalid_tools") from None

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        if body.echo and (body.max_tokens != 0 or body.stream or body.n != 1):
            raise APIError(
                400,
                "echo is supported for scoring prompts: with max_tokens=0, n=1 and no stream",
                param="echo",
            )
        beams = body.beams()
        prompt = body.prompt
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
        one = isinstance(prompt, str) or all(isinstance(p, int) for p in prompt)
        self._check_rows(1 if one else len(prompt), body.n)
        self._check_chars([len(t) for t in texts], self.max_prompt_chars, "prompt")
        prompts = await self._prepare(self._completion_prompts, prompt)
        if body.echo:
            return await self._echo(body, request, texts, prompts)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        fmt = ResponseFormat(chat=False, model_id=self.model_id, token_text=self.token_text)
        if beams is not None:
            return await self._beams(request, body, prompts, max_tokens, beams, fmt)
        return await self._generate(request, body, prompts, max_tokens, body.logprobs, fmt)

    async def _echo(
        self, body: CompletionRequest, request: Request, texts: list[str], prompts: list[list[int]]
    ) -> JSONResponse:
        """OpenAI's legacy ``echo``: the prompts back with their tokens' logprobs (``logprobs``: how many top
        tokens too), generating nothing. Scoring a text this way is what a hosted client's ``classify_text``
        does (``lmforge.hosted``), so it answers as the local model's label scoring does."""
        if self.llm.config.is_encoder:
            raise APIError(400, "this model is a sentence encoder: it serves /v1/embeddings, not completions")
        self._check_fits(prompts, 0)
        top = body.logprobs

        def score() -> list[Any]:
            return [None] * len(prompts) if top is None else prompt_logprobs(self.llm, prompts, top)

        scored = await self._in_thread(request, score)
        shown = texts if len(texts) == len(prompts) else [self.llm.tokenizer.decode(ids) for ids in prompts]
        fmt = ResponseFormat(chat=False, model_id=self.model_id, token_text=self.token_text)
        counts = usage(sum(len(ids) for ids in prompts), 0)
        return JSONResponse(fmt.echo(list(zip(shown, prompts, scored, strict=True)), counts))

    async def apply_template(self, body: TemplateRequest) -> dict[str, str]:
        """The text ``messages`` render to with the model's chat template, ready for /v1/completions
        (llama.cpp's /apply-template): a hosted client builds its prompts exactly as the local model does."""
        messages = [m.as_dict() for m in body.messages]
        self._check_chars([sum(len(m["content"]) for m in messages)], self.max_prompt_chars, "messages")
        return {"prompt": await self._prepare(self.llm.tokenizer.apply_chat_template, messages)}

    async def _beams(
        self,
        request: Request,
        body: CompletionRequest,
        prompts: list[list[int]],
        max_tokens: int,
        beams: BeamParams,
        fmt: ResponseFormat,
    ) -> Response:
        """Beam search (``best_of`` beams at temperature 0) in a task thread: the best ``n`` per prompt."""
        if self.llm.config.is_encoder:
            raise APIError(400, "this model is a sentence encoder: it serves /v1/embeddings, not completions")
        self._check_rows(len(prompts), beams.num_beams)
        self._check_fits(prompts, max_tokens)
        llm, params = self.llm, body.sampling(max_tokens)
        found = await self._in_thread(
            request, beam_complete, llm.model, llm.tokenizer, prompts, params, beams, llm.eos_ids
        )
        completions = [c for per_prompt in found for c in per_prompt]
        tokens = sum(len(c.token_ids) for c in completions)
        setattr(request.state, TOKENS, tokens)
        choices = [(c.text, None, c.finish_reason) for c in completions]
        return JSONResponse(fmt.response(choices, usage(sum(len(p) for p in prompts), tokens)))

    def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """A prompt is text, a list of texts, token ids, or a list of token-id lists."""
        if isinstance(prompt, str):
            return [self.llm.prompt_ids(prompt)]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [self.llm.prompt_ids(p) if isinstance(p, str) else list(p) for p in prompt]
        vocab = self.llm.config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompts

    async def _prepare(self, fn: Callable[..., T], *args: Any) -> T:
        """Tokenize (or render a chat template) in a worker thread: a long prompt must not hold up the event
        loop, which answers every other client."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.prepare_limiter)

    def _check_rows(self, prompts: int, n: int) -> None:
        """Sequences per request: at most ``limits.max_rows``, and never more than the queue can hold."""
        limit = min(self.limits.max_rows, self.scheduler.max_queue)
        if prompts * n > limit:
            raise APIError(
                400,
                f"{prompts} prompt(s) x n={n} asks for {prompts * n} sequences; the server's limit is "
                f"{limit} per request",
                param="n" if prompts == 1 else "prompt",
                code="too_many_sequences",
            )

    def _check_chars(self, lengths: list[int], limit: int, param: str) -> None:
        """Refuse texts too long to fit before tokenizing them (see ``longest_token_chars``)."""
        longest = max(lengths, default=0)
        if longest > limit:
            raise APIError(
                400,
                f"{param} has {longest} characters, more than the {limit} any text that fits the context can "
                "have; shorten it (nothing is truncated)",
                param=param,
                code="context_length_exceeded",
            )

    def _check_fits(self, prompts: list[list[int]], max_tokens: int) -> None:
        for prompt in prompts:
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            if len(prompt) + max_tokens > self.max_context:
                raise APIError(
                    400,
                    f"prompt of {len(prompt)} tokens plus max_tokens={max_tokens} exceeds the context of "
                    f"{self.max_context} tokens; shorten the prompt or lower max_tokens (nothing is truncated)",
                    param="max_tokens",
                    code="context_length_exceeded",
                )

    async def _generate(
        self,
        request: Request,
        body: GenerationRequest,
        prompts: list[list[int]],
        max_tokens: int,
        logprobs: int | None,
        fmt: ResponseFormat,
        constraint: Constraint | None = None,
    ) -> Response:
        """Run the request's sequences; ``constraint`` (a forced tool call's) stands in for response_format's."""
        started = time.monotonic()
        if self.llm.config.is_encoder:
            raise APIError(400, "this model is a sentence encoder: it serves /v1/embeddings, not completions")
        self._check_fits(prompts, max_tokens)
        params = body.sampling(max_tokens)
        constraint = constraint or await self._constraint(body)
        generation = _Generation(self.scheduler, prompts, params, body.n, logprobs, constraint)
        deadline = started + self.request_timeout_s
        prompt_tokens = sum(len(p) for p in prompts)
        events = self._observed(generation.events(request, deadline, self.request_timeout_s), started)
        if body.stream:
            chunks = self._stream(
                generation, events, fmt, logprobs is not None, prompt_tokens, body.include_usage, request
            )
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        total = len(prompts) * body.n
        texts, reasons = [""] * total, ["length"] * total
        token_logprobs: list[list[TokenLogprob]] = [[] for _ in range(total)]
        completion_tokens = 0
        try:
            async for index, event in events:
                token_logprobs[index] += event.logprobs
                if event.completion is not None:
                    texts[index], reasons[index] = event.completion.text, event.completion.finish_reason
                    completion_tokens += len(event.completion.token_ids)
        finally:
            generation.cancel()
        setattr(request.state, TOKENS, completion_tokens)
        lps = token_logprobs if logprobs is not None else [None] * total
        choices = list(zip(texts, lps, reasons, strict=True))
        return JSONResponse(fmt.response(choices, usage(prompt_tokens, completion_tokens, generation.jobs)))

    async def _observed(
        self, events: AsyncIterator[tuple[int, Event]], started: float
    ) -> AsyncIterator[tuple[int, Event]]:
        """Pass the events on, timing the first text and the end for the latency histograms."""
        first = True
        async for index, event in events:
            if first and event.text:
                self.ttft.observe(time.monotonic() - started)
                first = False
            yield index, event
        self.latency.observe(time.monotonic() - started)

    async def _stream(
        self,
        generation: _Generation,
        events: AsyncIterator[tuple[int, Event]],
        fmt: ResponseFormat,
        with_logprobs: bool,
        prompt_tokens: int,
        include_usage: bool,
        request: Request,
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        started: set[int] = set()
        completion_tokens = 0
        try:
            async for index, event in events:
                first = index not in started
                started.add(index)
                for chunk in fmt.pieces(index, event.text, event.logprobs if with_logprobs else None, first):
                    yield _sse(chunk)
                if event.completion is not None:
                    completion_tokens += len(event.completion.token_ids)
                    for chunk in fmt.ending(index, event.completion.finish_reason):
                        yield _sse(chunk)
            if include_usage:
                yield _sse(fmt.usage_chunk(usage(prompt_tokens, completion_tokens, generation.jobs)))
            yield "data: [DONE]\n\n"
        except APIError as e:  # the response has started: report the error as an event
            yield _sse(e.body())
        finally:
            generation.cancel()
            setattr(request.state, TOKENS, completion_tokens)

    async def _constraint(self, body: GenerationRequest) -> Constraint | None:
        """The request's ``response_format`` compiled (in a worker thread: a new schema takes milliseconds,
        the tokenizer's first one a few tenths of a second); a malformed schema is a 400 naming the problem."""
        spec = body.response_format.as_dict() if body.response_format is not None else None
        if spec is None:
            return None
        try:
            return await self._prepare(response_format_constraint, self.llm.tokenizer, spec)
        except LmforgeError as e:
            raise APIError(
                400, f"invalid response_format: {e.message}", param="response_format", code="invalid_schema"
            ) from None

    # ------------------------------------------------------------------ tasks
    async def _in_thread(self, request: Request, fn: Callable[..., T], *args: Any) -> T:
        """Run a task off the event loop (tasks share the model with the scheduler; inference is read-only).

        A client that goes away (checked every ``DISCONNECT_POLL_S``) or a timeout stops the task before its
        next batch (``progress.stop_when``), so abandoned work does not hold the task threads."""
        stop = threading.Event()

        def run() -> T:
            try:
                with stop_when(stop):
                    return fn(*args)
            finally:  # this worker's OpenMP team would slow the scheduler's down (see release_openmp_threads)
                release_openmp_threads()

        work = asyncio.ensure_future(anyio.to_thread.run_sync(run, limiter=self.task_limiter))
        deadline = time.monotonic() + self.request_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timeout(self.request_timeout_s)
                done, _ = await asyncio.wait({work}, timeout=min(DISCONNECT_POLL_S, left))
                if done:
                    return work.result()
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed")
        finally:
            if not work.done():
                stop.set()
                work.add_done_callback(_discard_outcome)

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input is empty", param="input")
        self._check_chars([len(t) for t in texts], self.max_text_chars, "input")

        def embed() -> tuple[np.ndarray, int]:
            return self.llm.embed(texts), sum(len(self.llm.tokenizer.encode(t)) for t in texts)

        vectors, tokens = await self._in_thread(request, embed)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": self.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input is empty", param="input")
        self._check_chars([len(t) for t in texts], self.max_text_chars, "input")
        self._check_chars([len(t) for t, _ in body.examples], self.max_text_chars, "examples")
        results = await self._in_thread(request, self.llm.classify_text, texts, body.labels, body.examples)
        return {
            "object": "list",
            "model": self.model_id,
            "data": [{"index": i, **r} for i, r in enumerate(results)],
        }

    async def summarize(self, body: SummarizeRequest, request: Request) -> dict[str, Any]:
        self._check_chars([len(body.input)], SUMMARY_CONTEXTS * self.max_text_chars, "input")
        summary = await self._in_thread(request, self.llm.summarize, body.input, body.max_tokens)
        return {"object": "summary", "model": self.model_id, "summary": summary}

    async def attention(self, body: AttentionRequest, request: Request) -> dict[str, Any]:
        self._check_chars([len(body.input)], self.max_text_chars, "input")
        view = await self._in_thread(
            request, functools.partial(attention_head, layer=body.layer, head=body.head), self.llm, body.input
        )
        return {"object": "attention", "model": self.model_id, **view}

    # ----------------------------------------------------------- information
    async def models(self) -> dict[str, Any]:
        config, model = self.llm.config, self.llm.model
        card = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "lmforge",
            "max_model_len": self.max_context,
            "lmforge": {
                "architecture": config.model_type,
                "parameters": model.num_parameters(),
                "dtype": str(model.dtype).removeprefix("torch."),
                "packing": packing_summary(model),
                "batch_weights_bytes": dense_copy_bytes(
                    model
                ),  # a bf16 copy for batches; 0: the packed kernel
                "bf16_batches": bf16_batches(model),  # batch steps in bf16 dot products
                "compiled_decode": bool(getattr(model, "compile_decode", False)),
                "device": str(model.device),
                "context_length": config.block_size,
                "chat_template": bool(self.llm.tokenizer.chat_template),
                "max_batch": self.scheduler.max_batch,
            },
        }
        return {"object": "list", "data": [card]}

    async def health(self) -> JSONResponse:
        ok = self.scheduler.alive
        body = {"status": "ok" if ok else "scheduler stopped", "model": self.model_id}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self) -> str:
        s = self.scheduler
        lines = [
            *sample("lmforge_queue_depth", "gauge", "Sequences waiting for a slot.", s.queue_depth),
            *sample("lmforge_running_sequences", "gauge", "Sequences being decoded.", s.running),
            *sample("lmforge_generated_tokens_total", "counter", "Tokens generated.", s.generated_tokens),
            *sample(
                "lmforge_tokens_per_second",
                "gauge",
                "Tokens generated per second, last 10 s.",
                s.tokens_per_second(),
            ),
            *self.ttft.render(),
            *self.latency.render(),
            *prefix_cache_metrics(s.prefix_cache),
        ]
        return "\n".join(lines) + "\n"


class _Generation:
    """The scheduler jobs of one HTTP request (one per prompt, ``n`` sequences each) and their events."""

    def __init__(
        self,
        scheduler: Scheduler,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        logprobs: int | None,
        constraint: Constraint | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.remaining = n * len(prompts)  # sequences not yet finished
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.jobs = []
        try:
            for i, prompt in enumerate(prompts):
                deliver = functools.partial(self._deliver, loop, i * n)
                self.jobs.append(
                    scheduler.submit(
                        prompt,
                        params,
                        n=n,
                        logprobs=logprobs,
                        on_event=deliver,
                        group=self,
                        constraint=constraint,
                    )
                )
        except QueueFullError as e:
            self.cancel()
            raise APIError(
                429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        except BaseException:
            self.cancel()
            raise

    def _deliver(self, loop: asyncio.AbstractEventLoop, offset: int, event: Event) -> None:
        """Called in the scheduler thread: hand the event to the request's event loop."""
        loop.call_soon_threadsafe(self.queue.put_nowait, (offset, event))

    async def events(
        self, request: Request, deadline: float, timeout_s: float
    ) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every sequence has finished; raises APIError on errors, timeouts and
        when the client has gone away (checked every second: a plain response only notices it this way)."""
        checked = time.monotonic()
        while self.remaining:
            now = time.monotonic()
            if now >= deadline:
                raise _timeout(timeout_s)
            if now - checked >= DISCONNECT_POLL_S:
                checked = now
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the request", code="client_closed")
            try:
                offset, event = await asyncio.wait_for(
                    self.queue.get(), min(DISCONNECT_POLL_S, deadline - now)
                )
            except asyncio.TimeoutError:
                continue
            if event.error is not None:
                status = 503 if isinstance(event.error, LmforgeError) else 500
                raise APIError(status, f"generation failed: {event.error}", type="server_error")
            if event.completion is not None:
                self.remaining -= 1
            yield offset + event.index, event

    def cancel(self) -> None:
        for job in self.jobs:
            self.scheduler.cancel(job)


def _timeout(seconds: float) -> APIError:
    return APIError(
        504,
        f"the request ran past the server's timeout of {seconds:g} s",
        type="timeout_error",
        code="timeout",
    )


def _discard_outcome(work: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's result or error (``progress.Stopped``, usually): nobody waits for it."""
    if not work.cancelled():
        work.exception()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
