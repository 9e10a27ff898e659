"""One table from library errors to HTTP status, and the handlers that apply it.

Only domain errors (``fewshot.errors``) are mapped; anything else is a 500 "internal error" with
the traceback in the log only, so no numpy, PIL or statistics message ever reaches a client.
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fewshot.errors import (Busy, DimensionMismatch, EmptyGallery, FaceChoice, FewShotError, FingerprintMismatch,
                            GalleryClosed,
                            ImageTooLarge, InvalidArgument, InvalidImage, InvalidLabel, InvalidVector, LabelExists,
                            NoFace, Overloaded, StoreUnavailable, TorchMissing, UnknownEncoder, UnknownGallery,
                            UnknownLabel, WeightsNotFound)

log = logging.getLogger("fewshot.service")

STATUS: list[tuple[type[Exception], int]] = [  # first match wins: subclasses before their bases
    (ImageTooLarge, 413), (NoFace, 422), (FaceChoice, 422), (InvalidImage, 400), (DimensionMismatch, 400),
    (InvalidVector, 400),
    (InvalidLabel, 400), (InvalidArgument, 400), (FingerprintMismatch, 409), (LabelExists, 409),
    (UnknownGallery, 404), (UnknownLabel, 404), (EmptyGallery, 409), (Busy, 429), (Overloaded, 503),
    (GalleryClosed, 503), (StoreUnavailable, 503), (UnknownEncoder, 400), (WeightsNotFound, 503),
    (TorchMissing, 503),
]
RETRY_AFTER = {429: "30", 503: "1"}  # seconds: an adapt job takes tens of seconds, a full queue drains at once
# The type of an error the HTTP layer itself raises, by status (a library error's type is its own name)
HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
              409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "validation_error",
              429: "too_many_requests", 503: "unavailable"}


def error_type(exc: Exception) -> str:
    """``InvalidImage`` -> ``invalid_image``: every type a client sees is snake_case (docs/reference.md lists them)."""
    return getattr(exc, "code", None) or re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def error_body(status: int, message: str, kind: str, headers: dict | None = None,
               details: dict | None = None) -> JSONResponse:
    headers = {**({"Retry-After": RETRY_AFTER[status]} if status in RETRY_AFTER else {}), **(headers or {})}
    error = {"type": kind, "message": message, **(details or {})}  # details: e.g. the faces to choose from
    return JSONResponse({"error": error}, status_code=status, headers=headers or None)


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            request.app.state.metrics.rejected(status)
            return error_body(status, str(exc), error_type(exc), details=getattr(exc, "details", None))
    return await internal_error(request, exc)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_body(500, "internal error; the details are in the server log", "internal_error")


def _describe(error: dict) -> str:
    if error.get("type") == "json_invalid":  # FastAPI puts the character offset in loc
        where = error["loc"][-1] if len(error.get("loc", ())) > 1 else "?"
        return f"malformed JSON body at character {where}: {error.get('ctx', {}).get('error', error['msg'])}"
    return f"{'.'.join(str(p) for p in error['loc'] if p != 'body') or 'body'}: {error['msg']}"


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    request.app.state.metrics.rejected(status)
    return error_body(status, "; ".join(_describe(e) for e in errors)[:1000],
                      "malformed_json" if status == 400 else "validation_error")


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code >= 400:
        request.app.state.metrics.rejected(exc.status_code)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405 and (allowed := allowed_methods(request)):  # a path may have several routes
        headers = {"Allow": ", ".join(allowed)}
    return error_body(exc.status_code, str(exc.detail), HTTP_TYPES.get(exc.status_code, "http_error"), headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method the API documents at this request's path (its OpenAPI paths are the routes)."""
    path = request.url.path
    methods = set()
    for template, operations in request.app.openapi()["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def install(app: FastAPI) -> None:
    app.add_exception_handler(FewShotError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
