"""Typed dependencies over ``app.state``: a route names what it needs as parameters (``gallery:
GalleryDep``, ``recognizer: RecognizerDep``); the objects are built once in ``main.create_app``'s
lifespan. Keys are in ``auth``, the images of a request in ``uploads``.

The gallery named in the path is leased: one already open is taken at once (memory only); opening one
(which builds its index) and closing one evicted meanwhile (which saves its snapshot) run in a worker
thread: no store work runs on the event loop.
"""
from __future__ import annotations

import asyncio
from typing import Annotated, AsyncIterator

from fastapi import Depends, Path, Query, Request
from pydantic import AfterValidator

from fewshot.gallery import Gallery
from fewshot.gallery_store import GalleryStore
from fewshot.recognize import Recognizer
from fewshot.validate import check_name

from .auth import Admin, Read, settings_of
from .config import Settings
from .encoders import EncoderPool, Slot
from .paths import restore
from .schemas import LABEL_SCHEMA, NAME_SCHEMA
from .uploads import Images

__all__ = ["Admin", "Read", "Images", "SettingsDep", "StoreDep", "PoolDep", "GalleryDep", "RecognizerDep",
           "GalleryName", "LabelPath", "LabelQuery", "Far", "MinScore", "Recognizers", "RecognizersDep"]

SettingsDep = Annotated[Settings, Depends(settings_of)]


def _store(request: Request) -> GalleryStore:
    return request.app.state.store


def _pool(request: Request) -> EncoderPool:
    return request.app.state.encoders


StoreDep = Annotated[GalleryStore, Depends(_store)]
PoolDep = Annotated[EncoderPool, Depends(_pool)]

# Names as the API documents them (checked by the library, which answers 400 with its own words)
GalleryName = Annotated[str, Path(description="1-64 letters, digits, '_', '.' or '-', starting with a letter or "
                                              "digit", json_schema_extra=NAME_SCHEMA)]
LabelPath = Annotated[str, Path(description="a class label: 1-200 characters, no control characters; a / in it "
                                            "goes percent-encoded (%2F)", json_schema_extra=LABEL_SCHEMA),
                      AfterValidator(restore)]
LabelQuery = Annotated[str, Query(description="a class label", json_schema_extra=LABEL_SCHEMA)]
Far = Annotated[float | None, Query(description="false-accept rate of the calibrated threshold (default 0.01)",
                                    json_schema_extra={"minimum": 1e-6, "maximum": 0.5})]
MinScore = Annotated[float | None, Query(
    description="face galleries: the detector score a face must reach to be enrolled (default "
                "FEWSHOT_FACE_MIN_SCORE, 0.2; HOG and CNN detectors both take a score above 0 for a face)")]


async def _gallery(gallery: GalleryName, store: StoreDep) -> AsyncIterator[Gallery]:
    """The existing gallery named in the path, kept open (never evicted) until the response is done."""
    found = store.lease_if_open(check_name(gallery)) or await asyncio.to_thread(store.lease, gallery)
    try:
        yield found
    finally:
        if closing := store.unlease(found.name):  # another gallery is evicted: saving it is disk work
            await asyncio.to_thread(store.close_evicted, closing)


GalleryDep = Annotated[Gallery, Depends(_gallery)]


class Recognizers:
    """One Recognizer per open gallery and encoder (its caches, thresholds and reference point). The one
    rule: an entry serves while its gallery object and fingerprint are the ones asked about; a gallery
    re-embedded or reopened gets a new one. ``forget`` frees a closed gallery's entry."""

    def __init__(self, calibrator, default_far: float) -> None:
        self.calibrator, self.default_far = calibrator, default_far
        self._cached: dict[str, Recognizer] = {}

    def of(self, gallery: Gallery, slot: Slot) -> Recognizer:
        cached = self._cached.get(gallery.name)
        if cached is None or cached.gallery is not gallery or cached.fingerprint != gallery.fingerprint:
            cached = self._cached[gallery.name] = Recognizer(gallery, self.calibrator, self.default_far,
                                                             slot.reference)
        return cached

    def __len__(self) -> int:
        return len(self._cached)

    def forget(self, name: str) -> None:
        self._cached.pop(name, None)


def _recognizers(request: Request) -> Recognizers:
    return request.app.state.recognizers


RecognizersDep = Annotated[Recognizers, Depends(_recognizers)]


async def _recognizer(request: Request, found: GalleryDep, pool: PoolDep) -> Recognizer:
    """The gallery's recognizer, with the reference point of the gallery's own encoder."""
    return request.app.state.recognizers.of(found, await pool.get(found.encoder or None))


RecognizerDep = Annotated[Recognizer, Depends(_recognizer)]
