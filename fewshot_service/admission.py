"""Admission control: the work a server takes on is bounded, and what is past the bound is refused
at once (503 + Retry-After), never queued for minutes.

- Uploads being received at once: at most ``max_uploads``; each body must arrive within
  ``body_seconds`` (a client sending slowly holds a connection, not the server: 408 past it).
- Request bodies held at once (received, or being answered): at most ``max_bytes`` (by their
  Content-Length; a chunked body counts as the largest allowed), so the memory bodies take is bounded.
- Images in flight (decoding, waiting for the batcher, embedding, scoring): at most ``max_images``,
  counted per request from when its body is read until its answer is ready.
- A client that goes away mid-upload is one line in the log and a client error (400) in the metrics.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from typing import Iterator

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fewshot.errors import Overloaded

from .errors import error_body

log = logging.getLogger("fewshot.service")


class Admission:
    def __init__(self, max_uploads: int, max_images: int, body_seconds: float, max_bytes: int,
                 largest_body: int) -> None:
        self.max_uploads, self.max_images, self.body_seconds = max_uploads, max_images, body_seconds
        self.max_bytes, self.largest_body = max_bytes, largest_body
        self.uploads = self.images_in_flight = self.bytes_held = 0  # changed on the event loop only

    @contextmanager
    def images(self, n: int) -> Iterator[None]:
        """Hold ``n`` images' place while they are worked on; Overloaded (503) if there is none."""
        if self.images_in_flight + n > self.max_images:
            raise Overloaded(f"{self.images_in_flight} images are being worked on, the limit of this server is "
                             f"{self.max_images}: retry in a moment")
        self.images_in_flight += n
        try:
            yield
        finally:
            self.images_in_flight -= n


class Uploads:
    """ASGI middleware: at most ``admission.max_uploads`` request bodies received at once, each within
    ``admission.body_seconds``."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app, self.admission = app, admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        admission = self.admission
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else admission.largest_body
        busy = (f"{admission.uploads} uploads are being received" if admission.uploads >= admission.max_uploads else
                f"{admission.bytes_held:,} bytes of requests are held" if admission.bytes_held and
                admission.bytes_held + size > admission.max_bytes else None)
        if busy:
            response = error_body(503, f"{busy}, the limit of this server; retry in a moment", "unavailable")
            return await response(scope, receive, send)
        admission.uploads += 1
        admission.bytes_held += size
        receiving, deadline = True, time.monotonic() + admission.body_seconds

        def done() -> None:
            nonlocal receiving
            if receiving:
                receiving = False
                admission.uploads -= 1

        async def timed() -> Message:
            if not receiving:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                done()
                raise HTTPException(408, f"the request body did not arrive within {admission.body_seconds:g} s; "
                                         "send it at once") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done()  # the whole body is in (or the client left)
            return message

        try:
            await self.app(scope, timed, send)
        finally:
            done()
            admission.bytes_held -= size
