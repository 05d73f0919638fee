"""CFG_MAX_BODY_BYTES: a request body over the limit gets 413 before it is read whole, on every route.

A pure ASGI middleware, so it holds with or without the gateway in front. A Content-Length over the limit
is refused before the app sees the request (and one within it bounds the body: the server frames the body
by it). A body without one (chunked) is read here first, counted as it streams, and refused at the chunk
that crosses the limit; one within it is handed to the app as it came. Either way the server discards the
rest of a refused body as it arrives, so the process never holds more than the limit and a chunk.
"""

from __future__ import annotations

from typing import Any

from app.api.errors import error_response

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None:
            if length > self.max_bytes:
                await self.refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # No Content-Length: read the body here, counting, before the app sees any of it.
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left mid-body: the app will see it leave
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self.refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay() -> Message:
            # The body as it came, then the connection's own messages (a disconnect, which routes wait for).
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Any, send: Any) -> None:
        message = (
            f"the request body is larger than this server's limit of {self.max_bytes} bytes (CFG_MAX_BODY_BYTES); "
            "no request this API takes needs more"
        )
        await error_response(scope["path"], 413, message, "request_too_large")(scope, receive, send)


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length; None without one (the server refuses one that is no number)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
