"""The images of a request: multipart files or JSON base64, within the server's limits, as bytes."""
from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Annotated, AsyncIterator

from fastapi import Depends, HTTPException, Request
from starlette.requests import ClientDisconnect

from .auth import settings_of
from .config import Settings

log = logging.getLogger("fewshot.service")


async def read_images(request: Request, config: Settings = Depends(settings_of)) -> AsyncIterator[list[bytes]]:
    """Images from a multipart upload (any file fields) or a JSON body {"images": [base64, ...]}, with
    their place among the images in flight held until the answer is ready (503 at once if there is none)."""
    try:
        images = await _read(request, config)
    except ClientDisconnect:
        log.info("client went away during its upload to %s", request.url.path)
        raise HTTPException(400, "the client disconnected before its upload was complete") from None
    with request.app.state.admission.images(len(images)):
        yield images


async def _read(request: Request, config: Settings) -> list[bytes]:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > config.max_request_bytes:
        raise HTTPException(413, f"request is {int(length):,} bytes; the limit is {config.max_request_bytes:,}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=config.max_images_per_request + 1)
        try:
            images = [await item.read() for _, item in form.multi_items() if hasattr(item, "read")]
        finally:
            await form.close()  # the spooled copies go now, not when the answer is sent
    elif kind == "application/json":
        images = _base64_images(await request.body())
    else:
        raise HTTPException(415, "send images as multipart/form-data files or JSON {\"images\": [base64, ...]}")
    if not images:
        raise HTTPException(400, "no image in the request")
    if len(images) > config.max_images_per_request:
        raise HTTPException(413, f"{len(images)} images in one request; the limit is {config.max_images_per_request}")
    return images


def _base64_images(body: bytes) -> list[bytes]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPException(400, "malformed JSON body") from None
    except RecursionError:  # the C parser recurses once per level
        raise HTTPException(400, 'JSON nested too deeply; the body must be {"images": [base64 strings]}') from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise HTTPException(400, 'the JSON body must be {"images": [base64 strings]}')
    out = []
    for i, text in enumerate(payload["images"]):
        if not isinstance(text, str):
            raise HTTPException(400, f"images[{i}] is not a base64 string")
        text = text.split(",", 1)[-1] if text.startswith("data:") else text
        try:  # white space and line breaks (what `base64` writes: 76 columns) are no part of the data
            out.append(base64.b64decode("".join(text.split()), validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"images[{i}] is not valid base64") from None
    return out


Images = Annotated[list[bytes], Depends(read_images)]
