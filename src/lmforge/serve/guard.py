"""What answers before or instead of a route of the server (``serve/app.py``): ``Guard``, the ASGI middleware
that checks the Host header, the API key, the body size and the body's content type; ``ParsedOffLoop``, the
route class that parses and validates a JSON body in a worker thread; and the exception handlers
(``answer_errors``) that turn every error into an OpenAI error object."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.errors import LmforgeError
from lmforge.serve.protocol import APIError, error_body

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # the names a keyless server answers to (with --host's)
PARSE_THREADS = 2  # request bodies being parsed and validated at once
# JSON objects and arrays in a body, counted before parsing. json.loads holds the GIL until it returns, and
# 4 MB of small lists or objects (a million) held it for seconds, the garbage collections their building sets
# off included. A valid request needs a few thousand at most (MAX_MESSAGES messages of MAX_CONTENT_PARTS
# parts: 18,500); this many parse in milliseconds.
MAX_JSON_CONTAINERS = 32_768
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # "\ud800"-style escapes (maybe a lone surrogate)


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the server's limit of {limit} bytes")


class Guard:
    """ASGI middleware for what comes before any route: the Host header (421), the API key on /v1/* (401),
    the body size (413) and a JSON body on every POST (415).

    Without an API key, a Host check stops DNS rebinding (a web page whose name resolves to 127.0.0.1), and
    the JSON-only rule stops a cross-site page's plain form or text POST (a browser sends those without a
    CORS preflight; ``application/json`` always gets one). A body is measured as it arrives, so a client
    without a Content-Length header cannot slip past the limit.
    """

    def __init__(
        self, app: ASGIApp, api_key: str | None, max_body_bytes: int, allowed_hosts: frozenset[str] | None
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = allowed_hosts  # None: any

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, body = refusal
            await JSONResponse(body, status_code=status)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise _BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, limited_receive, send)

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, dict[str, Any]] | None:
        """The status and error body that refuse this request, or None when it may go on."""
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            message = (
                f"the Host header {host!r} is not one this server answers to; start it with --allowed-host "
                f"{host or 'NAME'} (or an API key) to accept it"
            )
            return 421, error_body(message, code="invalid_host", param="Host")
        if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(headers):
            message = "invalid or missing API key (send 'Authorization: Bearer KEY')"
            return 401, error_body(message, code="invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return 413, error_body(_BodyTooLarge(self.max_body_bytes).detail)
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if kind != "application/json":
                message = f"the request body must be JSON (Content-Type: application/json), not {kind!r}"
                return 415, error_body(message, code="unsupported_media_type", param="Content-Type")
        return None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[len("Bearer ") :].strip() if given.startswith("Bearer ") else ""
        return secrets.compare_digest(token.encode(), self.api_key.encode())


def host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``, ``A.com.`` -> ``a.com``."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".").lower()


# ------------------------------------------------------------------- bodies
class ParsedOffLoop(APIRoute):
    """A route whose JSON body (a pydantic model) is parsed and validated in a worker thread (``parse_body``):
    on the event loop, which answers every client, a 4 MB body of small items held up ``/health`` for
    seconds. FastAPI then takes the validated model as the body (a model instance passes its validation
    unchanged), so the route's signature, its OpenAPI schema and its 422s stay FastAPI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler
        limiter: list[anyio.CapacityLimiter] = []  # made on first use: it needs the running event loop

        async def parse_then_handle(request: Request) -> Response:
            body = await request.body()
            if body:
                if not limiter:
                    limiter.append(anyio.CapacityLimiter(PARSE_THREADS))
                # Starlette's Request.json() returns _json once set: FastAPI reads the body through it.
                request._json = await anyio.to_thread.run_sync(parse_body, model, body, limiter=limiter[0])
            return await handler(request)

        return parse_then_handle


def parse_body(model: type[BaseModel], body: bytes) -> BaseModel:
    """``body`` as a ``model``; a RequestValidationError (400 or 422, see ``_validation_error``) for JSON that
    is broken, nested too deeply or the wrong shape, an APIError for a lone surrogate in a string.

    The work is bounded for any body under the size limit: at most ``MAX_JSON_CONTAINERS`` objects and arrays
    are parsed, and the request models check a list's length before its items (``protocol._at_most``)."""
    containers = json_containers(body)
    if containers > MAX_JSON_CONTAINERS:
        raise APIError(
            400,
            f"the request body has {containers} JSON objects and arrays, more than the {MAX_JSON_CONTAINERS} "
            "any request to this server needs; send fewer items",
            code="too_many_json_values",
        )
    try:
        text = body.decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise _invalid_json(f"not UTF-8: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise _invalid_json(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise _invalid_json("nested too deeply") from None
    try:
        parsed = model.model_validate(data, strict=True)  # JSON's types as the schema says: no true for 1.0
    except ValidationError as e:
        errors = [
            {**error, "loc": ("body", *_field_path(error["loc"]))} for error in e.errors(include_url=False)
        ]
        raise RequestValidationError(errors) from None
    if SURROGATE_ESCAPE.search(text):  # rare: look for a lone one among the fields the model kept
        try:
            pydantic_core.to_json(parsed)
        except pydantic_core.PydanticSerializationError:
            raise APIError(
                400,
                "a string in the request holds a lone UTF-16 surrogate (such as \\ud800), which is not text; "
                "send surrogates in pairs or the characters themselves",
                code="invalid_unicode",
            ) from None
    return parsed


def _field_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """A validation error's location without pydantic's names for the members of a union (``str``,
    ``function-before[...]``, ``list[int]``): ``prompt``, not ``prompt.function-before[check(), list[str]]``."""
    return tuple(p for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_NAMES))


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "tuple", "none"})


def json_containers(body: bytes) -> int:
    """The '{' and '[' of ``body`` outside its strings, in a few passes of C code (bytes methods, no parsing).

    Escaped backslashes, then escaped quotes, are removed, so every quote left opens or closes a string and
    the pieces between them alternate: outside, inside, outside... Cheap first: brackets inside strings
    matter only when the total is over the limit."""
    count = body.count(b"{") + body.count(b"[")
    if count <= MAX_JSON_CONTAINERS:
        return count
    outside = b"".join(body.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    return outside.count(b"{") + outside.count(b"[")


def _invalid_json(detail: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "ctx": {"error": detail}}]
    )


# ------------------------------------------------------------------- errors
def answer_errors(app: FastAPI) -> None:
    """Answer every error with an OpenAI error object: 4xx for the client's, 500 for the server's."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(LmforgeError, _lmforge_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _lmforge_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(error_body(str(exc)), status_code=400)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Malformed JSON is a 400; JSON whose fields do not fit the schema is a 422 naming the first field."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    broken = [e for e in errors if e.get("type") == "json_invalid"]
    if broken:
        detail = broken[0].get("ctx", {}).get("error", "")
        body = error_body(f"the request body is not valid JSON ({detail})", code="invalid_json")
        return JSONResponse(body, status_code=400)
    fields = [".".join(str(x) for x in e["loc"] if x != "body") or "body" for e in errors]
    problems = "; ".join(f"{field}: {e['msg']}" for field, e in zip(fields, errors, strict=True))
    return JSONResponse(error_body("invalid request: " + problems, param=fields[0]), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    body = error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(body, status_code=500)
