"""Galleries, classes and examples: enroll, list, get, rename, remove."""
from __future__ import annotations

import asyncio
import hashlib

from fastapi import APIRouter, Query, Request

from fewshot.gallery import GalleryStore, check_label

from .. import deps
from ..schemas import ClassDetail, ClassesPage, ClassSummary, Enrolled, GallerySummary, Removed, Rename

router = APIRouter(tags=["classes"])


@router.get("/v1/galleries", dependencies=[deps.Read])
async def galleries(request: Request) -> list[GallerySummary]:
    """Every gallery in the data directory."""
    opened = request.app.state.store.opened()
    return [GallerySummary(name=n, examples=len(opened[n]) if n in opened else None)
            for n in request.app.state.store.names()]


@router.post("/v1/galleries/{gallery}/classes/{label}/examples", status_code=201, dependencies=[deps.Admin])
async def enroll(request: Request, gallery: str, label: str, images: deps.Images) -> Enrolled:
    """Enroll a new class from one or more images, or add images to it. 201 once committed."""
    label = check_label(label)
    GalleryStore.check_name(gallery)
    rows = await deps.embed(request, images)  # bad images fail here, before a new gallery is made
    target = deps.gallery(request, gallery, create=True)
    digests = [hashlib.sha256(data).hexdigest() for data in images]
    ids = await asyncio.to_thread(target.add, label, rows, request.app.state.encoder.fingerprint, digests)
    return Enrolled(gallery=gallery, label=label, ids=ids, count=target.get_class(label).count)


@router.get("/v1/galleries/{gallery}/classes", dependencies=[deps.Read])
async def list_classes(request: Request, gallery: str, offset: int = Query(0, ge=0),
                       limit: int = Query(100, ge=1, le=1000)) -> ClassesPage:
    """Classes with example counts, by label, a page at a time."""
    everything = deps.gallery(request, gallery).classes()
    page = [ClassSummary(label=label, count=count) for label, count in everything[offset:offset + limit]]
    return ClassesPage(gallery=gallery, classes=page, total=len(everything), offset=offset, limit=limit)


@router.get("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Read])
async def get_class(request: Request, gallery: str, label: str) -> ClassDetail:
    info = deps.gallery(request, gallery).get_class(label)
    return ClassDetail(label=info.label, count=info.count, ids=info.ids, created=info.created)


@router.patch("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Admin])
async def rename_class(request: Request, gallery: str, label: str, body: Rename) -> ClassDetail:
    """Rename a class (the new label must not exist)."""
    target = deps.gallery(request, gallery)
    await asyncio.to_thread(target.rename_class, label, body.label)
    info = target.get_class(body.label)
    return ClassDetail(label=info.label, count=info.count, ids=info.ids, created=info.created)


@router.delete("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Admin])
async def delete_class(request: Request, gallery: str, label: str) -> Removed:
    return Removed(removed=await asyncio.to_thread(deps.gallery(request, gallery).remove_class, label))


@router.delete("/v1/galleries/{gallery}/examples/{example_id}", dependencies=[deps.Admin])
async def delete_example(request: Request, gallery: str, example_id: int) -> Removed:
    await asyncio.to_thread(deps.gallery(request, gallery).remove_example, example_id)
    return Removed(removed=1)
