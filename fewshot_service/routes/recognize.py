"""Recognise images or vectors; verify one image against one class."""
from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query

from fewshot.errors import DimensionMismatch, FingerprintMismatch, InvalidArgument
from fewshot.recognize import Ask

from .. import deps
from ..schemas import ON_GALLERY, IMAGES_IN, errors, IMAGES_BODY, Prediction, Recognized, Verified, VectorsIn

router = APIRouter(tags=["recognize"])
Head = Literal["prototype", "knn", "cache"]
Decision = Annotated[Literal["score", "margin"] | None, Query(
    description="what the threshold decides on: the best score, or its margin over the runner-up (default: "
                "margin on the gallery's own threshold, score on a given or reference one)")]


def _answer(head: str, answer, where: list[tuple] | None = None, faces: list[int] | None = None) -> Recognized:
    """``where``: per result, (image index, box, detector score, landmarks) of the face it is about."""
    where = where or [(0, None, None, None)] * len(answer.results)
    results = [Prediction(image=image, box=box, detection_score=score, landmarks=landmarks, **p)
               for (image, box, score, landmarks), p in zip(where, answer.results)]
    return Recognized(head=head, results=results, version=answer.version, threshold_version=answer.threshold_version,
                      threshold_source=answer.threshold_source, faces=faces)


async def once_more_if_reembedded(attempt):
    """Run ``attempt()``; once more if the gallery was re-embedded to another encoder between embedding
    the images and scoring them (the scores are then refused, never compared across encoders)."""
    try:
        return await attempt()
    except FingerprintMismatch:
        return await attempt()


@router.post("/v1/galleries/{gallery}/recognize", dependencies=[deps.Read], openapi_extra=IMAGES_BODY,
             responses=errors(ON_GALLERY, 409, IMAGES_IN))
async def recognize(gallery: deps.GalleryDep, recognizers: deps.RecognizersDep, pool: deps.PoolDep,
                    images: deps.Images, k: int = Query(5, ge=1, le=100), head: Head = "prototype",
                    threshold: float | None = None, far: deps.Far = None, decision: Decision = None) -> Recognized:
    """Label each image by the gallery's classes (in a face gallery: every face of each image, with its
    box): top-k with scores, ``unknown`` when ``decision_value`` is under the threshold (the given one,
    else the gallery's calibrated one for ``far``, default 1%: for 1:N, the share of strangers taken
    for someone; ``threshold_version`` says which gallery version it was calibrated on,
    ``threshold_source`` whether it is the gallery's own or the encoder's reference; ``decision``
    whether it is on the best score or on its margin over the runner-up)."""
    ask = Ask.checked(k, head, threshold, far, decision=decision)  # bad arguments fail before any work

    async def attempt():
        slot = await pool.get(gallery.encoder or None)
        recognizer = recognizers.of(gallery, slot)
        found = await slot.embedder.instances_of(images)
        faces = slot.encoder.finds_faces
        flat = [(i, instance) for i, instances in enumerate(found) for instance in instances]
        rows = await slot.embedder.rows([instance.pixels for _, instance in flat])
        where = [(i, list(instance.box), instance.score, [list(p) for p in instance.landmarks or ()] or None)
                 if faces else (i, None, None, None) for i, instance in flat]
        counts = [len(f) for f in found] if faces else None
        if not flat:  # no face in any image: nothing to label
            limit = await asyncio.to_thread(recognizer.limit, ask)
            return Recognized(head=head, results=[], version=await asyncio.to_thread(lambda: gallery.version),
                              threshold_version=limit.version, threshold_source=limit.source, faces=counts)
        answer = await asyncio.to_thread(recognizer.answer, rows, ask, slot.encoder.fingerprint)
        return _answer(head, answer, where, counts)

    return await once_more_if_reembedded(attempt)


@router.post("/v1/galleries/{gallery}/recognize/embedding", dependencies=[deps.Read],
             responses=errors(ON_GALLERY, 409, 413))
async def recognize_embedding(recognizer: deps.RecognizerDep, body: VectorsIn,
                              config: deps.SettingsDep) -> Recognized:
    """The same for vectors embedded elsewhere (same encoder: see /v1/galleries and /readyz for fingerprints)."""
    ask = Ask.checked(body.k, body.head, body.threshold, body.far, decision=body.decision)
    if len(body.vectors) > config.max_vectors_per_request:
        raise HTTPException(413, f"{len(body.vectors)} vectors in one request; the limit is "
                                 f"{config.max_vectors_per_request}")
    lengths = sorted({len(v) for v in body.vectors})
    if len(lengths) > 1:
        raise DimensionMismatch(f"every vector must have the same length; got lengths {lengths[:5]}")
    vectors = np.asarray(body.vectors, dtype=np.float32) if body.vectors else np.zeros((0, 0), np.float32)
    answer = await asyncio.to_thread(recognizer.answer, vectors, ask, body.fingerprint)
    return _answer(body.head, answer)


@router.post("/v1/galleries/{gallery}/verify", dependencies=[deps.Read], openapi_extra=IMAGES_BODY,
             responses=errors(ON_GALLERY, 409, IMAGES_IN))
async def verify(gallery: deps.GalleryDep, recognizers: deps.RecognizersDep, pool: deps.PoolDep,
                 images: deps.Images, label: deps.LabelQuery, threshold: float | None = None,
                 far: deps.Far = None) -> Verified:
    """Is this image (its largest face, in a face gallery) of class ``label``? Its score against the
    class's prototype, and the threshold."""
    if len(images) != 1:
        raise InvalidArgument(f"verify takes exactly one image, got {len(images)}")
    Ask.checked(threshold=threshold, far=far)

    async def attempt():
        slot = await pool.get(gallery.encoder or None)
        rows, *_ = await slot.embedder.main_rows(images)
        return Verified(**await asyncio.to_thread(recognizers.of(gallery, slot).verify, rows, label, threshold,
                                                  far, slot.encoder.fingerprint))

    return await once_more_if_reembedded(attempt)
