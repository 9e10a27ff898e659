"""Images -> embeddings."""
from __future__ import annotations

import base64
from typing import Literal

from fastapi import APIRouter

from .. import deps
from ..schemas import IMAGES_IN, errors, IMAGES_BODY, EmbedOut

router = APIRouter(tags=["embed"])


@router.post("/v1/embed", dependencies=[deps.Read], openapi_extra=IMAGES_BODY,
             responses=errors(400, 401, 403, IMAGES_IN, 422, 503))
async def embed(images: deps.Images, pool: deps.PoolDep, encoding: Literal["float", "base64"] = "float",
                encoder: str | None = None) -> EmbedOut:
    """Embed 1..N images with ``encoder`` (default: the server's default; face encoders embed the largest
    face of each image); ``encoding=base64`` returns little-endian float32 rows in base64."""
    slot = await pool.get(encoder)
    rows, faces, *_ = await slot.embedder.main_rows(images)
    out = EmbedOut(encoder=slot.name, fingerprint=slot.encoder.fingerprint, dim=slot.encoder.dim,
                   faces=faces if slot.encoder.finds_faces else None)
    if encoding == "base64":
        out.embeddings_base64 = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in rows]
    else:
        out.embeddings = rows.tolist()
    return out
