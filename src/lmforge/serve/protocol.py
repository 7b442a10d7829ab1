"""The OpenAI wire format: request bodies, response and stream-chunk shapes, error objects.

Only translation lives here; what a request does is decided in ``app.py`` and the scheduler. The request
models carry the fixed bounds on list and string fields (``MAX_*`` below; beyond them: 422 naming the field),
so no request reaches a tokenizer, a chat template or the stop-string matcher with unbounded input. A list's
length is checked before its items (``_at_most``): pydantic validates every item before it compares the count
with ``max_length``, and a 4 MB body holds a million small items, seconds of validation holding the GIL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from lmforge import limits
from lmforge.beam import MAX_BEAMS, BeamParams
from lmforge.generate import SamplingParams
from lmforge.serve.scheduler import Job, TokenLogprob
from lmforge.tokenizer import Tokenizer
from lmforge.tools import Function, ToolChoice, ToolStream, parse_reply


class APIError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer (the OpenAPI schema documents it for each status below)."""

    error: ErrorDetail


_ERRORS = {
    400: "a value the schema allows but the server refuses (too long for the context, too many sequences...)",
    401: "a missing or wrong API key",
    413: "a body over the size limit",
    415: "a POST body that is not JSON",
    421: "a Host header the server does not answer to",
    422: "a body that does not fit the request's schema",
    429: "a full queue (with Retry-After)",
    499: "the client went away",
    503: "the scheduler stopped",
    504: "the request ran past the server's timeout",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in _ERRORS.items()
}


# Chat and completions answer JSON, or server-sent events when the request asks for a stream.
STREAMED_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the answer; with stream=true, server-sent events (OpenAI's chunks, then [DONE])",
        # One event: its data is a JSON chunk (or "[DONE]"), as text.
        "content": {
            "text/event-stream": {
                "schema": {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
            }
        },
    }
}


def error_body(
    message: str, type: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------- requests
MAX_STOP = 16  # stop strings per request: each is checked at every token
MAX_STOP_CHARS = 256  # characters per stop string (the matcher looks this far back)
MAX_MESSAGES = 1024  # chat messages per request (their characters are bounded by the context, in app.py)
MAX_INPUTS = 2048  # texts per embeddings or classify request (OpenAI's embeddings limit)
MAX_LABELS = 64  # classify labels, and few-shot examples, per request
MAX_LABEL_CHARS = 256  # characters per classify label
MAX_CONTENT_PARTS = 16  # content parts per chat message (x MAX_MESSAGES: each is a model to validate)
MAX_PROMPTS = 2048  # prompts per completion request (ServerLimits.max_rows counts them with n, in app.py)
MAX_PROMPT_IDS = 2**20  # token ids per prompt: a bound on validation work; app.py checks the context
MAX_TOOL_CALLS = 64  # tool calls per assistant message in a conversation
MAX_SCHEMA_NAME_CHARS = 64  # response_format.json_schema.name (OpenAI's limit); the schema: structured.py's
MAX_SCHEMA_DESCRIPTION_CHARS = 4096  # response_format.json_schema.description (not used: kept for clients)


def _at_most(limit: int) -> BeforeValidator:
    """Refuse a list longer than ``limit`` before its items are validated (``max_length`` counts after)."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > limit:
            raise PydanticCustomError(
                "too_long",
                "List should have at most {max_length} items, not {actual_length}",
                {"max_length": limit, "actual_length": len(value)},
            )
        return value

    return BeforeValidator(check)


def _only_ints(value: Any) -> Any:
    """One error for a list of token ids holding something else (pydantic would report every item: a
    million strings in a 4 MB body, and the union of prompt shapes tries each)."""
    if isinstance(value, list) and not all(type(x) is int for x in value):
        raise PydanticCustomError("int_type", "Token ids should be integers")
    return value


def _pairs_as_tuples(value: Any) -> Any:
    """JSON arrays as tuples, which strict validation (``guard.parse_body``) takes only as such."""
    if isinstance(value, list):
        return [tuple(pair) if isinstance(pair, list) else pair for pair in value]
    return value


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP), _at_most(MAX_STOP)]
Label = Annotated[str, Field(max_length=MAX_LABEL_CHARS)]
Texts = Annotated[list[str], Field(max_length=MAX_INPUTS), _at_most(MAX_INPUTS)]
TokenIds = Annotated[
    list[int], Field(max_length=MAX_PROMPT_IDS), BeforeValidator(_only_ints), _at_most(MAX_PROMPT_IDS)
]


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the answer must follow (``strict`` is accepted; every
    schema is enforced strictly here)."""

    name: str = Field(default="response", max_length=MAX_SCHEMA_NAME_CHARS)
    description: str | None = Field(default=None, max_length=MAX_SCHEMA_DESCRIPTION_CHARS)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatRequest(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def as_dict(self) -> dict[str, Any] | None:
        """The form ``structured.response_format_constraint`` takes (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.json_schema is None:
            raise APIError(
                400, "response_format json_schema needs a 'json_schema' object", param="response_format"
            )
        return {"type": "json_schema", "json_schema": {"schema": self.json_schema.schema_}}


class GenerationRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions (unknown fields are ignored, as OpenAI does).

    ``top_k``, ``min_p``, ``repetition_penalty`` and ``ignore_eos`` are extensions with vLLM's names.
    """

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    response_format: ResponseFormatRequest | None = None

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The request's ``SamplingParams`` (OpenAI's defaults: temperature 1, top_p 1)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(
                    400, f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead", param=name
                )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k is not None and self.top_k > 0 else None,  # vLLM's -1 means off
            min_p=self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=stop,
            stop_on_eos=not self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    """A call in an earlier assistant turn (``id`` pairs it with the ``tool`` message answering it)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: str
    content: (
        str
        | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS), _at_most(MAX_CONTENT_PARTS)]
        | None
    ) = None
    tool_calls: Annotated[list[ToolCallIn], _at_most(MAX_TOOL_CALLS)] | None = Field(
        default=None, max_length=MAX_TOOL_CALLS
    )
    tool_call_id: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                raise APIError(400, "only text content parts are supported", param="messages")
            text = "".join(part.text or "" for part in self.content)
        else:
            text = self.content or ""
        message: dict[str, Any] = {"role": self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    @property
    def chars(self) -> int:
        """Characters this message brings to the prompt (its text and its calls' names and arguments)."""
        calls = sum(len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or ())
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(p.text or "" for p in self.content or ())
        )
        return len(content) + calls


class ChatRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], _at_most(MAX_MESSAGES)] = Field(
        min_length=1, max_length=MAX_MESSAGES
    )
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # OpenAI's tools (``lmforge.tools`` checks each one's shape and size); tool_choice: "auto", "none",
    # "required" or {"type": "function", "function": {"name": ...}}. parallel_tool_calls is accepted: a free
    # reply may hold several calls, a forced one holds one.
    tools: Annotated[list[dict[str, Any]], _at_most(limits.MAX_TOOLS)] | None = Field(
        default=None, max_length=limits.MAX_TOOLS
    )
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(GenerationRequest):
    # Token ids before texts: pydantic tries the members in turn, and a list of a million ids checked as
    # texts first would collect a million errors.
    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(max_length=MAX_PROMPTS), _at_most(MAX_PROMPTS)]
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS), _at_most(MAX_PROMPTS)]
    )
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False  # with max_tokens=0: the prompt's own token logprobs (OpenAI's legacy scoring)
    best_of: int | None = Field(default=None, ge=1, le=MAX_BEAMS)

    def beams(self) -> BeamParams | None:
        """``best_of`` > 1 at temperature 0 is beam search with ``best_of`` beams, returning the best ``n``;
        None when the request samples as usual."""
        best_of = self.best_of or 1
        if best_of == 1:
            return None
        for wrong, message in (
            (self.temperature != 0, "best_of > 1 runs beam search: set temperature to 0"),
            (self.n > best_of, f"n={self.n} must be at most best_of={best_of}"),
            (self.stream, "best_of > 1 cannot stream: the best beams are known only at the end"),
            (self.logprobs is not None, "logprobs are not given with best_of > 1"),
            (
                self.response_format is not None and self.response_format.type != "text",
                "response_format constrains sampled rows, not beams (best_of > 1)",
            ),
        ):
            if wrong:
                raise APIError(400, message, param="best_of")
        return BeamParams(num_beams=best_of, num_return_sequences=self.n)


class TemplateRequest(BaseModel):
    """/v1/apply-template (llama.cpp's /apply-template): the prompt text chat messages render to."""

    messages: Annotated[list[ChatMessage], _at_most(MAX_MESSAGES)] = Field(
        min_length=1, max_length=MAX_MESSAGES
    )


class EmbeddingRequest(BaseModel):
    input: str | Texts
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


class ClassifyRequest(BaseModel):
    input: str | Texts
    labels: Annotated[list[Label], _at_most(MAX_LABELS)] | None = Field(default=None, max_length=MAX_LABELS)
    examples: Annotated[list[tuple[str, Label]], BeforeValidator(_pairs_as_tuples), _at_most(MAX_LABELS)] = (
        Field(default=[], max_length=MAX_LABELS)
    )
    model: str | None = None


class AttentionRequest(BaseModel):
    """One layer's and head's attention over a text (the playground's attention view)."""

    input: str
    layer: int = Field(default=0, ge=0)
    head: int = Field(default=0, ge=0)
    model: str | None = None


class SummarizeRequest(BaseModel):
    input: str
    max_tokens: int = Field(default=80, ge=1)
    model: str | None = None


# ------------------------------------------------------------------ responses
def usage(prompt_tokens: int, completion_tokens: int, jobs: Sequence[Job] = ()) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens`` counts the prompt tokens of ``jobs`` the prefix cache supplied
    (each job's count is set before its first event, so it is complete once every job has one)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(job.cached_tokens for job in jobs)},
    }


class TokenText:
    """A token's exact bytes and display string: half a character shows as ``bytes:\\xe4\\xbd`` (as OpenAI
    does), so logprobs never carry U+FFFD and clients can rebuild the text from ``bytes``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}  # at most one entry per vocabulary token

    def bytes(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            self._bytes[token_id] = self.tokenizer.token_bytes(token_id)
        return self._bytes[token_id]

    def text(self, token_id: int) -> str:
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class ResponseFormat:
    """Builds the JSON of one generation request, for chat (``chat.completion``) or text completions."""

    def __init__(
        self,
        chat: bool,
        model_id: str,
        token_text: TokenText,
        tools: tuple[list[Function], ToolChoice] | None = None,
    ) -> None:
        self.chat = chat
        self.model_id = model_id
        self.token_text = token_text
        self.tools = tools  # (functions, choice): the reply is parsed into tool calls (lmforge.tools)
        self._tool_streams: dict[int, ToolStream] = {}
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, stream: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if stream else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        text = self.token_text.text
        if self.chat:
            return {
                "content": [
                    {
                        "token": text(e.token_id),
                        "logprob": e.logprob,
                        "bytes": list(self.token_text.bytes(e.token_id)),
                        "top_logprobs": [
                            {"token": text(i), "logprob": lp, "bytes": list(self.token_text.bytes(i))}
                            for i, lp in e.top
                        ],
                    }
                    for e in entries
                ]
            }
        return {
            "tokens": [text(e.token_id) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(i): lp for i, lp in e.top} for e in entries],
        }

    def chunk(
        self,
        index: int,
        text: str,
        logprobs: list[TokenLogprob] | None,
        finish_reason: str | None = None,
        first: bool = False,
    ) -> dict[str, Any]:
        """One streamed piece of choice ``index`` (the first chat chunk of a choice names the role)."""
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta = {"role": "assistant"} if first else {}
            if text or finish_reason is None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice["logprobs"] = self.logprobs(logprobs)
        choice["finish_reason"] = finish_reason
        return {**self._envelope(stream=True), "choices": [choice]}

    def pieces(
        self, index: int, text: str, logprobs: list[TokenLogprob] | None, first: bool
    ) -> list[dict[str, Any]]:
        """The chunks for one streamed piece: one as ``chunk`` makes it, or, with tools, OpenAI's deltas
        (content and ``tool_calls`` pieces, ``lmforge.tools.ToolStream``; logprobs are not sent with them)."""
        if self.tools is None:
            if text or logprobs or (first and self.chat):
                return [self.chunk(index, text, logprobs, first=first)]
            return []
        stream = self._tool_streams.setdefault(index, ToolStream(*self.tools))
        deltas = stream.feed(text)
        if first:
            deltas = [{"role": "assistant", **(deltas[0] if deltas else {"content": ""})}, *deltas[1:]]
        return [self._delta_chunk(index, delta) for delta in deltas]

    def ending(self, index: int, finish_reason: str) -> list[dict[str, Any]]:
        """The chunks that end choice ``index``: held text (with tools), then the finish reason."""
        stream = self._tool_streams.pop(index, None)
        if stream is None:
            return [self.chunk(index, "", None, finish_reason=finish_reason)]
        chunks = [self._delta_chunk(index, delta) for delta in stream.finish()]
        return [*chunks, self._delta_chunk(index, {}, stream.finish_reason(finish_reason))]

    def _delta_chunk(
        self, index: int, delta: dict[str, Any], finish_reason: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope(stream=True), "choices": [choice]}

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope(stream=True), "choices": [], "usage": counts}

    def echo(
        self,
        prompts: list[tuple[str, list[int], list[tuple[float, list[tuple[int, float]]]] | None]],
        counts: dict[str, int],
    ) -> dict[str, Any]:
        """Prompts echoed back, nothing generated: (text, token ids, each later token's (logprob, top) or None
        without ``logprobs``). The first token has no logprob (nothing comes before it), as in OpenAI's API."""
        text = self.token_text.text
        out = []
        for index, (prompt, ids, scored) in enumerate(prompts):
            logprobs = None
            if scored is not None:
                logprobs = {
                    "tokens": [text(i) for i in ids],
                    "token_logprobs": [None, *(lp for lp, _ in scored)],
                    "top_logprobs": [None, *({text(i): lp for i, lp in top} for _, top in scored)],
                }
            out.append({"index": index, "text": prompt, "logprobs": logprobs, "finish_reason": "length"})
        return {**self._envelope(stream=False), "choices": out, "usage": counts}

    def response(
        self, choices: list[tuple[str, list[TokenLogprob] | None, str]], counts: dict[str, int]
    ) -> dict[str, Any]:
        """The whole answer: ``choices`` are (text, logprobs, finish_reason) in index order."""
        out = []
        for index, (text, logprobs, finish_reason) in enumerate(choices):
            choice: dict[str, Any] = {"index": index}
            if self.chat and self.tools is not None:
                reply = parse_reply(text, *self.tools, finish_reason=finish_reason)
                choice["message"], finish_reason = reply.message(), reply.finish_reason
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = self.logprobs(logprobs)
            choice["finish_reason"] = finish_reason
            out.append(choice)
        return {**self._envelope(stream=False), "choices": out, "usage": counts}
