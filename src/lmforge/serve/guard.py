"""What answers before or instead of a route of the server (``serve/app.py``): ``Guard``, the ASGI middleware
that checks the Host header, the API key, the body size and the body's content type, and the exception
handlers (``answer_errors``) that turn every error into an OpenAI error object."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.errors import LmforgeError
from lmforge.serve.protocol import APIError, error_body

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # the names a keyless server answers to (with --host's)


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
