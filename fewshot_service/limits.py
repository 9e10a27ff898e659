"""A request-body cap that also holds for chunked uploads (no Content-Length to check up front),
with tighter caps for routes whose bodies are parsed whole into Python objects (JSON vectors)."""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body


class BodyLimit:
    """Counts body bytes as the app reads them; past the limit the read fails with a 413.
    ``tighter``: path suffix -> a smaller limit for the paths that end with it."""

    def __init__(self, app: ASGIApp, max_bytes: int, tighter: dict[str, int] | None = None) -> None:
        self.app, self.max_bytes, self.tighter = app, max_bytes, tighter or {}

    def limit(self, path: str) -> int:
        return min([self.max_bytes] + [n for suffix, n in self.tighter.items() if path.endswith(suffix)])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:  # refused before reading a byte of it
            response = error_body(413, f"request body is {int(declared):,} bytes; the limit here is {limit:,}",
                                  "too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body is over the limit of {limit:,} bytes")
            return message

        await self.app(scope, counted, send)
