"""Guarded light fine-tuning of a gallery, as a background job."""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, HTTPException, Request

from fewshot.adapt import train_adapter

from .. import deps
from ..schemas import AdaptJob

router = APIRouter(tags=["adapt"])
log = logging.getLogger("fewshot.service")


@router.post("/v1/galleries/{gallery}/adapt", status_code=202, dependencies=[deps.Admin])
async def start(request: Request, gallery: str) -> AdaptJob:
    """Train the residual adapter on the gallery's classes; it is adopted only if it beats the frozen
    head on held-out examples. Poll GET for the status and the report."""
    recognizer = deps.recognizer(request, gallery)
    jobs = request.app.state.adapt_jobs
    if jobs.get(gallery, {}).get("status") == "running":
        raise HTTPException(409, f"an adapt job for {gallery!r} is already running; poll GET for its status")
    job = jobs[gallery] = {"gallery": gallery, "status": "running", "started": time.time()}
    task = asyncio.create_task(_run(recognizer, job))
    request.app.state.background.add(task)
    task.add_done_callback(request.app.state.background.discard)
    return AdaptJob(**job)


async def _run(recognizer, job: dict) -> None:
    try:
        vectors, _, labels = await asyncio.to_thread(recognizer.gallery.vectors)
        adapter, report = await asyncio.to_thread(train_adapter, vectors, labels)
        if adapter is not None:
            await asyncio.to_thread(recognizer.set_adapter, adapter, report)
        job.update(status="done", report=report.to_dict())
    except Exception:  # the job reports failure; the details stay in the log
        log.exception("adapt job for %s failed", job["gallery"])
        job.update(status="failed", error="adaptation failed; see the server log")
    job["finished"] = time.time()


@router.get("/v1/galleries/{gallery}/adapt", dependencies=[deps.Read])
async def status(request: Request, gallery: str) -> AdaptJob:
    """The latest adapt job of this gallery and its report."""
    deps.gallery(request, gallery)
    job = request.app.state.adapt_jobs.get(gallery)
    if job is None:
        adopted = deps.recognizer(request, gallery).adapter is not None
        return AdaptJob(gallery=gallery, status="adopted" if adopted else "none")
    return AdaptJob(**job)


@router.delete("/v1/galleries/{gallery}/adapt", dependencies=[deps.Admin])
async def drop(request: Request, gallery: str) -> AdaptJob:
    """Drop the adopted adapter: back to the frozen head."""
    await asyncio.to_thread(deps.recognizer(request, gallery).set_adapter, None)
    request.app.state.adapt_jobs.pop(gallery, None)
    return AdaptJob(gallery=gallery, status="none")
