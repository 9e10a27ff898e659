"""Galleries, classes and examples: create, enroll, list, get, rename, remove."""
from __future__ import annotations

import asyncio
import hashlib

from typing import Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse, Response

from fewshot.errors import LabelExists
from fewshot.gallery import SQLITE_MAX_ID, GalleryStore, check_label

from .. import deps
from ..schemas import (ERRORS, IMAGES_BODY, ClassDetail, ClassesPage, ClassSummary, Enrolled, GalleryIn,
                       GallerySummary, Removed, Rename)

router = APIRouter(tags=["classes"], responses=ERRORS)


def _summary(store: GalleryStore, name: str) -> GallerySummary:
    opened, info = store.opened(), store.describe(name) or {}
    return GallerySummary(name=name, encoder=info.get("encoder") or None,
                          examples=len(opened[name]) if name in opened else None)


@router.get("/v1/galleries", dependencies=[deps.Read])
async def galleries(store: deps.StoreDep) -> list[GallerySummary]:
    """Every gallery in the data directory, with its encoder (example counts for those open here)."""
    return [_summary(store, name) for name in store.names()]


@router.post("/v1/galleries", status_code=201, dependencies=[deps.Admin],
             responses={200: {"model": GallerySummary, "description": "it exists already, with that encoder"}})
async def create_gallery(body: GalleryIn, store: deps.StoreDep, pool: deps.PoolDep) -> GallerySummary:
    """Create an empty gallery bound to an encoder (201); 200 if it exists with that encoder, 409 with another."""
    name, encoder = GalleryStore.check_name(body.name), pool.check(body.encoder)
    existing = store.describe(name)
    if existing is not None:
        if existing["encoder"] != encoder:
            raise LabelExists(f"gallery {name!r} exists with encoder {existing['encoder']!r}; pick another name")
        return JSONResponse(_summary(store, name).model_dump(), status_code=200)
    slot = await pool.get(encoder)
    with store.use(name, slot.encoder.dim, slot.encoder.fingerprint, slot.name, create=True):
        return _summary(store, name)


@router.post("/v1/galleries/{gallery}/classes/{label}/examples", status_code=201, dependencies=[deps.Admin],
             openapi_extra=IMAGES_BODY)
async def enroll(gallery: deps.GalleryName, label: deps.LabelPath, images: deps.Images, store: deps.StoreDep,
                 pool: deps.PoolDep, config: deps.SettingsDep) -> Enrolled:
    """Enroll a new class from one or more images (the largest face of each, in face galleries), or add
    images to it. 201 once committed. A gallery that does not exist is made with the default encoder."""
    label = check_label(label)
    GalleryStore.check_name(gallery)
    existing = store.describe(gallery)
    slot = await pool.get(existing["encoder"] or None if existing else None)
    rows, faces, kept = await slot.embed.main_rows(images, config.keep_images)  # bad images fail here
    digests = [hashlib.sha256(data).hexdigest() for data in images]
    with store.use(gallery, slot.encoder.dim, slot.encoder.fingerprint, slot.name, create=True) as target:
        await deps.slot_of(target, pool)  # the gallery's own encoder, same weights
        ids = await asyncio.to_thread(target.add, label, rows, slot.encoder.fingerprint, digests, images=kept)
        count = await asyncio.to_thread(target.count, label)
    return Enrolled(gallery=gallery, label=label, ids=ids, count=count,
                    faces=faces if slot.encoder.finds_faces else None)


@router.get("/v1/galleries/{gallery}/classes", dependencies=[deps.Read])
async def list_classes(gallery: deps.GalleryDep, offset: int = Query(0, ge=0),
                       limit: int = Query(100, ge=1, le=1000)) -> ClassesPage:
    """Classes with example counts, by label, a page at a time."""
    everything = await asyncio.to_thread(gallery.classes)
    page = [ClassSummary(label=label, count=count) for label, count in everything[offset:offset + limit]]
    return ClassesPage(gallery=gallery.name, classes=page, total=len(everything), offset=offset, limit=limit)


@router.get("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Read])
async def get_class(gallery: deps.GalleryDep, label: deps.LabelPath) -> ClassDetail:
    info = await asyncio.to_thread(gallery.get_class, label)
    return ClassDetail(label=info.label, count=info.count, ids=info.ids, created=info.created)


@router.patch("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Admin])
async def rename_class(gallery: deps.GalleryDep, label: deps.LabelPath, body: Rename) -> ClassDetail:
    """Rename a class (the new label must not exist)."""
    await asyncio.to_thread(gallery.rename_class, label, body.label)
    info = await asyncio.to_thread(gallery.get_class, body.label)
    return ClassDetail(label=info.label, count=info.count, ids=info.ids, created=info.created)


@router.delete("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Admin])
async def delete_class(gallery: deps.GalleryDep, label: deps.LabelPath) -> Removed:
    return Removed(removed=await asyncio.to_thread(gallery.remove_class, label))


@router.get("/v1/galleries/{gallery}/examples/{example_id}/{kind}", dependencies=[deps.Read],
            response_class=Response, responses={200: {"content": {"image/*": {}}}})
async def example_image(gallery: deps.GalleryDep, kind: Literal["image", "thumbnail"],
                        example_id: int = Path(ge=0, le=SQLITE_MAX_ID)) -> Response:
    """The kept original image of an example (``image``), or its small JPEG (``thumbnail``)."""
    data, media = await asyncio.to_thread(gallery.image, example_id, "original" if kind == "image" else kind)
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


@router.delete("/v1/galleries/{gallery}/examples/{example_id}", dependencies=[deps.Admin])
async def delete_example(gallery: deps.GalleryDep,
                         example_id: int = Path(ge=0, le=SQLITE_MAX_ID, description="an example id")) -> Removed:
    await asyncio.to_thread(gallery.remove_example, example_id)
    return Removed(removed=1)
