"""Re-embed a gallery with another encoder from its kept originals, as a background job."""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from fastapi import APIRouter, HTTPException, Request

from fewshot.errors import FewShotError
from fewshot.reembed import encoder_embed, reembed

from .. import deps
from ..encoders import Slot
from ..schemas import ON_GALLERY, errors, ReembedIn, ReembedJob

router = APIRouter(tags=["reembed"])
log = logging.getLogger("fewshot.service")


@router.post("/v1/galleries/{gallery}/reembed", status_code=202, dependencies=[deps.Admin],
             responses=errors(ON_GALLERY, 409))
async def start_reembedding(request: Request, body: ReembedIn, gallery: deps.GalleryDep, pool: deps.PoolDep,
                store: deps.StoreDep) -> ReembedJob:
    """Re-embed every example from its kept original with ``encoder``; the old vectors keep serving
    until the new ones are complete, then the gallery switches in one step. Poll GET for progress."""
    jobs = request.app.state.reembed_jobs
    name = gallery.name
    if jobs.get(name, {}).get("status") == "running":
        raise HTTPException(409, f"a re-embedding of {name!r} is already running; poll GET for its progress")
    slot = await pool.get(body.encoder)
    job = jobs[name] = {"gallery": name, "encoder": slot.name, "status": "running", "started": time.time(),
                        "done": 0, "total": len(gallery)}
    task = asyncio.create_task(_run(store, name, slot, job))
    request.app.state.background.add(task)
    task.add_done_callback(request.app.state.background.discard)
    return ReembedJob(**job)


async def _run(store, name: str, slot: Slot, job: dict) -> None:
    loop = asyncio.get_running_loop()

    def through_batcher(pixels: np.ndarray) -> np.ndarray:  # from the job's thread, sharing forward passes
        return asyncio.run_coroutine_threadsafe(slot.embedder.rows(list(pixels)), loop).result()

    def progress(done: int, total: int) -> None:
        job.update(done=done, total=total)

    try:
        report = await asyncio.to_thread(reembed, store, name, slot.name, slot.encoder.dim, slot.encoder.fingerprint,
                                         encoder_embed(slot.encoder, through_batcher), progress)
        job.update(status="done", report=report.to_dict(), done=report.examples + len(report.skipped))
    except FewShotError as exc:  # refused: e.g. the originals were not kept; the gallery is unchanged
        job.update(status="failed", error=str(exc))
    except Exception:  # the details stay in the log; the gallery is unchanged unless the swap happened
        log.exception("re-embedding %s failed", name)
        job.update(status="failed", error="re-embedding failed; see the server log")
    finally:
        job["finished"] = time.time()


@router.get("/v1/galleries/{gallery}/reembed", dependencies=[deps.Read], responses=errors(ON_GALLERY))
async def reembed_status(request: Request, gallery: deps.GalleryDep) -> ReembedJob:
    """The latest re-embedding of this gallery: progress, then its report."""
    job = request.app.state.reembed_jobs.get(gallery.name)
    if job is None:
        return ReembedJob(gallery=gallery.name, status="none", encoder=gallery.encoder or None)
    return ReembedJob(**job)
