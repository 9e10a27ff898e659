"""Galleries, classes and examples: create, get, delete, enroll, list, rename, remove."""
from __future__ import annotations

import asyncio
import hashlib
from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from fewshot import face_quality
from fewshot.backbones import canonical_name
from fewshot.errors import LabelExists
from fewshot.gallery_store import GalleryStore
from fewshot.recognize import Limit as Threshold
from fewshot.validate import MAX_ID, check_label, check_name

from .. import deps
from ..schemas import (ON_GALLERY, IMAGES_IN, errors, IMAGES_BODY, ClassDetail, ClassesPage, ClassSummary, Deleted, Enrolled,
                       GalleryDetail, GalleryIn, GallerySummary, Removed, Rename)

router = APIRouter(tags=["classes"])


def _summary(store: GalleryStore, name: str) -> GallerySummary:
    """In a worker thread: describing a gallery that is not open reads its database."""
    opened, info = store.opened(), store.describe(name) or {}
    return GallerySummary(name=name, encoder=info.get("encoder") or None,
                          examples=len(opened[name]) if name in opened else None)


def _summaries(store: GalleryStore) -> list[GallerySummary]:
    return [_summary(store, name) for name in store.names()]


@router.get("/v1/galleries", dependencies=[deps.Read], responses=errors(401, 403, 503))
async def galleries(store: deps.StoreDep) -> list[GallerySummary]:
    """Every gallery in the data directory, with its encoder (example counts for those open here)."""
    return await asyncio.to_thread(_summaries, store)


@router.post("/v1/galleries", status_code=201, dependencies=[deps.Admin],
             responses={200: {"model": GallerySummary, "description": "it exists already, with that encoder"},
                        **errors(400, 401, 403, 409, 422, 503)})
async def create_gallery(body: GalleryIn, store: deps.StoreDep, pool: deps.PoolDep) -> GallerySummary:
    """Create an empty gallery bound to an encoder (201); 200 if it exists with that encoder, 409 with another."""
    name, encoder = check_name(body.name), pool.check(body.encoder)
    existing = await asyncio.to_thread(store.describe, name)
    if existing is not None:
        if canonical_name(existing["encoder"]) != canonical_name(encoder):
            raise LabelExists(f"gallery {name!r} exists with encoder {existing['encoder']!r}; pick another name")
        return JSONResponse((await asyncio.to_thread(_summary, store, name)).model_dump(), status_code=200)
    slot = await pool.get(encoder)

    def create() -> GallerySummary:
        with store.use(name, slot.encoder.dim, slot.encoder.fingerprint, slot.name, create=True):
            return _summary(store, name)
    return await asyncio.to_thread(create)


@router.post("/v1/galleries/{gallery}/classes/{label}/examples", status_code=201, dependencies=[deps.Admin],
             openapi_extra=IMAGES_BODY, responses=errors(ON_GALLERY, 409, IMAGES_IN))
async def enroll(gallery: deps.GalleryName, label: deps.LabelPath, images: deps.Images, store: deps.StoreDep,
                 pool: deps.PoolDep, config: deps.SettingsDep,
                 face: Literal["largest", "center", "best"] | None = Query(
                     None, description="face galleries: which face of a photo holding several (best: the "
                                       "detector's highest score); without it such a photo answers 422 several_faces"),
                 box: str | None = Query(None, description="face galleries: x0,y0,x1,y1, the face to enroll"),
                 quality: Literal["on", "off"] = Query(
                     "on", description="off: enroll a face that is small, blurred or weakly detected anyway"),
                 min_score: deps.MinScore = None) -> Enrolled:
    """Enroll a new class from one or more images, or add images to it. 201 once committed. A gallery that
    does not exist is made with the default encoder. In face galleries one face per image is enrolled: the
    one that passes the quality limits (422 face_quality with the measurements otherwise), or, of several,
    the one ``face`` or ``box`` names (422 several_faces lists every box and score)."""
    label, gallery = check_label(label), check_name(gallery)
    limits = face_quality.Limits(score=config.face_min_score).with_score(min_score)
    choose = partial(face_quality.choose, face=face, box=face_quality.parse_box(box), check=quality == "on",
                     limits=limits)
    existing = await asyncio.to_thread(store.describe, gallery)
    slot = await pool.get(existing["encoder"] or None if existing else None)
    rows, faces, kept, chosen = await slot.embedder.main_rows(images, config.keep_images, choose)  # bad ones fail here
    digests = [hashlib.sha256(data).hexdigest() for data in images]

    def add() -> tuple[list[int], int]:  # the fingerprint is checked once, by the gallery, in its write
        made = existing is None  # then with this encoder's dim and fingerprint
        with store.use(gallery, slot.encoder.dim if made else None, slot.encoder.fingerprint if made else None,
                       slot.name, create=made) as target:
            ids = target.add(label, rows, slot.encoder.fingerprint, digests, images=kept)
            return ids, target.count(label)
    ids, count = await asyncio.to_thread(add)
    finds_faces = slot.encoder.finds_faces
    return Enrolled(gallery=gallery, label=label, ids=ids, count=count, faces=faces if finds_faces else None,
                    boxes=[list(c.box) for c in chosen] if finds_faces else None,
                    detection_scores=[c.score for c in chosen] if finds_faces else None)


@router.get("/v1/galleries/{gallery}", dependencies=[deps.Read], responses=errors(ON_GALLERY))
async def get_gallery(gallery: deps.GalleryDep, recognizers: deps.RecognizersDep, pool: deps.PoolDep) -> GalleryDetail:
    """A gallery: its encoder, counts, version, the threshold queries get by default (and where it comes
    from), and when it was made."""
    slot = await pool.get(gallery.encoder or None)

    def detail() -> GalleryDetail:
        classes, version = len(gallery.rows.classes()), gallery.version
        limit = recognizers.of(gallery, slot).threshold() if len(gallery) else Threshold(None, None, None)
        return GalleryDetail(name=gallery.name, encoder=gallery.encoder or None, dim=gallery.dim,
                             fingerprint=gallery.fingerprint, classes=classes, examples=len(gallery),
                             version=version, threshold=limit.threshold, threshold_source=limit.source,
                             decision=limit.statistic, threshold_version=limit.version, created=gallery.created)
    return await asyncio.to_thread(detail)


@router.delete("/v1/galleries/{gallery}", dependencies=[deps.Admin], responses=errors(ON_GALLERY))
async def delete_gallery(request: Request, gallery: deps.GalleryName, store: deps.StoreDep) -> Deleted:
    """Delete a gallery and everything of it: vectors, kept images, change log, files (one step that
    survives a crash half-way). Other replicas drop it too. 404 if there is none."""
    await asyncio.to_thread(store.delete, gallery)
    request.app.state.adapt_jobs.pop(gallery, None)
    request.app.state.reembed_jobs.pop(gallery, None)
    return Deleted(deleted=gallery)


@router.get("/v1/galleries/{gallery}/classes", dependencies=[deps.Read], responses=errors(ON_GALLERY))
async def list_classes(gallery: deps.GalleryDep, offset: int = Query(0, ge=0),
                       limit: int = Query(100, ge=1, le=1000)) -> ClassesPage:
    """Classes with example counts, by label, a page at a time."""
    everything = await asyncio.to_thread(gallery.rows.classes)
    page = [ClassSummary(label=label, count=count) for label, count in everything[offset:offset + limit]]
    return ClassesPage(gallery=gallery.name, classes=page, total=len(everything), offset=offset, limit=limit)


def _detail(gallery, label: str, offset: int, limit: int) -> ClassDetail:
    info = gallery.rows.get_class(label, offset, limit)
    return ClassDetail(label=info.label, count=info.count, ids=info.ids, created=info.created, total=info.count,
                       offset=offset, limit=limit)


Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="the first example id to list, counted from 0")]
Limit = Annotated[int, Query(ge=1, le=10_000, description="how many example ids to list")]


@router.get("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Read], responses=errors(ON_GALLERY))
async def get_class(gallery: deps.GalleryDep, label: deps.LabelPath, offset: Offset = 0,
                    limit: Limit = 1000) -> ClassDetail:
    """A class: its count, when it was first enrolled, and its example ids, a page at a time. (A label
    holding ``/`` goes into the path percent-encoded: ``AC%2FDC``.)"""
    return await asyncio.to_thread(_detail, gallery, label, offset, limit)


@router.patch("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Admin],
              responses=errors(ON_GALLERY, 409))
async def rename_class(gallery: deps.GalleryDep, label: deps.LabelPath, body: Rename) -> ClassDetail:
    """Rename a class (the new label must not exist)."""
    def rename() -> ClassDetail:
        gallery.rename_class(label, body.label)
        return _detail(gallery, body.label, 0, 1000)
    return await asyncio.to_thread(rename)


@router.delete("/v1/galleries/{gallery}/classes/{label}", dependencies=[deps.Admin],
               responses=errors(ON_GALLERY))
async def delete_class(gallery: deps.GalleryDep, label: deps.LabelPath) -> Removed:
    return Removed(removed=await asyncio.to_thread(gallery.remove_class, label))


@router.get("/v1/galleries/{gallery}/examples/{example_id}/{kind}", dependencies=[deps.Read],
            response_class=Response, responses={200: {"content": {"image/*": {}}}, **errors(ON_GALLERY)})
async def example_image(gallery: deps.GalleryDep, kind: Literal["image", "thumbnail"],
                        example_id: int = Path(ge=0, le=MAX_ID)) -> Response:
    """The kept original image of an example (``image``), or its small JPEG (``thumbnail``)."""
    data, media = await asyncio.to_thread(gallery.rows.image, example_id, "original" if kind == "image" else kind)
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


@router.delete("/v1/galleries/{gallery}/examples/{example_id}", dependencies=[deps.Admin],
               responses=errors(ON_GALLERY))
async def delete_example(gallery: deps.GalleryDep,
                         example_id: int = Path(ge=0, le=MAX_ID, description="an example id")) -> Removed:
    await asyncio.to_thread(gallery.remove_example, example_id)
    return Removed(removed=1)
