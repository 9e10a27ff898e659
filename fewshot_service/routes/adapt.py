"""Guarded light fine-tuning of a gallery, as a background job (at most ``max_adapt_jobs`` at once)."""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, HTTPException, Request

from fewshot.adapt import train_adapter
from fewshot.errors import Busy
from fewshot.recognize import Recognizer

from .. import deps
from ..schemas import ON_GALLERY, errors, AdaptJob

router = APIRouter(tags=["adapt"])
log = logging.getLogger("fewshot.service")


@router.post("/v1/galleries/{gallery}/adapt", status_code=202, dependencies=[deps.Admin],
             responses=errors(ON_GALLERY, 409, 429))
async def start_adapting(request: Request, recognizer: deps.RecognizerDep, config: deps.SettingsDep,
                store: deps.StoreDep) -> AdaptJob:
    """Train the residual adapter on the gallery's classes; it is adopted only if it beats the frozen
    head on held-out examples. Poll GET for the status and the report."""
    name = recognizer.gallery.name
    jobs = request.app.state.adapt_jobs
    if jobs.get(name, {}).get("status") == "running":
        raise HTTPException(409, f"an adapt job for {name!r} is already running; poll GET for its status")
    running = sum(job.get("status") == "running" for job in jobs.values())
    if running >= config.max_adapt_jobs:
        raise Busy(f"{running} adapt job(s) already running, the limit of this server; retry when one is done")
    job = jobs[name] = {"gallery": name, "status": "running", "started": time.time()}
    await asyncio.to_thread(store.lease, name)  # the gallery stays open (not evicted) while the job trains
    task = asyncio.create_task(_run(recognizer, job, store))
    request.app.state.background.add(task)
    task.add_done_callback(request.app.state.background.discard)
    return AdaptJob(**job)


async def _run(recognizer: Recognizer, job: dict, store) -> None:
    try:
        vectors, _, labels = await asyncio.to_thread(recognizer.gallery.vectors)
        adapter, report = await asyncio.to_thread(train_adapter, vectors, labels)
        if adapter is not None:
            await asyncio.to_thread(recognizer.set_adapter, adapter, report)
        job.update(status="done", report=report.to_dict())
    except Exception:  # the job reports failure; the details stay in the log
        log.exception("adapt job for %s failed", job["gallery"])
        job.update(status="failed", error="adaptation failed; see the server log")
    finally:
        await asyncio.to_thread(store.release, job["gallery"])
    job["finished"] = time.time()


@router.get("/v1/galleries/{gallery}/adapt", dependencies=[deps.Read], responses=errors(ON_GALLERY))
async def adapt_status(request: Request, recognizer: deps.RecognizerDep) -> AdaptJob:
    """The latest adapt job of this gallery and its report."""
    name = recognizer.gallery.name
    job = request.app.state.adapt_jobs.get(name)
    if job is None:
        return AdaptJob(gallery=name, status="adopted" if recognizer.adapter is not None else "none")
    return AdaptJob(**job)


@router.delete("/v1/galleries/{gallery}/adapter", dependencies=[deps.Admin], responses=errors(ON_GALLERY))
async def drop_adapter(request: Request, recognizer: deps.RecognizerDep) -> AdaptJob:
    """Drop the adopted adapter (and forget the last job): back to the frozen head. GET .../adapt
    then says ``none``."""
    await asyncio.to_thread(recognizer.set_adapter, None)
    request.app.state.adapt_jobs.pop(recognizer.gallery.name, None)
    return AdaptJob(gallery=recognizer.gallery.name, status="none")
