"""Faces without a gallery: detection alone, and two photos compared."""
from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Query

from fewshot.errors import InvalidArgument
from fewshot.face_quality import Limits, describe
from fewshot.recognize import DEFAULT_FAR, Ask

from .. import deps
from ..schemas import IMAGES_BODY, IMAGES_IN, Detected, PairVerified, errors

router = APIRouter(tags=["faces"])
FaceEncoder = Query(None, description="a face encoder this server offers (default: the first it offers)")


async def _face_slot(pool, encoder: str | None):
    name = encoder or next((n for n in pool.allowed if n.split(":")[0] == "face"), None)
    if name is None:
        raise InvalidArgument(f"this server offers no face encoder ({pool.allowed}); add face to FEWSHOT_ENCODERS")
    slot = await pool.get(name)
    if not slot.encoder.finds_faces:
        raise InvalidArgument(f"encoder {slot.name!r} finds no faces; use a face encoder (e.g. face)")
    return slot


@router.post("/v1/detect", dependencies=[deps.Read], openapi_extra=IMAGES_BODY,
             responses=errors(400, 401, 403, IMAGES_IN, 503))
async def detect(images: deps.Images, pool: deps.PoolDep, config: deps.SettingsDep, encoder: str | None = FaceEncoder,
                 min_score: deps.MinScore = None) -> Detected:
    """Every face of each image, largest first: its box (the image's pixels), the detector's score, its
    width and sharpness, and what would keep it from being enrolled (empty: nothing). No gallery."""
    limits = Limits(score=config.face_min_score).with_score(min_score)
    slot = await _face_slot(pool, encoder)
    found = await slot.embedder.instances_of(images)
    return Detected(encoder=slot.name, faces=[[describe(face, limits) for face in faces] for faces in found])


@router.post("/v1/verify", dependencies=[deps.Read], openapi_extra=IMAGES_BODY,
             responses=errors(400, 401, 403, IMAGES_IN, 422, 503))
async def verify_pair(images: deps.Images, pool: deps.PoolDep, encoder: str | None = FaceEncoder,
                      threshold: float | None = None, far: deps.Far = None) -> PairVerified:
    """Are the two images of the same person? The cosine of their largest faces' embeddings against
    ``threshold`` if given, else the encoder's reference threshold for ``far`` (default 1%: of pairs of
    different people, 1 in 100 is taken as the same)."""
    if len(images) != 2:
        raise InvalidArgument(f"verify takes exactly two images (files=@a.jpg -F files=@b.jpg), got {len(images)}")
    ask = Ask.checked(threshold=threshold, far=far)
    slot = await _face_slot(pool, encoder)
    rows, _, _, faces = await slot.embedder.main_rows(images)
    score = float(np.dot(rows[0], rows[1]))
    if ask.threshold is not None:
        limit, source = ask.threshold, "given"
    elif slot.reference is not None:
        limit, source = await asyncio.to_thread(slot.reference.threshold, ask.far or DEFAULT_FAR), "reference"
    else:
        raise InvalidArgument(f"encoder {slot.name!r} has no reference threshold: give threshold=")
    return PairVerified(encoder=slot.name, score=score, threshold=limit, threshold_source=source,
                        far=None if source == "given" else ask.far or DEFAULT_FAR, match=score >= limit,
                        boxes=[list(face.box) for face in faces])
