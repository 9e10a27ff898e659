"""Liveness, readiness and metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .. import deps

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up (open to all)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Ready once the default encoder is loaded and warm and the galleries' indexes are built (open to all).
    ``galleries``: the store, how many galleries and examples are in memory now, and how long building
    their indexes took at start.
    ``encoders``: those galleries may choose, with the fingerprint of each one loaded so far (the others
    load on first use)."""
    state = request.app.state
    if not getattr(state, "ready", False):
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
    pool = state.encoders
    loaded = {name: slot.encoder for name, slot in pool.slots.items()}
    opened = state.store.opened()
    galleries = {"store": state.store.kind, "open": len(opened), "examples": sum(len(g) for g in opened.values()),
                 "build_seconds": state.build_seconds}
    return {"status": "ready", "galleries": galleries, "encoder": pool.default, "fingerprint": loaded[pool.default].fingerprint,
            "encoders": {name: ({"fingerprint": loaded[name].fingerprint, "dim": loaded[name].dim}
                                if name in loaded else {"loaded": False}) for name in pool.allowed}}


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[deps.Read])
async def metrics(request: Request, store: deps.StoreDep) -> str:
    """Prometheus text: latency per route, batch sizes, queue depth, gallery sizes, rejections.
    Gallery names are data: it needs the read key when keys are set."""
    sizes = {name: len(g) for name, g in store.opened().items()}
    return request.app.state.metrics.render(request.app.state.encoders.depth, sizes)
