"""Images -> embeddings."""
from __future__ import annotations

import base64
from typing import Literal

from fastapi import APIRouter

from .. import deps
from ..schemas import EmbedOut

router = APIRouter(tags=["embed"])


@router.post("/v1/embed", dependencies=[deps.Read])
async def embed(images: deps.Images, embedder: deps.EmbedderDep, encoder: deps.EncoderDep,
                encoding: Literal["float", "base64"] = "float") -> EmbedOut:
    """Embed 1..N images; ``encoding=base64`` returns little-endian float32 rows in base64."""
    rows = await embedder(images)
    out = EmbedOut(encoder=encoder.name, fingerprint=encoder.fingerprint, dim=encoder.dim)
    if encoding == "base64":
        out.embeddings_base64 = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in rows]
    else:
        out.embeddings = rows.tolist()
    return out
