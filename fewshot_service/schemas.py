"""Request and response models; no logic."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from fewshot.validate import GALLERY_NAME, LABEL_PATTERN, MAX_LABEL

NAME_SCHEMA = {"pattern": f"^{GALLERY_NAME.pattern}$", "minLength": 1, "maxLength": 64}
LABEL_SCHEMA = {"pattern": LABEL_PATTERN, "minLength": 1, "maxLength": MAX_LABEL}


class ImagesIn(BaseModel):
    images: list[str] = Field(description="base64-encoded image files (JPEG, PNG, WebP, ...)")


class ErrorDetail(BaseModel):
    type: str = Field(description="the error's kind, snake_case: e.g. invalid_image, no_face, not_found, "
                                  "validation_error (all of them: docs/reference.md)")
    message: str = Field(description="what went wrong and what to do next")


class ErrorBody(BaseModel):
    error: ErrorDetail


_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in [
    (400, "bad input: an unreadable image, a bad label, vectors of the wrong shape, a parameter out of range"),
    (401, "an API key is needed"), (403, "this key may not do that (a read-only key on a write)"),
    (404, "no such gallery, class or example"), (409, "a conflict: the class or gallery exists, other encoder"),
    (413, "too large: the body, an image or too many images"), (415, "images must be multipart or JSON"),
    (422, "a malformed parameter, or (no_face) no face in an image"), (429, "too many jobs; see Retry-After"),
    (503, "overloaded, starting or the database unavailable; see Retry-After")]}
# What a route on one gallery can answer besides its success: a bad name or parameter, keys, no such
# gallery, malformed parameters, a gallery closed or a database away.
ON_GALLERY = (400, 401, 403, 404, 422, 503)
IMAGES_IN = (413, 415)  # a route that reads images: too large, or neither multipart nor JSON


def errors(*statuses: int | tuple[int, ...]) -> dict:
    """The ``responses`` of a route: the error statuses it can return, each with the error body."""
    flat = sorted({s for group in statuses for s in (group if isinstance(group, tuple) else (group,))})
    return {status: _ERRORS[status] for status in flat}

IMAGES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "minItems": 1, "maxItems": 32,
                                 "description": "one or more image files (any field name is read)"}}}},
    "application/json": {"schema": {
        "type": "object", "required": ["images"],
        "properties": {"images": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 32,
                                  "description": "base64-encoded image files (a data: URL prefix is allowed)"}}}},
}}}


class EmbedOut(BaseModel):
    encoder: str
    fingerprint: str
    dim: int
    faces: list[int] | None = Field(None, description="face encoders: faces found per image (the largest is embedded)")
    embeddings: list[list[float]] | None = None
    embeddings_base64: list[str] | None = Field(None, description="little-endian float32 rows, base64")


class Enrolled(BaseModel):
    gallery: str
    label: str
    ids: list[int]
    count: int = Field(description="examples of this class after the enrollment")
    faces: list[int] | None = Field(None, description="face galleries: faces found in each image")
    boxes: list[list[int]] | None = Field(None, description="face galleries: [x0, y0, x1, y1] of the face enrolled "
                                                            "from each image, in its pixels")
    detection_scores: list[float | None] | None = Field(None, description="face galleries: the detector's score "
                                                                          "of each face enrolled")


class ClassSummary(BaseModel):
    label: str
    count: int


class ClassDetail(ClassSummary):
    ids: list[int] = Field(description="example ids in id order, a page at a time: ids[offset:offset + limit]")
    created: float
    total: int = Field(description="example ids in all (the class's count)")
    offset: int
    limit: int


class ClassesPage(BaseModel):
    gallery: str
    classes: list[ClassSummary]
    total: int
    offset: int
    limit: int


class GallerySummary(BaseModel):
    name: str
    encoder: str | None = None
    examples: int | None = Field(None, description="examples, for the galleries open in this process")


class GalleryDetail(BaseModel):
    name: str
    encoder: str | None
    dim: int
    fingerprint: str
    classes: int
    examples: int
    version: int
    threshold: float | None = Field(description="the prototype head's threshold at the default false-accept rate")
    threshold_source: str | None = Field(description="gallery (its own calibration), reference (its encoder's, "
                                                     "while it is too small for its own), or null")
    decision: Literal["score", "margin"] = Field(
        "score", description="what that threshold is compared with: the best score, or its margin over the runner-up")
    threshold_version: int | None
    created: float | None = Field(description="when it was made (null: made before this was recorded)")


class Deleted(BaseModel):
    deleted: str


class GalleryIn(BaseModel):
    name: str = Field(json_schema_extra=NAME_SCHEMA)
    encoder: str | None = Field(None, description="one of the server's FEWSHOT_ENCODERS; default FEWSHOT_ENCODER")


class Rename(BaseModel):
    label: str = Field(json_schema_extra=LABEL_SCHEMA)


class Removed(BaseModel):
    removed: int


LANDMARKS = Field(None, description="face galleries: dlib's 5 landmarks [[x, y], ...] in the original image's "
                                   "pixels: the corners of each eye and the base of the nose")


class Match(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    image: int = Field(0, description="the index of the image this answer is about")
    box: list[int] | None = Field(None, description="[x0, y0, x1, y1] of the face in the original image's pixels "
                                                   "(face galleries; absent for whole images)")
    detection_score: float | None = Field(
        None, description="how sure the face detector is that the box holds a face (its margin: above 0 it is "
                          "taken as a face, above ~1 it is clear-cut; low scores are worth a look); face galleries")
    landmarks: list[list[int]] | None = LANDMARKS
    matches: list[Match]
    unknown: bool = Field(description="true when decision_value is under the threshold: no class is accepted")
    threshold: float | None
    decision: Literal["score", "margin"] = Field(
        "score", description="what the threshold is compared with: the best match's score, or its margin over "
                             "the runner-up (best - 0.5 x second), the default on a gallery's own threshold")
    decision_value: float | None = Field(None, description="the value compared with the threshold")


class Recognized(BaseModel):
    head: str
    results: list[Prediction]
    version: int = Field(description="the gallery version the scores come from (it grows with every change)")
    threshold_version: int | None = Field(
        description="the gallery version the calibrated threshold was computed on (it may trail `version` "
                    "for a moment after a change while it is recomputed in the background); null when a "
                    "threshold was given or the gallery has too few classes to calibrate one")
    threshold_source: str | None = Field(
        None, description="given; gallery (its own calibration); reference (the encoder's reference operating "
                          "point, while the gallery is too small to calibrate itself); null: no threshold")
    faces: list[int] | None = Field(None, description="face galleries: faces found in each image (each is a result)")


class VectorsIn(BaseModel):
    vectors: list[list[float]] = Field(description="unit-length rows from the gallery's encoder")
    fingerprint: str | None = Field(None, description="the encoder fingerprint they come from (checked if given)")
    k: int = Field(5, ge=1, le=100)
    head: Literal["prototype", "knn", "cache"] = "prototype"
    threshold: float | None = None
    far: float | None = Field(None, description="false-accept rate for the calibrated threshold, 1e-6 to 0.5",
                              json_schema_extra={"minimum": 1e-6, "maximum": 0.5})
    decision: Literal["score", "margin"] | None = Field(
        None, description="what the threshold decides on (default: margin on the gallery's own threshold, "
                          "score on a given or reference one)")


class Verified(BaseModel):
    label: str
    score: float
    threshold: float | None
    match: bool
    version: int
    threshold_version: int | None
    threshold_source: str | None = None


class DetectedFace(BaseModel):
    box: list[int] = Field(description="[x0, y0, x1, y1] in the image's pixels")
    score: float | None = Field(description="the detector's score: above 0 a face, above ~1 clear-cut")
    width: int = Field(description="px")
    sharpness: float = Field(description="variance of the Laplacian of the aligned 150 px chip")
    problems: list[str] = Field(description="what keeps it from being enrolled (quality limits); empty: nothing")
    landmarks: list[list[int]] | None = LANDMARKS


class Detected(BaseModel):
    encoder: str
    faces: list[list[DetectedFace]] = Field(description="per image, every face, largest first")


class PairVerified(BaseModel):
    encoder: str
    score: float = Field(description="cosine of the two faces' embeddings")
    threshold: float
    threshold_source: str = Field(description="given, or reference (the encoder's operating point for far)")
    far: float | None = Field(description="the false-accept rate the reference threshold is for")
    match: bool = Field(description="the same person: score >= threshold")
    boxes: list[list[int]] = Field(description="the face compared in each image (its largest)")


class AdaptJob(BaseModel):
    gallery: str
    status: str = Field(description="running, done, failed; or none / adopted when no job ran here")
    started: float | None = None
    finished: float | None = None
    report: dict | None = Field(None, description="adopted, reason, frozen and adapted held-out accuracy, ...")
    error: str | None = None


class ReembedIn(BaseModel):
    encoder: str = Field(description="one of the server's FEWSHOT_ENCODERS")


class ReembedJob(BaseModel):
    gallery: str
    status: str = Field(description="running, done, failed, or none when no job ran here")
    encoder: str | None = None
    started: float | None = None
    finished: float | None = None
    done: int | None = Field(None, description="examples re-embedded (or skipped) so far")
    total: int | None = None
    report: dict | None = Field(None, description="examples re-embedded, those skipped and why, seconds")
    error: str | None = None
