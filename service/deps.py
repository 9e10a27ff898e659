"""Typed dependencies over ``app.state``: settings, API keys, the images of a request, the encoders,
and the gallery (leased for the request) with its encoder's slot and its recognizer.

A route names what it needs as parameters (``gallery: GalleryDep``, ``slot: SlotDep``); the objects
are built once in ``main.create_app``'s lifespan.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Annotated, AsyncIterator

from fastapi import Depends, HTTPException, Path, Query, Request

from fewshot.errors import FingerprintMismatch
from fewshot.gallery import Gallery, GalleryStore
from fewshot.recognize import Recognizer

from .config import Settings
from .encoders import EncoderPool, Slot
from .schemas import LABEL_SCHEMA, NAME_SCHEMA


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> GalleryStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[GalleryStore, Depends(_store)]

# Names as the API documents them (checked by the library, which answers 400 with its own words)
GalleryName = Annotated[str, Path(description="1-64 letters, digits, '_', '.' or '-', starting with a letter or "
                                              "digit", json_schema_extra=NAME_SCHEMA)]
LabelPath = Annotated[str, Path(description="a class label: 1-200 characters, no control characters",
                                json_schema_extra=LABEL_SCHEMA)]
LabelQuery = Annotated[str, Query(description="a class label", json_schema_extra=LABEL_SCHEMA)]
Far = Annotated[float | None, Query(description="false-accept rate of the calibrated threshold (default 0.01)",
                                    json_schema_extra={"minimum": 1e-6, "maximum": 0.5})]


# ---------------------------------------------------------------- API keys
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
    """With any key configured, queries need the read-only key or the admin key."""
    if not _allowed(_presented_key(request), config.read_key, config.admin_key):
        raise HTTPException(401, "missing or wrong API key: send X-API-Key or Authorization: Bearer")


def require_admin(request: Request, config: SettingsDep) -> None:
    """Writes need the admin key whenever any key is configured (Settings refuses a read key alone)."""
    if (config.admin_key or config.read_key) and not _allowed(_presented_key(request), config.admin_key):
        raise HTTPException(401 if not _presented_key(request) else 403,
                            "this call changes data: it needs the admin API key")


Read = Depends(require_read)
Admin = Depends(require_admin)


# ---------------------------------------------------------------- images in, embeddings out
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
    except RecursionError:  # the C parser recurses once per level
        raise HTTPException(400, 'JSON nested too deeply; the body must be {"images": [base64 strings]}') from None
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


def _pool(request: Request) -> EncoderPool:
    return request.app.state.encoders


PoolDep = Annotated[EncoderPool, Depends(_pool)]


# ---------------------------------------------------------------- galleries
async def _gallery(gallery: GalleryName, store: StoreDep) -> AsyncIterator[Gallery]:
    """The existing gallery named in the path, kept open (never evicted) until the response is done."""
    with store.use(gallery) as found:
        yield found


GalleryDep = Annotated[Gallery, Depends(_gallery)]


async def slot_of(gallery: Gallery, pool: EncoderPool) -> Slot:
    """The encoder a gallery was made with, loaded; refused if this server's weights differ."""
    slot = await pool.get(gallery.encoder or None)
    if (slot.encoder.dim, slot.encoder.fingerprint) != (gallery.dim, gallery.fingerprint):
        raise FingerprintMismatch(f"gallery {gallery.name!r} holds {gallery.dim}-d vectors of fingerprint "
                                  f"{gallery.fingerprint}; this server's encoder {slot.name!r} gives "
                                  f"{slot.encoder.dim}-d, {slot.encoder.fingerprint}. Re-embed, never mix")
    return slot


async def _slot(found: GalleryDep, pool: PoolDep) -> Slot:
    return await slot_of(found, pool)


SlotDep = Annotated[Slot, Depends(_slot)]


async def _recognizer(request: Request, found: GalleryDep, slot: SlotDep) -> Recognizer:
    """One Recognizer per open gallery (its caches and thresholds), dropped when the gallery closes."""
    state = request.app.state
    cached = state.recognizers.get(found.name)
    if cached is None or cached.gallery is not found:
        cached = state.recognizers[found.name] = Recognizer(found, state.calibrator, state.settings.default_far,
                                                            slot.reference)
    return cached


RecognizerDep = Annotated[Recognizer, Depends(_recognizer)]
