"""Liveness, readiness and metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Ready once the encoder is loaded and warm."""
    state = request.app.state
    if not getattr(state, "ready", False):
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready", "encoder": state.encoder.name, "fingerprint": state.encoder.fingerprint}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> str:
    """Prometheus text: latency per route, batch sizes, queue depth, gallery sizes, rejections."""
    state = request.app.state
    sizes = {name: len(g) for name, g in state.store.opened().items()}
    return state.metrics.render(state.batcher.depth, sizes)
