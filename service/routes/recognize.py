"""Recognise images or vectors; verify one image against one class."""
from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Query, Request

from .. import deps
from ..schemas import Prediction, Recognized, Verified, VectorsIn

router = APIRouter(tags=["recognize"])


def _results(predictions: list[dict]) -> list[Prediction]:
    return [Prediction(**p) for p in predictions]


@router.post("/v1/galleries/{gallery}/recognize", dependencies=[deps.Read])
async def recognize(request: Request, gallery: str, images: deps.Images, k: int = Query(5, ge=1, le=100),
                    head: str = "prototype", threshold: float | None = None,
                    far: float | None = Query(None, gt=0, lt=1)) -> Recognized:
    """Label each image by the gallery's classes: top-k with scores, ``unknown`` under the threshold
    (the given one, else the gallery's calibrated one for ``far``, default 1%)."""
    recognizer = deps.recognizer(request, gallery)
    rows = await deps.embed(request, images)
    predictions = await asyncio.to_thread(recognizer.predict, rows, k, head, threshold, far)
    return Recognized(head=head, results=_results(predictions))


@router.post("/v1/galleries/{gallery}/recognize/embedding", dependencies=[deps.Read])
async def recognize_embedding(request: Request, gallery: str, body: VectorsIn) -> Recognized:
    """The same for vectors embedded elsewhere (same encoder: see /readyz for its fingerprint)."""
    recognizer = deps.recognizer(request, gallery)
    vectors = np.asarray(body.vectors, dtype=np.float32) if body.vectors else np.zeros((0, 0), np.float32)
    predictions = await asyncio.to_thread(recognizer.predict, vectors, body.k, body.head, body.threshold, body.far)
    return Recognized(head=body.head, results=_results(predictions))


@router.post("/v1/galleries/{gallery}/verify", dependencies=[deps.Read])
async def verify(request: Request, gallery: str, images: deps.Images, label: str = Query(...),
                 threshold: float | None = None, far: float | None = Query(None, gt=0, lt=1)) -> Verified:
    """Is this image of class ``label``? Its score against the class's examples, and the threshold."""
    if len(images) != 1:
        raise ValueError("verify takes exactly one image")
    recognizer = deps.recognizer(request, gallery)
    rows = await deps.embed(request, images)
    return Verified(**await asyncio.to_thread(recognizer.verify, rows, label, threshold, far))


