"""A ``/`` inside one path segment (sent percent-encoded, ``AC%2FDC``) stays inside it: the server
decodes paths before routing, which would make ``classes/AC%2FDC`` the two segments ``AC`` and ``DC``.
This ASGI middleware routes on the raw path instead, with an encoded slash held as ``SLASH`` until the
route's parameter gives it back (``restore``). A literal ``/`` still separates segments."""
from __future__ import annotations

from urllib.parse import unquote

SLASH = "\ue000"  # a private-use character: stands for an encoded "/" between routing and the route


def restore(value: str) -> str:
    return value.replace(SLASH, "/")


class EncodedSlashes:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        raw = scope.get("raw_path") or b""
        if scope["type"] == "http" and b"%2f" in raw.lower():
            segments = raw.split(b"?", 1)[0].decode("latin-1").split("/")
            path = "/".join(unquote(segment).replace("/", SLASH) for segment in segments)
            scope = {**scope, "path": path}
        await self.app(scope, receive, send)
