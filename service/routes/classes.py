"""Galleries, classes and examples: enroll, list, get, rename, remove."""
from __future__ import annotations

import asyncio
import hashlib

from fastapi import APIRouter, Path, Query

from fewshot.gallery import SQLITE_MAX_ID, GalleryStore, check_label

from .. import deps
from ..schemas import ClassDetail, ClassesPage, ClassSummary, Enrolled, GallerySummary, Removed, Rename

router = APIRouter(tags=["classes"])


@router.get("/v1/galleries", dependencies=[deps.Read])
async def galleries(store: deps.StoreDep) -> list[GallerySummary]:
    """Every gallery in the data directory (example counts for those open in this process)."""
    opened = store.opened()
    return [GallerySummary(name=n, examples=len(opened[n]) if n in opened else None) for n in store.names()]


@router.post("/v1/galleries/{gallery}/classes/{label}/examples", status_code=201, dependencies=[deps.Admin])
async def enroll(gallery: str, label: str, images: deps.Images, embed: deps.EmbedderDep, store: deps.StoreDep,
                 encoder: deps.EncoderDep) -> Enrolled:
    """Enroll a new class from one or more images, or add images to it. 201 once committed."""
    label = check_label(label)
    GalleryStore.check_name(gallery)
    rows = await embed(images)  # bad images fail here, before a new gallery is made
    digests = [hashlib.sha256(data).hexdigest() for data in images]
    with store.use(gallery, encoder.dim, encoder.fingerprint, encoder.name, create=True) as target:
        ids = await asyncio.to_thread(target.add, label, rows, encoder.fingerprint, digests)
        count = target.count(label)
    return Enrolled(gallery=gallery, label=label, ids=ids, count=count)


@router.get("/v1/galleries/{gallery}/classes", dependencies=[deps.Read])
async def list_classes(gallery: deps.GalleryDep, offset: int = Query(0, ge=0),
                       limit: int = Query(100, ge=1, le=1000)) -> ClassesPage:
    """Classes with example counts, by label, a page at a time."""
    everything = await asyncio.to_thread(gallery.classes)
    page = [ClassSummary(label=label, count=count) for label, count in everything[offset:offset + limit]]
    return ClassesPage(gallery=gallery.name, classes=page, total=len(everything), offset=offset, limit=limit)


@router.get("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Read])
async def get_class(gallery: deps.GalleryDep, label: str) -> ClassDetail:
    info = await asyncio.to_thread(gallery.get_class, label)
    return ClassDetail(label=info.label, count=info.count, ids=info.ids, created=info.created)


@router.patch("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Admin])
async def rename_class(gallery: deps.GalleryDep, label: str, body: Rename) -> ClassDetail:
    """Rename a class (the new label must not exist)."""
    await asyncio.to_thread(gallery.rename_class, label, body.label)
    info = await asyncio.to_thread(gallery.get_class, body.label)
    return ClassDetail(label=info.label, count=info.count, ids=info.ids, created=info.created)


@router.delete("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Admin])
async def delete_class(gallery: deps.GalleryDep, label: str) -> Removed:
    return Removed(removed=await asyncio.to_thread(gallery.remove_class, label))


@router.delete("/v1/galleries/{gallery}/examples/{example_id}", dependencies=[deps.Admin])
async def delete_example(gallery: deps.GalleryDep,
                         example_id: int = Path(ge=0, le=SQLITE_MAX_ID, description="an example id")) -> Removed:
    await asyncio.to_thread(gallery.remove_example, example_id)
    return Removed(removed=1)
