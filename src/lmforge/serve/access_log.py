"""``AccessLog``: one line per HTTP request when its response has ended (``lmforge serve --access-log``).

    POST /v1/chat/completions 200 tokens=12 153.2 ms

Method, path, status, the tokens generated for it (``-`` for a request that generates none: /health, an
embedding, a refusal) and the time from the request's arrival to the end of its response, a stream's last
event included. An endpoint reports its tokens in ``request.state.completion_tokens`` (``TOKENS``), which
lives in the request's ASGI scope, so this middleware reads it back after the response. The path comes from
the client: it is cut to ``MAX_PATH_CHARS`` and its control characters are escaped, so a request cannot write
a fake log line.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKENS = "completion_tokens"  # the key of request.state an endpoint sets
MAX_PATH_CHARS = 200


class AccessLog:
    """ASGI middleware writing one line per HTTP request with ``write`` (outermost: refusals are logged too)."""

    def __init__(self, app: ASGIApp, write: Callable[[str], None]) -> None:
        self.app = app
        self.write = write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})  # what request.state reads and writes
        status = 500  # a response never started: the app failed

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            tokens = state.get(TOKENS)
            self.write(
                f"{scope['method']} {printable(scope['path'])} {status} "
                f"tokens={'-' if tokens is None else tokens} {(time.perf_counter() - start) * 1e3:.1f} ms"
            )


def printable(text: str, limit: int = MAX_PATH_CHARS) -> str:
    """``text`` cut to ``limit`` characters, a space as %20 and unprintable characters (a newline) escaped."""
    shown = "".join(
        "%20" if c == " " else c if c.isprintable() else c.encode("unicode_escape").decode()
        for c in text[:limit]
    )
    return shown + ("…" if len(text) > limit else "")
