"""``ServerLimits``: the server's bounds on bodies, sequences and connections, in one place for ``create_app``
(``app.state.limits``), ``lmforge serve`` and Python callers (``uvicorn_config(app, host, port)``).

Connections are guarded below the ASGI app, in uvicorn's h11 protocol, because a client that never finishes
its request head never reaches the app: each connection must deliver a whole request (head and body) within
``read_timeout_s`` of opening or of its previous response, or it is closed; beyond ``max_connections`` open
ones, a new connection evicts the oldest one that has no request under way (half-sent or idle), or is
closed itself when every connection is being answered. A request head is at most ``max_header_bytes`` (h11
answers 400 beyond it) and an idle keep-alive connection closes after ``keep_alive_s``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI


@dataclass(frozen=True)
class ServerLimits:
    """Bounds checked before any work starts (the README's serve section lists them with the fixed ones)."""

    max_body_bytes: int = 4_000_000  # a request body (413 beyond)
    max_rows: int = 16  # sequences one generation request asks for: prompts x n (400 beyond)
    max_connections: int = 256  # open connections (see the module docstring for what happens beyond)
    read_timeout_s: float = 20.0  # to deliver a request's head and body, from opening or the last response
    keep_alive_s: int = 5  # an idle keep-alive connection closes after this
    max_header_bytes: int = 65_536  # a request's line and headers (h11's incomplete-event limit)


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> uvicorn.Config:
    """A uvicorn configuration enforcing ``app.state.limits`` on connections; ``uvicorn.Server(it).run()``."""
    import uvicorn

    limits: ServerLimits = app.state.limits
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        **options,
    )


def guarded_protocol(limits: ServerLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with ``limits``' read timeout and connection cap."""

    class Guarded(H11Protocol):
        opened = 0.0
        read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self.opened = self.loop.time()
            self._arm()
            live = [c for c in self.connections if not c.transport.is_closing()]
            if len(live) > limits.max_connections:
                waiting = [c for c in live if c is not self and isinstance(c, Guarded) and c.awaiting_request]
                victim = min(waiting, key=lambda c: c.opened) if waiting else self
                victim.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection has the same time to arrive

        @property
        def awaiting_request(self) -> bool:
            """No request is being answered: its head or body is still arriving, or the connection is idle."""
            cycle = self.cycle
            return cycle is None or cycle.response_complete or cycle.more_body

        def _arm(self) -> None:
            self._disarm()
            self.read_timer = self.loop.call_later(limits.read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def _read_timed_out(self) -> None:
            self.read_timer = None
            if self.awaiting_request and not self.transport.is_closing():
                self.transport.close()

    return Guarded
