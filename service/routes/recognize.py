"""Recognise images or vectors; verify one image against one class."""
from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, HTTPException, Query

from fewshot.errors import DimensionMismatch, InvalidArgument

from .. import deps
from ..schemas import Prediction, Recognized, Verified, VectorsIn

router = APIRouter(tags=["recognize"])


def _answer(head: str, answer) -> Recognized:
    return Recognized(head=head, results=[Prediction(**p) for p in answer.results], version=answer.version,
                      threshold_version=answer.threshold_version)


@router.post("/v1/galleries/{gallery}/recognize", dependencies=[deps.Read])
async def recognize(recognizer: deps.RecognizerDep, images: deps.Images, embed: deps.EmbedderDep,
                    k: int = Query(5, ge=1, le=100), head: str = "prototype", threshold: float | None = None,
                    far: float | None = None) -> Recognized:
    """Label each image by the gallery's classes: top-k with scores, ``unknown`` under the threshold
    (the given one, else the gallery's calibrated one for ``far``, default 1%; ``threshold_version``
    says which gallery version it was calibrated on)."""
    rows = await embed(images)
    answer = await asyncio.to_thread(recognizer.predict, rows, k, head, threshold, far)
    return _answer(head, answer)


@router.post("/v1/galleries/{gallery}/recognize/embedding", dependencies=[deps.Read])
async def recognize_embedding(recognizer: deps.RecognizerDep, body: VectorsIn,
                              config: deps.SettingsDep) -> Recognized:
    """The same for vectors embedded elsewhere (same encoder: see /readyz for its fingerprint)."""
    if len(body.vectors) > config.max_vectors_per_request:
        raise HTTPException(413, f"{len(body.vectors)} vectors in one request; the limit is "
                                 f"{config.max_vectors_per_request}")
    lengths = sorted({len(v) for v in body.vectors})
    if len(lengths) > 1:
        raise DimensionMismatch(f"every vector must have the same length; got lengths {lengths[:5]}")
    vectors = np.asarray(body.vectors, dtype=np.float32) if body.vectors else np.zeros((0, 0), np.float32)
    answer = await asyncio.to_thread(recognizer.predict, vectors, body.k, body.head, body.threshold, body.far)
    return _answer(body.head, answer)


@router.post("/v1/galleries/{gallery}/verify", dependencies=[deps.Read])
async def verify(recognizer: deps.RecognizerDep, images: deps.Images, embed: deps.EmbedderDep,
                 label: str = Query(...), threshold: float | None = None, far: float | None = None) -> Verified:
    """Is this image of class ``label``? Its score against the class's prototype, and the threshold."""
    if len(images) != 1:
        raise InvalidArgument(f"verify takes exactly one image, got {len(images)}")
    rows = await embed(images)
    return Verified(**await asyncio.to_thread(recognizer.verify, rows, label, threshold, far))
