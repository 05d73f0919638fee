"""CFG_MAX_BODY_BYTES: a request body over the limit gets 413 before it is read whole, on every route.

A pure ASGI middleware, so it holds with or without the gateway in front. A Content-Length over the
limit is refused before the app sees the request; a body without one (chunked) is counted as it streams,
and the chunk that crosses the limit ends it: the middleware answers 413 itself, and the app, which
reads on, is told the client has gone (`http.disconnect`) and its own response is dropped. The server
discards the rest of the body as it arrives, so memory holds at most one chunk beyond the limit.
"""

from __future__ import annotations

import logging
from typing import Any

from app.api.errors import error_response

Scope = dict[str, Any]
Message = dict[str, Any]

log = logging.getLogger("uvicorn.error")


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def message(self) -> str:
        return (
            f"the request body is larger than this server's limit of {self.max_bytes} bytes (CFG_MAX_BODY_BYTES); "
            "the request fields need far less"
        )

    async def too_large(self, scope: Scope, receive: Any, send: Any) -> None:
        response = error_response(scope["path"], 413, self.message(), "request_too_large")
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.max_bytes:
            await self.too_large(scope, receive, send)
            return

        received = 0
        refused = False  # the 413 has been sent: what the app sends after it goes nowhere
        started = False  # the app began its response (then there is no 413 to send: it ends as a disconnect)

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self.too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # The app saw its client "disconnect" mid-body; the client has its 413 already.
            log.debug("request refused at %d bytes: the app's error after it is dropped", received, exc_info=True)


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None without one (or with one that is no number: the server refuses
    those before the app sees them)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
