"""Hosted models behind the same methods as ``LLM``: an OpenAI-compatible endpoint as a model.

    llm = LLM.load("openai:gpt-4o-mini")                                     # key from $OPENAI_API_KEY
    llm = LLM.load("openai:default", base_url="http://127.0.0.1:8000/v1")   # the first model it lists
    llm.classify_text("WINNER!! Claim your prize", labels=["ham", "spam"]); llm.embed(["你好", "hello"])

``HostedLLM`` has ``generate_text``, ``chat``, ``stream``, ``classify_text``, ``summarize``, ``embed`` and
``similarity`` with ``LLM``'s signatures (``TextModel`` is the Protocol both satisfy), so code written for a local
model runs against a hosted one, and ``lmforge eval`` / ``lmforge select`` rank both in one table.

The questions are the local ones (``lmforge.prompts``): where the endpoint renders chat messages to text
(lmforge serve's and llama.cpp's ``apply-template``) the prompt is that text, sent to ``/completions``, so the
tokens are those the local model sees; elsewhere the messages go to ``/chat/completions``. ``classify_text``
scores each label by its log-probability after the prompt (``/completions`` with ``echo`` and ``logprobs``,
as OpenAI's legacy API and lmforge serve answer it; the same sums as ``inference.classify``); an endpoint that
refuses that is asked to choose (``response_format`` with a JSON schema whose ``label`` is an enum of the labels;
a server that ignores the format answers in text, matched to a label). ``summarize`` asks the summarization
prompt; a text the endpoint says is beyond its context (``context_length_exceeded``) is split at whitespace
into halves, summarized and merged, with a warning (the local model chunks by its own token counts; this side
has no tokenizer). ``embed`` is ``/embeddings``, L2-normalised as local embeddings are.

Client: httpx rather than the ``openai`` package (a test dependency only): one small pure-Python dependency,
and lmforge owns what matters here: the retry policy (bounded attempts *and* bounded total wait, Retry-After
honoured), one-line errors with the key redacted, and two requests the ``openai`` client has no method for
(``apply-template``, and ``echo`` scoring on ``/completions``). Robustness: every HTTP request times out after
``DEFAULT_TIMEOUT_S`` (60 s; ``timeout_s=``); 429 and 5xx answers and timeouts are retried up to
``MAX_ATTEMPTS`` times, waiting Retry-After when the answer gives one, else 0.5, 1, 2, 4 s, at most
``MAX_RETRY_WAIT_S`` in all and no retry once ``timeout_s`` + that has passed; an endpoint that cannot be reached is one ``LmforgeError`` naming the URL.

The API key (``api_key=``, else ``$OPENAI_API_KEY``) is sent as a header and written nowhere: the repr,
``source`` and ``usage`` (what reports and the store see) never hold it, and any text that comes back from the
endpoint (an error message echoing the key) is redacted before it is raised.

Why one module of ~670 lines: it is one client. The methods and the HTTP layer under them (retries, one-line
errors, redaction) share one connection and the key in its headers; split apart, the key would have to travel
between modules, which is what this module exists to prevent.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import numpy as np

from lmforge.errors import LmforgeError
from lmforge.loading import HOSTED_SCHEME, hosted_model
from lmforge.prompts import Example, classification_prompt, plain_prompt, summarization_prompt
from lmforge.tokenizer import Message

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 5  # tries of one request (429, 5xx, timeouts are retried)
BACKOFF_S = 0.5  # first wait without a Retry-After; doubles each retry
MAX_RETRY_WAIT_S = 30.0  # total sleep across one request's retries; a longer Retry-After fails at once
MAX_ROWS = 16  # prompts per /completions request (lmforge serve's default max_rows)
EMBED_BATCH = 256  # texts per /embeddings request
MAX_SPLITS = 6  # a text too long for the context is halved at most this deep (64 pieces)
OPTIONS = {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop"}


class TextModel(Protocol):
    """What ``LLM`` (a local model) and ``HostedLLM`` both answer: type checkers see one interface."""

    source: str

    def generate_text(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = ...,
        *,
        max_length: int | None = ...,
        **options: Any,
    ) -> str | list[str]: ...

    def chat(
        self,
        messages: Sequence[Message] | str,
        max_new_tokens: int = ...,
        *,
        max_length: int | None = ...,
        **options: Any,
    ) -> str: ...

    def stream(
        self,
        prompt: str | Sequence[Message],
        max_new_tokens: int = ...,
        *,
        max_length: int | None = ...,
        **options: Any,
    ) -> Iterator[str]: ...

    def classify_text(
        self,
        text: str | Sequence[str],
        labels: Sequence[str] | None = ...,
        examples: Sequence[tuple[str, str]] = ...,
        zero_shot: bool = ...,
    ) -> dict[str, Any] | list[dict[str, Any]]: ...

    def summarize(
        self,
        text: str | Sequence[str],
        max_length: int = ...,
        examples: Sequence[tuple[str, str]] = ...,
        **options: Any,
    ) -> str | list[str]: ...

    def embed(self, texts: str | Sequence[str]) -> np.ndarray: ...

    def similarity(self, a: str, b: str) -> float: ...


@dataclass(frozen=True)
class Endpoint:
    """Where ``eval`` and ``select`` find their hosted candidates: a base URL and the *name* of the environment
    variable that holds the key (never the key: these settings may be printed or recorded)."""

    base_url: str | None = None
    api_key_env: str | None = None  # None: $OPENAI_API_KEY when set
    timeout_s: float = DEFAULT_TIMEOUT_S

    def open(self, name: str) -> HostedLLM:
        key = None
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise LmforgeError(
                    f"the environment variable {self.api_key_env} holds no API key",
                    hint=f"export {self.api_key_env}=... before running, or name another with --api-key-env",
                )
        return HostedLLM.load(name, base_url=self.base_url, api_key=key, timeout_s=self.timeout_s)


Price = tuple[float, float]  # USD per 1,000 prompt tokens and per 1,000 completion tokens


def parse_prices(specs: Sequence[str]) -> dict[str, Price]:
    """``["openai:x=0.15,0.60"]`` -> ``{"openai:x": (0.15, 0.6)}``: prices per 1k prompt and completion tokens."""
    prices: dict[str, Price] = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        parts = values.split(",")
        try:
            price = (float(parts[0]), float(parts[1])) if len(parts) == 2 and name.strip() else None
        except ValueError:
            price = None
        if price is None or not all(math.isfinite(p) and p >= 0 for p in price):
            raise LmforgeError(
                f"price {spec!r} is not MODEL=INPUT,OUTPUT",
                hint="give USD per 1k prompt and completion tokens, e.g. --price openai:gpt-4o-mini=0.15,0.60",
            )
        prices[name.strip()] = price
    return prices


def cost(usage: dict[str, int], price: Price) -> float:
    """What ``usage`` (a HostedLLM's token counts) costs at ``price``."""
    return usage["prompt_tokens"] / 1000 * price[0] + usage["completion_tokens"] / 1000 * price[1]


class ContextExceededError(LmforgeError):
    """The endpoint says the prompt does not fit its context (OpenAI's ``context_length_exceeded``)."""


class _Refused(LmforgeError):
    """A 400/404/405/422 answer: the endpoint does not do what was asked (a route, ``echo``...)."""


class HostedLLM:
    """An OpenAI-compatible endpoint with ``LLM``'s methods (see the module docstring)."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not model:
            raise LmforgeError(
                "a hosted model needs a name after 'openai:'",
                hint="use openai:MODEL, or openai:default for the first model the endpoint lists",
            )
        if not (isinstance(timeout_s, int | float) and 0 < timeout_s <= 3600):
            raise LmforgeError(f"timeout_s={timeout_s!r} is out of range", hint="use 0 < timeout_s <= 3600")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise LmforgeError(
                f"base URL {self.base_url!r} is not an http(s) URL",
                hint="give e.g. base_url='http://127.0.0.1:8000/v1'",
            )
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key and self.base_url == DEFAULT_BASE_URL:
            raise LmforgeError(
                "OpenAI's API needs an API key",
                hint="set OPENAI_API_KEY, or pass api_key=...; for a local server give its base_url",
            )
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # The key lives in the client's headers, and in ``_secret`` only for ``_redact`` to keep it out of every
        # message raised.
        self._client = httpx.Client(headers=headers, timeout=timeout_s)
        self._secret = key or ""
        self.timeout_s = float(timeout_s)
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        self._mode: str | None = None  # how prompts are sent: "template", "plain" or "chat"
        self.model = self._first_model() if model == "default" else model
        self.source = HOSTED_SCHEME + self.model

    @classmethod
    def load(
        cls,
        name: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> HostedLLM:
        model = hosted_model(name)
        if model is None:
            raise LmforgeError(f"{name!r} is not a hosted model name", hint="use openai:MODEL")
        return cls(model, base_url=base_url, api_key=api_key, timeout_s=timeout_s)

    def __repr__(self) -> str:
        return f"HostedLLM({self.source!r} at {self.base_url})"

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- generation
    def generate_text(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 100,
        *,
        max_length: int | None = None,
        **options: Any,
    ) -> str | list[str]:
        """Continue ``prompt`` (or each of a list) by up to ``max_new_tokens`` tokens (``/completions``)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        budget = max_new_tokens if max_length is None else max_length
        texts = self._complete(prompts, budget, options)
        return texts[0] if isinstance(prompt, str) else texts

    def chat(
        self,
        messages: Sequence[Message] | str,
        max_new_tokens: int = 256,
        *,
        max_length: int | None = None,
        **options: Any,
    ) -> str:
        """Answer a conversation (``/chat/completions``; the endpoint applies its chat template)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        budget = max_new_tokens if max_length is None else max_length
        body = {"messages": list(messages), **self._sampling(budget, options)}
        answer = self._post("/chat/completions", body)
        return answer["choices"][0]["message"].get("content") or ""

    def stream(
        self,
        prompt: str | Sequence[Message],
        max_new_tokens: int = 256,
        *,
        max_length: int | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Yield the answer piece by piece (server-sent events): text continues, messages are a chat."""
        budget = max_new_tokens if max_length is None else max_length
        body: dict[str, Any] = {**self._sampling(budget, options), "stream": True}
        if isinstance(prompt, str):
            path, body["prompt"] = "/completions", prompt
        else:
            path, body["messages"] = "/chat/completions", list(prompt)
        for chunk in self._events(path, body):
            choices = chunk.get("choices") or [{}]
            piece = choices[0].get("text") or (choices[0].get("delta") or {}).get("content")
            if piece:
                yield piece

    # --------------------------------------------------------------------- tasks
    def classify_text(
        self,
        text: str | Sequence[str],
        labels: Sequence[str] | None = None,
        examples: Sequence[tuple[str, str]] = (),
        zero_shot: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """``{"label": ..., "probabilities": {label: p}}`` per text, by label scoring (zero/few-shot; a hosted
        model has no fine-tuned head, so ``zero_shot`` changes nothing). Where the endpoint cannot score, it
        chooses: the chosen label gets probability 1, and ``label`` is None when the answer names none."""
        if labels is None or len(set(labels)) < 2:
            raise LmforgeError(
                "hosted classification needs at least two distinct labels",
                hint="pass labels=[...] (the command line's --labels a,b)",
            )
        labels = list(labels)
        texts = [text] if isinstance(text, str) else list(text)
        results = [self._classify_one(t, labels, examples) for t in texts]
        return results[0] if isinstance(text, str) else results

    def summarize(
        self,
        text: str | Sequence[str],
        max_length: int = 80,
        examples: Sequence[tuple[str, str]] = (),
        **options: Any,
    ) -> str | list[str]:
        """A short summary of ``text`` (or one per text of a list), asked as ``inference.summarize`` asks."""
        texts = [text] if isinstance(text, str) else list(text)
        options.setdefault("stop", ["\n\n"])
        summaries = [self._summarize_one(t, max_length, examples, options, 0) for t in texts]
        return summaries[0] if isinstance(text, str) else summaries

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings from ``/embeddings``: (dim,) for one text, (N, dim) for a list."""
        rows = [texts] if isinstance(texts, str) else list(texts)
        if not rows:
            raise LmforgeError("nothing to embed", hint="pass one text or a non-empty list")
        vectors: list[list[float]] = []
        for start in range(0, len(rows), EMBED_BATCH):
            body = {
                "model": self.model,
                "input": rows[start : start + EMBED_BATCH],
                "encoding_format": "float",
            }
            answer = self._post("/embeddings", body)
            data = sorted(answer.get("data") or [], key=lambda d: d.get("index", 0))
            if len(data) != len(body["input"]):
                raise self._bad_answer("/embeddings", f"{len(data)} vectors for {len(body['input'])} texts")
            vectors += [d["embedding"] for d in data]
        out = np.asarray(vectors, dtype=np.float32)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if isinstance(texts, str) else out

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts' embeddings."""
        va, vb = self.embed([a, b])
        return float(np.dot(va, vb))

    # ----------------------------------------------------------------- prompts
    def _prompt(self, user: str) -> str | None:
        """The text the local model would read for a user message (its chat template, or plain text for a
        model without one), or None where the endpoint renders no templates (then: /chat/completions)."""
        if self._mode is None:
            self._mode = self._find_mode()
        if self._mode == "plain":
            return plain_prompt(user)
        if self._mode == "chat":
            return None
        try:
            answer = self._post("/apply-template", {"messages": [{"role": "user", "content": user}]})
        except _Refused:
            self._mode = "chat"
            return None
        return str(answer["prompt"])

    def _find_mode(self) -> str:
        """lmforge serve says in /models whether its model has a chat template; others are tried."""
        try:
            listed = self._get("/models").get("data") or []
        except LmforgeError:
            return "template"
        for card in listed:
            if card.get("id") == self.model and isinstance(card.get("lmforge"), dict):
                return "template" if card["lmforge"].get("chat_template") else "plain"
        return "template"

    def _complete_one(self, user: str, max_tokens: int, options: dict[str, Any]) -> str:
        """A user message's answer: the rendered prompt to /completions, else the message to /chat."""
        prompt = self._prompt(user)
        if prompt is None:
            return self.chat(user, max_tokens, **options)
        return self._complete([prompt], max_tokens, options)[0]

    def _complete(self, prompts: list[str], max_tokens: int, options: dict[str, Any]) -> list[str]:
        texts: list[str] = []
        for start in range(0, len(prompts), MAX_ROWS):
            rows = prompts[start : start + MAX_ROWS]
            answer = self._post("/completions", {"prompt": rows, **self._sampling(max_tokens, options)})
            choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != len(rows):
                raise self._bad_answer("/completions", f"{len(choices)} choices for {len(rows)} prompts")
            texts += [c.get("text") or "" for c in choices]
        return texts

    def _sampling(self, max_tokens: int, options: dict[str, Any]) -> dict[str, Any]:
        """The request fields for ``LLM``'s sampling options (greedy unless a temperature is given)."""
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise LmforgeError(
                f"unknown option(s) {', '.join(unknown)} for a hosted model",
                hint=f"use {', '.join(sorted(OPTIONS))}",
            )
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise LmforgeError(f"max_new_tokens={max_tokens!r} must be an integer >= 1", hint="e.g. 100")
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0}
        body.update({k: v for k, v in options.items() if v is not None})
        if isinstance(body.get("stop"), list) and not body["stop"]:
            del body["stop"]
        return body

    # ------------------------------------------------------------------ classify
    def _classify_one(self, text: str, labels: list[str], examples: Sequence[Example]) -> dict[str, Any]:
        user = classification_prompt(text, labels, examples)
        prompt = self._prompt(user)
        scores = None
        if prompt is not None:
            # As inference.classify: a label follows the chat template directly, plain text after a space.
            conts = [label if self._mode == "template" else " " + label for label in labels]
            scores = self._label_logprobs(prompt, conts)
        if scores is None:
            return self._choose(user, labels)
        row = np.asarray(scores)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        return {
            "label": labels[int(row.argmax())],
            "probabilities": dict(zip(labels, probs.tolist(), strict=True)),
        }

    def _label_logprobs(self, prompt: str, conts: list[str]) -> list[float] | None:
        """Sum of the continuation's token logprobs after ``prompt``, for each continuation; None where the
        endpoint does not score prompts. The continuation's tokens are those after the longest run of tokens
        the scored row shares with the prompt alone (the prompt's own tokens, where the cut is clean)."""
        scores: list[float] = []
        step = MAX_ROWS - 1
        for start in range(0, len(conts), step):
            rows = [prompt] + [prompt + c for c in conts[start : start + step]]
            body = {"model": self.model, "prompt": rows, "max_tokens": 0, "echo": True, "logprobs": 0}
            try:
                answer = self._post("/completions", {**body, "temperature": 0.0})
            except _Refused:
                return None
            choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
            scored = [c.get("logprobs") or {} for c in choices]
            if len(scored) != len(rows) or not all(s.get("tokens") for s in scored):
                return None  # answered, but without the prompt's logprobs: not a scoring endpoint
            head = scored[0]["tokens"]
            for s in scored[1:]:
                tokens, logprobs = s["tokens"], s["token_logprobs"]
                shared = next(
                    (i for i, (a, b) in enumerate(zip(head, tokens, strict=False)) if a != b), len(head)
                )
                scores.append(float(sum(lp for lp in logprobs[max(shared, 1) :] if lp is not None)))
        return scores

    def _choose(self, user: str, labels: list[str]) -> dict[str, Any]:
        """Ask for one of ``labels`` as JSON under a schema (an enum); match a plain-text answer otherwise."""
        schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": labels}},
            "required": ["label"],
            "additionalProperties": False,
        }
        body = {
            "messages": [{"role": "user", "content": user}],
            **self._sampling(max(16, max(len(x) for x in labels) + 16), {}),
            "response_format": {"type": "json_schema", "json_schema": {"name": "label", "schema": schema}},
        }
        answer = (self._post("/chat/completions", body)["choices"][0]["message"].get("content") or "").strip()
        label = _matched_label(answer, labels)
        return {
            "label": label,
            "probabilities": {x: float(x == label) for x in labels},
        }

    # ----------------------------------------------------------------- summarize
    def _summarize_one(
        self, text: str, max_length: int, examples: Sequence[Example], options: dict[str, Any], depth: int
    ) -> str:
        try:
            return self._complete_one(summarization_prompt(text, examples), max_length, options).strip()
        except ContextExceededError:
            if depth >= MAX_SPLITS:
                raise
        halves = _halves(text)
        warnings.warn(
            f"a text of {len(text)} characters exceeds the endpoint's context; summarizing it in two halves and "
            "merging the summaries",
            stacklevel=3,
        )
        merged = "\n".join(self._summarize_one(h, max_length, examples, options, depth + 1) for h in halves)
        if len(merged) >= len(text):
            raise LmforgeError(
                f"the summaries of a {len(text)}-character text's parts are together no shorter than the text",
                hint="use a smaller max_length",
            )
        return self._summarize_one(merged, max_length, examples, options, depth + 1)

    # ---------------------------------------------------------------------- HTTP
    def _first_model(self) -> str:
        listed = self._get("/models").get("data") or []
        if not listed or not isinstance(listed[0], dict) or not listed[0].get("id"):
            raise LmforgeError(
                f"{self.base_url}/models lists no model, so openai:default means nothing there",
                hint="name the model: openai:MODEL",
            )
        return str(listed[0]["id"])

    def _get(self, path: str) -> dict[str, Any]:
        return self._json(path, self._request("GET", path, None))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._json(path, self._request("POST", path, body))
        counts = answer.get("usage") if isinstance(answer, dict) else None
        if isinstance(counts, dict):
            self.usage["prompt_tokens"] += int(counts.get("prompt_tokens") or 0)
            self.usage["completion_tokens"] += int(counts.get("completion_tokens") or 0)
        self.usage["requests"] += 1
        return answer

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The server-sent events of a streamed answer (retries happen before its first byte)."""
        response = self._request("POST", path, body, stream=True)
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise self._error(path, None, chunk)
                yield chunk
        except httpx.HTTPError as e:
            raise self._unreachable(path, e) from None
        except json.JSONDecodeError:
            raise self._bad_answer(path, "a stream event that is not JSON") from None
        finally:
            response.close()
        self.usage["requests"] += 1

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, stream: bool = False
    ) -> httpx.Response:
        """One request, retried on 429, 5xx and timeouts (see the module docstring); errors are one line."""
        url = self.base_url + path
        waited = 0.0
        started = time.monotonic()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            wait = BACKOFF_S * 2 ** (attempt - 1)
            try:
                request = self._client.build_request(method, url, json=body)
                response = self._client.send(request, stream=stream)
            except httpx.TimeoutException as e:
                problem: Any = e
            except httpx.HTTPError as e:
                raise self._unreachable(path, e) from None
            else:
                if response.status_code < 400:
                    return response
                if stream:
                    response.read()
                if response.status_code != 429 and response.status_code < 500:
                    raise self._error(path, response.status_code, _body(response))
                problem = response
                wait = _retry_after(response) or wait
            # Bounded in tries, in sleep, and in time: timed-out tries count too (a slow server stays slow).
            late = time.monotonic() - started + wait > self.timeout_s + MAX_RETRY_WAIT_S
            if attempt == MAX_ATTEMPTS or waited + wait > MAX_RETRY_WAIT_S or late:
                break
            time.sleep(wait)
            waited += wait
        if isinstance(problem, httpx.Response):
            error = self._error(path, problem.status_code, _body(problem))
            raise LmforgeError(
                f"{error.message} (after {attempt} tries over {waited:g} s)",
                hint="try again later, or lower the request rate",
            )
        raise LmforgeError(
            f"{url} did not answer within {self.timeout_s:g} s ({attempt} tries)",
            hint="check the endpoint, or raise timeout_s",
        )

    def _json(self, path: str, response: httpx.Response) -> dict[str, Any]:
        try:
            answer = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._bad_answer(path, "an answer that is not JSON") from None
        if not isinstance(answer, dict):
            raise self._bad_answer(path, "an answer that is not a JSON object")
        return answer

    def _error(self, path: str, status: int | None, body: Any) -> LmforgeError:
        """The endpoint's error answer as one line (OpenAI's ``{"error": {"message", "code"}}`` when it is)."""
        detail = body.get("error") if isinstance(body, dict) else None
        message = detail.get("message") if isinstance(detail, dict) else None
        code = detail.get("code") if isinstance(detail, dict) else None
        text = self._redact(" ".join(str(message or body or "").split()))[:300]  # redacted, then cut
        where = f"{self.base_url}{path}" + (f" answered HTTP {status}" if status else " sent an error")
        if code == "context_length_exceeded":
            return ContextExceededError(f"{where}: {text}", hint="shorten the input")
        if status in (400, 404, 405, 422):
            return _Refused(f"{where}: {text}", hint="check the model name and the request's options")
        hint = "check the API key (api_key=... or $OPENAI_API_KEY)" if status in (401, 403) else None
        return LmforgeError(f"{where}: {text}", hint=hint or "see the endpoint's message")

    def _unreachable(self, path: str, error: Exception) -> LmforgeError:
        reason = self._redact(" ".join(str(error).split()))[:200] or type(error).__name__
        return LmforgeError(
            f"cannot reach {self.base_url}{path}: {reason}",
            hint="start the server (e.g. `lmforge serve`) or fix base_url / --base-url",
        )

    def _bad_answer(self, path: str, what: str) -> LmforgeError:
        return LmforgeError(
            f"{self.base_url}{path} sent {what}", hint="check that base_url is an OpenAI-compatible API"
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "[key]") if self._secret else text


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _matched_label(answer: str, labels: list[str]) -> str | None:
    """The label a chosen answer names: JSON ``{"label": ...}``, the exact text, else the first label named."""
    try:
        parsed = json.loads(answer)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("label") in labels:
        return parsed["label"]
    cleaned = answer.strip().strip(".。!！\"'").casefold()
    for label in labels:
        if cleaned == label.casefold():
            return label
    found = [(cleaned.find(x.casefold()), x) for x in labels if x.casefold() in cleaned]
    return min(found)[1] if found else None


def _halves(text: str) -> list[str]:
    """``text`` cut in two near its middle, at whitespace where there is some (Chinese has none)."""
    middle = len(text) // 2
    cut = text.rfind(" ", 0, middle)
    if cut <= 0:
        cut = middle
    return [text[:cut], text[cut:]]
