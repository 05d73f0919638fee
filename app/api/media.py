"""Media types: a JSON body or 415, and a response type the client accepts or 406 (RFC 9110, 12.5.1).

Both are route dependencies: FastAPI has read the body by the time they run (the body limit bounds it),
and they run before the body is validated, so a form post gets 415 naming JSON rather than a 422 about
its fields."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request

from app.api.errors import RequestRefused

JSON = "application/json"
PNG = "image/png"
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: type/subtype (either may be *) and its weight q."""

    type: str
    subtype: str
    q: float

    def matches(self, media_type: str) -> int | None:
        """How specifically this range names media_type (2 exact, 1 type/*, 0 */*), None if it doesn't."""
        type_, subtype = media_type.split("/")
        if self.type == "*" and self.subtype == "*":
            return 0
        if self.type != type_:
            return None
        if self.subtype == "*":
            return 1
        return 2 if self.subtype == subtype else None


def parse_accept(header: str) -> list[MediaRange]:
    """The ranges of an Accept header, lower-cased; an entry that is no media range (no slash, a q that is no
    number in 0..1) is left out, so it accepts nothing."""
    ranges = []
    for entry in header.split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        type_, slash, subtype = media.lower().partition("/")
        if not (slash and type_ and subtype) or (type_ == "*" and subtype != "*"):
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = -1.0
        if 0 <= q <= 1:
            ranges.append(MediaRange(type_, subtype, q))
    return ranges


def negotiate(header: str | None, offered: tuple[str, ...]) -> str | None:
    """The offered type the Accept header prefers: the highest q, a more specific range before a wildcard,
    then the order of offered; None if it accepts none of them. No header, or an empty one, accepts any."""
    if header is None or not header.strip():
        return offered[0]
    ranges = parse_accept(header)
    best: tuple[float, int] | None = None
    chosen = None
    for media_type in offered:
        # The most specific range that names the type gives its weight (RFC 9110: "text/html;q=0, */*" refuses HTML).
        matches = [(spec, r.q) for r in ranges if (spec := r.matches(media_type)) is not None]
        if not matches:
            continue
        spec, q = max(matches)
        if q > 0 and (best is None or (q, spec) > best):
            best, chosen = (q, spec), media_type
    return chosen


def produces(*offered: str) -> Callable[[Request], Awaitable[str]]:
    """A dependency: the response type to send, from the request's Accept header; 406 naming the types the
    route can send when it accepts none of them."""

    async def accepted_type(request: Request) -> str:
        chosen = negotiate(request.headers.get("accept"), offered)
        if chosen is None:
            raise RequestRefused(
                406,
                f"this endpoint responds with {', '.join(offered)}; the Accept header "
                f"({request.headers['accept']!r}) accepts none of them",
                "not_acceptable",
            )
        return chosen

    return accepted_type


def is_json(content_type: str) -> bool:
    """application/json, or a +json type (application/merge-patch+json), with any parameters."""
    media = content_type.split(";")[0].strip().lower()
    type_, _, subtype = media.partition("/")
    return type_ == "application" and (subtype == "json" or subtype.endswith("+json"))


async def json_body(request: Request) -> None:
    """A dependency: 415 for a body sent as anything but JSON (a form, text, or no Content-Type at all)."""
    content_type = request.headers.get("content-type")
    if content_type is not None and is_json(content_type):
        return
    if content_type is None and not await request.body():
        return  # no body: the route's own 422 says which fields it needs
    sent = "no Content-Type" if content_type is None else f"Content-Type {content_type!r}"
    raise RequestRefused(
        415, f"the body must be JSON, sent with Content-Type: {JSON}; this request has {sent}", "unsupported_media_type"
    )
