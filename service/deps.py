"""Dependencies over ``app.state``: the encoder, galleries, batcher, the image reader and API keys."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from typing import Annotated

import numpy as np
from fastapi import Depends, HTTPException, Request

from fewshot.errors import InvalidImage
from fewshot.gallery import Gallery
from fewshot.recognize import Recognizer

from .config import Settings


def settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(settings)]


def _presented_key(request: Request) -> str | None:
    if key := request.headers.get("x-api-key"):
        return key
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _allowed(presented: str | None, *keys: str | None) -> bool:
    wanted = [k for k in keys if k]
    if not wanted:
        return True
    return presented is not None and any(hmac.compare_digest(presented.encode(), k.encode()) for k in wanted)


def require_read(request: Request, config: SettingsDep) -> None:
    """Queries need the read-only key or the admin key, when keys are configured."""
    if not (config.read_key or config.admin_key):
        return
    if not _allowed(_presented_key(request), config.read_key, config.admin_key):
        raise HTTPException(401, "missing or wrong API key: send X-API-Key or Authorization: Bearer")


def require_admin(request: Request, config: SettingsDep) -> None:
    """Writes need the admin key, when one is configured."""
    if config.admin_key and not _allowed(_presented_key(request), config.admin_key):
        raise HTTPException(401 if not _presented_key(request) else 403,
                            "this call changes data: it needs the admin API key")


Read = Depends(require_read)
Admin = Depends(require_admin)


async def read_images(request: Request, config: SettingsDep) -> list[bytes]:
    """Images from a multipart upload (any file fields) or a JSON body {"images": [base64, ...]}."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > config.max_request_bytes:
        raise HTTPException(413, f"request is {int(length):,} bytes; the limit is {config.max_request_bytes:,}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=config.max_images_per_request + 1)
        images = [await item.read() for _, item in form.multi_items() if hasattr(item, "read")]
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
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise HTTPException(400, 'the JSON body must be {"images": [base64 strings]}')
    out = []
    for i, text in enumerate(payload["images"]):
        if not isinstance(text, str):
            raise HTTPException(400, f"images[{i}] is not a base64 string")
        try:
            out.append(base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"images[{i}] is not valid base64") from None
    return out


Images = Annotated[list[bytes], Depends(read_images)]


async def embed(request: Request, images: list[bytes]) -> np.ndarray:
    """Decode in the worker pool, then one row per image from the shared micro-batcher."""
    state = request.app.state
    loop = asyncio.get_running_loop()
    pixels = await asyncio.gather(*(loop.run_in_executor(state.decoders, state.encoder.preprocess, data)
                                    for data in images), return_exceptions=True)
    for i, result in enumerate(pixels):
        if isinstance(result, InvalidImage):
            raise type(result)(f"image {i + 1}: {result}")
        if isinstance(result, BaseException):
            raise result
    return np.stack(await asyncio.gather(*(state.batcher.submit(p) for p in pixels)))


def gallery(request: Request, name: str, create: bool = False) -> Gallery:
    encoder = request.app.state.encoder
    return request.app.state.store.get(name, encoder.dim, encoder.fingerprint, encoder.name, create=create)


def recognizer(request: Request, name: str) -> Recognizer:
    found = gallery(request, name)
    cache = request.app.state.recognizers
    if name not in cache or cache[name].gallery is not found:
        cache[name] = Recognizer(found)
    return cache[name]
