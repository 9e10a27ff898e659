"""One table from library errors to HTTP status, and the handlers that apply it."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fewshot.errors import (DimensionMismatch, EmptyGallery, FewShotError, FingerprintMismatch, ImageTooLarge,
                            InvalidImage, InvalidLabel, InvalidVector, LabelExists, Overloaded, UnknownGallery,
                            UnknownLabel)

log = logging.getLogger("fewshot.service")

STATUS: list[tuple[type[Exception], int]] = [  # first match wins: subclasses before their bases
    (ImageTooLarge, 413), (InvalidImage, 400), (DimensionMismatch, 400), (InvalidVector, 400),
    (InvalidLabel, 400), (FingerprintMismatch, 409), (LabelExists, 409), (UnknownGallery, 404),
    (UnknownLabel, 404), (EmptyGallery, 409), (Overloaded, 503), (ValueError, 400),
]


def error_body(status: int, message: str, kind: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            request.app.state.metrics.rejected(status)
            return error_body(status, str(exc), type(exc).__name__)
    return await internal_error(request, exc)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_body(500, "internal error; the details are in the server log", "InternalError")


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    request.app.state.metrics.rejected(422)
    parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
    return error_body(422, "; ".join(parts)[:1000], "ValidationError")


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code >= 400:
        request.app.state.metrics.rejected(exc.status_code)
    return error_body(exc.status_code, str(exc.detail), "HTTPError")


def install(app: FastAPI) -> None:
    app.add_exception_handler(FewShotError, domain_error)
    app.add_exception_handler(ValueError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
